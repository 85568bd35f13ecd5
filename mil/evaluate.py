"""Out-of-fold evaluation of a cross-validated run.

Writes the run folder's ``predictions.csv`` (columns fixed by DESIGN.md),
``metrics.json`` (per-fold and pooled metrics of the test rows, bootstrap CIs) and, for
survival, the report of :func:`wsi_mil.survival.report.make_report`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    ``risk``."""
    if cohort.task == "classification":
        tail = ["label", *_prob_columns(cohort)]
    else:
        tail = ["time", "event", "risk"]
    return table[["patient_id", "fold", "split", *tail]]


def compute_metrics(
    predictions: pd.DataFrame, cohort: Cohort, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold metrics from the test rows of ``predictions``.

    Classification: AUC and balanced accuracy; survival: Harrell's and Uno's C (Uno's
    censoring weights from each fold's training rows). All with bootstrap CIs.
    """
    test = predictions[predictions["split"] == "test"]
    per_fold = {}
    for k, rows in test.groupby("fold", sort=True):
        train = predictions[(predictions["fold"] == k) & (predictions["split"] == "train")]
        per_fold[str(k)] = _metrics_of(rows, train, cohort, n_boot, seed)
    pooled = _metrics_of(test, predictions[predictions["split"] == "train"], cohort, n_boot, seed)
    return {"task": cohort.task, "pooled": pooled, "folds": per_fold, "n_boot": n_boot}


def _metrics_of(
    rows: pd.DataFrame, train: pd.DataFrame, cohort: Cohort, n_boot: int, seed: int
) -> dict[str, Any]:
    if cohort.task == "classification":
        index = {c: i for i, c in enumerate(cohort.classes)}
        y = [index[str(v)] for v in rows["label"]]
        probs = rows[_prob_columns(cohort)].to_numpy()
        return classification_metrics(y, probs, n_boot=n_boot, seed=seed)
    return survival_metrics(
        rows["time"].to_numpy(float),
        rows["event"].to_numpy(int),
        rows["risk"].to_numpy(float),
        train_time=train["time"].to_numpy(float),
        train_event=train["event"].to_numpy(int),
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
    """Write ``predictions.csv``, ``metrics.json`` and (survival) the report of a run.

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
    metrics = compute_metrics(predictions, cohort, n_boot=config.n_boot, seed=config.seed)
    metrics["excluded_empty_slides"] = list(excluded)
    metrics["n_excluded_empty_slides"] = len(excluded)
    metrics["n_patients"] = n_patients
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if config.task == "survival":
        _survival_report(out, config.seed, config.n_boot)
    return predictions, metrics


def _survival_report(out: Path, seed: int, n_boot: int) -> None:
    """Write ``report.html``/``report.json`` with :func:`wsi_mil.survival.report.make_report`."""
    from wsi_mil.survival.report import make_report

    make_report(out, out, n_bootstrap=n_boot, seed=seed, force=True)
