"""Risk stratification: training cut-offs, Kaplan–Meier, log-rank and hazard ratios.

Cut-offs are always learnt on **training** predictions and applied to held-out ones, so
the groups of a test patient never depend on the test outcomes. Statistics come from
lifelines (``KaplanMeierFitter``, ``multivariate_logrank_test``, ``CoxPHFitter``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.survival.validate import (
    SurvivalDataError,
    UndefinedStatisticError,
    _plain,
    validate_survival,
)

__all__ = [
    "HazardRatio",
    "KMCurve",
    "LogRank",
    "Stratification",
    "assign_groups",
    "group_labels",
    "hazard_ratios",
    "kaplan_meier",
    "learn_cutoffs",
    "logrank",
    "median_follow_up",
    "numbers_at_risk",
    "stratify_risk",
]


class KMCurve(NamedTuple):
    """Kaplan–Meier estimate of one group.

    Attributes:
        label: group name.
        times: (K,) step times, starting at 0.
        survival: (K,) survival probability from each time on.
        lower: (K,) lower 95% confidence band (exponential Greenwood, lifelines).
        upper: (K,) upper 95% band.
        n: patients in the group.
        events: events in the group.
        median: median survival time (inf when the curve never reaches 0.5).
    """

    label: str
    times: np.ndarray
    survival: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n: int
    events: int
    median: float


class LogRank(NamedTuple):
    """Log-rank test across groups (``multivariate_logrank_test``).

    Attributes:
        statistic: chi-squared test statistic.
        p_value: two-sided p-value.
        dof: degrees of freedom (groups - 1).
        n_groups: non-empty groups compared.
    """

    statistic: float
    p_value: float
    dof: int
    n_groups: int


class HazardRatio(NamedTuple):
    """One row of a Cox model: hazard ratio with its 95% confidence interval.

    Attributes:
        variable: design column (e.g. ``"risk_group=high"`` or ``"age"``).
        label: readable name (``"risk group: high vs low"``; per unit for numbers).
        hr: hazard ratio exp(coef).
        lower: lower 95% bound.
        upper: upper 95% bound.
        p_value: Wald test p-value.
        model: ``"univariate"`` or ``"multivariable"``.
        n: patients used (complete cases).
        events: events among them.
        note: warnings raised while fitting (e.g. convergence), else empty.
    """

    variable: str
    label: str
    hr: float
    lower: float
    upper: float
    p_value: float
    model: str
    n: int
    events: int
    note: str


class Stratification(NamedTuple):
    """Result of :func:`stratify_risk`.

    Attributes:
        cutoffs: (G-1,) cut-offs learnt on training risks.
        labels: (G,) group names, lowest risk first.
        groups: (N,) group index of each held-out patient.
        curves: Kaplan–Meier curve per non-empty group.
        logrank: log-rank test, or None when undefined (see ``note``).
        at_risk: numbers at risk per group label at ``at_times``.
        at_times: (T,) times of the at-risk table.
        note: why a statistic is missing, else empty.
    """

    cutoffs: np.ndarray
    labels: list[str]
    groups: np.ndarray
    curves: list[KMCurve]
    logrank: LogRank | None
    at_risk: dict[str, list[int]]
    at_times: np.ndarray
    note: str


def group_labels(n_groups: int) -> list[str]:
    """Readable names for ``n_groups`` risk groups, lowest risk first."""
    if n_groups == 2:
        return ["low", "high"]
    if n_groups == 3:
        return ["low", "intermediate", "high"]
    return [f"Q{i + 1}" for i in range(n_groups)]


def learn_cutoffs(
    train_risk: Any,
    n_groups: int = 2,
    *,
    quantiles: Sequence[float] | None = None,
) -> np.ndarray:
    """Cut-offs from **training** risks: the median (2 groups) or equal quantiles.

    Args:
        train_risk: (M,) training risk scores.
        n_groups: number of groups (>= 2), split at equal quantiles.
        quantiles: explicit increasing quantiles in (0, 1) instead of ``n_groups``,
            e.g. ``[0.25, 0.75]``.

    Returns:
        (G-1,) increasing cut-offs.
    """
    r = np.asarray(train_risk, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise UndefinedStatisticError("no training risks to learn cut-offs from")
    bad = ~np.isfinite(r)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SurvivalDataError(f"train_risk must be finite; index {i} has {r[i]!r}")
    if quantiles is None:
        if int(n_groups) < 2:
            raise SurvivalDataError(f"n_groups must be >= 2, got {n_groups}")
        q = np.linspace(0, 1, int(n_groups) + 1)[1:-1]
    else:
        q = np.asarray(quantiles, dtype=np.float64)
        if q.size == 0 or (q <= 0).any() or (q >= 1).any() or (np.diff(q) <= 0).any():
            raise SurvivalDataError(
                f"quantiles must be increasing and inside (0, 1), got {list(quantiles)}"
            )
    return np.quantile(r, q)


def assign_groups(risk: Any, cutoffs: Any) -> np.ndarray:
    """Group index of each risk: 0 = lowest; a risk above cut-off k is in group k+1.

    Args:
        risk: (N,) risk scores.
        cutoffs: (G-1,) increasing cut-offs from :func:`learn_cutoffs`.

    Returns:
        (N,) int64 group indices.
    """
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(r)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SurvivalDataError(f"risk must be finite; index {i} has {r[i]!r}")
    return np.searchsorted(np.asarray(cutoffs, dtype=np.float64), r, side="left").astype(np.int64)


def _fit_km(time: np.ndarray, event: np.ndarray, label: str) -> Any:
    from lifelines import KaplanMeierFitter

    return KaplanMeierFitter(label=label).fit(time, event_observed=event)


def kaplan_meier(
    time: Any,
    event: Any,
    groups: Any,
    labels: Sequence[str],
) -> list[KMCurve]:
    """Kaplan–Meier curve of every non-empty group (lifelines ``KaplanMeierFitter``).

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators.
        groups: (N,) group index in ``[0, len(labels))``.
        labels: group names.

    Returns:
        One :class:`KMCurve` per group that has patients, in label order.
    """
    d = validate_survival(time, event, min_samples=1, require_events=False)
    g = np.asarray(groups).reshape(-1)
    curves = []
    for k, label in enumerate(labels):
        m = g == k
        if not m.any():
            continue
        km = _fit_km(d.time[m], d.event[m], label)
        sf = km.survival_function_.iloc[:, 0]
        ci = km.confidence_interval_survival_function_
        curves.append(
            KMCurve(
                label=label,
                times=sf.index.to_numpy(dtype=np.float64),
                survival=sf.to_numpy(dtype=np.float64),
                lower=ci.iloc[:, 0].to_numpy(dtype=np.float64),
                upper=ci.iloc[:, 1].to_numpy(dtype=np.float64),
                n=int(m.sum()),
                events=int(d.event[m].sum()),
                median=float(km.median_survival_time_),
            )
        )
    return curves


def numbers_at_risk(time: Any, groups: Any, labels: Sequence[str], at: Any) -> dict[str, list[int]]:
    """Patients still under follow-up (time >= t) per group at each time in ``at``.

    Args:
        time: (N,) follow-up times.
        groups: (N,) group indices.
        labels: group names.
        at: (T,) times.

    Returns:
        ``{label: [n at risk at each time]}``.
    """
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    at = np.asarray(at, dtype=np.float64).reshape(-1)
    return {label: [int(((g == k) & (t >= s)).sum()) for s in at] for k, label in enumerate(labels)}


def logrank(time: Any, event: Any, groups: Any) -> LogRank:
    """Log-rank test of equal survival across two or more groups.

    Args:
        time: (N,) follow-up times.
        event: (N,) event indicators.
        groups: (N,) group labels or indices.

    Returns:
        A :class:`LogRank`.

    Raises:
        UndefinedStatisticError: fewer than two non-empty groups or no events.
    """
    from lifelines.statistics import multivariate_logrank_test

    d = validate_survival(time, event)
    g = np.asarray(groups).reshape(-1)
    n_groups = len(np.unique(g))
    if n_groups < 2:
        raise UndefinedStatisticError(
            "log-rank test needs at least two non-empty risk groups; all patients fell in "
            "one group (training cut-offs did not separate the held-out risks)"
        )
    res = multivariate_logrank_test(d.time, g, d.event)
    return LogRank(float(res.test_statistic), float(res.p_value), n_groups - 1, n_groups)


def median_follow_up(time: Any, event: Any) -> float:
    """Median follow-up by the reverse Kaplan–Meier method (censoring as the event).

    Returns:
        The median potential follow-up time (inf when not reached).
    """
    d = validate_survival(time, event, min_samples=1, require_events=False)
    return float(_fit_km(d.time, ~d.event, "follow-up").median_survival_time_)


def _encode(df: pd.DataFrame, col: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """Design columns for one variable: numbers as is, categories as dummies."""
    s = df[col]
    if pd.api.types.is_bool_dtype(s):
        s = s.astype(float)
    if pd.api.types.is_numeric_dtype(s):
        if s.nunique() < 2:
            raise UndefinedStatisticError(
                f"covariate {col!r} is constant ({_plain(s.iloc[0])!r} in every row used), so its "
                "hazard ratio is undefined; drop it from the covariates"
            )
        return pd.DataFrame({col: s.astype(float)}), {col: f"{col} (per unit)"}
    levels = (
        list(s.cat.categories)
        if isinstance(s.dtype, pd.CategoricalDtype)
        else sorted(s.astype(str).unique())
    )
    present = [lv for lv in levels if (s.astype(str) == str(lv)).any()]
    if len(present) < 2:
        raise UndefinedStatisticError(
            f"covariate {col!r} is constant ({_plain(s.iloc[0])!r} in every row used), so its "
            "hazard ratio is undefined; drop it from the covariates"
        )
    ref = present[0]
    out, names = {}, {}
    for lv in present[1:]:
        name = f"{col}={lv}"
        out[name] = (s.astype(str) == str(lv)).astype(float)
        names[name] = f"{col}: {lv} vs {ref}"
    return pd.DataFrame(out, index=df.index), names


def _cox(
    df: pd.DataFrame,
    variables: Sequence[str],
    time_col: str,
    event_col: str,
    model: str,
) -> list[HazardRatio]:
    from lifelines import CoxPHFitter

    data = df[[time_col, event_col, *variables]].dropna()
    if len(data) < 2:
        raise UndefinedStatisticError(f"fewer than two complete rows for {', '.join(variables)}")
    if not data[event_col].astype(bool).any():
        raise UndefinedStatisticError("no events among the complete rows")
    parts, names = [], {}
    for col in variables:
        part, part_names = _encode(data, col)
        parts.append(part)
        names.update(part_names)
    design = pd.concat([data[[time_col, event_col]], *parts], axis=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cph = CoxPHFitter(penalizer=0.0).fit(design, time_col, event_col)
        except Exception as exc:  # lifelines ConvergenceError and linear-algebra failures
            raise UndefinedStatisticError(
                f"{model} Cox model with {', '.join(variables)} did not converge: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
    note = "; ".join(sorted({str(w.message).splitlines()[0] for w in caught}))
    summ = cph.summary
    rows = []
    for name, label in names.items():
        r = summ.loc[name]
        rows.append(
            HazardRatio(
                variable=name,
                label=label,
                hr=float(r["exp(coef)"]),
                lower=float(r["exp(coef) lower 95%"]),
                upper=float(r["exp(coef) upper 95%"]),
                p_value=float(r["p"]),
                model=model,
                n=len(data),
                events=int(data[event_col].astype(bool).sum()),
                note=note,
            )
        )
    return rows


def _check_columns(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SurvivalDataError(
            f"column(s) {', '.join(map(repr, missing))} not found; available: "
            f"{', '.join(map(str, df.columns))}"
        )


def hazard_ratios(
    data: pd.DataFrame,
    variables: Sequence[str],
    *,
    time: str = "time",
    event: str = "event",
    multivariable: bool = True,
) -> tuple[list[HazardRatio], dict[str, str]]:
    """Hazard ratios with 95% CIs from lifelines ``CoxPHFitter`` (Efron ties).

    Each variable is fitted alone (univariate) and, when ``multivariable``, all
    together. Numeric columns enter per unit; other columns are categorical with the
    first level (in sorted or categorical order) as reference. Rows with missing values
    are left out of a model (complete cases; ``n`` says how many were used).

    Args:
        data: one row per patient with ``time``, ``event`` and the variables.
        variables: columns to model, e.g. ``["risk_group", "age", "grade"]``.
        time: follow-up column.
        event: event column.
        multivariable: also fit the model with all variables.

    Returns:
        (rows, notes): the hazard ratios, and for every model that is undefined (a
        constant covariate, no events, no convergence) a note keyed by the model name
        (``"univariate: age"`` or ``"multivariable"``).
    """
    _check_columns(data, [time, event, *variables])
    validate_survival(
        data[time], data[event], names=(time, event, ""), rows=[f"row {i}" for i in data.index]
    )
    rows: list[HazardRatio] = []
    notes: dict[str, str] = {}
    for var in variables:
        try:
            rows += _cox(data, [var], time, event, "univariate")
        except UndefinedStatisticError as exc:
            notes[f"univariate: {var}"] = str(exc)
    if multivariable and len(variables) > 1:
        usable = [v for v in variables if f"univariate: {v}" not in notes]
        dropped = [v for v in variables if v not in usable]
        try:
            if len(usable) < 1:
                raise UndefinedStatisticError("no usable variable")
            rows += _cox(data, usable, time, event, "multivariable")
            if dropped:
                notes["multivariable"] = f"left out (undefined alone): {', '.join(dropped)}"
        except UndefinedStatisticError as exc:
            notes["multivariable"] = str(exc)
    return rows, notes


def stratify_risk(
    train_risk: Any,
    time: Any,
    event: Any,
    risk: Any,
    *,
    n_groups: int = 2,
    quantiles: Sequence[float] | None = None,
    at_times: Any | None = None,
) -> Stratification:
    """Learn cut-offs on training risks and compare the held-out risk groups.

    Args:
        train_risk: (M,) training risks (cut-offs only).
        time: (N,) held-out follow-up times.
        event: (N,) held-out events.
        risk: (N,) held-out risks.
        n_groups: groups at equal training quantiles (2 = median split).
        quantiles: explicit quantiles instead of ``n_groups``.
        at_times: (T,) times of the at-risk table; default 5 evenly spaced times from 0.

    Returns:
        A :class:`Stratification`; ``logrank`` is None with a ``note`` when undefined.
    """
    d = validate_survival(time, event, risk, min_samples=1, require_events=False)
    cut = learn_cutoffs(train_risk, n_groups, quantiles=quantiles)
    labels = group_labels(len(cut) + 1)
    groups = assign_groups(np.asarray(d.risk), cut)
    curves = kaplan_meier(d.time, d.event, groups, labels)
    note = ""
    lr = None
    try:
        lr = logrank(d.time, d.event, groups)
    except UndefinedStatisticError as exc:
        note = f"log-rank test undefined: {exc}"
    if at_times is None:
        at_times = np.linspace(0, d.time.max(), 5)
    at = np.asarray(at_times, dtype=np.float64)
    return Stratification(
        cut, labels, groups, curves, lr, numbers_at_risk(d.time, groups, labels, at), at, note
    )
