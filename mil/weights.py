"""Per-patient weights of the Cox loss (``--weight-column``, ``--event-weight``).

A weighted Cox fit multiplies each sample's contribution to the partial likelihood
(its event term and its share of every risk set) by its weight, as lifelines'
``CoxPHFitter(weights_col=...)`` does. Weights here are per *patient*:

* ``--weight-column COL`` reads one weight per patient from the cohort table (finite,
  >= 0; every slide row of a patient must give the same value);
* ``--event-weight W`` multiplies the weight of patients with an event by ``W``;
* at ``--level slide`` a patient's slides are separate samples and share the
  patient's weight equally (:func:`unit_weights`), so a patient with three slides
  weighs as much as a patient with one, instead of counting three times.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from wsi_mil.errors import CohortError
from wsi_mil.mil.cohort import _read_table

__all__ = ["load_patient_weights", "unit_weights"]

_PATIENT_COLUMNS = ("patient_id", "case_id")


def load_patient_weights(
    path: str | os.PathLike[str], column: str, patient_ids: Sequence[str] | None = None
) -> dict[str, float]:
    """Read one loss weight per patient from a cohort table.

    Args:
        path: The cohort CSV (one row per slide).
        column: The weight column.
        patient_ids: Patients that need a weight (default: every row's patient).

    Returns:
        ``{patient_id: weight}``.

    Raises:
        CohortError: Every problem at once, as ``file:line: column: message``: a
            missing column, an empty, non-numeric, non-finite or negative value, rows
            of one patient that disagree, or weights that are all zero.
    """
    path = Path(path)
    header, rows = _read_table(path)
    pid_col = next((c for c in _PATIENT_COLUMNS if c in header), "patient_id")
    if column not in header:
        raise CohortError(
            f"{path}:1: {column}: --weight-column {column!r} is not a column of the cohort "
            f"(columns: {', '.join(header)})"
        )
    problems: list[str] = []
    weights: dict[str, float] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        pid, text = row.get(pid_col, ""), row.get(column, "")
        value = _parse_weight(text)
        if value is None:
            problems.append(
                f"{path}:{line}: {column}: weight {text!r} must be a finite number >= 0 "
                f"(patient {pid!r}); fix or remove the row"
            )
            continue
        if pid in weights and weights[pid] != value:
            problems.append(
                f"{path}:{line}: {column}: weight {value:g} disagrees with {weights[pid]:g} "
                f"for patient {pid!r} on line {first[pid]}; a patient has one weight"
            )
            continue
        weights.setdefault(pid, value)
        first.setdefault(pid, line)
    wanted = list(weights) if patient_ids is None else list(patient_ids)
    if not problems and wanted and not any(weights.get(p, 0.0) > 0 for p in wanted):
        problems.append(f"{path}:1: {column}: every patient's weight is 0; nothing to fit")
    if problems:
        raise CohortError(
            f"{len(problems)} problem(s) with --weight-column {column!r}; fix them and "
            "re-run:\n" + "\n".join(problems[:50])
        )
    return {p: weights[p] for p in wanted if p in weights}


def _parse_weight(text: str) -> float | None:
    """The weight in ``text``, or None when it is not a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def unit_weights(
    patient_ids: Sequence[str],
    events: Sequence[int],
    *,
    patient_weights: Mapping[str, float] | None = None,
    event_weight: float = 1.0,
) -> np.ndarray:
    """Loss weight of each sample (bag), one entry per element of ``patient_ids``.

    A patient's weight (1, or ``patient_weights[p]``), times ``event_weight`` when the
    patient had an event, is split equally among the samples of that patient (its
    slides at slide level), so the samples of each patient sum to its weight.

    Args:
        patient_ids: (U,) the patient of each sample; a patient may repeat.
        events: (U,) event indicator of each sample (0/1).
        patient_weights: ``{patient_id: weight}``; None = every patient weighs 1.
        event_weight: Factor of patients with an event.

    Returns:
        (U,) float64 weights.

    Raises:
        KeyError: A patient without a weight in ``patient_weights``.
    """
    counts: dict[str, int] = {}
    for p in patient_ids:
        counts[p] = counts.get(p, 0) + 1
    out = np.empty(len(patient_ids), dtype=np.float64)
    for i, (p, e) in enumerate(zip(patient_ids, events, strict=True)):
        base = 1.0 if patient_weights is None else float(patient_weights[p])
        out[i] = base * (event_weight if int(e) == 1 else 1.0) / counts[p]
    return out
