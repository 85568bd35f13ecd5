"""``wsi-mil run`` and the demo data, end to end on a tiny generated cohort."""

from __future__ import annotations

import csv
import json

import pytest

from wsi_mil.outputs import read_manifest
from wsi_mil.workflows.cli import build_parser, main
from wsi_mil.workflows.commands.run import pipeline_steps
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


def test_pipeline_steps_chain_the_stage_folders(tmp_path, demo):
    args = build_parser().parse_args(
        ["run", str(demo.slides), str(demo.cohort), "--out", str(tmp_path), "--folds", "2"]
    )
    tile, extract, train = pipeline_steps(args)
    assert tile[:2] == ["tile", str(demo.slides)]
    assert extract[1] == str(tmp_path / "tiles")
    assert train[train.index("--features") + 1] == str(tmp_path / "features" / "builtin")
    assert train[train.index("--task") + 1] == "survival"  # cohort has time + event


def test_run_end_to_end_lists_bad_slide_and_resumes(tmp_path, demo, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    for p in demo.slides.glob("*.svs"):
        (slides / p.name).symlink_to(p)
    (slides / "broken.svs").write_text("not a slide")
    out = tmp_path / "out"
    argv = ["run", str(slides), str(demo.cohort), "--out", str(out), "--folds", "2",
            "--steps", "8", "--workers", "1"]  # fmt: skip
    assert main(argv) == 1  # one slide failed, the rest went on

    manifest = {r["slide_id"]: r for r in read_manifest(out / "tiles" / "manifest.csv")}
    assert manifest["broken"]["status"] == "failed"
    assert "broken.svs" in manifest["broken"]["error"]
    assert sum(r["status"] == "ok" for r in manifest.values()) == 11
    run_dir = out / "runs" / "abmil-survival"
    for name in ("config.yaml", "splits.json", "predictions.csv", "metrics.json", "report.html"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "fold_0" / "model.safetensors").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "pooled" in metrics
    assert (out / "run_config.yaml").is_file()

    capsys.readouterr()
    assert main(argv) == 1  # second run: everything complete is skipped
    manifest = read_manifest(out / "tiles" / "manifest.csv")
    assert {r["status"] for r in manifest if r["slide_id"] != "broken"} == {"skipped"}


def test_run_reports_unreadable_cohort(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    code = main(["run", str(slides), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.csv" in capsys.readouterr().err
