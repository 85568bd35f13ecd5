"""``wsi-mil info``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsi_mil.workflows.cli import main
from wsi_mil.wsi import make_synthetic_slide

REAL_SLIDE = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REAL_SLIDE = REAL_SLIDE / "CMU-1-Small-Region.svs"


@pytest.mark.real_slide
@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_real_slide_json(capsys: pytest.CaptureFixture[str], backend: str) -> None:
    if not REAL_SLIDE.exists():
        pytest.skip(f"real slide not found at {REAL_SLIDE}")
    assert main(["info", str(REAL_SLIDE), "--json", "--backend", backend]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["mpp"] == pytest.approx(0.499)
    assert info["vendor"] == "aperio"
    assert info["backend"] == ("openslide" if backend == "auto" else backend)
    assert info["objective_power"] == 20
    assert info["levels"] == [
        {"level": 0, "width": 2220, "height": 2967, "downsample": 1.0, "mpp": 0.499}
    ]


def test_synthetic_slide_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_synthetic_slide(tmp_path / "s.svs", 2048, 1024, mpp=0.25, levels=2).path
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2048 x 1024 px" in out
    assert "0.25 µm/px" in out and "aperio" in out and "openslide" in out and "40x" in out
    assert "downsample 4" in out and "512 x 256" in out


def test_json_keys_and_mpp_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_synthetic_slide(tmp_path / "n.tif", 512, 256, mpp=None, flavour="generic").path
    assert main(["info", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "--mpp" in err and str(path) in err
    assert main(["info", str(path), "--json", "--mpp", "0.5", "--backend", "tiffslide"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"width", "height", "levels", "mpp", "vendor", "backend"} <= set(info)
    assert info["mpp"] == 0.5 and info["mpp_source"] == "explicit"
    assert info["backend"] == "tiffslide" and info["associated_images"] == []


def test_missing_file_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no such file" in err
