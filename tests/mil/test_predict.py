"""Inference with the fold ensemble and the weight soup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from wsi_mil.errors import ConfigError
from wsi_mil.features.bags import BagError
from wsi_mil.mil.attention import read_attention
from wsi_mil.mil.predict import load_ensemble, predict_cohort, uniform_soup


def test_ensemble_predicts_new_bags_with_attention(classification_run: Any, tmp_path: Path) -> None:
    run, syn = classification_run.result.out, classification_run.syn
    out = tmp_path / "preds.csv"
    table = predict_cohort(run, syn.features_dirs, out=out, n_boot=20)
    assert len(table) == len(syn.planted)  # one patient per bag without a cohort
    assert {"patient_id", "prob_0", "prob_1", "pred"} <= set(table.columns)
    assert "label" not in table.columns
    np.testing.assert_allclose(table[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-6)
    sid = next(s for s, m in syn.planted.items() if m.any())
    att = read_attention(tmp_path / "preds_attention" / f"{sid}.h5")
    assert att.attrs["source"] == "ensemble" and att.attention.shape == syn.planted[sid].shape
    options = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert options["folds"] == [0, 1, 2] and options["soup"] is False


def test_ensemble_is_the_mean_of_fold_outputs(classification_run: Any, tmp_path: Path) -> None:
    run, syn = classification_run.result.out, classification_run.syn
    table = predict_cohort(
        run,
        syn.features_dirs,
        cohort=syn.cohort_csv,
        out=tmp_path / "p.csv",
        n_boot=20,
        allow_in_sample=True,
    )
    assert "label" in table.columns
    oof = classification_run.result.predictions
    # each fold's own predictions of its training patients are in predictions.csv
    train_rows = oof[oof["split"] == "train"].groupby("patient_id")["prob_1"].agg(["mean", "count"])
    test_rows = oof[oof["split"] == "test"].set_index("patient_id")["prob_1"]
    expected = (train_rows["mean"] * train_rows["count"] + test_rows) / (train_rows["count"] + 1)
    got = table.set_index("patient_id")["prob_1"]
    # on a GPU both passes run under bf16 autocast, batched differently: ~1e-3 apart
    atol = 2e-3 if torch.cuda.is_available() else 1e-5
    np.testing.assert_allclose(got.loc[expected.index], expected, atol=atol)
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["auc"]["value"] > 0.9
    assert metrics["in_sample"] is True and metrics["n_seen_in_training"] == len(table)


def test_training_cohort_is_flagged_and_gets_no_metrics(
    classification_run: Any, tmp_path: Path
) -> None:
    """Every patient of the training cohort was in some fold's training set: all are
    flagged, and by default no metrics are written (none are out of sample)."""
    run, syn = classification_run.result.out, classification_run.syn
    out = tmp_path / "p.csv"
    out.with_suffix(".metrics.json").write_text("{}")  # a stale file of an earlier call
    table = predict_cohort(run, syn.features_dirs, cohort=syn.cohort_csv, out=out, n_boot=5)
    assert table["seen_in_training"].all() and table.attrs["n_seen_in_training"] == len(table)
    assert not out.with_suffix(".metrics.json").exists()
    assert "all 30 labelled patient(s) were seen in training" in table.attrs["metrics_note"]
    assert pd.read_csv(out)["seen_in_training"].all()
    # without a cohort, bags are matched to the training slides by slide id
    bags = predict_cohort(run, syn.features_dirs, out=tmp_path / "b.csv")
    assert bags["seen_in_training"].all()


def test_patients_seen_in_training_are_left_out_of_the_metrics(
    classification_run: Any, tmp_path: Path
) -> None:
    run, syn = classification_run.result.out, classification_run.syn
    cohort = pd.read_csv(syn.cohort_csv, dtype=str)
    feats = tmp_path / "feats"
    feats.mkdir()
    rows = []
    for i, row in enumerate(cohort.head(20).itertuples()):
        new = i >= 8  # 8 training patients, 12 new ids (copies of other bags)
        sid = f"new{i}" if new else row.slide_id
        shutil.copy(syn.features_dirs[0] / f"{row.slide_id}.h5", feats / f"{sid}.h5")
        rows.append({"patient_id": f"N{i}" if new else row.patient_id, "slide_id": sid,
                     "label": row.label})  # fmt: skip
    table_csv = tmp_path / "mixed.csv"
    pd.DataFrame(rows).to_csv(table_csv, index=False)
    out = tmp_path / "m.csv"
    table = predict_cohort(run, [feats], cohort=table_csv, out=out, n_boot=5)
    seen = table.set_index("patient_id")["seen_in_training"]
    assert seen.sum() == 8 and not seen[[f"N{i}" for i in range(8, 20)]].any()
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n_patients"] == 12 and metrics["in_sample"] is False
    assert metrics["n_seen_in_training"] == 8 and metrics["seen_in_training"] == "excluded"
    assert "8 of 20 patient(s) were seen in training" in table.attrs["metrics_note"]
    table = predict_cohort(run, [feats], cohort=table_csv, out=out, n_boot=5, allow_in_sample=True)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n_patients"] == 20 and metrics["in_sample"] is True


def test_uniform_soup(classification_run: Any, tmp_path: Path) -> None:
    ens = load_ensemble(classification_run.result.out)
    soup = uniform_soup(ens.folds)
    for name, tensor in soup.model.state_dict().items():
        mean = sum(fm.model.state_dict()[name].float() for fm in ens.folds) / len(ens.folds)
        np.testing.assert_allclose(tensor.float().numpy(), mean.numpy(), rtol=1e-5, atol=1e-6)
    table = predict_cohort(
        classification_run.result.out,
        classification_run.syn.features_dirs,
        out=tmp_path / "soup.csv",
        soup=True,
    )
    assert table["prob_1"].between(0, 1).all()


def test_predict_refuses_mismatched_features(classification_run: Any, tmp_path: Path) -> None:
    run, syn = classification_run.result.out, classification_run.syn
    with pytest.raises(ConfigError, match="trained on 1 feature folder"):
        predict_cohort(run, [*syn.features_dirs, *syn.features_dirs], out=tmp_path / "x.csv")
    from wsi_mil.mil.synthetic import make_synthetic_cohort

    other = make_synthetic_cohort(tmp_path / "o", n_patients=2, n_tiles=(5, 5), dims=(16,))
    with pytest.raises(BagError, match="dim 16 differs from dim 32 of the trained model"):
        predict_cohort(run, other.features_dirs, out=tmp_path / "y.csv")
    with pytest.raises(ConfigError, match="not a wsi-mil run folder"):
        predict_cohort(tmp_path, other.features_dirs, out=tmp_path / "z.csv")


def test_survival_predictions_are_standardised_per_fold(survival_run: Any, tmp_path: Path) -> None:
    preds = survival_run.result.predictions
    train = preds[preds["split"] == "train"]
    np.testing.assert_allclose(train.groupby("fold")["risk"].mean(), 0.0, atol=1e-6)
    table = predict_cohort(
        survival_run.result.out,
        survival_run.syn.features_dirs,
        cohort=survival_run.syn.cohort_csv,
        out=tmp_path / "s.csv",
        n_boot=10,
    )
    assert {"time", "event", "risk"} <= set(table.columns)
    assert isinstance(table, pd.DataFrame) and table["risk"].notna().all()
