"""CLAM for survival: early/late-event pseudo-classes from the training patients only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil import inference
from wsi_mil.mil import train as train_module
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.fold import build_model
from wsi_mil.mil.heads import (
    ClassificationHead,
    CoxHead,
    create_head,
    head_from_state,
    survival_pseudo_labels,
)
from wsi_mil.mil.models import create_aggregator
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.tabular import TabularPreprocessor
from wsi_mil.mil.train import train_cv

SMALL = {"hidden_dim": 16, "attn_dim": 8, "k_sample": 2, "dropout": 0.0}


def _survival_cohort(tmp_path: Path, times: list[float], events: list[int]):
    csv = tmp_path / "c.csv"
    rows = "".join(
        f"P{i},s{i},{t},{e}\n" for i, (t, e) in enumerate(zip(times, events, strict=True))
    )
    csv.write_text("patient_id,slide_id,time,event\n" + rows)
    return load_cohort(csv, task="survival")


def test_pseudo_labels_early_late_unknown() -> None:
    time = torch.tensor([1.0, 2.0, 3.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    event = torch.tensor([1, 0, 1, 0, 1, 0])
    labels = survival_pseudo_labels(time, event, cutoff=3.0)
    # event <= cut-off: 1; censored <= cut-off: -1; beyond the cut-off: 0 either way
    assert labels.tolist() == [1, -1, 1, -1, 0, 0]
    assert labels.dtype == torch.long


@pytest.mark.parametrize("loss", ["cox", "discrete"])
def test_cutoff_uses_the_training_patients_only(tmp_path: Path, loss: str) -> None:
    times = [1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 200.0, 300.0]
    events = [1, 0, 1, 1, 0, 1, 1, 0]
    cohort = _survival_cohort(tmp_path, times, events)
    train = ["P0", "P1", "P2", "P3", "P4"]
    head = create_head(cohort, train, survival_loss=loss, n_bins=2)
    assert head.pseudo_cutoff == 3.0  # median of 1..5, whatever the held-out times are
    whole = create_head(cohort, cohort.patient_ids, survival_loss=loss, n_bins=2)
    assert whole.pseudo_cutoff == 4.5  # the held-out patients would move it
    labels = head.instance_labels(head.targets(cohort, train))
    assert labels is not None and labels.tolist() == [1, -1, 1, 0, 0]
    again = head_from_state(json.loads(json.dumps(head.state_dict())))
    assert again.pseudo_cutoff == 3.0


def test_classification_instance_labels_are_the_classes(tmp_path: Path) -> None:
    head = ClassificationHead(["a", "b"])
    targets = {"label": torch.tensor([1, 0, 1])}
    assert head.instance_labels(targets) is targets["label"]
    assert CoxHead().instance_labels({}) is None  # no cut-off fitted: no labels


def _clam(n_outputs: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_aggregator("clam_sb", 6, n_outputs, n_classes=2, **SMALL).eval()


def _bags(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 8, 6, generator=g), torch.ones(3, 8, dtype=torch.bool)


def test_unknown_labels_are_left_out_of_the_instance_loss() -> None:
    model = _clam()
    features, mask = _bags()
    labels = torch.tensor([1, -1, 0])
    aux = model(features, mask, labels=labels).aux_loss
    assert aux is not None and torch.isfinite(aux) and aux > 0
    # new features for the unknown bag leave the loss unchanged ...
    other = features.clone()
    other[1] = torch.randn(8, 6, generator=torch.Generator().manual_seed(5)) * 3
    torch.testing.assert_close(model(other, mask, labels=labels).aux_loss, aux)
    # ... and it equals the loss of the known bags alone
    known = model(features[[0, 2]], mask[[0, 2]], labels=torch.tensor([1, 0])).aux_loss
    torch.testing.assert_close(aux, known)
    # whereas giving that bag a known label does change it
    assert not torch.allclose(model(features, mask, labels=torch.tensor([1, 1, 0])).aux_loss, aux)


def test_all_unknown_labels_give_a_zero_loss_with_grad() -> None:
    model = _clam()
    features, mask = _bags()
    aux = model(features, mask, labels=torch.full((3,), -1)).aux_loss
    assert aux is not None and float(aux.detach()) == 0.0 and aux.requires_grad
    aux.backward()  # the trainer can add it to the task loss


def test_labels_below_minus_one_are_config_errors() -> None:
    features, mask = _bags()
    with pytest.raises(ConfigError, match="-1"):
        _clam()(features, mask, labels=torch.tensor([0, -2, 1]))


@pytest.mark.parametrize(("loss", "n_outputs"), [("cox", 1), ("discrete", 3)])
def test_survival_clam_has_two_instance_classes(
    tmp_path: Path, make_config: Any, loss: str, n_outputs: int
) -> None:
    syn = make_synthetic_cohort(tmp_path / "d", task="survival", n_patients=6, n_tiles=(4, 5))
    config = make_config(syn, "survival", model="clam_sb", model_kwargs=SMALL, survival_loss=loss)
    config.n_bins = n_outputs
    cohort = load_cohort(syn.cohort_csv, task="survival", features_dirs=syn.features_dirs)
    head = create_head(cohort, cohort.patient_ids, survival_loss=loss, n_bins=n_outputs)
    pre = TabularPreprocessor.fit(cohort, cohort.patient_ids)
    model = build_model(config, 32, head, pre)
    assert model.n_classes == 2 and model.aggregator_config["n_outputs"] == n_outputs
    assert model.aggregator_config["n_classes"] == 2


def test_classification_clam_keeps_its_classes(tmp_path: Path, make_config: Any) -> None:
    syn = make_synthetic_cohort(tmp_path / "d", n_patients=9, n_classes=3, n_tiles=(4, 5))
    config = make_config(syn, "classification", model="clam_sb", model_kwargs=SMALL)
    cohort = load_cohort(syn.cohort_csv, task="classification", features_dirs=syn.features_dirs)
    head = create_head(cohort, cohort.patient_ids)
    model = build_model(config, 32, head, TabularPreprocessor.fit(cohort, cohort.patient_ids))
    assert model.n_classes == 3 and "n_classes" not in model.aggregator_config


def test_survival_training_passes_pseudo_labels_on_training_batches_only(
    tmp_path: Path, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=12, n_tiles=(6, 10), dims=(8,), seed=3
    )
    train_calls: list[dict[str, Any]] = []
    eval_labels: list[Any] = []
    fold = {"k": 0}
    real_forward = inference.forward_batch

    def record_train(model, batch, extras, device, labels=None):  # type: ignore[no-untyped-def]
        out = real_forward(model, batch, extras, device, labels)
        pids = [u.patient_id for u in batch.units]
        train_calls.append({"fold": fold["k"], "pids": pids, "labels": labels, "aux": out.aux_loss})
        return out

    def record_eval(model, batch, extras, device, labels=None):  # type: ignore[no-untyped-def]
        eval_labels.append(labels)
        return real_forward(model, batch, extras, device, labels)

    def callback(event: str, info: dict[str, Any]) -> None:
        if event == "fold_done":
            fold["k"] += 1

    monkeypatch.setattr(train_module, "forward_batch", record_train)
    monkeypatch.setattr(inference, "forward_batch", record_eval)
    config = make_config(
        syn, "survival", model="clam_sb", model_kwargs=SMALL, folds=2, steps=8, n_boot=0
    )
    out = train_cv(config, tmp_path / "run", callback=callback).out

    assert eval_labels and all(labels is None for labels in eval_labels)
    cohort = load_cohort(syn.cohort_csv, task="survival", features_dirs=syn.features_dirs)
    splits = json.loads((out / "splits.json").read_text())["folds"]
    n_known = 0
    for spec in splits:
        k = spec["fold"]
        cutoff = float(np.median([cohort.patients[p].time for p in spec["train"]]))
        meta = json.loads((out / f"fold_{k}" / "fold.json").read_text())
        assert meta["head"]["pseudo_cutoff"] == pytest.approx(cutoff)
        assert meta["aggregator"]["n_classes"] == 2 and meta["aggregator"]["n_outputs"] == 1
        calls = [c for c in train_calls if c["fold"] == k]
        assert calls
        for call in calls:
            assert set(call["pids"]) <= set(spec["train"])  # never val/test outcomes
            time = torch.tensor([float(cohort.patients[p].time) for p in call["pids"]])
            event = torch.tensor([int(cohort.patients[p].event) for p in call["pids"]])
            expected = survival_pseudo_labels(time, event, cutoff)
            assert call["labels"].tolist() == expected.tolist()
            assert call["aux"] is not None and torch.isfinite(call["aux"])
            if (expected >= 0).any():
                n_known += 1
                assert call["aux"] > 0
    assert n_known > 0
