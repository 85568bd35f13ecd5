"""External validation: training cut-offs carried over, bag and modality refusals,
reports on external predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from wsi_mil.errors import BagMismatchError, MissingModalityError
from wsi_mil.mil.predict import predict_cohort
from wsi_mil.mil.synthetic import SyntheticCohort, make_synthetic_cohort
from wsi_mil.mil.train import train_cv
from wsi_mil.mil.validate import validate_external
from wsi_mil.workflows.cli import main

from .conftest import small_config

N_TRAIN = 26


@pytest.fixture(scope="module")
def held_apart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A survival run on 26 patients, and a cohort B of the 14 others plus 2 of the run's
    patients, with an ``age`` column."""
    root = tmp_path_factory.mktemp("extval")
    syn = make_synthetic_cohort(
        root / "data",
        task="survival",
        n_patients=40,
        n_tiles=(20, 40),
        dims=(16,),
        planted_fraction=(0.0, 0.3),
        seed=3,
    )
    table = pd.read_csv(syn.cohort_csv, dtype={"patient_id": str})
    ids = sorted(table["patient_id"].unique())
    rng = np.random.default_rng(0)
    table["age"] = rng.integers(40, 80, len(table))
    train_ids, ext_ids = ids[:N_TRAIN], ids[N_TRAIN:]
    train_csv, ext_csv = root / "train.csv", root / "B.csv"
    table[table["patient_id"].isin(train_ids)].to_csv(train_csv, index=False)
    table[table["patient_id"].isin([*ext_ids, *train_ids[:2]])].to_csv(ext_csv, index=False)
    config = small_config(
        syn,
        "survival",
        cohort=str(train_csv),
        steps=40,
        eval_every=20,
        patience=40,
        warmup_steps=5,
        max_tiles=48,
        n_boot=20,
    )
    run = root / "run"
    train_cv(config, run)
    return {
        "root": root,
        "syn": syn,
        "run": run,
        "cohort": ext_csv,
        "ext": ext_ids,
        "seen": train_ids[:2],
    }


def _copy_bags(syn: SyntheticCohort, dest: Path, **attrs: Any) -> Path:
    """The bags in a new folder; ``attrs`` overwrite the first bag's file attributes."""
    shutil.copytree(syn.features_dirs[0], dest)
    first = sorted(dest.glob("*.h5"))[0]
    with h5py.File(first, "r+") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = value
    return first


def test_external_report_uses_the_training_cutoffs(held_apart: dict, tmp_path: Path) -> None:
    run = held_apart["run"]
    res = validate_external(
        run,
        held_apart["syn"].features_dirs,
        held_apart["cohort"],
        tmp_path / "val",
        covariates=["age"],
        n_bootstrap=20,
        device="cpu",
    )
    data = json.loads(res.report.json.read_text())
    # recompute the run's cut-offs from its training predictions
    train = pd.read_csv(run / "predictions.csv")
    train = train[train["split"] == "train"]
    per_fold = {str(k): float(np.median(g["risk"])) for k, g in train.groupby("fold")}
    expected = float(np.mean(list(per_fold.values())))
    strat = data["stratification"]
    assert strat["cutoffs"]["ensemble"] == pytest.approx([expected])
    assert {k: v[0] for k, v in strat["cutoffs"].items() if k != "ensemble"} == pytest.approx(
        per_fold
    )
    assert data["external"]["cutoffs"] == pytest.approx([expected])
    # ...and that they are the ones that made the groups of the external patients
    preds = pd.read_csv(res.folder / "predictions.csv", dtype={"patient_id": str})
    external = preds[~preds["seen_in_training"]]
    assert sorted(external["patient_id"]) == held_apart["ext"]
    n_high = int((external["risk"] > expected).sum())
    groups = {g["label"]: g["n"] for g in strat["groups"]}
    assert groups.get("high", 0) == n_high
    assert groups.get("low", 0) == len(external) - n_high
    # the run's tau, the seen patients left out, clinical columns joined
    assert data["tau"] == pytest.approx(json.loads((run / "metrics.json").read_text())["tau"])
    assert data["external"]["excluded_seen_in_training"] == 2
    assert sorted(res.excluded_seen) == held_apart["seen"]
    assert data["input"]["rows"] == len(held_apart["ext"])
    assert "age" in preds.columns
    assert any(r["variable"] == "age" for r in data["hazard_ratios"]["rows"])
    assert data["concordance"]["pooled"]["harrell"]["estimate"] is not None
    assert data["brier"].get("ibs") is not None, data["brier"]
    assert data["calibration"].get("groups"), data["calibration"]
    metrics = json.loads((res.folder / "predictions.metrics.json").read_text())
    assert metrics["seen_in_training"] == "excluded"
    assert (res.folder / "validate_config.yaml").is_file()
    assert (res.folder / "report.html").is_file()


