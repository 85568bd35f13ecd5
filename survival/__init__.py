"""Survival analysis: weighted Cox loss, metrics, risk stratification and reports.

Conventions used throughout: ``time`` is follow-up (>= 0), ``event`` is 1 for an
observed death / progression and 0 for censored, and ``risk`` is a log relative
hazard where **higher means an earlier event**.

Modules (imported lazily, so ``import wsi_mil.survival`` is cheap):

* :mod:`~wsi_mil.survival.loss` — ``cox_ph_loss``, ``event_weights``,
  ``discrete_time_nll`` and time-bin helpers (torch).
* :mod:`~wsi_mil.survival.metrics` — Harrell's and Uno's C, time-dependent AUC,
  integrated Brier score, each with bootstrap CIs (scikit-survival).
* :mod:`~wsi_mil.survival.calibration` — the run's horizon τ (``choose_tau``,
  ``run_tau``), the Brier score beside its Kaplan–Meier reference (``brier_vs_km``) and
  predicted vs observed survival at τ by risk group (``calibration_by_group``).
* :mod:`~wsi_mil.survival.stratify` — risk groups from training cut-offs, Kaplan–Meier,
  log-rank, hazard ratios (lifelines).
* :mod:`~wsi_mil.survival.report` — the HTML / JSON survival report: ``make_report``
  reads a predictions table and writes the outputs, with the numbers from
  :mod:`~wsi_mil.survival.analysis` (``analyse_predictions``), the plain-language
  summary from :mod:`~wsi_mil.survival.summary`, the figures from
  :mod:`~wsi_mil.survival.figures` and the page from :mod:`~wsi_mil.survival.render`.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_exports

_EXPORTS = {
    "loss": (
        "NoEventsError",
        "assign_time_bins",
        "cox_ph_loss",
        "discrete_time_nll",
        "discrete_time_risk",
        "event_weights",
        "make_time_bins",
    ),
    "validate": (
        "SurvivalData",
        "SurvivalDataError",
        "UndefinedStatisticError",
        "validate_survival",
    ),
    "metrics": (
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
    ),
    "stratify": (
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
    ),
    "calibration": (
        "BrierComparison",
        "CalibrationTable",
        "brier_vs_km",
        "calibration_by_group",
        "choose_tau",
        "kaplan_meier_fit",
        "out_of_fold_brier",
        "run_tau",
    ),
    "analysis": ("analyse_predictions",),
    "report": ("ReportResult", "load_predictions", "make_report"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [
    "BreslowBaseline",
    "BrierComparison",
    "BrierScore",
    "CIndex",
    "CalibrationTable",
    "HazardRatio",
    "KMCurve",
    "LogRank",
    "NoEventsError",
    "ReportResult",
    "Stratification",
    "SurvivalData",
    "SurvivalDataError",
    "TimeAUC",
    "UndefinedStatisticError",
    "analyse_predictions",
    "assign_groups",
    "assign_time_bins",
    "breslow_survival",
    "brier_from_survival",
    "brier_vs_km",
    "calibration_by_group",
    "choose_tau",
    "cox_ph_loss",
    "default_eval_times",
    "discrete_time_nll",
    "discrete_time_risk",
    "event_weights",
    "group_labels",
    "harrell_c",
    "hazard_ratios",
    "integrated_brier",
    "kaplan_meier",
    "kaplan_meier_fit",
    "learn_cutoffs",
    "load_predictions",
    "logrank",
    "make_report",
    "make_time_bins",
    "median_follow_up",
    "numbers_at_risk",
    "out_of_fold_brier",
    "run_tau",
    "stratify_risk",
    "time_dependent_auc",
    "to_risk",
    "uno_c",
    "validate_survival",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
