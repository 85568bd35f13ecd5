"""``wsi-mil report``: the report of a run or a predictions CSV — the survival-
stratification report for survival predictions (``time``, ``event``, ``risk``), the
classification report for class probabilities (``label``, ``prob_<class>``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = ["add_parser", "parse_times", "run"]


def parse_times(values: Sequence[str] | None) -> list[float] | None:
    """Parse ``--times 12 24,36`` into floats (space- or comma-separated)."""
    if not values:
        return None
    out = []
    for item in values:
        for part in item.split(","):
            if not part.strip():
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(
                    f"--times: {part.strip()!r} is not a number; give times like --times 12 24 36"
                ) from None
    return out or None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="survival or classification report from predictions",
        description=(
            "Turn a predictions table into report.html (self-contained), report.json and "
            "figures (PNG + SVG). Survival (patient_id, fold, split=train|test, time, event, "
            "risk, optional clinical columns): Kaplan–Meier, hazard ratios, C-index, Brier "
            "score vs Kaplan–Meier, calibration at tau. Classification (patient_id, fold, "
            "split, label, prob_<class>): ROC, precision–recall, confusion matrix, "
            "calibration. Given a run folder, reads predictions.csv and writes the report "
            "beside it.\n\n"
            "External predictions (`wsi-mil predict` of a new cohort: no fold/split "
            "columns) are all held out. With --run RUN (the training run) the report uses "
            "its training risk cut-offs, tau and baseline hazard (Brier score and "
            "calibration need the per-fold columns `wsi-mil validate` writes); without "
            "it only the C-index, time-dependent AUC and risk distribution can be computed "
            "(survival) or the cohort's own prevalence is used (classification). Rows "
            "flagged seen_in_training are left out."
        ),
    )
    p.add_argument("source", metavar="RUN_DIR_OR_PREDICTIONS_CSV")
    p.add_argument("--out", default=None, help="output folder (default: beside the predictions)")
    p.add_argument(
        "--covariates",
        default="",
        help="comma-separated clinical columns to adjust hazard ratios for, e.g. age,stage",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=2,
        choices=(2, 3),
        help="risk groups: 2 = median split, 3 = tertiles of the training risks",
    )
    p.add_argument(
        "--times",
        nargs="+",
        default=None,
        help="evaluation times of the time-dependent AUC (default: event-time percentiles)",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help="survival horizon: Uno's C truncation, end of the Brier-score times, "
        "calibration time (default: 80th percentile of the training patients' follow-up, "
        "the tau of the run's metrics.json)",
    )
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN_DIR",
        help="for external predictions: the training run whose cut-offs and tau apply",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--force", action="store_true", help="replace a report made from a different input"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report; print where it is."""
    from wsi_mil.outputs import ensure_writable
    from wsi_mil.survival.report import make_report, resolve_report_paths

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    csv, out = resolve_report_paths(args.source, args.out)
    ensure_writable(out, what="--out")
    from wsi_mil.mil.class_report import is_classification_predictions

    if is_classification_predictions(csv):
        from wsi_mil.mil.class_report import make_classification_report

        result = make_classification_report(
            args.source,
            args.out,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            force=args.force,
            run=args.run,
        )
        return _print(result)
    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    result = make_report(
        args.source,
        args.out,
        covariates=covariates,
        n_groups=args.groups,
        times=parse_times(args.times),
        tau=args.tau,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        force=args.force,
        run=args.run,
    )
    return _print(result)


def _print(result: Any) -> int:
    """Say where the report is and print its summary."""
    print(f"report: {result.html}")
    print(f"numbers: {result.json}")
    for line in result.data["summary"]:
        print(f"  {line}")
    ext = result.data.get("external")
    if ext is not None and ext.get("run") is None and "not_computed" in ext:
        print(f"external predictions: not computed: {'; '.join(ext['not_computed'])}")
        print(f"  {ext['how']}")
    if ext is not None and ext.get("excluded_seen_in_training"):
        print(f"left out {ext['excluded_seen_in_training']} patient(s) seen in training")
    return 0
