"""Patient-level cross-validation splits (``splits.json``).

Outer folds come from :class:`sklearn.model_selection.StratifiedGroupKFold` over the
cohort's slides grouped by patient, stratified by label (classification) or event
(survival), so a patient's slides are never split between folds. Inside each outer
training set an inner validation split (also grouped and stratified) is carved out for
early stopping and model selection; the outer test fold is never used to choose anything.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from wsi_mil.errors import CohortError, ConfigError
from wsi_mil.mil.cohort import Cohort
from wsi_mil.outputs import atomic_path

__all__ = ["SPLITS_FORMAT", "check_cv_cohort", "load_splits", "make_splits", "save_splits"]

SPLITS_FORMAT = "wsi-mil.splits/1"


def _stratum(cohort: Cohort, patient_id: str) -> str:
    p = cohort.patients[patient_id]
    return str(p.label) if cohort.task == "classification" else str(p.event)


def check_cv_cohort(cohort: Cohort, patient_ids: Sequence[str], n_folds: int) -> None:
    """Refuse cohorts that cannot be cross-validated with ``n_folds`` folds.

    Raises:
        ConfigError: ``n_folds`` < 2.
        CohortError: Fewer patients than folds, a class with fewer patients than folds,
            a single class, a survival cohort without events or with fewer events than
            folds.
    """
    if n_folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {n_folds}")
    where = cohort.path
    if len(patient_ids) < n_folds:
        raise CohortError(
            f"{where}: {len(patient_ids)} patient(s) with usable bags but --folds {n_folds}; "
            "use fewer folds or add patients"
        )
    counts = Counter(_stratum(cohort, p) for p in patient_ids)
    if cohort.task == "classification":
        if len(counts) < 2:
            raise CohortError(f"{where}: only one class ({next(iter(counts))}); need two or more")
        small = {c: n for c, n in sorted(counts.items()) if n < n_folds}
        if small:
            desc = ", ".join(f"{c!r} has {n}" for c, n in small.items())
            raise CohortError(
                f"{where}: class(es) with fewer patients than --folds {n_folds} ({desc}); "
                "every test fold needs each class: use fewer folds or merge classes"
            )
    else:
        events = counts.get("1", 0)
        if events == 0:
            raise CohortError(
                f"{where}: the survival cohort has no events (every event is 0); the Cox "
                "model cannot be fitted - check the event column (1 = death/progression)"
            )
        if events < n_folds:
            raise CohortError(
                f"{where}: {events} event(s) but --folds {n_folds}; each test fold needs an "
                "event for the C-index: use fewer folds"
            )


def _group_split(
    slides: list[str],
    strata: list[str],
    groups: list[str],
    n_splits: int,
    seed: int,
) -> list[np.ndarray]:
    """Test indices of each fold of a stratified (when possible) grouped K-fold."""
    x = np.zeros((len(slides), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small strata: stratify best effort
        if len(set(strata)) > 1 and max(Counter(strata).values()) >= n_splits:
            cv: Any = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return [test for _, test in cv.split(x, strata, groups)]
        order = np.random.default_rng(seed).permutation(len(set(groups)))
        remap = {g: int(order[i]) for i, g in enumerate(dict.fromkeys(groups))}
        cv = GroupKFold(n_splits=n_splits)
        return [test for _, test in cv.split(x, strata, [remap[g] for g in groups])]


def make_splits(
    cohort: Cohort,
    patient_ids: Sequence[str],
    *,
    n_folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, Any]:
    """Outer test folds and inner validation sets, grouped by patient.

    Args:
        cohort: The cohort (targets give the strata; slides the groups).
        patient_ids: Patients to split (those with usable bags).
        n_folds: Outer folds K.
        seed: Random seed.
        val_fraction: Fraction of each outer training set held out for early stopping
            (0 disables the inner split: fixed number of epochs, last epoch kept).

    Returns:
        ``{"format", "n_folds", "seed", "val_fraction", "stratify", "folds": [{"fold",
        "train", "val", "test"}]}``; ``train`` are the patients the model is fitted on,
        ``val`` the inner validation patients, ``test`` the outer test fold.
    """
    check_cv_cohort(cohort, patient_ids, n_folds)
    slides = [s for p in patient_ids for s in cohort.patients[p].slide_ids]
    groups = [cohort.slides[s].patient_id for s in slides]
    strata = [_stratum(cohort, g) for g in groups]
    folds = []
    for k, test_idx in enumerate(_group_split(slides, strata, groups, n_folds, seed)):
        test = sorted({groups[i] for i in test_idx})
        rest = [p for p in patient_ids if p not in set(test)]
        val = _inner_val(cohort, rest, val_fraction, seed + 1000 + k)
        fit = [p for p in rest if p not in set(val)]
        folds.append({"fold": k, "train": fit, "val": val, "test": test})
    return {
        "format": SPLITS_FORMAT,
        "n_folds": n_folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "stratify": "label" if cohort.task == "classification" else "event",
        "folds": folds,
    }


def _inner_val(cohort: Cohort, patient_ids: list[str], fraction: float, seed: int) -> list[str]:
    """Hold out about ``fraction`` of the training patients (grouped, stratified)."""
    if fraction <= 0 or len(patient_ids) < 4:
        return []
    n_splits = min(len(patient_ids), max(2, round(1 / fraction)))
    slides = [s for p in patient_ids for s in cohort.patients[p].slide_ids]
    groups = [cohort.slides[s].patient_id for s in slides]
    strata = [_stratum(cohort, g) for g in groups]
    first = _group_split(slides, strata, groups, n_splits, seed)[0]
    return sorted({groups[i] for i in first})


def save_splits(path: str | os.PathLike[str], splits: dict[str, Any]) -> Path:
    """Write ``splits.json`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=1))
    return path


def load_splits(path: str | os.PathLike[str], patient_ids: Sequence[str]) -> dict[str, Any]:
    """Read ``splits.json`` and check it covers exactly ``patient_ids``.

    Raises:
        ConfigError: Unreadable file, or patients that differ from the cohort's.
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
        assigned = [p for f in splits["folds"] for key in ("train", "val", "test") for p in f[key]]
        tests = [p for f in splits["folds"] for p in f["test"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not a readable splits file ({exc}); delete it to re-split"
        ) from exc
    expected = set(patient_ids)
    if set(tests) != expected or len(tests) != len(set(tests)) or set(assigned) != expected:
        extra = sorted(set(assigned) - expected)[:5]
        missing = sorted(expected - set(assigned))[:5]
        raise ConfigError(
            f"{path}: the saved splits do not match the cohort's patients (not in cohort: "
            f"{extra}, not in splits: {missing}); train into a new --out folder"
        )
    return splits
