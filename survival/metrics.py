"""Discrimination and calibration metrics with bootstrap confidence intervals.

Sign convention (fixed here once, see :func:`to_risk`): a **risk** score is higher for
patients expected to have the event **earlier**. Statistics come from
scikit-survival; this module adds input validation, the Breslow baseline needed to turn
risks into survival curves, and seeded percentile-bootstrap CIs.

Every function validates its inputs once and raises
:class:`~wsi_mil.survival.validate.SurvivalDataError` naming the argument and the first
offending index, or :class:`~wsi_mil.survival.validate.UndefinedStatisticError` when a
statistic is undefined for valid data (no events, no comparable pairs, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from wsi_mil.survival.validate import (
    SurvivalDataError,
    UndefinedStatisticError,
    validate_survival,
)

__all__ = [
    "BreslowBaseline",
    "BrierScore",
    "CIndex",
    "TimeAUC",
    "breslow_survival",
    "brier_from_survival",
    "default_eval_times",
    "harrell_c",
    "integrated_brier",
    "time_dependent_auc",
    "to_risk",
    "uno_c",
]


class CIndex(NamedTuple):
    """A concordance index with a percentile-bootstrap confidence interval.

    Attributes:
        estimate: the C-index on the data given (0.5 = random, 1 = perfect ranking).
        lower: lower CI bound (NaN when no bootstrap resample was usable).
        upper: upper CI bound.
        n_bootstrap: bootstrap resamples the interval is based on.
    """

    estimate: float
    lower: float
    upper: float
    n_bootstrap: int


class TimeAUC(NamedTuple):
    """Cumulative/dynamic AUC at chosen times with pointwise bootstrap CIs.

    Attributes:
        times: (T,) evaluation times.
        auc: (T,) AUC at each time.
        lower: (T,) lower CI bounds.
        upper: (T,) upper CI bounds.
        mean_auc: AUC averaged over time (weighted by the KM survival drop).
        mean_lower: CI of ``mean_auc``.
        mean_upper: CI of ``mean_auc``.
        n_bootstrap: usable bootstrap resamples.
    """

    times: np.ndarray
    auc: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    mean_auc: float
    mean_lower: float
    mean_upper: float
    n_bootstrap: int


class BrierScore(NamedTuple):
    """Time-dependent Brier score and its integral (lower is better).

    Attributes:
        times: (T,) evaluation times.
        brier: (T,) IPCW Brier score at each time.
        ibs: integrated Brier score over ``times``.
        lower: lower CI bound of ``ibs``.
        upper: upper CI bound of ``ibs``.
        n_bootstrap: usable bootstrap resamples.
    """

    times: np.ndarray
    brier: np.ndarray
    ibs: float
    lower: float
    upper: float
    n_bootstrap: int


def to_risk(
    scores: Any,
    higher_means: Literal["risk", "survival"] = "risk",
) -> np.ndarray:
    """Return scores as risks (higher = earlier event), the convention used everywhere.

    Args:
        scores: (N,) model outputs: log hazards / risks (``higher_means="risk"``) or
            predicted survival times / probabilities (``higher_means="survival"``).
        higher_means: what a higher score means for the patient.

    Returns:
        (N,) float64 risk scores.
    """
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if higher_means == "risk":
        return arr
    if higher_means == "survival":
        return -arr
    raise SurvivalDataError(f"higher_means must be 'risk' or 'survival', got {higher_means!r}")


def _validated(time: Any, event: Any, risk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = validate_survival(time, event, risk)
    r = d.risk if d.risk is not None else np.zeros_like(d.time)
    return d.time, d.event, r


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    out = np.empty(time.shape[0], dtype=[("event", bool), ("time", np.float64)])
    out["event"] = event
    out["time"] = time
    return out


def _resamples(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """The seeded bootstrap draws, ``(n,)`` row indices each, shared by every CI."""
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        yield rng.integers(0, n, n)


def _bootstrap(
    stat: Callable[[np.ndarray], Any],
    n: int,
    n_bootstrap: int,
    seed: int,
) -> list[Any]:
    """Evaluate ``stat(indices)`` on seeded resamples; skip undefined resamples."""
    if n_bootstrap < 0:
        raise SurvivalDataError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    values = []
    for idx in _resamples(n, n_bootstrap, seed):
        try:
            values.append(stat(idx))
        except (UndefinedStatisticError, ValueError, ZeroDivisionError):
            continue  # e.g. a resample without events or comparable pairs
    return values


def _interval(values: Sequence[Any], alpha: float) -> tuple[Any, Any]:
    if not 0 < alpha < 1:
        raise SurvivalDataError(f"alpha must be in (0, 1), got {alpha}")
    if len(values) == 0:
        return np.nan, np.nan
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(arr, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


def _harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tied_tol: float) -> float:
    from sksurv.metrics import concordance_index_censored

    if not event.any():
        raise UndefinedStatisticError("no events")
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> checked below
            value = float(concordance_index_censored(event, time, risk, tied_tol=tied_tol)[0])
    except Exception as exc:  # sksurv's NoComparablePairException, ZeroDivision
        if type(exc).__name__ == "NoComparablePairException" or isinstance(exc, ZeroDivisionError):
            raise UndefinedStatisticError(
                "no comparable pairs (every event time is tied with all others or no "
                "patient outlived an event)"
            ) from exc
        raise
    if not np.isfinite(value):
        raise UndefinedStatisticError("no comparable pairs")
    return value


def harrell_c(
    time: Any,
    event: Any,
    risk: Any,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tied_tol: float = 1e-8,
) -> CIndex:
    """Harrell's concordance index (scikit-survival ``concordance_index_censored``).

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators (1 = event).
        risk: (N,) risk scores, higher = earlier event (see :func:`to_risk`).
        n_bootstrap: percentile-bootstrap resamples (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.
        tied_tol: risks closer than this count as tied (0.5 credit).

    Returns:
        A :class:`CIndex`.
    """
    t, e, r = _validated(time, event, risk)
    est = _harrell(t, e, r, tied_tol)
    if len(t) <= _PAIRWISE_MAX:
        boots = _pair_bootstrap(t, e, r, np.ones_like(t), tied_tol, n_bootstrap, seed)
    else:

        def stat(i: np.ndarray) -> float:
            return _harrell(t[i], e[i], r[i], tied_tol)

        boots = _bootstrap(stat, len(t), n_bootstrap, seed)
    lo, hi = _interval(boots, alpha)
    return CIndex(est, float(lo), float(hi), len(boots))


_PAIRWISE_MAX = 2000  # patients: (N, N) float64 pair matrices up to 32 MB each


def _pair_bootstrap(
    t: np.ndarray,
    e: np.ndarray,
    r: np.ndarray,
    w: np.ndarray,
    tied_tol: float,
    n_bootstrap: int,
    seed: int,
) -> list[float]:
    """Bootstrap of scikit-survival's weighted concordance, all resamples at once.

    ``_estimate_concordance_index`` sums, over comparable pairs (``i`` an event and
    ``j`` later, or censored at the same time), ``w_i`` times 1 for a concordant pair
    and 1/2 for tied risks, and divides by the sum of ``w_i``. A resample that repeats
    patient ``i`` ``c_i`` times weights pair ``(i, j)`` by ``c_i c_j``, so resample
    ``b``'s C is ``c_b^T A c_b / c_b^T B c_b`` with the pair matrices ``A`` and ``B``
    built once. The resamples are those of :func:`_bootstrap` (same seed, same draws);
    values equal a per-resample call of scikit-survival (tested).

    Args:
        t: (N,) times.
        e: (N,) bool events.
        r: (N,) risks.
        w: (N,) per-patient weights (1 for Harrell; squared IPCW, 0 after tau, for Uno).
        tied_tol: risks closer than this are tied.
        n_bootstrap: resamples.
        seed: seed of the resampling.

    Returns:
        The C of every resample with a comparable pair.
    """
    if n_bootstrap < 0:
        raise SurvivalDataError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if n_bootstrap == 0:
        return []
    n = t.size
    later = (t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :])
    comparable = (e[:, None] & later) * w[:, None]  # B: (N, N)
    tie = np.abs(r[None, :] - r[:, None]) <= tied_tol
    credit = np.where(tie, 0.5, (r[None, :] < r[:, None]).astype(np.float64))
    counts = np.stack(  # (n_bootstrap, N) multiplicities
        [np.bincount(idx, minlength=n) for idx in _resamples(n, n_bootstrap, seed)]
    ).astype(np.float64)
    num = ((counts @ (comparable * credit)) * counts).sum(1)
    den = ((counts @ comparable) * counts).sum(1)
    ok = den > 0
    return (num[ok] / den[ok]).tolist()


def _reference(
    time: np.ndarray,
    event: np.ndarray,
    train_time: Any | None,
    train_event: Any | None,
) -> tuple[np.ndarray, np.ndarray] | None:
    if (train_time is None) != (train_event is None):
        raise SurvivalDataError("pass both train_time and train_event, or neither")
    if train_time is None:
        return None
    ref = validate_survival(train_time, train_event, names=("train_time", "train_event", ""))
    return ref.time, ref.event


def _uno(
    ref: tuple[np.ndarray, np.ndarray],
    t: np.ndarray,
    e: np.ndarray,
    r: np.ndarray,
    tau: float,
    tied_tol: float,
) -> float:
    from sksurv.metrics import concordance_index_ipcw

    if not e[t < tau].any():
        raise UndefinedStatisticError(f"no events before tau={tau:g}")
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = concordance_index_ipcw(
                _structured(*ref), _structured(t, e), r, tau=tau, tied_tol=tied_tol
            )[0]
    except ValueError as exc:
        if type(exc).__name__ == "NoComparablePairException":
            raise UndefinedStatisticError("no comparable pairs before tau") from exc
        raise UndefinedStatisticError(
            f"Uno's C undefined at tau={tau:g}: {exc}; choose a smaller tau"
        ) from exc
    except ZeroDivisionError as exc:
        raise UndefinedStatisticError("no comparable pairs before tau") from exc
    if not np.isfinite(value):
        raise UndefinedStatisticError("no comparable pairs before tau")
    return float(value)


def _uno_weights(
    ref: tuple[np.ndarray, np.ndarray], t: np.ndarray, e: np.ndarray, tau: float
) -> np.ndarray:
    """(N,) squared inverse censoring probabilities, 0 from ``tau`` on, as
    ``concordance_index_ipcw`` weights each patient (censoring KM fitted on ``ref``)."""
    from sksurv.nonparametric import CensoringDistributionEstimator

    before = t < tau
    cens = CensoringDistributionEstimator().fit(_structured(*ref))
    w = np.zeros_like(t)
    w[before] = np.square(cens.predict_ipcw(_structured(t[before], e[before])))
    return w


def uno_c(
    time: Any,
    event: Any,
    risk: Any,
    *,
    tau: float | None = None,
    train_time: Any | None = None,
    train_event: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tied_tol: float = 1e-8,
) -> CIndex:
    """Uno's IPCW concordance index truncated at ``tau`` (``concordance_index_ipcw``).

    The censoring distribution is estimated on the training data when given (else on
    the evaluation data itself); bootstrap resamples the evaluation rows.

    Args:
        time: (N,) follow-up times of the evaluated patients.
        event: (N,) event indicators.
        risk: (N,) risk scores, higher = earlier event.
        tau: truncation time; pairs are compared only before it. Default: the 80th
            percentile of the reference follow-up times, where the censoring
            distribution is still well estimated.
        train_time: optional (M,) reference times for the censoring distribution.
        train_event: optional (M,) reference events.
        n_bootstrap: bootstrap resamples (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.
        tied_tol: risk tie tolerance.

    Returns:
        A :class:`CIndex`.
    """
    t, e, r = _validated(time, event, risk)
    ref = _reference(t, e, train_time, train_event)
    ref_t = t if ref is None else ref[0]
    if tau is None:
        tau = float(np.percentile(ref_t, 80))
    if not np.isfinite(tau) or tau <= 0:
        raise SurvivalDataError(f"tau must be a positive time, got {tau!r}")
    tau = float(tau)
    est = _uno((t, e) if ref is None else ref, t, e, r, tau, tied_tol)
    if ref is not None and len(t) <= _PAIRWISE_MAX:
        # fixed censoring weights: one set of pair matrices serves every resample
        boots = _pair_bootstrap(t, e, r, _uno_weights(ref, t, e, tau), tied_tol, n_bootstrap, seed)
    else:

        def stat(i: np.ndarray) -> float:
            base = (t[i], e[i]) if ref is None else ref
            return _uno(base, t[i], e[i], r[i], tau, tied_tol)

        boots = _bootstrap(stat, len(t), n_bootstrap, seed)
    lo, hi = _interval(boots, alpha)
    return CIndex(est, float(lo), float(hi), len(boots))


def default_eval_times(
    time: Any,
    event: Any,
    n: int = 5,
    *,
    lower: float = 10,
    upper: float = 80,
) -> np.ndarray:
    """Evaluation times spread over the follow-up: percentiles of the event times.

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators.
        n: number of times.
        lower: lowest percentile of the event times.
        upper: highest percentile.

    Returns:
        (T,) unique times strictly inside the follow-up range (T <= n).
    """
    d = validate_survival(time, event)
    ev_t = d.time[d.event]
    grid = np.unique(np.percentile(ev_t, np.linspace(lower, upper, n)))
    return grid[(grid >= d.time.min()) & (grid < d.time.max())]


def _check_times(times: Any, t: np.ndarray, name: str = "times") -> np.ndarray:
    arr = np.unique(np.asarray(times, dtype=np.float64).reshape(-1))
    if arr.size == 0:
        raise SurvivalDataError(f"{name} is empty; give at least one evaluation time")
    bad = ~np.isfinite(arr) | (arr < t.min()) | (arr >= t.max())
    if bad.any():
        raise SurvivalDataError(
            f"{name} must lie within the follow-up of the evaluated patients "
            f"[{t.min():g}, {t.max():g}); got {arr[bad][0]:g}"
        )
    return arr


def _auc(
    ref: tuple[np.ndarray, np.ndarray],
    t: np.ndarray,
    e: np.ndarray,
    r: np.ndarray,
    times: np.ndarray,
) -> tuple[np.ndarray, float]:
    from sksurv.metrics import cumulative_dynamic_auc

    if times.max() >= t.max() or times.min() < t.min():
        raise UndefinedStatisticError("evaluation times outside the follow-up")
    has_case = np.array([(e & (t <= s)).any() and (t > s).any() for s in times])
    if not has_case.all():
        raise UndefinedStatisticError(
            f"no cases or no controls at time {times[~has_case][0]:g}; choose other times"
        )
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            auc, mean = cumulative_dynamic_auc(_structured(*ref), _structured(t, e), r, times)
    except ValueError as exc:
        raise UndefinedStatisticError(f"time-dependent AUC undefined: {exc}") from exc
    auc = np.asarray(auc, dtype=np.float64)
    if not (np.isfinite(auc).all() and np.isfinite(mean)):
        raise UndefinedStatisticError("time-dependent AUC undefined (no cases or controls)")
    return auc, float(mean)


def time_dependent_auc(
    time: Any,
    event: Any,
    risk: Any,
    times: Any | None = None,
    *,
    train_time: Any | None = None,
    train_event: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> TimeAUC:
    """Cumulative/dynamic AUC(t): do patients with an event by t have higher risk than
    those still event-free at t? (``cumulative_dynamic_auc``, IPCW).

    Args:
        time: (N,) follow-up times of the evaluated patients.
        event: (N,) event indicators.
        risk: (N,) risk scores, higher = earlier event.
        times: (T,) evaluation times within the follow-up; default
            :func:`default_eval_times`.
        train_time: optional (M,) reference times for the censoring weights.
        train_event: optional (M,) reference events.
        n_bootstrap: bootstrap resamples (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        A :class:`TimeAUC`.
    """
    t, e, r = _validated(time, event, risk)
    ref = _reference(t, e, train_time, train_event)
    grid = default_eval_times(t, e) if times is None else _check_times(times, t)
    if grid.size == 0:
        raise UndefinedStatisticError("no evaluation time inside the follow-up")
    auc, mean = _auc((t, e) if ref is None else ref, t, e, r, grid)

    def stat(i: np.ndarray) -> np.ndarray:
        base = (t[i], e[i]) if ref is None else ref
        a, m = _auc(base, t[i], e[i], r[i], grid)
        return np.append(a, m)

    boots = _bootstrap(stat, len(t), n_bootstrap, seed)
    lo, hi = _interval(boots, alpha)
    if len(boots) == 0:
        lo = hi = np.full(grid.size + 1, np.nan)
    return TimeAUC(grid, auc, lo[:-1], hi[:-1], mean, float(lo[-1]), float(hi[-1]), len(boots))


class BreslowBaseline(NamedTuple):
    """Breslow baseline cumulative hazard fitted on training risks.

    Attributes:
        times: (K,) unique training event/censoring times, increasing.
        cum_hazard: (K,) baseline cumulative hazard at those times (for risk = center).
        center: the mean training risk subtracted before exponentiating.
    """

    times: np.ndarray
    cum_hazard: np.ndarray
    center: float

    def survival(self, risk: Any, times: Any) -> np.ndarray:
        """Predicted survival ``S(t | risk) = exp(-H0(t) * exp(risk - center))``.

        Args:
            risk: (N,) risk scores on the training scale.
            times: (T,) times; before the first training time H0 = 0, after the last
                it stays at its last value.

        Returns:
            (N, T) survival probabilities.
        """
        r = np.asarray(risk, dtype=np.float64).reshape(-1)
        s = np.asarray(times, dtype=np.float64).reshape(-1)
        pos = np.searchsorted(self.times, s, side="right") - 1
        h0 = np.where(pos >= 0, self.cum_hazard[np.clip(pos, 0, None)], 0.0)
        return np.exp(-np.outer(np.exp(r - self.center), h0))


def breslow_survival(train_time: Any, train_event: Any, train_risk: Any) -> BreslowBaseline:
    r"""Fit Breslow's baseline cumulative hazard on **training** predictions.

    :math:`H_0(t) = \sum_{t_k \le t} d_k / \sum_{j: t_j \ge t_k} e^{r_j - c}`, with
    ``d_k`` events at unique time ``t_k`` and ``c`` the mean training risk (for
    numerical range only; it cancels in predictions).

    Args:
        train_time: (M,) training follow-up times.
        train_event: (M,) training event indicators.
        train_risk: (M,) training risk scores.

    Returns:
        A :class:`BreslowBaseline`.
    """
    d = validate_survival(
        train_time, train_event, train_risk, names=("train_time", "train_event", "train_risk")
    )
    risk = np.asarray(d.risk)
    center = float(risk.mean())
    order = np.argsort(d.time, kind="mergesort")
    t, e, w = d.time[order], d.event[order], np.exp(risk[order] - center)
    uniq, first = np.unique(t, return_index=True)
    at_risk = np.cumsum(w[::-1])[::-1][first]
    deaths = np.add.reduceat(e.astype(np.float64), first)
    return BreslowBaseline(uniq, np.cumsum(deaths / at_risk), center)


def _ibs(
    ref: tuple[np.ndarray, np.ndarray],
    t: np.ndarray,
    e: np.ndarray,
    surv: np.ndarray,
    times: np.ndarray,
) -> tuple[np.ndarray, float]:
    from sksurv.metrics import brier_score, integrated_brier_score

    if times.max() >= t.max() or times.min() < t.min():
        raise UndefinedStatisticError("evaluation times outside the follow-up")
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            _, bs = brier_score(_structured(*ref), _structured(t, e), surv, times)
            ibs = integrated_brier_score(_structured(*ref), _structured(t, e), surv, times)
    except ValueError as exc:
        raise UndefinedStatisticError(f"Brier score undefined: {exc}") from exc
    bs = np.asarray(bs, dtype=np.float64)
    if not (np.isfinite(bs).all() and np.isfinite(ibs)):
        raise UndefinedStatisticError("Brier score undefined at the evaluation times")
    return bs, float(ibs)


def brier_from_survival(
    time: Any,
    event: Any,
    survival: Any,
    times: Any | None = None,
    *,
    ref_time: Any | None = None,
    ref_event: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BrierScore:
    """Time-dependent and integrated Brier score of predicted survival curves.

    Args:
        time: (N,) evaluated follow-up times.
        event: (N,) evaluated event indicators.
        survival: (N, T) predicted survival probabilities at ``times``, or a callable
            ``times -> (N, T)`` (used when ``times`` is None and chosen here).
        times: (T >= 2,) evaluation times inside the follow-up; default 20 points
            between the 10th and 80th percentile of the evaluated event times.
        ref_time: optional (M,) reference times for the censoring weights
            (default: the evaluated patients).
        ref_event: optional (M,) reference events.
        n_bootstrap: bootstrap resamples of the evaluated rows (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        A :class:`BrierScore` (CI on the integrated score).
    """
    d = validate_survival(time, event)
    t, e = d.time, d.event
    ref = _reference(t, e, ref_time, ref_event) or (t, e)
    grid = default_eval_times(t, e, n=20) if times is None else _check_times(times, t)
    if grid.size < 2:
        raise UndefinedStatisticError(
            "the integrated Brier score needs at least two evaluation times inside the follow-up"
        )
    surv = np.asarray(survival(grid) if callable(survival) else survival, dtype=np.float64)
    if surv.shape != (t.size, grid.size):
        raise SurvivalDataError(
            f"survival must have shape (N, T) = ({t.size}, {grid.size}), got {surv.shape}"
        )
    bs, ibs = _ibs(ref, t, e, surv, grid)
    boots = _bootstrap(lambda i: _ibs(ref, t[i], e[i], surv[i], grid)[1], len(t), n_bootstrap, seed)
    lo, hi = _interval(boots, alpha)
    return BrierScore(grid, bs, ibs, float(lo), float(hi), len(boots))


def integrated_brier(
    time: Any,
    event: Any,
    risk: Any,
    *,
    train_time: Any,
    train_event: Any,
    train_risk: Any,
    times: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BrierScore:
    """Integrated Brier score of survival curves from a Breslow baseline.

    Risks only rank patients; to get survival probabilities a Breslow baseline is
    fitted on the **training** predictions (:func:`breslow_survival`) and applied to
    the evaluated ones. IPCW weights come from the training censoring distribution.

    Args:
        time: (N,) evaluated follow-up times.
        event: (N,) evaluated event indicators.
        risk: (N,) evaluated risks.
        train_time: (M,) training times.
        train_event: (M,) training events.
        train_risk: (M,) training risks (same model, same scale).
        times: (T >= 2,) evaluation times inside the follow-up (see
            :func:`brier_from_survival`).
        n_bootstrap: bootstrap resamples (0 = no interval).
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        A :class:`BrierScore` (CI on the integrated score).
    """
    t, e, r = _validated(time, event, risk)
    base = breslow_survival(train_time, train_event, train_risk)
    return brier_from_survival(
        t,
        e,
        lambda grid: base.survival(r, grid),
        times,
        ref_time=train_time,
        ref_event=train_event,
        n_bootstrap=n_bootstrap,
        seed=seed,
        alpha=alpha,
    )
