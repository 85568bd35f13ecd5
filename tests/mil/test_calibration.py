"""Class probabilities: prior-shift correction, Brier score, ECE, reliability, report.

References: the training prevalence (intercept-only model), scikit-learn's
``brier_score_loss`` and ``calibration_curve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from wsi_mil.mil.calibration import (
    balanced_decision,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.heads import create_head, head_from_state, prior_shift
from wsi_mil.mil.metrics import classification_metrics
from wsi_mil.workflows.cli import main


def _cohort(tmp_path: Path, labels: list[str]):
    csv = tmp_path / "c.csv"
    csv.write_text(
        "patient_id,slide_id,label\n" + "".join(f"P{i},s{i},{c}\n" for i, c in enumerate(labels))
    )
    return load_cohort(csv, task="classification")


@pytest.mark.parametrize(
    "labels",
    [["pos"] * 20 + ["neg"] * 80, ["a"] * 10 + ["b"] * 30 + ["c"] * 60],
    ids=["binary-20%", "three-classes"],
)
def test_intercept_only_model_predicts_the_training_prevalence(tmp_path, labels) -> None:
    cohort = _cohort(tmp_path, labels)
    head = create_head(cohort, cohort.patient_ids)
    targets = head.targets(cohort, cohort.patient_ids)
    bias = torch.zeros(1, head.n_outputs, requires_grad=True)  # the intercept-only model
    opt = torch.optim.LBFGS([bias], lr=1.0, max_iter=200, tolerance_grad=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = head.loss(bias.expand(len(labels), -1), targets)
        loss.backward()
        return loss

    opt.step(closure)
    logits = bias.detach().expand(3, -1)
    prevalence = [labels.count(c) / len(labels) for c in cohort.classes]
    # the class-weighted loss drives the softmax to the balanced prior ...
    np.testing.assert_allclose(
        head.balanced_probabilities(logits)[0], 1 / len(prevalence), atol=1e-4
    )
    # ... and the prior-shift correction brings it back to the training prevalence
    np.testing.assert_allclose(head.predict(logits)[0], prevalence, atol=1e-4)
    np.testing.assert_allclose(
        head_from_state(head.state_dict()).predict(logits)[0], prevalence, atol=1e-4
    )
    # the balanced decision of the corrected probabilities is the raw argmax
    raw = torch.randn(50, head.n_outputs)
    np.testing.assert_array_equal(
        balanced_decision(head.predict(raw), prevalence), raw.argmax(1).numpy()
    )


def test_prior_shift_validates() -> None:
    with pytest.raises(ValueError, match="class_weights"):
        prior_shift(np.full((2, 2), 0.5), [1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        prior_shift(np.full((2, 3), 1 / 3), [1.0, 1.0])


def test_brier_ece_and_reliability_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.beta(2, 3, 400)
    y = (rng.random(400) < np.clip(p1 * 1.2, 0, 1)).astype(int)
    probs = np.column_stack([1 - p1, p1])
    assert brier_score(y, probs) == pytest.approx(brier_score_loss(y, p1))
    true, pred = calibration_curve(y, p1, n_bins=10, strategy="uniform")
    rel = reliability_bins(y, probs, 10)
    used = rel.counts > 0
    np.testing.assert_allclose(rel.observed[used], true)
    np.testing.assert_allclose(rel.predicted[used], pred)
    counts = np.histogram(p1, np.linspace(0, 1, 11))[0]
    ece = np.sum(counts[counts > 0] / 400 * np.abs(true - pred))
    assert expected_calibration_error(y, probs) == pytest.approx(ece)
    assert np.all(rel.lower[used] <= rel.observed[used])
    assert np.all(rel.observed[used] <= rel.upper[used])
    # multiclass: the original Brier score and top-label ECE
    probs3 = rng.dirichlet(np.ones(3), 300)
    y3 = rng.integers(0, 3, 300)
    onehot = np.eye(3)[y3]
    assert brier_score(y3, probs3) == pytest.approx(np.mean(((probs3 - onehot) ** 2).sum(1)))
    conf, hit = probs3.max(1), (probs3.argmax(1) == y3).astype(int)
    true3, pred3 = calibration_curve(hit, conf, n_bins=10, strategy="uniform")
    counts3 = np.histogram(conf, np.linspace(0, 1, 11))[0]
    ece3 = np.sum(counts3[counts3 > 0] / 300 * np.abs(true3 - pred3))
    assert expected_calibration_error(y3, probs3) == pytest.approx(ece3)


def test_classification_metrics_report_calibration() -> None:
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0, 1, 120)
    y = (rng.random(120) < p1).astype(int)
    probs = np.column_stack([1 - p1, p1])
    m = classification_metrics(y, probs, n_boot=50, seed=0)
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p1))
    assert m["brier"]["ci_low"] <= m["brier"]["value"] <= m["brier"]["ci_high"]
    assert m["ece"]["value"] == pytest.approx(expected_calibration_error(y, probs))
    assert sum(m["reliability"]["count"]) == 120
    json.dumps(m, allow_nan=False)


def _class_predictions(n: int = 90, folds: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.where(rng.random(n) < 0.3, "tumour", "normal")
    score = (label == "tumour") * 1.5 + rng.normal(size=n)
    fold_of = rng.permutation(np.arange(n) % folds)
    rows = []
    for k in range(folds):
        for i in range(n):
            p = 1 / (1 + np.exp(-(score[i] - 1.2 + rng.normal(0, 0.1))))
            rows.append(
                {
                    "patient_id": f"P{i:03d}",
                    "fold": k,
                    "split": "test" if fold_of[i] == k else "train",
                    "label": label[i],
                    "prob_normal": 1 - p,
                    "prob_tumour": p,
                }
            )
    return pd.DataFrame(rows)


def test_classification_report_renders(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    df = _class_predictions()
    df.loc[df["patient_id"] == "P001", "patient_id"] = "<b>x</b>"
    df.to_csv(run / "predictions.csv", index=False)
    assert main(["report", str(run), "--bootstrap", "20"]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    html = (run / "report.html").read_text()
    data = json.loads((run / "report.json").read_text())
    assert data["format"] == "wsi-mil.classification-report/1"
    assert html.count("data:image/png;base64,") == 4
    for name in ("roc", "pr", "confusion", "reliability"):
        assert (run / "report_figures" / f"{name}.svg").stat().st_size > 1000
    test = df[df["split"] == "test"]
    from sklearn.metrics import roc_auc_score

    y = (test["label"] == "tumour").to_numpy(int)
    assert data["pooled"]["auc"]["value"] == pytest.approx(roc_auc_score(y, test["prob_tumour"]))
    assert data["calibration"]["brier"]["value"] == pytest.approx(
        brier_score_loss(y, test["prob_tumour"])
    )
    assert np.sum(data["confusion"]["matrix"]) == len(test)
    assert "<b>x</b>" not in html
    assert data["summary"][0].startswith("90 patients")
