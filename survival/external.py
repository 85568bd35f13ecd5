"""External validation: the training run's reference carried over to a new cohort.

A prediction table of a new cohort (``wsi-mil predict`` / ``validate``) has no ``fold``
or ``split``: every row is the fold ensemble's prediction of a patient the run never saw.
What needs training data comes from the run:

* **Risk-group cut-offs** (:func:`training_cutoffs`): per fold, the cut-offs learnt on
  the fold's train rows of the run's ``predictions.csv`` (the same ones the run's own
  report uses); the ensemble's risk is the mean of the folds' standardised risks, so
  its cut-off is the mean of the folds' cut-offs.
* **τ**: the run's horizon from its ``metrics.json`` (key ``tau``), else recomputed from
  its training rows (:func:`~wsi_mil.survival.calibration.run_tau`).
* **Brier score and calibration** (:func:`external_survival`): per fold, a Breslow
  baseline on the fold's train rows and its own linear predictor, applied to the new
  patients' ``linear_predictor_fold_<k>`` (written by ``validate``); predicted survival
  is the mean of the folds' curves, the reference the Kaplan–Meier curve of the training
  patients.

Statistics of the new cohort alone (Harrell's and Uno's C with the cohort's own
censoring, the time-dependent AUC) need none of this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.survival.calibration import (
    LP_COLUMN,
    TAU_RULE,
    FoldSurvival,
    kaplan_meier_fit,
    run_tau,
)
from wsi_mil.survival.validate import SurvivalDataError, UndefinedStatisticError

__all__ = [
    "EXTERNAL_FOLD",
    "TrainingReference",
    "describe",
    "external_survival",
    "is_external",
    "training_cutoffs",
    "training_reference",
]

#: The ``fold`` given to the rows of an external predictions table.
EXTERNAL_FOLD = "external"


class TrainingReference(NamedTuple):
    """What an external cohort borrows from the training run.

    Attributes:
        run_dir: The run folder.
        predictions: Its validated ``predictions.csv``.
        tau: The run's horizon.
        tau_source: Where τ comes from.
        fold_cutoffs: Per fold (key ``str(fold)``), the cut-offs of its train rows.
        cutoffs: (G-1,) the ensemble's cut-offs (mean of the folds').
    """

    run_dir: Path
    predictions: pd.DataFrame
    tau: float
    tau_source: str
    fold_cutoffs: dict[str, list[float]]
    cutoffs: np.ndarray


def is_external(columns: Iterable[str]) -> bool:
    """Whether a predictions table is of a new cohort (no ``fold`` / ``split`` columns)."""
    cols = set(columns)
    return "fold" not in cols or "split" not in cols


def training_cutoffs(
    predictions: pd.DataFrame, n_groups: int = 2
) -> tuple[dict[str, list[float]], np.ndarray]:
    """Risk-group cut-offs of a run: each fold's from its train rows, and their mean.

    Args:
        predictions: A run's validated predictions table (``fold``, ``split``, ``risk``).
        n_groups: Risk groups (2 = median of the training risks).

    Returns:
        (per fold ``{str(fold): cut-offs}``, the mean cut-offs of the folds).

    Raises:
        UndefinedStatisticError: No fold has train rows.
    """
    from wsi_mil.survival.stratify import learn_cutoffs

    per_fold: dict[str, list[float]] = {}
    for fold in sorted(predictions["fold"].unique().tolist(), key=lambda f: (str(type(f)), f)):
        train = predictions[(predictions["fold"] == fold) & (predictions["split"] == "train")]
        if not train.empty:
            per_fold[str(fold)] = learn_cutoffs(train["risk"], n_groups).tolist()
    if not per_fold:
        raise UndefinedStatisticError("the run's predictions have no train rows")
    return per_fold, np.mean(np.array(list(per_fold.values())), axis=0)


def _run_tau(run_dir: Path, predictions: pd.DataFrame) -> tuple[float, str]:
    path = run_dir / "metrics.json"
    try:
        tau = json.loads(path.read_text()).get("tau")
    except (OSError, ValueError, AttributeError):
        tau = None
    if isinstance(tau, int | float) and tau > 0:
        return float(tau), f"the training run's tau ({path})"
    return run_tau(predictions), f"{TAU_RULE} of the training run (recomputed)"


def training_reference(run_dir: str | os.PathLike[str], n_groups: int = 2) -> TrainingReference:
    """Read what an external validation needs from a survival run folder.

    Args:
        run_dir: A run folder of ``wsi-mil train`` (``predictions.csv``, ``metrics.json``).
        n_groups: Risk groups.

    Raises:
        SurvivalDataError: Not a survival run folder (no readable ``predictions.csv`` with
            train rows).
    """
    from wsi_mil.survival.report import load_predictions

    run_dir = Path(run_dir)
    csv = run_dir / "predictions.csv"
    if not csv.is_file():
        raise SurvivalDataError(
            f"--run {run_dir}: no predictions.csv; give the run folder of `wsi-mil train` "
            "whose model made the external predictions"
        )
    df = load_predictions(csv)
    if is_external(df.columns) or not (df["split"] == "train").any():
        raise SurvivalDataError(f"{csv}: no train rows; --run needs a training run's predictions")
    try:
        per_fold, cutoffs = training_cutoffs(df, n_groups)
    except UndefinedStatisticError as exc:
        raise SurvivalDataError(f"{csv}: {exc}") from exc
    tau, source = _run_tau(run_dir, df)
    return TrainingReference(run_dir, df, tau, source, per_fold, cutoffs)


def _fold_column(df: pd.DataFrame, fold: str, lp: str) -> str:
    name = f"linear_predictor_fold_{fold}" if lp == LP_COLUMN else f"risk_fold_{fold}"
    if name not in df.columns:
        raise UndefinedStatisticError(
            f"the external predictions have no {name!r} column: the Breslow baseline of "
            "each fold needs each fold model's prediction (`wsi-mil validate` writes them)"
        )
    return name


def _curves(base: Any, x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``grid -> (N, T)`` survival of linear predictors ``x`` under a Breslow baseline."""

    def at(grid: np.ndarray) -> np.ndarray:
        return np.asarray(base.survival(x, grid))

    return at


