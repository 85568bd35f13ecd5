"""Heads (losses, calibration, state) and bootstrap metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from wsi_mil.errors import ConfigError
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.heads import ClassificationHead, CoxHead, create_head, head_from_state
from wsi_mil.mil.metrics import bootstrap_ci, classification_metrics, survival_metrics
from wsi_mil.survival.loss import cox_ph_loss


def _cohort(tmp_path: Path, task: str):
    csv = tmp_path / "c.csv"
    if task == "classification":
        csv.write_text(
            "patient_id,slide_id,label\n"
            + "".join(f"P{i},s{i},{['a', 'b', 'c'][min(i % 5, 2)]}\n" for i in range(10))
        )
    else:
        csv.write_text(
            "patient_id,slide_id,time,event\n"
            + "".join(f"P{i},s{i},{i + 1},{i % 2}\n" for i in range(10))
        )
    return load_cohort(csv, task=task)


def test_multiclass_head_weights_and_loss(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, "classification")
    head = create_head(cohort, cohort.patient_ids)
    assert isinstance(head, ClassificationHead) and head.n_outputs == 3
    counts = {"a": 2, "b": 2, "c": 6}
    expected = [10 / (3 * counts[c]) for c in ("a", "b", "c")]
    np.testing.assert_allclose(head.class_weights, expected)
    logits = torch.randn(10, 3)
    targets = head.targets(cohort, cohort.patient_ids)
    ref = torch.nn.functional.cross_entropy(logits, targets["label"], weight=torch.tensor(expected))
    torch.testing.assert_close(head.loss(logits, targets), ref.float())
    np.testing.assert_allclose(head.predict(logits).sum(1), 1.0)
    assert head_from_state(head.state_dict()).classes == ["a", "b", "c"]


def test_cox_head_uses_weighted_cox_and_calibrates(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, "survival")
    head = create_head(cohort, cohort.patient_ids)
    logits = torch.randn(10, 1)
    targets = head.targets(cohort, cohort.patient_ids)
    ref = cox_ph_loss(logits[:, 0], targets["time"], targets["event"])
    torch.testing.assert_close(head.loss(logits, targets), ref)
    weighted = CoxHead(event_weight=2.0)
    w = torch.where(targets["event"] == 1, 2.0, 1.0)
    torch.testing.assert_close(
        weighted.loss(logits, targets),
        cox_ph_loss(logits[:, 0], targets["time"], targets["event"], w),
    )
    head.calibrate(logits)
    risk = head.predict(logits)
    assert abs(risk.mean()) < 1e-9 and abs(risk.std() - 1) < 1e-9
    again = head_from_state(head.state_dict())
    np.testing.assert_allclose(again.predict(logits), risk)


def test_discrete_head(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, "survival")
    head = create_head(cohort, cohort.patient_ids, survival_loss="discrete", n_bins=3)
    assert head.n_outputs == 3
    logits = torch.randn(10, 3, requires_grad=True)
    loss = head.loss(logits, head.targets(cohort, cohort.patient_ids))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    assert head_from_state(head.state_dict()).edges[-1] == float("inf")
    with pytest.raises(ConfigError, match="--survival-loss"):
        create_head(cohort, cohort.patient_ids, survival_loss="weibull")


def test_classification_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    probs[np.arange(60), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs, n_boot=200, seed=1)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["balanced_accuracy"]["value"] == pytest.approx(
        balanced_accuracy_score(y, probs.argmax(1))
    )
    assert m["auc"]["ci_low"] < m["auc"]["value"] < m["auc"]["ci_high"]
    assert (
        classification_metrics([1, 1], np.array([[0.2, 0.8], [0.4, 0.6]]), n_boot=5)["auc"]["value"]
        is None
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_auc_equals_sklearn_on_tied_scores_and_resamples(n_classes: int) -> None:
    """The Mann–Whitney AUC against scikit-learn, with ties and repeated rows."""
    from wsi_mil.mil.metrics import _auc

    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 50)
    probs = rng.dirichlet(np.ones(n_classes), 6)[rng.integers(0, 6, 50)]  # many ties
    for _ in range(20):
        i = rng.integers(0, 50, 50)
        if len(np.unique(y[i])) < n_classes:
            continue
        ref = (
            roc_auc_score(y[i], probs[i, 1])
            if n_classes == 2
            else roc_auc_score(y[i], probs[i], multi_class="ovr", average="macro")
        )
        assert _auc(y[i], probs[i], n_classes) == pytest.approx(ref, abs=1e-12)


def test_balanced_accuracy_when_a_predicted_class_is_absent() -> None:
    # 3 classes, class 2 never true but predicted (sklearn warns here; pytest -W error)
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, probs, n_boot=20)
    assert m["balanced_accuracy"]["value"] == pytest.approx(0.5)  # recalls 1/2 and 1/2
    assert m["auc"]["value"] is None  # one-vs-rest AUC needs every class


def test_bootstrap_is_seeded() -> None:
    data = np.arange(50.0)
    a = bootstrap_ci(lambda i: float(data[i].mean()), 50, n_boot=100, seed=3)
    b = bootstrap_ci(lambda i: float(data[i].mean()), 50, n_boot=100, seed=3)
    assert a == b and a["value"] == 24.5 and a["n_boot"] == 100


def test_survival_metrics() -> None:
    rng = np.random.default_rng(0)
    risk = rng.normal(size=80)
    time = np.exp(-risk + rng.normal(0, 0.3, 80))
    event = (rng.random(80) < 0.7).astype(int)
    m = survival_metrics(time, event, risk, n_boot=50)
    assert m["harrell_c"]["value"] > 0.8 and m["uno_c"]["value"] > 0.8
    assert m["n_events"] == event.sum()
    none = survival_metrics(time[:5], np.zeros(5, int), risk[:5], n_boot=5)
    assert none["harrell_c"]["value"] is None
