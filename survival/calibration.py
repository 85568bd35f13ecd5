"""Calibration of survival predictions: the run's horizon τ, the Brier score against its
Kaplan–Meier reference, and observed vs predicted survival by risk group.

* :func:`choose_tau` / :func:`run_tau` — **one** horizon per run: the 80th percentile of
  the follow-up times of the patients in the training rows (each patient once). Uno's C,
  the calibration table and the end of the Brier-score grid all use it, in
  ``metrics.json`` and in ``report.json`` alike.
* :func:`out_of_fold_survival` — survival curves of the held-out rows: per fold, a
  Breslow baseline fitted on the fold's **training** rows and their *linear predictor*
  (the model's own log relative hazard, not the z-scored ``risk``), and the Kaplan–Meier
  curve of the same training rows as the reference model that ignores the slides.
* :func:`brier_vs_km` — IPCW Brier score and its integral (IBS) of the model next to the
  Kaplan–Meier reference on the same rows, their difference and paired bootstrap CIs.
  A model helps only when its IBS is *below* the Kaplan–Meier IBS.
* :func:`calibration_by_group` — predicted vs Kaplan–Meier-observed survival at τ per
  quantile group of predicted survival, with log-log CIs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.survival.metrics import (
    _bootstrap,
    _interval,
    _structured,
    breslow_survival,
)
from wsi_mil.survival.validate import (
    SurvivalDataError,
    UndefinedStatisticError,
    validate_survival,
)

__all__ = [
    "LP_COLUMN",
    "TAU_QUANTILE",
    "TAU_RULE",
    "BrierComparison",
    "CalibrationTable",
    "FoldSurvival",
    "StepCurve",
    "brier_vs_km",
    "calibration_by_group",
    "choose_tau",
    "ibs_grid",
    "kaplan_meier_fit",
    "out_of_fold_brier",
    "out_of_fold_survival",
    "run_tau",
]

#: Quantile of the training follow-up times used as the run's horizon τ.
TAU_QUANTILE = 0.8
#: How τ is chosen, in words (written beside ``tau`` in metrics.json and report.json).
TAU_RULE = (
    "80th percentile of the follow-up times of the patients in the training rows "
    "(each patient once)"
)
#: Column of ``predictions.csv`` with the model's own log relative hazard.
LP_COLUMN = "linear_predictor"


def choose_tau(train_time: Any, quantile: float = TAU_QUANTILE) -> float:
    """The horizon τ: a quantile of the training follow-up times.

    Args:
        train_time: (M,) follow-up times of the training patients (each once).
        quantile: in (0, 1]; 0.8 keeps τ where the censoring distribution is still
            estimated from enough patients.

    Returns:
        τ (> 0).

    Raises:
        SurvivalDataError: no times, a bad time, or a bad ``quantile``.
    """
    if not 0 < quantile <= 1:
        raise SurvivalDataError(f"quantile must be in (0, 1], got {quantile!r}")
    t = np.asarray(train_time, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or (t < 0).any():
        raise SurvivalDataError("train_time must hold at least one finite time >= 0")
    tau = float(np.percentile(t, 100 * quantile))
    if tau <= 0:
        raise SurvivalDataError(f"the {quantile:g} quantile of train_time is {tau:g}; need > 0")
    return tau


def run_tau(df: pd.DataFrame) -> float:
    """τ of a predictions table (``patient_id``, ``split``, ``time``): :func:`choose_tau`
    of the patients that appear in a training row (every patient when there is none)."""
    train = df[df["split"] == "train"]
    rows = train if not train.empty else df
    return choose_tau(rows.drop_duplicates("patient_id")["time"].to_numpy(float))


class StepCurve(NamedTuple):
    """A right-continuous survival step function (1 before the first time).

    Attributes:
        times: (K,) increasing times of the steps.
        survival: (K,) survival from each time on.
    """

    times: np.ndarray
    survival: np.ndarray

    def at(self, times: Any) -> np.ndarray:
        """(T,) survival at ``times``."""
        s = np.asarray(times, dtype=np.float64).reshape(-1)
        pos = np.searchsorted(self.times, s, side="right") - 1
        return np.where(pos >= 0, self.survival[np.clip(pos, 0, None)], 1.0)


def kaplan_meier_fit(time: Any, event: Any) -> StepCurve:
    """Kaplan–Meier survival curve (scikit-survival ``kaplan_meier_estimator``).

    Args:
        time: (M,) follow-up times.
        event: (M,) event indicators.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    d = validate_survival(time, event, min_samples=1, require_events=False)
    t, s = kaplan_meier_estimator(d.event, d.time)
    return StepCurve(np.asarray(t, dtype=np.float64), np.asarray(s, dtype=np.float64))