def external_survival(df: pd.DataFrame, ref: TrainingReference) -> FoldSurvival:
    """Survival curves of the external rows from the run's per-fold Breslow baselines.

    Args:
        df: The external rows (``time``, ``event`` and ``linear_predictor_fold_<k>``).
        ref: :func:`training_reference`.

    Returns:
        A :class:`~wsi_mil.survival.calibration.FoldSurvival`: ``model`` the mean of the
        folds' survival curves, ``km`` the Kaplan–Meier curve of the training patients.

    Raises:
        UndefinedStatisticError: No external rows, a missing per-fold column, or a fold
            without training events.
    """
    from wsi_mil.survival.metrics import breslow_survival

    if df.empty:
        raise UndefinedStatisticError("no external rows")
    train = ref.predictions[ref.predictions["split"] == "train"]
    lp = LP_COLUMN if LP_COLUMN in train.columns else "risk"
    parts: list[Callable[[np.ndarray], np.ndarray]] = []
    for fold in ref.fold_cutoffs:
        tr = train[train["fold"].astype(str) == fold]
        if not tr["event"].any():
            raise UndefinedStatisticError(f"fold {fold} of the run has no training event")
        base = breslow_survival(tr["time"], tr["event"], tr[lp])
        x = df[_fold_column(df, fold, lp)].to_numpy(float)
        parts.append(_curves(base, x))
    patients = train.drop_duplicates("patient_id")
    curve = kaplan_meier_fit(patients["time"], patients["event"])
    n = len(df)

    def model(grid: np.ndarray) -> np.ndarray:
        g = np.asarray(grid, dtype=np.float64).reshape(-1)
        return np.mean([f(g) for f in parts], axis=0)

    def km(grid: np.ndarray) -> np.ndarray:
        return np.tile(curve.at(grid), (n, 1))

    return FoldSurvival(
        np.arange(n),
        df["time"].to_numpy(float),
        df["event"].to_numpy(int),
        model,
        km,
        lp,
    )


def describe(ref: TrainingReference | None) -> dict[str, Any]:
    """The ``external`` block of ``report.json``: what was carried over, and from where."""
    if ref is None:
        return {
            "run": None,
            "computed": ["Harrell's and Uno's C", "time-dependent AUC", "risk distribution"],
            "not_computed": [
                "risk groups, Kaplan–Meier by group, log-rank and hazard ratios (they need "
                "the training cut-offs)",
                "Brier score and calibration (they need the training baseline hazard)",
            ],
            "how": "pass --run RUN (the training run) to carry its cut-offs and tau over",
        }
    return {
        "run": str(ref.run_dir.resolve()),
        "cutoffs": ref.cutoffs.tolist(),
        "fold_cutoffs": ref.fold_cutoffs,
        "cutoffs_rule": (
            "mean over the run's folds of the cut-offs learnt on each fold's train rows "
            "(the ensemble's risk is the mean of the folds' standardised risks)"
        ),
        "tau": ref.tau,
        "tau_source": ref.tau_source,
    }
