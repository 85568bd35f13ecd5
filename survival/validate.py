"""Validation of survival inputs, done once at the public entry points.

Invalid values (negative or NaN times, events that are not 0/1, NaN risks) raise
:class:`SurvivalDataError` naming the argument or column and the first offending row.
A statistic that is merely *undefined* for valid data (no events, one patient, all
times tied, a constant covariate) raises :class:`UndefinedStatisticError`, which the
report catches and prints as a note instead of a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from wsi_mil.errors import CohortError

__all__ = ["SurvivalData", "SurvivalDataError", "UndefinedStatisticError", "validate_survival"]


class SurvivalDataError(CohortError):
    """Survival data (times, events, risks, covariates) with invalid values."""


class UndefinedStatisticError(SurvivalDataError):
    """Valid data for which a statistic is undefined (e.g. no events, one patient)."""


class SurvivalData(NamedTuple):
    """Validated survival arrays, all (N,).

    Attributes:
        time: float64 follow-up times (>= 0).
        event: bool event indicators.
        risk: float64 risk scores (higher = earlier event) or None.
    """

    time: np.ndarray
    event: np.ndarray
    risk: np.ndarray | None


def _plain(value: Any) -> Any:
    """Python scalar for messages (``2`` rather than ``np.int64(2)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _row_label(rows: Sequence[Any] | None, i: int) -> str:
    return str(rows[i]) if rows is not None else f"index {i}"


def _to_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise SurvivalDataError(f"{name} must be one-dimensional (N,), got shape {arr.shape}")
    return arr


def _as_float(arr: np.ndarray, name: str, rows: Sequence[Any] | None) -> np.ndarray:
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError):
        for i, v in enumerate(arr):
            try:
                float(v)
            except (TypeError, ValueError):
                raise SurvivalDataError(
                    f"{name} must be numeric; {_row_label(rows, i)} has {_plain(v)!r}"
                ) from None
        raise


def validate_survival(
    time: Any,
    event: Any,
    risk: Any | None = None,
    *,
    names: tuple[str, str, str] = ("time", "event", "risk"),
    rows: Sequence[Any] | None = None,
    min_samples: int = 2,
    require_events: bool = True,
) -> SurvivalData:
    """Check and convert survival arrays.

    Args:
        time: (N,) follow-up times; must be finite and >= 0.
        event: (N,) 1/True = event, 0/False = censored (bools, ints or 0.0/1.0).
        risk: optional (N,) finite risk scores.
        names: how to call (time, event, risk) in messages (argument or column names).
        rows: optional (N,) row labels used verbatim in messages (e.g. ``"line 7 of
            predictions.csv"``) instead of ``"index i"``.
        min_samples: fewer samples raise :class:`UndefinedStatisticError`.
        require_events: raise :class:`UndefinedStatisticError` when no event occurred.

    Returns:
        A :class:`SurvivalData` with float64 times, bool events and float64 risks.

    Raises:
        SurvivalDataError: invalid values, naming the argument/column and first bad row.
        UndefinedStatisticError: too few samples or no events.
    """
    tname, ename, rname = names
    t = _as_float(_to_1d(time, tname), tname, rows)
    e_raw = _to_1d(event, ename)
    n = t.shape[0]
    if e_raw.shape[0] != n:
        raise SurvivalDataError(f"{ename} has {e_raw.shape[0]} values but {tname} has {n}")
    bad = ~np.isfinite(t) | (t < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SurvivalDataError(
            f"{tname} must be finite and >= 0; {_row_label(rows, i)} has {float(t[i])!r}; "
            "fix or drop that row"
        )
    if e_raw.dtype == bool:
        e = e_raw
    else:
        e_num = _as_float(e_raw, ename, rows)
        bad = ~np.isin(e_num, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurvivalDataError(
                f"{ename} must be 0 (censored) or 1 (event); {_row_label(rows, i)} "
                f"has {_plain(e_raw[i])!r}"
            )
        e = e_num == 1.0
    r = None
    if risk is not None:
        r = _as_float(_to_1d(risk, rname), rname, rows)
        if r.shape[0] != n:
            raise SurvivalDataError(f"{rname} has {r.shape[0]} values but {tname} has {n}")
        bad = ~np.isfinite(r)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurvivalDataError(
                f"{rname} must be finite; {_row_label(rows, i)} has {float(r[i])!r}; "
                "re-run prediction or drop that row"
            )
    if n < min_samples:
        raise UndefinedStatisticError(
            f"needs at least {min_samples} patients, got {n}"
            + (" (a single patient)" if n == 1 else "")
        )
    if require_events and not e.any():
        raise UndefinedStatisticError(
            f"no events: every value of {ename} is 0 (all censored), so concordance and "
            "hazard ratios are undefined"
        )
    return SurvivalData(t, e, r)
