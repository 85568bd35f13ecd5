"""Out-of-fold evaluation of a cross-validated run.

Writes the run folder's ``predictions.csv`` (columns fixed by DESIGN.md),
``metrics.json`` (per-fold and pooled metrics of the test rows, bootstrap CIs) and the
report: :func:`wsi_mil.survival.report.make_report` for survival,
:func:`wsi_mil.mil.class_report.make_classification_report` for classification.

Survival runs have one horizon ``tau`` (:func:`wsi_mil.survival.calibration.run_tau`,
chosen on the training rows), written in ``metrics.json`` and given to the report, so
both hold the same Uno's C. Classification balanced accuracy uses the balanced decision
with each fold's training prevalence (:func:`wsi_mil.mil.calibration.balanced_decision`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_mil.mil.cohort import Cohort
from wsi_mil.mil.metrics import classification_metrics, survival_metrics
from wsi_mil.mil.run import TrainConfig
from wsi_mil.outputs import atomic_path

__all__ = ["compute_metrics", "contract_columns", "write_run_outputs"]


def _prob_columns(cohort: Cohort) -> list[str]:
    return [f"prob_{c}" for c in cohort.classes]


def contract_columns(table: pd.DataFrame, cohort: Cohort) -> pd.DataFrame:
    """Keep the ``predictions.csv`` columns of DESIGN.md, in order: ``patient_id``,
    ``fold``, ``split``, then ``label`` + ``prob_<class>`` or ``time`` + ``event`` +
    ``risk`` (+ ``linear_predictor``, the model's own risk scale, when present)."""
    if cohort.task == "classification":
        tail = ["label", *_prob_columns(cohort)]
    else:
        tail = ["time", "event", "risk"]
        if "linear_predictor" in table.columns and table["linear_predictor"].notna().all():
            tail.append("linear_predictor")
    return table[["patient_id", "fold", "split", *tail]]


def compute_metrics(
    predictions: pd.DataFrame, cohort: Cohort, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold metrics from the test rows of ``predictions``.

    Classification: AUC, balanced accuracy, Brier score, ECE (+ reliability bins).
    Survival: Harrell's and Uno's C at the run's ``tau`` (Uno's censoring weights from the
    fold's training rows; pooled: the training patients, each once) and, pooled, the
    integrated Brier score beside its Kaplan–Meier reference. All with bootstrap CIs.
    """
    test = predictions[predictions["split"] == "test"]
    train_all = predictions[predictions["split"] == "train"]
    out: dict[str, Any] = {"task": cohort.task}
    tau = None
    if cohort.task == "survival":
        from wsi_mil.survival.calibration import TAU_RULE, run_tau

        tau = run_tau(predictions)
        out["tau"], out["tau_rule"] = tau, TAU_RULE
    per_fold = {}
    for k, rows in test.groupby("fold", sort=True):
        train = train_all[train_all["fold"] == k]
        per_fold[str(k)] = _metrics_of(rows, train, cohort, tau, n_boot, seed)
    pooled_train = train_all.drop_duplicates("patient_id")
    pooled = _metrics_of(test, pooled_train, cohort, tau, n_boot, seed, all_train=train_all)
    if tau is not None:
        pooled["brier"] = _brier(predictions, tau, n_boot, seed)
    out.update({"pooled": pooled, "folds": per_fold, "n_boot": n_boot})
    return out


def _brier(predictions: pd.DataFrame, tau: float, n_boot: int, seed: int) -> dict[str, Any]:
    """The pooled IBS beside its Kaplan–Meier reference (as in the report)."""
    from wsi_mil.survival.analysis import brier_json
    from wsi_mil.survival.calibration import out_of_fold_brier
    from wsi_mil.survival.validate import SurvivalDataError

    try:
        res, fs = out_of_fold_brier(predictions, tau, n_bootstrap=n_boot, seed=seed)
    except SurvivalDataError as exc:
        return {"note": str(exc)}
    return {**brier_json(res), "lp_column": fs.lp_column}


def _prior(rows: pd.DataFrame, train: pd.DataFrame, cohort: Cohort) -> np.ndarray:
    """(P, C) training prevalence of each row's fold (from the fold's train rows)."""
    prior = np.empty((len(rows), len(cohort.classes)))
    folds = rows["fold"].to_numpy()
    for k in np.unique(folds):
        labels = train.loc[train["fold"] == k, "label"].astype(str)
        counts = np.array([(labels == c).sum() for c in cohort.classes], float)
        prior[folds == k] = counts / counts.sum() if counts.sum() else 1.0 / len(counts)
    return prior


def _metrics_of(
    rows: pd.DataFrame,
    train: pd.DataFrame,
    cohort: Cohort,
    tau: float | None,
    n_boot: int,
    seed: int,
    *,
    all_train: pd.DataFrame | None = None,
) -> dict[str, Any]:
    if cohort.task == "classification":
        index = {c: i for i, c in enumerate(cohort.classes)}
        y = [index[str(v)] for v in rows["label"]]
        probs = rows[_prob_columns(cohort)].to_numpy()
        prior = _prior(rows, train if all_train is None else all_train, cohort)
        return classification_metrics(y, probs, prior=prior, n_boot=n_boot, seed=seed)
    return survival_metrics(
        rows["time"].to_numpy(float),
        rows["event"].to_numpy(int),
        rows["risk"].to_numpy(float),
        train_time=train["time"].to_numpy(float),
        train_event=train["event"].to_numpy(int),
        tau=tau,
        n_boot=n_boot,
        seed=seed,
    )


def write_run_outputs(
    out: Path,
    frames: Sequence[pd.DataFrame],
    cohort: Cohort,
    config: TrainConfig,
    *,
    excluded: Sequence[str],
    n_patients: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Write ``predictions.csv``, ``metrics.json``, a fusion run's co-attention summary
    (:func:`wsi_mil.mil.co_attention.write_co_attention_summary`) and the report.

    Args:
        out: The run folder.
        frames: Every fold's prediction rows (train and test splits).
        cohort: The cohort (task, classes).
        config: The run's options (``n_boot``, ``seed``, ``task``).
        excluded: Slides left out because their bags are empty.
        n_patients: Patients used.

    Returns:
        The predictions table and the metrics.
    """
    predictions = contract_columns(pd.concat(frames, ignore_index=True), cohort)
    with atomic_path(out / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    from wsi_mil.mil.co_attention import write_co_attention_summary

    # fusion runs: the co-attention summary first, so that the report shows it
    write_co_attention_summary(out, predictions)
    metrics = compute_metrics(predictions, cohort, n_boot=config.n_boot, seed=config.seed)
    metrics["excluded_empty_slides"] = list(excluded)
    metrics["n_excluded_empty_slides"] = len(excluded)
    metrics["n_patients"] = n_patients
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if config.task == "survival":
        from wsi_mil.survival.report import make_report

        make_report(
            out, out, n_bootstrap=config.n_boot, seed=config.seed, tau=metrics["tau"], force=True
        )
    else:
        from wsi_mil.mil.class_report import make_classification_report

        make_classification_report(
            out, out, n_bootstrap=config.n_boot, seed=config.seed, force=True
        )
    return predictions, metrics
