"""Weighted Cox from the training options: ``event_weight``, ``weight_column``, slide level.

The reference is lifelines' ``CoxPHFitter`` with ``weights_col`` (Efron ties): a linear
Cox model fitted through the Cox head's targets and loss, and a linear aggregator
trained by ``train_cv``, must give lifelines' coefficients for the same weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from wsi_mil.errors import CohortError, ConfigError
from wsi_mil.features.bags import read_bag
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.data import make_units
from wsi_mil.mil.heads import CoxHead, create_head, head_from_state
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.train import train_cv
from wsi_mil.mil.weights import load_patient_weights, unit_weights
from wsi_mil.survival.loss import cox_ph_loss

lifelines = pytest.importorskip("lifelines")


def _lifelines_coefs(x: np.ndarray, time: np.ndarray, event: np.ndarray, w: np.ndarray) -> Any:
    """Coefficients of lifelines' weighted Cox fit (Efron ties, no penalty)."""
    df = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])])
    df["T"], df["E"], df["W"] = time, event, w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines warns about non-integer weights
        cph = lifelines.CoxPHFitter().fit(df, "T", "E", weights_col="W", robust=True)
    return cph.params_.to_numpy()


def _fit_linear_cox(head: Any, targets: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
    """Coefficients minimising ``head.loss`` of the linear predictor ``x @ beta``."""
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = head.loss((x @ beta)[:, None], targets)
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy()


def _write_cohort(path: Path, n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """A tabular survival cohort with covariates x0, x1 and a weight column."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    t = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5]))))
    c = rng.exponential(1.5, n)
    table = pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(n)],
            "slide_id": [f"S{i}" for i in range(n)],
            "time": np.round(np.minimum(t, c), 3),
            "event": (t <= c).astype(int),
            "w": rng.uniform(0.2, 3.0, n).round(3),
        }
    )
    table.to_csv(path, index=False)
    return x, table


def test_cox_head_with_event_weight_2_matches_lifelines(tmp_path: Path) -> None:
    x, table = _write_cohort(tmp_path / "cohort.csv", 120, seed=3)
    cohort = load_cohort(tmp_path / "cohort.csv", task="survival")
    ids = list(cohort.patients)
    pw = load_patient_weights(tmp_path / "cohort.csv", "w", ids)
    for event_weight, patient_weights in ((2.0, None), (2.0, pw)):
        head = create_head(cohort, ids, event_weight=event_weight, patient_weights=patient_weights)
        beta = _fit_linear_cox(head, head.targets(cohort, ids), torch.from_numpy(x))
        base = table["w"].to_numpy() if patient_weights is not None else np.ones(len(table))
        w = base * np.where(table["event"] == 1, event_weight, 1.0)
        ref = _lifelines_coefs(x, table["time"].to_numpy(), table["event"].to_numpy(), w)
        np.testing.assert_allclose(beta, ref, atol=2e-3)
        unweighted = _lifelines_coefs(
            x, table["time"].to_numpy(), table["event"].to_numpy(), np.ones(len(table))
        )
        assert np.abs(ref - unweighted).max() > 0.02  # the weights do change the fit
    state = head.state_dict()
    assert state["event_weight"] == 2.0 and state["patient_weighted"] is True
    assert isinstance(head_from_state(state), CoxHead)


def test_slide_level_weights_sum_to_the_patient_weight(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=8, slides_per_patient=(1, 3), n_tiles=(3, 5)
    )
    cohort = load_cohort(syn.cohort_csv, task="survival")
    ids = list(cohort.patients)
    units = make_units(cohort, ids, "slide", set())
    pids = [u.patient_id for u in units]
    assert len(units) > len(ids)  # some patients have several slides
    for event_weight in (1.0, 2.0):
        head = create_head(cohort, ids, event_weight=event_weight)
        targets = head.targets(cohort, pids)
        np.testing.assert_allclose(pd.Series(targets["weight"].numpy()).groupby(pids).sum(), 1.0)
        # the weights the loss uses: event patients weigh event_weight in total
        event = targets["event"].numpy() == 1
        w = targets["weight"].numpy() * np.where(event, event_weight, 1.0)
        sums = pd.Series(w).groupby(pids).sum()
        expected = [event_weight if cohort.patients[p].event == 1 else 1.0 for p in sums.index]
        np.testing.assert_allclose(sums.to_numpy(), expected, rtol=1e-12)
        logits = torch.randn(len(pids), 1, generator=torch.Generator().manual_seed(0))
        ref = cox_ph_loss(logits[:, 0], targets["time"], targets["event"], torch.from_numpy(w))
        torch.testing.assert_close(head.loss(logits, targets), ref.float())
    # patient level: one sample per patient, weight 1 -> the unweighted loss
    assert (head.targets(cohort, ids)["weight"].numpy() > 0).all()
    np.testing.assert_allclose(unit_weights(["a", "a", "b"], [0, 0, 1]), [0.5, 0.5, 1.0])


def test_weight_column_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "patient_id,slide_id,time,event,w\n"
        "P1,S1,1.0,1,1.5\n"
        "P1,S2,1.0,1,2.0\n"
        "P2,S3,2.0,0,-1\n"
        "P3,S4,2.0,0,inf\n"
        "P4,S5,3.0,1,\n"
        "P5,S6,3.0,1,1\n"
    )
    with pytest.raises(CohortError) as err:
        load_patient_weights(path, "w")
    text = str(err.value)
    assert f"{path}:3: w: weight 2 disagrees with 1.5 for patient 'P1' on line 2" in text
    assert f"{path}:4: w: weight '-1' must be a finite number >= 0" in text
    assert f"{path}:5: w: weight 'inf'" in text and f"{path}:6: w: weight ''" in text
    with pytest.raises(CohortError, match="'nope' is not a column"):
        load_patient_weights(path, "nope")
    zero = tmp_path / "z.csv"
    zero.write_text("patient_id,slide_id,time,event,w\nP1,S1,1,1,0\nP2,S2,2,0,0\n")
    with pytest.raises(CohortError, match="every patient's weight is 0"):
        load_patient_weights(zero, "w")


def test_weight_options_are_checked() -> None:
    base: dict[str, Any] = {"task": "survival", "cohort": "c.csv", "features": ["f"]}
    for bad in ({"event_weight": 0.0}, {"event_weight": float("nan")}):
        with pytest.raises(ConfigError, match="--event-weight must be a finite number > 0"):
            TrainConfig(**base, **bad).validate()
    for bad in ({"survival_loss": "discrete", "event_weight": 2.0}, {"task": "classification"}):
        with pytest.raises(ConfigError, match="weight the Cox loss"):
            TrainConfig(**{**base, "weight_column": "w", **bad}).validate()


def test_train_cv_with_event_weight_2_fits_lifelines_coefficients(tmp_path: Path) -> None:
    """A linear aggregator (mean of one tile, no hidden layer, unscaled) trained by
    ``train_cv`` with ``event_weight=2`` and a weight column reaches lifelines' weighted
    Cox coefficients on each fold's training patients."""
    syn = make_synthetic_cohort(
        tmp_path / "d",
        task="survival",
        n_patients=40,
        n_tiles=(1, 1),
        dims=(2,),
        planted_fraction=(0.0, 1.0),
        shift=1.0,
        seed=5,
    )
    table = pd.read_csv(syn.cohort_csv, dtype={"patient_id": str})
    rng = np.random.default_rng(0)
    ids = table["patient_id"].unique()
    weights = {p: float(v) for p, v in zip(ids, rng.uniform(0.5, 2, len(ids)), strict=True)}
    table["w"] = table["patient_id"].map(weights).round(3)
    table.to_csv(syn.cohort_csv, index=False)
    config = TrainConfig(
        task="survival",
        cohort=str(syn.cohort_csv),
        features=[str(d) for d in syn.features_dirs],
        model="mean",
        model_kwargs={"hidden_dim": 0},
        folds=2,
        steps=600,
        warmup_steps=0,
        eval_every=100,
        lr=0.05,
        weight_decay=0.0,
        grad_clip=0.0,
        batch_size=64,
        val_fraction=0.0,
        scale=False,
        event_weight=2.0,
        weight_column="w",
        n_boot=0,
        device="cpu",
        prefetch=1,
    )
    run = tmp_path / "run"
    train_cv(config, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["event_weight"] == 2.0 and saved["weight_column"] == "w"
    assert saved["repeats"] == 1 and saved["search"] == {}
    splits = json.loads((run / "splits.json").read_text())
    by_patient = table.drop_duplicates("patient_id").set_index("patient_id")
    for fold in splits["folds"]:
        ids = fold["train"]
        x = np.stack(
            [read_bag(syn.features_dirs[0] / f"{p}_S0.h5").features[0] for p in ids]
        ).astype(np.float64)
        rows = by_patient.loc[ids]
        w = rows["w"].to_numpy() * np.where(rows["event"] == 1, 2.0, 1.0)
        ref = _lifelines_coefs(x, rows["time"].to_numpy(), rows["event"].to_numpy(), w)
        fold_dir = run / f"fold_{fold['fold']}"
        coef = load_file(str(fold_dir / "model.safetensors"))["classifier.weight"][0].numpy()
        np.testing.assert_allclose(coef, ref, atol=1e-3)
        meta = json.loads((fold_dir / "fold.json").read_text())
        assert meta["head"]["event_weight"] == 2.0 and meta["head"]["patient_weighted"]