def test_validate_refuses_a_cohort_of_training_patients(held_apart: dict, tmp_path: Path) -> None:
    rc = main(
        [
            "validate",
            str(held_apart["run"]),
            "--features",
            str(held_apart["syn"].features_dirs[0]),
            "--cohort",
            str(held_apart["root"] / "train.csv"),
            "--out",
            str(tmp_path / "v"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    assert not (tmp_path / "v" / "predictions.csv").exists()


def test_report_on_external_predictions(held_apart: dict, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "preds.csv"
    predict_cohort(
        held_apart["run"],
        held_apart["syn"].features_dirs,
        out=out,
        cohort=held_apart["cohort"],
        device="cpu",
        n_boot=10,
    )
    assert "fold" not in pd.read_csv(out).columns
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--bootstrap", "10"]) == 0
    text = capsys.readouterr().out
    assert "not computed" in text and "--run" in text
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["external"]["run"] is None
    assert data["stratification"]["groups"] == []
    assert data["concordance"]["pooled"]["harrell"]["estimate"] is not None
    # with the run: the training cut-offs; no per-fold columns, so no Brier score
    args = ["report", str(out), "--out", str(tmp_path / "r2"), "--bootstrap", "10"]
    assert main([*args, "--run", str(held_apart["run"]), "--covariates", "age"]) == 0
    data = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert data["stratification"]["groups"]
    assert "linear_predictor_fold_0" in data["brier"]["note"]


@pytest.mark.parametrize(
    ("attrs", "named"),
    [({"target_mpp": 1.0}, "target_mpp 1.0"), ({"encoder": "uni"}, "encoder 'uni'")],
)
def test_bags_made_otherwise_are_refused(
    held_apart: dict, tmp_path: Path, capsys: Any, attrs: dict, named: str
) -> None:
    bag = _copy_bags(held_apart["syn"], tmp_path / "enc0", **attrs)
    cmd = ["predict", str(held_apart["run"]), "--features", str(tmp_path / "enc0")]
    cmd += ["--out", str(tmp_path / "p.csv"), "--device", "cpu"]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert str(bag) in err and named in err and "--allow-mismatch" in err
    assert "the run's" in err and ("0.5" in err or "'enc0'" in err)
    assert not (tmp_path / "p.csv").exists()
    assert main([*cmd, "--allow-mismatch"]) == 0
    options = (tmp_path / "p.yaml").read_text()
    assert "allow_mismatch: true" in options and named.split()[0] in options


def test_runs_without_recorded_bags_check_the_training_bags(
    held_apart: dict, tmp_path: Path
) -> None:
    run = tmp_path / "old_run"
    shutil.copytree(held_apart["run"], run)
    for fold_json in run.glob("fold_*/fold.json"):
        meta = json.loads(fold_json.read_text())
        assert meta["bags"][0]["target_mpp"] == 0.5
        del meta["bags"]
        fold_json.write_text(json.dumps(meta))
    _copy_bags(held_apart["syn"], tmp_path / "enc0", target_mpp=0.25)
    with pytest.raises(BagMismatchError, match=r"target_mpp 0\.25"):
        predict_cohort(run, [tmp_path / "enc0"], out=tmp_path / "p.csv", device="cpu")


def test_fusion_model_without_omics_is_refused(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=12, n_tiles=(10, 20), dims=(8,), seed=4
    )
    ids = sorted(pd.read_csv(syn.cohort_csv, dtype={"patient_id": str})["patient_id"].unique())
    rng = np.random.default_rng(0)
    omics = pd.DataFrame(rng.standard_normal((len(ids), 4)), columns=[f"g{i}" for i in range(4)])
    omics.insert(0, "patient_id", ids)
    omics.to_csv(tmp_path / "omics.csv", index=False)
    config = small_config(
        syn,
        "survival",
        model="dual_xattn",
        model_kwargs={},
        omics=str(tmp_path / "omics.csv"),
        folds=2,
        steps=4,
        eval_every=2,
        patience=4,
        warmup_steps=1,
        max_tiles=16,
        n_boot=0,
    )
    run = tmp_path / "run"
    train_cv(config, run)
    with pytest.raises(MissingModalityError, match=r"omics.*--mask-missing-modalities"):
        predict_cohort(run, syn.features_dirs, out=tmp_path / "p.csv", device="cpu")
    assert not (tmp_path / "p.csv").exists()
    preds = predict_cohort(
        run, syn.features_dirs, out=tmp_path / "p.csv", device="cpu", mask_missing_modalities=True
    )
    assert np.isfinite(preds["risk"]).all()
    assert "masked_modalities:\n- omics" in (tmp_path / "p.yaml").read_text()
    ok = predict_cohort(
        run, syn.features_dirs, out=tmp_path / "q.csv", omics=tmp_path / "omics.csv", device="cpu"
    )
    assert len(ok) == len(ids)
