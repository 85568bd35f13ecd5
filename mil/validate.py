"""External validation of a trained run on a held-apart cohort (``wsi-mil validate``).

One call does what ``predict`` + ``report --run`` do, into one folder:

``predictions.csv``
    The fold ensemble's prediction of every patient of the cohort (with the cohort's
    clinical columns joined, ``seen_in_training``, and for survival each fold model's
    ``risk_fold_<k>`` / ``linear_predictor_fold_<k>``), ``predictions.yaml`` (the
    resolved options), ``predictions.metrics.json`` (metrics with bootstrap CIs) and
    ``predictions_attention/``.
``report.html`` / ``report.json`` / ``report_figures/`` / ``report_config.yaml``
    The survival report with the run's *training* cut-offs and τ
    (:mod:`wsi_mil.survival.external`), or the classification report with the run's
    training prevalence.
``validate_config.yaml``
    Every option, resolved.

Patients of the cohort that the run was trained on (by patient or slide id) are left out
of the metrics and the report, and said so; a cohort made only of them is refused
before any compute. Bags made otherwise than the run's and fusion models without their
inputs are refused as by :func:`~wsi_mil.mil.predict.predict_cohort`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_mil.errors import CohortError, OutputExistsError
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.predict import predict_cohort, training_ids
from wsi_mil.mil.run import load_config, write_config
from wsi_mil.survival.report import ReportResult

__all__ = ["ValidationResult", "validate_external"]

PREDICTIONS = "predictions.csv"
CONFIG = "validate_config.yaml"


@dataclass
class ValidationResult:
    """What :func:`validate_external` wrote.

    Attributes:
        predictions: The predictions table (every patient of the cohort).
        report: The report's paths and data.
        folder: The output folder.
        excluded_seen: Patients left out because the run was trained on them.
        notes: One line per thing the user should know (exclusions, overrides).
    """

    predictions: pd.DataFrame
    report: ReportResult
    folder: Path
    excluded_seen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _seen_before(run_dir: Path, cfg: dict[str, Any], cohort: Path) -> list[str]:
    """Patients of ``cohort`` the run was trained on; refuse a cohort made only of them.

    Raises:
        CohortError: Targets missing (nothing to validate against), or every patient
            of the cohort was in training.
    """
    table = load_cohort(
        cohort,
        task=cfg["task"],
        label_column=cfg["label_column"],
        time_column=cfg["time_column"],
        event_column=cfg["event_column"],
        require_targets=True,
    )
    patients, slides = training_ids(run_dir, cfg)
    seen = [
        pid
        for pid, p in table.patients.items()
        if pid in patients or any(s in slides for s in p.slide_ids)
    ]
    if len(seen) == len(table.patients):
        raise CohortError(
            f"{cohort}: all {len(seen)} patient(s) were in the training run {run_dir} (by "
            "patient or slide id), so this is not an external cohort; the run's own "
            f"out-of-fold report is `wsi-mil report {run_dir}`"
        )
    return seen


def _check_out(out: Path, force: bool) -> None:
    if (out / PREDICTIONS).exists() and not force:
        raise OutputExistsError(
            f"{out} already holds a validation ({PREDICTIONS}); pass --force to replace it "
            "or --out to write elsewhere"
        )


def validate_external(
    run_dir: str | os.PathLike[str],
    features: Sequence[str | os.PathLike[str]],
    cohort: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    omics: str | os.PathLike[str] | None = None,
    covariates: Sequence[str] = (),
    n_groups: int = 2,
    times: Sequence[float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    allow_mismatch: bool = False,
    mask_missing_modalities: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    force: bool = False,
) -> ValidationResult:
    """Predict a labelled external cohort with a run's fold ensemble and report on it.

    Args:
        run_dir: A run folder of ``wsi-mil train``.
        features: Bag folders of the cohort, one per encoder, in the training order.
        cohort: Cohort CSV with targets (``label`` or ``time`` + ``event``) and any
            clinical columns (joined to the predictions, usable as ``covariates``).
        out: Output folder.
        omics: Omics table, for fusion models trained with one.
        covariates: Clinical columns to adjust the hazard ratios for (survival).
        n_groups: Risk groups (2 = the run's median cut-off, 3 = tertiles).
        times: Times of the time-dependent AUC (survival).
        n_bootstrap: Bootstrap resamples of every confidence interval.
        seed: Bootstrap seed.
        allow_mismatch: Predict bags whose encoder, weights, ``target_mpp`` or
            ``tile_px`` differ from the run's.
        mask_missing_modalities: Apply a fusion model without its omics / clinical inputs.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Bags per forward pass.
        force: Replace an earlier validation in ``out``.

    Returns:
        A :class:`ValidationResult`.

    Raises:
        CohortError: No targets, or every patient was in training.
        BagMismatchError / MissingModalityError: As :func:`predict_cohort`.
        OutputExistsError: ``out`` holds a validation and not ``force``.
    """
    from wsi_mil.mil.class_report import make_classification_report
    from wsi_mil.survival.report import make_report

    run_dir, out, cohort = Path(run_dir), Path(out), Path(cohort)
    cfg = load_config(run_dir)
    _check_out(out, force)
    seen = _seen_before(run_dir, cfg, cohort)
    csv = out / PREDICTIONS
    predictions = predict_cohort(
        run_dir,
        features,
        out=csv,
        cohort=cohort,
        omics=omics,
        device=device,
        batch_size=batch_size,
        n_boot=n_bootstrap,
        allow_mismatch=allow_mismatch,
        mask_missing_modalities=mask_missing_modalities,
        fold_columns=True,
    )
    common: dict[str, Any] = {"n_bootstrap": n_bootstrap, "seed": seed, "force": force}
    if cfg["task"] == "survival":
        report = make_report(
            csv,
            out,
            covariates=covariates,
            n_groups=n_groups,
            times=times,
            run=run_dir,
            **common,
        )
    else:
        report = make_classification_report(csv, out, run=run_dir, **common)
    notes = _notes(predictions, seen)
    write_config(
        out / CONFIG,
        {
            "validate": {
                "run_dir": str(run_dir.resolve()),
                "features": [str(Path(f).resolve()) for f in features],
                "cohort": str(cohort.resolve()),
                "omics": None if omics is None else str(Path(omics).resolve()),
                "out": str(out.resolve()),
                "covariates": list(covariates),
                "groups": n_groups,
                "times": None if times is None else [float(t) for t in times],
                "bootstrap": n_bootstrap,
                "seed": seed,
                "allow_mismatch": allow_mismatch,
                "mask_missing_modalities": mask_missing_modalities,
                "device": device,
                "batch_size": batch_size,
                "excluded_seen_in_training": seen,
            }
        },
    )
    return ValidationResult(predictions, report, out, seen, notes)


def _notes(predictions: pd.DataFrame, seen: list[str]) -> list[str]:
    notes = []
    if seen:
        shown = ", ".join(seen[:10]) + (" ..." if len(seen) > 10 else "")
        notes.append(
            f"{len(seen)} patient(s) of the cohort were in the training run and are left out "
            f"of the metrics and the report: {shown}"
        )
    empty = predictions.attrs.get("excluded_empty_slides") or []
    if empty:
        notes.append(f"{len(empty)} slide(s) with empty bags left out: {', '.join(empty[:10])}")
    return notes
