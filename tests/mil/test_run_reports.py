"""Run folders: one τ and one Uno's C in metrics.json and report.json; classification runs
get calibrated probabilities and their report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest


def test_metrics_and_report_share_tau_and_uno_c(survival_run: Any) -> None:
    out = survival_run.result.out
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    train = preds[preds["split"] == "train"].drop_duplicates("patient_id")
    assert metrics["tau"] == pytest.approx(np.percentile(train["time"], 80))
    assert report["tau"] == metrics["tau"] == report["concordance"]["tau"]
    assert report["tau_rule"] == metrics["tau_rule"]
    pooled = report["concordance"]["pooled"]["uno"]
    assert metrics["pooled"]["uno_c"]["value"] == pytest.approx(pooled["estimate"], abs=1e-12)
    assert metrics["pooled"]["uno_c"]["ci_low"] == pytest.approx(pooled["lower"], abs=1e-12)
    for fold in report["concordance"]["per_fold"]:
        ours = metrics["folds"][str(fold["fold"])]["uno_c"]["value"]
        assert ours == pytest.approx(fold["uno"]["estimate"], abs=1e-12)
    # the Brier score sits beside its Kaplan–Meier reference, the same in both files
    for key in ("ibs", "ibs_km", "ibs_minus_km"):
        assert metrics["pooled"]["brier"][key] == pytest.approx(report["brier"][key], abs=1e-12)
    assert metrics["pooled"]["brier"]["lp_column"] == "linear_predictor"
    # the linear predictor is the fold's own scale: risk is its z-score on training rows
    for _, rows in preds.groupby("fold"):
        tr = rows[rows["split"] == "train"]
        z = (tr["linear_predictor"] - tr["linear_predictor"].mean()) / tr["linear_predictor"].std(
            ddof=0
        )
        np.testing.assert_allclose(z, tr["risk"], atol=1e-9)
    assert report["calibration"]["groups"]


def test_classification_run_is_calibrated_and_reported(classification_run: Any) -> None:
    out = classification_run.result.out
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("brier", "ece", "auc", "balanced_accuracy"):
        assert metrics["pooled"][key]["value"] is not None
    assert metrics["pooled"]["reliability"]["count"]
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "wsi-mil.classification-report/1"
    assert report["pooled"]["auc"]["value"] == pytest.approx(metrics["pooled"]["auc"]["value"])
    assert (out / "report.html").is_file()


def test_classification_report_shows_a_fusion_runs_co_attention(
    classification_run: Any, tmp_path: Path
) -> None:
    """With ``co_attention_summary.csv`` and ``co_attention.png`` beside the predictions
    (a fusion run), the report embeds the figure and the table; without, no section."""
    import shutil

    from wsi_mil.mil.class_report import make_classification_report
    from wsi_mil.mil.co_attention import _figure

    shutil.copy(classification_run.result.out / "predictions.csv", tmp_path)
    plain = make_classification_report(tmp_path, n_bootstrap=10)
    assert "co-attention" not in plain.html.read_text()
    summary = pd.DataFrame({"token": ["G00", "clinical"], "n_patients": [9, 12],
                            "mean_weight": [0.7, 0.3], "sd_weight": [0.1, float("nan")],
                            "spearman_rho": [0.61, float("nan")],
                            "spearman_p": [0.0004, float("nan")]})  # fmt: skip
    summary.to_csv(tmp_path / "co_attention_summary.csv", index=False)
    _figure(summary).savefig(tmp_path / "co_attention.png", format="png")
    html = make_classification_report(tmp_path, n_bootstrap=10, force=True).html.read_text()
    assert "Which gene groups count (co-attention)" in html
    assert "<td>G00</td><td>9</td><td>0.700 (0.100)</td><td>0.61 (p &lt; 0.001)</td>" in html
    assert "<td>clinical</td><td>12</td><td>0.300 (n/a)</td><td>n/a (n/a)</td>" in html
