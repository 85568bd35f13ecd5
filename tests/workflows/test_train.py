"""`wsi-mil train` and `wsi-mil predict` end to end on tiny generated bags."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

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
        "--epochs",
        "2",
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
    assert (tmp_path / "pred" / "attention").is_dir()
    assert json.loads(out.with_suffix(".metrics.json").read_text())["n_patients"] == 10


def test_user_errors_exit_2(cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    assert main(_train_args(cohort, run, "--folds", "20")) == 2
    assert "--folds 20" in capsys.readouterr().err
    assert main(_train_args(cohort, run, "--epochs", "1", "--folds", "2")) == 0
    capsys.readouterr()
    assert main(_train_args(cohort, run, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "pick a new --out" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,slide_id,label\nP1,missing_slide,1\n")
    args = _train_args(cohort, tmp_path / "r2")
    args[1] = str(bad)
    assert main(args) == 2
    assert f"{bad}:2: slide_id: no feature bag" in capsys.readouterr().err
