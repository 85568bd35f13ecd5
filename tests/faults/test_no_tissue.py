"""Fault matrix, a blank slide: tile → extract → train finishes with the slide excluded.

A slide without tissue gets an empty store (tile: ok, "no tissue found"), an empty bag
(extract: ok, "no tissue", features (0, D)), and training leaves it out and counts it
in ``metrics.json`` instead of refusing the cohort.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.bags import bag_info, read_bag
from wsi_mil.outputs import read_manifest
from wsi_mil.workflows.cli import main


def _blank_slide(path: Path, mpp: float = 0.5) -> Path:
    """A 512 x 384 white tiled TIFF with a resolution (no tissue at all)."""
    import tifffile

    tifffile.imwrite(
        path, np.full((384, 512, 3), 255, np.uint8), tile=(256, 256), photometric="rgb",
        compression="jpeg", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def cohort_with_blank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eight tiny (640 x 480) synthetic slides (one per patient, labels 0/1) and a blank
    one of a ninth patient; returns ``(slides folder, cohort.csv)``."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("no_tissue")
    slides = root / "slides"
    slides.mkdir()
    rows = [["patient_id", "slide_id", "label"]]
    for i in range(8):
        make_synthetic_slide(slides / f"s{i}.svs", 640, 480, seed=i, levels=1)
        rows.append([f"p{i}", f"s{i}", str(i % 2)])
    _blank_slide(slides / "blank.tif")
    rows.append(["p8", "blank", "1"])
    with open(root / "cohort.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return slides, root / "cohort.csv"


def test_blank_slide_goes_through_tile_extract_train(
    cohort_with_blank: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    slides, cohort = cohort_with_blank
    tiles, features, run = tmp_path / "tiles", tmp_path / "features", tmp_path / "run"
    tile = ["tile", str(slides), "--out", str(tiles), "--tile-px", "32", "--workers", "2"]
    assert main([*tile, "--no-qc"]) == 0
    row = {r["slide_id"]: r for r in read_manifest(tiles / "manifest.csv")}["blank"]
    assert row["status"] == "ok" and row["n_tiles"] == "0" and "no tissue" in row["message"]

    extract = ["extract", str(tiles), "--out", str(features), "--devices", "cpu"]
    assert main([*extract, "--workers", "0", "--no-progress"]) == 0
    rows = {r["slide_id"]: r for r in read_manifest(features / "builtin" / "manifest.csv")}
    assert rows["blank"]["status"] == "ok" and rows["blank"]["message"] == "no tissue"
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == 9
    empty = read_bag(features / "builtin" / "blank.h5")
    full = bag_info(features / "builtin" / "s0.h5")
    assert empty.features.shape == (0, full["dim"]) and empty.coords.shape == (0, 2)
    assert empty.attrs["encoder"] == "builtin" and empty.attrs["slide_id"] == "blank"
    assert empty.attrs["store_fingerprint"] and empty.attrs["tile_px"] == 32

    # a re-run skips the empty bag like any other up-to-date bag
    assert main([*extract, "--workers", "0", "--no-progress"]) == 0
    rows = {r["slide_id"]: r for r in read_manifest(features / "builtin" / "manifest.csv")}
    assert rows["blank"]["status"] == "skipped"
    assert rows["blank"]["message"] == "up to date; no tissue"

    train = ["train", str(cohort), "--features", str(features / "builtin"), "--task"]
    train += ["classification", "--folds", "2", "--steps", "4", "--warmup-steps", "1"]
    train += ["--eval-every", "2", "--n-boot", "5", "--out", str(run)]
    capsys.readouterr()
    assert main(train) == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["excluded_empty_slides"] == ["blank"]
    assert metrics["n_excluded_empty_slides"] == 1
    assert "excluded 1 slide(s) with empty bags: blank" in capsys.readouterr().out