class FoldSurvival(NamedTuple):
    """Survival curves of the held-out rows of a predictions table.

    Attributes:
        rows: (N,) positions in the test rows (fold by fold) the curves belong to.
        time: (N,) their follow-up times.
        event: (N,) their events.
        model: ``times (T,) -> (N, T)``: Breslow survival of each row's fold.
        km: ``times (T,) -> (N, T)``: Kaplan–Meier of each row's fold training rows.
        lp_column: the column used as the log relative hazard.
    """

    rows: np.ndarray
    time: np.ndarray
    event: np.ndarray
    model: Callable[[np.ndarray], np.ndarray]
    km: Callable[[np.ndarray], np.ndarray]
    lp_column: str


def _stack(parts: list[Callable[[np.ndarray], np.ndarray]]) -> Callable[[Any], np.ndarray]:
    def at(grid: Any) -> np.ndarray:
        g = np.asarray(grid, dtype=np.float64).reshape(-1)
        return np.vstack([f(g) for f in parts])

    return at


def _breslow_curves(base: Any, risk: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def at(grid: np.ndarray) -> np.ndarray:
        return np.asarray(base.survival(risk, grid))

    return at


def _km_curves(curve: StepCurve, n: int) -> Callable[[np.ndarray], np.ndarray]:
    def at(grid: np.ndarray) -> np.ndarray:
        return np.tile(curve.at(grid), (n, 1))

    return at


def out_of_fold_survival(df: pd.DataFrame) -> FoldSurvival:
    """Per fold, fit a Breslow baseline and a Kaplan–Meier curve on the training rows and
    apply them to the fold's test rows.

    The Breslow baseline uses the column :data:`LP_COLUMN` (the model's own linear
    predictor) when the table has it, else ``risk``.

    Args:
        df: predictions table with ``fold``, ``split``, ``time``, ``event``, ``risk``
            (and ideally :data:`LP_COLUMN`).

    Raises:
        UndefinedStatisticError: no test rows, or a fold with test rows and no training
            rows with an event.
    """
    lp = LP_COLUMN if LP_COLUMN in df.columns else "risk"
    test = df[df["split"] == "test"]
    if test.empty:
        raise UndefinedStatisticError("no test rows")
    model: list[Callable[[np.ndarray], np.ndarray]] = []
    km: list[Callable[[np.ndarray], np.ndarray]] = []
    order = []
    folds = sorted(test["fold"].unique().tolist(), key=lambda f: (str(type(f)), f))
    for fold in folds:
        tr = df[(df["fold"] == fold) & (df["split"] == "train")]
        idx = np.flatnonzero((test["fold"] == fold).to_numpy())
        if tr.empty or not tr["event"].any():
            raise UndefinedStatisticError(
                f"fold {fold} has no training rows with an event to fit the Breslow baseline on"
            )
        base = breslow_survival(tr["time"], tr["event"], tr[lp])
        risk = test[lp].to_numpy(float)[idx]
        curve = kaplan_meier_fit(tr["time"], tr["event"])
        model.append(_breslow_curves(base, risk))
        km.append(_km_curves(curve, idx.size))
        order.append(idx)
    rows = np.concatenate(order)
    return FoldSurvival(
        rows,
        test["time"].to_numpy(float)[rows],
        test["event"].to_numpy(int)[rows],
        _stack(model),
        _stack(km),
        lp,
    )


def ibs_grid(time: Any, event: Any, tau: float, n: int = 20) -> np.ndarray:
    """Evaluation times of the integrated Brier score: ``n`` even steps from the 10th
    percentile of the event times to τ (kept below the last follow-up time).

    Raises:
        UndefinedStatisticError: no event, or fewer than two times inside the follow-up.
    """
    d = validate_survival(time, event)
    lo = float(np.percentile(d.time[d.event], 10))
    hi = min(float(tau), float(np.nextafter(d.time.max(), -np.inf)))
    grid = np.unique(np.linspace(lo, hi, n)) if hi > lo else np.array([lo])
    grid = grid[(grid >= d.time.min()) & (grid < d.time.max())]
    if grid.size < 2:
        raise UndefinedStatisticError(
            f"fewer than two Brier-score times between the 10th percentile of the event "
            f"times ({lo:g}) and tau ({tau:g})"
        )
    return grid


class BrierComparison(NamedTuple):
    """Brier score of a model next to the Kaplan–Meier reference on the same rows.

    Attributes:
        times: (T,) evaluation times.
        brier: (T,) model Brier score at each time.
        brier_km: (T,) Kaplan–Meier Brier score at each time.
        ibs: integrated Brier score of the model (lower is better).
        ibs_km: integrated Brier score of the Kaplan–Meier curve.
        difference: ``ibs - ibs_km`` (negative = the model beats Kaplan–Meier).
        ci: (3, 2) bootstrap CIs of (ibs, ibs_km, difference), paired resamples.
        n_bootstrap: usable bootstrap resamples.
    """

    times: np.ndarray
    brier: np.ndarray
    brier_km: np.ndarray
    ibs: float
    ibs_km: float
    difference: float
    ci: np.ndarray
    n_bootstrap: int


def _brier_pair(
    t: np.ndarray, e: np.ndarray, surv: np.ndarray, km: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, float]:
    from sksurv.metrics import brier_score

    if grid.max() >= t.max() or grid.min() < t.min():
        raise UndefinedStatisticError("evaluation times outside the follow-up")
    y = _structured(t, e)
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            bs = brier_score(y, y, surv, grid)[1]
            bk = brier_score(y, y, km, grid)[1]
            # sksurv's integrated_brier_score, without computing each curve twice
            ibs, ibk = np.trapezoid(np.stack([bs, bk]), grid) / (grid[-1] - grid[0])
    except ValueError as exc:
        raise UndefinedStatisticError(f"Brier score undefined: {exc}") from exc
    values = np.concatenate([bs, bk, [ibs, ibk]])
    if not np.isfinite(values).all():
        raise UndefinedStatisticError("Brier score undefined at the evaluation times")
    return np.asarray(bs, float), np.asarray(bk, float), float(ibs), float(ibk)


def brier_vs_km(
    time: Any,
    event: Any,
    survival: Any,
    km_survival: Any,
    times: Any,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BrierComparison:
    """IPCW Brier score (scikit-survival) of a model and of Kaplan–Meier on the same rows.

    The censoring weights come from the evaluated rows themselves, for both models, so
    the two scores differ only by the predicted curves.

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators.
        survival: (N, T) model survival probabilities at ``times``.
        km_survival: (N, T) Kaplan–Meier survival (fitted on training rows) at ``times``.
        times: (T >= 2,) increasing evaluation times inside the follow-up.
        n_bootstrap: paired bootstrap resamples of the rows (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        A :class:`BrierComparison`.
    """
    d = validate_survival(time, event)
    t, e = d.time, d.event
    grid = np.asarray(times, dtype=np.float64).reshape(-1)
    surv = np.asarray(survival, dtype=np.float64)
    km = np.asarray(km_survival, dtype=np.float64)
    for name, arr in (("survival", surv), ("km_survival", km)):
        if arr.shape != (t.size, grid.size):
            raise SurvivalDataError(
                f"{name} must have shape (N, T) = ({t.size}, {grid.size}), got {arr.shape}"
            )
    if grid.size < 2 or (np.diff(grid) <= 0).any():
        raise SurvivalDataError("times must hold at least two increasing values")
    bs, bk, ibs, ibk = _brier_pair(t, e, surv, km, grid)

    def stat(i: np.ndarray) -> list[float]:
        _, _, a, b = _brier_pair(t[i], e[i], surv[i], km[i], grid)
        return [a, b, a - b]

    boots = _bootstrap(stat, t.size, n_bootstrap, seed)
    lo, hi = _interval(boots, alpha)
    ci = np.stack([np.broadcast_to(lo, 3), np.broadcast_to(hi, 3)], axis=1)
    return BrierComparison(grid, bs, bk, ibs, ibk, ibs - ibk, ci, len(boots))


def out_of_fold_brier(
    df: pd.DataFrame,
    tau: float,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[BrierComparison, FoldSurvival]:
    """:func:`brier_vs_km` of the pooled test rows of a predictions table, with per-fold
    Breslow and Kaplan–Meier curves (:func:`out_of_fold_survival`) on :func:`ibs_grid`.

    The last result is kept: a training run's metrics and its report ask for the same
    numbers, and the bootstrap is the expensive part."""
    key = (_frame_key(df), float(tau), n_bootstrap, seed, alpha)
    if _last_brier and _last_brier[0][0] == key:
        return _last_brier[0][1]
    fs = out_of_fold_survival(df)
    grid = ibs_grid(fs.time, fs.event, tau)
    res = brier_vs_km(
        fs.time,
        fs.event,
        fs.model(grid),
        fs.km(grid),
        grid,
        n_bootstrap=n_bootstrap,
        seed=seed,
        alpha=alpha,
    )
    _last_brier[:] = [(key, (res, fs))]
    return res, fs


#: ``[(key, result)]`` of the last :func:`out_of_fold_brier` call.
_last_brier: list[tuple[tuple[Any, ...], tuple[BrierComparison, FoldSurvival]]] = []


def _frame_key(df: pd.DataFrame) -> tuple[tuple[str, ...], str]:
    """Column names and a digest of the values as text, floats to 12 significant digits
    (a table read back from its CSV gives the same key: pandas' default parser can
    change a float's last digit)."""
    import hashlib

    text = df.apply(lambda c: c.map("{:.12g}".format) if c.dtype.kind == "f" else c.astype(str))
    values = pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes()
    return tuple(map(str, df.columns)), hashlib.sha256(values).hexdigest()


class CalibrationTable(NamedTuple):
    """Predicted vs observed survival at τ per quantile group of predicted survival.

    Attributes:
        tau: the horizon.
        n: (G,) patients per group (group 0 = lowest predicted survival = highest risk).
        events: (G,) events per group (at any time).
        predicted: (G,) mean predicted survival at τ.
        observed: (G,) Kaplan–Meier survival at τ of the group.
        lower: (G,) lower log-log (exponential Greenwood) CI bound of ``observed``.
        upper: (G,) upper bound.
    """

    tau: float
    n: np.ndarray
    events: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def default_n_groups(n: int) -> int:
    """Groups of the calibration table: deciles, fewer so each holds about 10 patients."""
    return int(min(10, max(2, n // 10)))


def _km_at(t: np.ndarray, e: np.ndarray, tau: float, alpha: float) -> tuple[float, float, float]:
    from sksurv.nonparametric import kaplan_meier_estimator

    times, surv, conf = kaplan_meier_estimator(e, t, conf_level=1 - alpha, conf_type="log-log")
    pos = int(np.searchsorted(times, tau, side="right")) - 1
    if pos < 0:
        return 1.0, 1.0, 1.0
    return float(surv[pos]), float(conf[0][pos]), float(conf[1][pos])


def calibration_by_group(
    time: Any,
    event: Any,
    predicted: Any,
    tau: float,
    *,
    n_groups: int | None = None,
    alpha: float = 0.05,
) -> CalibrationTable:
    """Group patients by quantiles of predicted survival at τ and compare the mean
    prediction with the Kaplan–Meier survival at τ of each group.

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators.
        predicted: (N,) predicted survival probabilities at ``tau``.
        tau: the horizon.
        n_groups: quantile groups (default :func:`default_n_groups`).
        alpha: 1 - confidence level of the Kaplan–Meier CIs.

    Raises:
        SurvivalDataError: bad inputs (naming the argument).
        UndefinedStatisticError: fewer patients than groups.
    """
    d = validate_survival(time, event, predicted, names=("time", "event", "predicted"))
    p = np.asarray(d.risk)
    if ((p < 0) | (p > 1)).any():
        raise SurvivalDataError("predicted must be survival probabilities in [0, 1]")
    g = default_n_groups(p.size) if n_groups is None else int(n_groups)
    if g < 1:
        raise SurvivalDataError(f"n_groups must be >= 1, got {n_groups}")
    if p.size < 2 * g:
        raise UndefinedStatisticError(f"{p.size} patients are too few for {g} groups")
    order = np.argsort(p, kind="mergesort")
    groups = np.array_split(order, g)
    rows = []
    for idx in groups:
        obs = _km_at(d.time[idx], d.event[idx], tau, alpha)
        rows.append((idx.size, int(d.event[idx].sum()), float(p[idx].mean()), *obs))
    arr = np.array(rows, dtype=np.float64)
    return CalibrationTable(
        float(tau),
        arr[:, 0].astype(int),
        arr[:, 1].astype(int),
        arr[:, 2],
        arr[:, 3],
        arr[:, 4],
        arr[:, 5],
    )
