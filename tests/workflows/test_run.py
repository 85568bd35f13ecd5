"""``wsi-mil run`` end to end on tiny generated slides, and the demo data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from wsi_mil.outputs import read_manifest
from wsi_mil.workflows.cli import main
from wsi_mil.workflows.demo import make_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo"), n_patients=8, slide_px=1536, seed=1)


def test_demo_data_is_a_valid_cohort(demo):
    with open(demo.cohort, newline="") as fh:
        rows = list(csv.DictReader(fh))
    slides = {p.stem for p in demo.slides.glob("*.svs")}
    assert {r["slide_id"] for r in rows} == slides
    assert len({r["patient_id"] for r in rows}) == 8
    assert len(rows) == 11  # every third patient has two slides
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add((r["time"], r["event"], r["label"]))
    assert all(len(v) == 1 for v in by_patient.values())
    assert {r["event"] for r in rows} <= {"0", "1"} and "1" in {r["event"] for r in rows}
    assert {r["label"] for r in rows} == {"high", "low"}


def _blank_slide(path: Path) -> Path:
    """A white tiled TIFF with a resolution (no tissue)."""
    import tifffile

    tifffile.imwrite(
        path, np.full((384, 512, 3), 255, np.uint8), tile=(256, 256), photometric="rgb",
        compression="jpeg", resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """Eight tiny slides, a blank one and a corrupt one in the cohort (with an ``mpp``
    column set for s1), and a slide file that is not in the cohort."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("study")
    slides = root / "slides"
    slides.mkdir()
    rows = [["patient_id", "slide_id", "label", "mpp"]]
    for i in range(8):
        make_synthetic_slide(slides / f"s{i}.svs", 640, 480, seed=i, levels=1)
        rows.append([f"p{i}", f"s{i}", str(i % 2), "0.6" if i == 1 else ""])
    _blank_slide(slides / "blank.tif")
    (slides / "corrupt.svs").write_bytes(b"II*\x00 not a slide")
    shutil.copy(slides / "s0.svs", slides / "extra.svs")  # not in the cohort
    rows += [["p8", "blank", "1", ""], ["p9", "corrupt", "0", ""]]
    with open(root / "cohort.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return slides, root / "cohort.csv"


def test_run_leaves_out_failed_and_blank_slides_and_ignores_others(study, tmp_path, capsys):
    slides, cohort = study
    out = tmp_path / "out"
    argv = ["run", str(slides), str(cohort), "--out", str(out), "--tile-px", "32",
            "--workers", "1", "--no-qc", "--devices", "cpu", "--extract-workers", "0",
            "--folds", "2", "--steps", "4", "--warmup-steps", "1", "--eval-every", "2",
            "--n-boot", "5"]  # fmt: skip
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert printed.count("extra.svs") == 1 and "ignored 1 slide file(s)" in printed

    run_dir = out / "runs" / "abmil-classification"
    assert (run_dir / "fold_0" / "model.safetensors").is_file()
    assert (run_dir / "fold_1" / "model.safetensors").is_file()
    rows = read_manifest(out / "manifest.csv")
    by = {(r["slide_id"], r["stage"]): r for r in rows}
    assert by["extra.svs", "input"]["status"] == "ignored"
    assert (
        by["corrupt", "tile"]["status"] == "failed" and "corrupt" in by["corrupt", "tile"]["reason"]
    )
    assert by["corrupt", "extract"]["status"] == "excluded"
    assert by["corrupt", "train"]["status"] == "excluded"
    assert by["blank", "tile"]["status"] == "ok" and by["blank", "extract"]["status"] == "ok"
    assert (
        by["blank", "train"]["status"] == "excluded"
        and "no tissue" in by["blank", "train"]["reason"]
    )
    assert all(by[f"s{i}", "train"]["status"] == "ok" for i in range(8))
    assert not any(r["slide_id"] == "extra" for r in read_manifest(out / "tiles" / "manifest.csv"))

    from wsi_mil.tiling import open_tile_store

    assert open_tile_store(out / "tiles" / "s1.zarr").attrs["mpp"] == pytest.approx(0.6)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["steps"] == 4 and config["tile"]["tile_px"] == 32
    assert config["cohort"] == str(cohort) and config["task"] == "classification"
    log = (out / "run.log").read_text()
    assert "wsi-mil tile" in log and "wsi-mil train" in log and "corrupt" in log

    # a re-run from the resolved config resumes: everything skipped, same exit status
    assert main(["run", "--config", str(out / "config.yaml")]) == 1
    tiles = {r["slide_id"]: r["status"] for r in read_manifest(out / "tiles" / "manifest.csv")}
    assert tiles["corrupt"] == "failed"
    assert {s for k, s in tiles.items() if k != "corrupt"} == {"skipped"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["excluded_empty_slides"] == ["blank"]


def test_run_reports_unreadable_cohort(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    code = main(["run", str(slides), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.csv" in capsys.readouterr().err
