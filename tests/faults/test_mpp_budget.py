"""Resolution overrides are range-checked and masking has a pixel budget.

Rows of the fault matrix: ``--mpp 500`` was accepted and tried to allocate 25 GiB; a
200k x 200k single-level slide decoded for minutes instead of being refused.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from wsi_mil.errors import ConfigError, SlideTooLargeError
from wsi_mil.outputs import read_manifest
from wsi_mil.tiling import tissue
from wsi_mil.tiling.tissue import MASK_PIXEL_BUDGET, check_mask_budget
from wsi_mil.workflows.cli import main
from wsi_mil.wsi import open_slide
from wsi_mil.wsi.mpp import resolve_mpp


@pytest.mark.parametrize("value", ["500", "0.01", "nan", "-1"])
def test_tile_refuses_mpp_out_of_range(small_slides, tmp_path: Path, value: str, capsys) -> None:
    out = tmp_path / "tiles"
    code = main(["tile", str(small_slides["small"]), "--out", str(out), "--mpp", value])
    err = capsys.readouterr().err
    assert code == 2 and f"--mpp={float(value)!r}" in err and "0.05-20 µm/px" in err
    assert not out.exists()


def test_tile_refuses_mpp_csv_row_out_of_range(small_slides, tmp_path: Path, capsys) -> None:
    table = tmp_path / "mpp.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "mpp"], ["other", "0.25"], ["small", "500"]])
    out = tmp_path / "tiles"
    code = main(["tile", str(small_slides["small"]), "--out", str(out), "--mpp-csv", str(table)])
    err = capsys.readouterr().err
    assert code == 2 and "row 3" in err and "'500'" in err and "'small'" in err
    assert "0.05-20 µm/px" in err and not out.exists()


def test_explicit_mpp_is_range_checked(small_slides) -> None:
    assert resolve_mpp("x", {}, 20.0).value == 20.0
    assert resolve_mpp("x", {}, 0.05).value == 0.05
    for bad in (20.5, 0.04, 500):
        with pytest.raises(ConfigError, match=rf"--mpp {bad!r} for x: .*0\.05-20 µm/px"):
            resolve_mpp("x", {}, bad)
    with pytest.raises(ConfigError, match="--mpp 500"):
        open_slide(small_slides["small"], mpp=500)


def _fake_slide(width: int, height: int, levels: list[tuple[int, int]]) -> SimpleNamespace:
    downsamples = [width / w for w, _ in levels]

    def best_level_for_mpp(target: float) -> int:
        ok = [i for i, d in enumerate(downsamples) if 0.25 * d <= target * (1 + 1e-3)]
        return max(ok, key=lambda i: downsamples[i]) if ok else 0

    return SimpleNamespace(
        path=Path("huge.tif"),
        dimensions=(width, height),
        mpp=0.25,
        level_dimensions=levels,
        best_level_for_mpp=best_level_for_mpp,
    )


def test_budget_refuses_a_huge_single_level_slide_at_once() -> None:
    huge = _fake_slide(200_000, 200_000, [(200_000, 200_000)])
    with pytest.raises(SlideTooLargeError) as info:
        check_mask_budget(huge, 8.0)
    message = str(info.value)
    assert "huge.tif" in message and "40,000,000,000 pixels" in message
    assert f"{MASK_PIXEL_BUDGET:,}" in message and "pyramidal TIFF" in message
    pyramid = [(200_000, 100_000), (50_000, 25_000), (12_500, 6_250)]
    check_mask_budget(_fake_slide(200_000, 100_000, pyramid), 8.0)  # a real pyramid fits


def test_budget_counts_an_upsampled_thumbnail() -> None:
    slide = _fake_slide(40_000, 40_000, [(40_000, 40_000), (10_000, 10_000)])
    check_mask_budget(slide, 8.0)
    with pytest.raises(SlideTooLargeError, match=r"thumbnail.*check --mpp"):
        check_mask_budget(slide, 0.125)  # 2x finer than level 0


def test_tile_fails_the_over_budget_slide_only(small_slides, tmp_path: Path, monkeypatch,
                                              capsys) -> None:  # fmt: skip
    budget = 500_000  # between small (196,608 px) and large (786,432 px)
    monkeypatch.setattr(tissue, "MASK_PIXEL_BUDGET", budget)
    out = tmp_path / "tiles"
    # --workers 0: in this process, where the budget is patched
    code = main(["tile", str(small_slides["small"]), str(small_slides["large"]), "--out",
                 str(out), "--mask-mpp", "0.5", "--pixels", "none", "--no-qc", "--workers",
                 "0"])  # fmt: skip
    assert code == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["small"]["status"] == "ok"
    assert rows["large"]["status"] == "failed"
    assert "SlideTooLargeError" in rows["large"]["error"]
    assert "786,432 pixels" in rows["large"]["error"] and "500,000" in rows["large"]["error"]
    assert (out / "small.zarr").exists() and not (out / "large.zarr").exists()
    assert "failed large" in capsys.readouterr().out
