"""`wsi-mil train` and `wsi-mil predict` end to end on tiny generated bags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.workflows.cli import main


@pytest.fixture
def cohort(tmp_path: Path):
    return make_synthetic_cohort(
        tmp_path / "data", n_patients=10, slides_per_patient=(1, 2), n_tiles=(10, 20), dims=(8, 4)
    )


def _train_args(cohort, out: Path, *extra: str) -> list[str]:
    feats = [a for d in cohort.features_dirs for a in ("--features", str(d))]
    return [
        "train",
        str(cohort.cohort_csv),
        *feats,
        "--task",
        "classification",
        "--model",
        "abmil",
        "--folds",
        "2",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--max-tiles",
        "16",
        "--n-boot",
        "10",
        "--model-kwargs",
        '{"hidden_dim": 16, "attn_dim": 8}',
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_train_then_predict(cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "demo"
    assert main(_train_args(cohort, run)) == 0
    assert "out-of-fold auc" in capsys.readouterr().out
    for name in (
        "config.yaml",
        "splits.json",
        "predictions.csv",
        "metrics.json",
        "fold_0/model.safetensors",
        "fold_1/fold.json",
    ):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert len(config["features"]) == 2 and config["max_tiles"] == 16
    assert len(list((run / "attention").glob("*.h5"))) == len(cohort.planted)
    assert main(_train_args(cohort, run)) == 0  # same options: resumes, trains nothing
    assert "resumed folds [0, 1]" in capsys.readouterr().out
    feats = [a for d in cohort.features_dirs for a in ("--features", str(d))]
    out = tmp_path / "pred" / "preds.csv"
    assert (
        main(
            [
                "predict",
                str(run),
                *feats,
                "--cohort",
                str(cohort.cohort_csv),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert len(table) == 10 and {"prob_0", "prob_1", "label"} <= set(table.columns)
    assert (tmp_path / "pred" / "preds_attention").is_dir()  # the prediction's own folder
    # the training cohort: every patient seen in training, so no metrics by default
    assert table["seen_in_training"].all() and not out.with_suffix(".metrics.json").exists()
    assert "all 10 labelled patient(s) were seen in training" in capsys.readouterr().err
    predict = ["predict", str(run), *feats, "--cohort", str(cohort.cohort_csv), "--out", str(out)]
    assert main([*predict, "--device", "cpu", "--allow-in-sample"]) == 0
    assert "10 of 10 patient(s) were seen in training and are INCLUDED" in capsys.readouterr().err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n_patients"] == 10 and metrics["in_sample"] is True


def test_weighted_cox_repeats_and_search_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=12, slides_per_patient=(1, 2),
        n_tiles=(5, 10), dims=(8,),
    )  # fmt: skip
    table = pd.read_csv(syn.cohort_csv)
    table["w"] = table["patient_id"].str[1:].astype(int) % 3 + 1
    table.to_csv(syn.cohort_csv, index=False)
    extra = ["--level", "slide", "--event-weight", "2", "--weight-column", "w", "--repeats",
             "2", "--search", "lr=1e-3,3e-3", "dropout=0.0,0.2", "--batch-size", "4"]  # fmt: skip

    def survival_args(out: Path) -> list[str]:
        args = _train_args(syn, out, *extra)
        args[args.index("classification")] = "survival"
        return args

    args = survival_args(tmp_path / "run")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "out-of-fold harrell_c over 2 repeats:" in printed and "(SD)" in printed
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["event_weight"] == 2.0 and config["weight_column"] == "w"
    assert config["repeats"] == 2 and config["level"] == "slide"
    assert config["search"] == {"lr": [1e-3, 3e-3], "dropout": [0.0, 0.2]}
    fold = json.loads((run / "repeat_1" / "fold_0" / "fold.json").read_text())
    assert fold["head"]["event_weight"] == 2.0 and len(fold["search"]["candidates"]) == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["repeats"]["pooled"]["harrell_c"]["values"]) == 2
    assert set(metrics["search"]["chosen"]) == {"fold_0", "fold_1", "repeat_1/fold_0",
                                                "repeat_1/fold_1"}  # fmt: skip
    bad = _train_args(syn, tmp_path / "r2", "--weight-column", "w")
    assert main(bad) == 2
    assert "--event-weight and --weight-column weight the Cox loss" in capsys.readouterr().err
    table.loc[3, "w"] = -1
    table.to_csv(syn.cohort_csv, index=False)
    assert main(survival_args(tmp_path / "r3")) == 2
    assert f"{syn.cohort_csv}:5: w: weight '-1' must be a finite number >= 0" in (
        capsys.readouterr().err
    )


def test_user_errors_exit_2(cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    assert main(_train_args(cohort, run, "--folds", "20")) == 2
    assert "--folds 20" in capsys.readouterr().err
    assert main(_train_args(cohort, run, "--steps", "4", "--folds", "2")) == 0
    capsys.readouterr()
    assert main(_train_args(cohort, run, "--steps", "12")) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "pick a new --out" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,slide_id,label\nP1,missing_slide,1\n")
    args = _train_args(cohort, tmp_path / "r2")
    args[1] = str(bad)
    assert main(args) == 2
    assert f"{bad}:2: slide_id: no feature bag" in capsys.readouterr().err
    # a bad model option is refused before the run folder exists, so fixing it just works
    fresh = tmp_path / "r3"
    assert main(_train_args(cohort, fresh, "--model-kwargs", '{"bogus": 1}')) == 2
    assert "has no option(s) ['bogus']" in capsys.readouterr().err and not fresh.exists()
    assert main(_train_args(cohort, fresh, "--model", "nope")) == 2
    assert "unknown aggregator 'nope'" in capsys.readouterr().err and not fresh.exists()
    assert main(_train_args(cohort, fresh, "--steps", "4")) == 0
    assert yaml.safe_load((fresh / "config.yaml").read_text())["device"] == "cpu"


def _fold_complete(fold: Path) -> bool:
    return all((fold / n).is_file() for n in ("model.safetensors", "fold.json", "predictions.csv"))


def test_sigkill_mid_fold_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    syn = make_synthetic_cohort(tmp_path / "d", n_patients=8, n_tiles=(10, 20), dims=(8,))
    run = tmp_path / "run"
    args = _train_args(syn, run, "--steps", "400", "--patience", "400")
    code = "import sys; from wsi_mil.workflows.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "fold_0").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "fold 0 never finished"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid fold 1: no clean-up handler can run
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert _fold_complete(run / "fold_0") and load_file(run / "fold_0" / "model.safetensors")
    assert not (run / "fold_1").exists()  # nothing half-written at a final path
    assert not (run / "predictions.csv").exists() and not (run / "metrics.json").exists()
    splits = (run / "splits.json").read_text()
    assert main(args) == 0  # the same command resumes
    assert "resumed folds [0]" in capsys.readouterr().out
    assert _fold_complete(run / "fold_1") and (run / "splits.json").read_text() == splits
    assert not list(run.rglob("*.tmp"))
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns) == ["patient_id", "fold", "split", "label", "prob_0", "prob_1"]


def test_empty_bags_counted_predict_soup_and_without_cohort(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", n_patients=8, n_tiles=(10, 20), dims=(8, 4), empty_slides=1
    )
    run = tmp_path / "run"
    assert main(_train_args(syn, run, "--level", "slide")) == 0
    out = capsys.readouterr().out
    empty = next(s for s in syn.planted if "_E" in s)
    assert f"excluded 1 slide(s) with empty bags: {empty}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_excluded_empty_slides"] == 1
    assert set(metrics["folds"]) == {"0", "1"} and metrics["pooled"]["auc"]["ci_low"] is not None
    feats = [a for d in syn.features_dirs for a in ("--features", str(d))]
    for extra, name in (([], "bags"), (["--soup", "--cohort", str(syn.cohort_csv)], "soup")):
        dest = tmp_path / name / "p.csv"
        assert main(["predict", str(run), *feats, "--out", str(dest), *extra]) == 0
        printed = capsys.readouterr().out
        assert f"excluded 1 slide(s) with empty bags: {empty}" in printed
        table = pd.read_csv(dest, dtype={"patient_id": str})
        options = yaml.safe_load(dest.with_suffix(".yaml").read_text())
        assert options["soup"] is (name == "soup")
        atts = {p.stem for p in (tmp_path / name / "p_attention").glob("*.h5")}
        assert atts == {s for s in syn.planted if s != empty}
        if name == "bags":  # one row per non-empty bag, no targets
            assert len(table) == len(syn.planted) - 1 and "label" not in table.columns
        else:
            assert len(table) == 8 and "label" in table.columns
