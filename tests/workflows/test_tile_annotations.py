"""``wsi-mil tile --include-geojson/--exclude-geojson``: per-slide files, failures, ``run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from wsi_mil.outputs import read_manifest
from wsi_mil.tiling import open_tile_store
from wsi_mil.workflows.cli import main


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with three small synthetic slides a, b, c."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("ann-slides")
    for seed, name in enumerate("abc"):
        make_synthetic_slide(root / f"{name}.svs", 1200, 900, mpp=0.5, seed=seed + 1)
    return root


def _square(x0: int, y0: int, side: int) -> list[list[int]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def _export(path: Path, ring: list[list[int]]) -> None:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))


def test_bad_geojson_fails_only_its_slide(slides: Path, tmp_path: Path, capsys) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    _export(ann / "a.geojson", _square(0, 0, 1200))
    (ann / "b.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": ')
    out = tmp_path / "tiles"
    args = ["tile", str(slides), "--out", str(out), "--workers", "0", "--tile-px", "64",
            "--pixels", "none", "--no-qc", "--include-geojson", str(ann),
            "--include-class", "Tumor"]  # fmt: skip
    assert main(args) == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["a"]["status"] == "ok" and int(rows["a"]["n_tiles"]) > 0
    assert rows["b"]["status"] == "failed"
    assert "b.geojson: not valid JSON" in rows["b"]["error"]
    assert rows["c"]["status"] == "failed"  # include mode: no file for c
    assert "no annotation file for slide 'c'" in rows["c"]["error"]
    printed = capsys.readouterr().out
    assert "failed b:" in printed and "failed c:" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["include_geojson"] == str(ann.resolve()) and config["include_class"] == "Tumor"
    assert open_tile_store(out / "a.zarr").attrs["annotations"]["include"]["classes"] == ["Tumor"]
    # exclude mode: slides without a file are tiled as usual; a's region is cut out
    (ann / "b.geojson").unlink()
    excl = tmp_path / "excl"
    args = ["tile", str(slides), "--out", str(excl), "--workers", "0", "--tile-px", "64",
            "--pixels", "none", "--no-qc", "--exclude-geojson", str(ann)]  # fmt: skip
    assert main(args) == 0
    rows = {r["slide_id"]: r for r in read_manifest(excl / "manifest.csv")}
    assert rows["a"]["status"] == "ok" and int(rows["a"]["n_tiles"]) == 0
    assert all(int(rows[s]["n_tiles"]) > 0 for s in "bc")


def test_bad_annotation_arguments_exit_2(slides: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "o")
    one = tmp_path / "a.geojson"
    _export(one, _square(0, 0, 100))
    assert main(["tile", str(slides), "--out", out, "--include-geojson", str(one)]) == 2
    assert "one file for 3 slides" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert main(["tile", str(slides), "--out", out, "--exclude-geojson", missing]) == 2
    assert "--exclude-geojson" in capsys.readouterr().err
    assert main(["tile", str(slides), "--out", out, "--include-class", "Tumor"]) == 2
    assert "--include-class needs --include-geojson" in capsys.readouterr().err


def test_run_takes_the_options_and_resolves_paths_in_its_file(tmp_path: Path) -> None:
    from wsi_mil.workflows.commands.run import pipeline_steps
    from wsi_mil.workflows.config import load_config_file, resolve_config, run_options

    keys = {o.key: o for o in run_options()}
    assert keys["tile.include_geojson"].flag == "--include-geojson"
    assert keys["tile.exclude_class"].flag == "--exclude-class"
    config = tmp_path / "study.yaml"
    config.write_text("tile:\n  include_geojson: annotations\n  include_class: Tumor\n")
    values = load_config_file(config)
    assert values["tile.include_geojson"] == str(tmp_path / "annotations")
    ns = type("Args", (), {"config": config, "slides": "s", "cohort": "c.csv", "out": "o"})()
    resolved = resolve_config(ns)  # type: ignore[arg-type]
    resolved["task"], resolved["name"] = "survival", "x"
    tile = pipeline_steps(resolved, ["s/a.svs"], [], "c.csv")[0]
    assert tile[tile.index("--include-geojson") + 1] == str(tmp_path / "annotations")
    assert tile[tile.index("--include-class") + 1] == "Tumor"
