"""``wsi-mil validate``: external validation of a trained run on a held-apart cohort."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``validate``."""
    from wsi_mil.workflows.commands.predict import add_check_overrides

    p = subparsers.add_parser(
        "validate",
        help="external validation: predict a labelled cohort with a run and report on it",
        description=(
            "Predict every patient of a labelled external cohort with the fold ensemble "
            "of RUN_DIR and write, into --out: predictions.csv (the cohort's clinical "
            "columns joined), predictions.metrics.json (bootstrap CIs) and the report "
            "(report.html/.json). Survival: risk groups at the run's TRAINING cut-offs, "
            "Kaplan–Meier by group, hazard ratios, C-index, Brier score and calibration "
            "at the run's tau. Classification: ROC, confusion matrix and calibration "
            "with the run's training prevalence. Patients the run was trained on are "
            "left out (a cohort of only them is refused). Bags extracted otherwise than "
            "the run's (encoder, weights, target_mpp, tile_px) are refused unless "
            "--allow-mismatch; a fusion model without its omics/clinical inputs unless "
            "--mask-missing-modalities."
        ),
    )
    p.add_argument("run_dir", help="run folder written by `wsi-mil train`")
    p.add_argument(
        "--features",
        action="append",
        required=True,
        metavar="DIR",
        help="folder of the cohort's bags; repeat in the training order for joined encoders",
    )
    p.add_argument("--cohort", required=True, help="cohort CSV with targets (and clinical columns)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--omics", help="omics table for fusion models")
    p.add_argument(
        "--covariates",
        default="",
        help="comma-separated clinical columns to adjust hazard ratios for, e.g. age,stage",
    )
    p.add_argument("--groups", type=int, default=2, choices=(2, 3), help="risk groups")
    p.add_argument("--times", nargs="+", default=None, help="times of the time-dependent AUC")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_check_overrides(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="replace an earlier validation in --out")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``validate``."""
    from wsi_mil.mil.validate import validate_external
    from wsi_mil.outputs import ensure_writable
    from wsi_mil.workflows.commands.report import parse_times

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    ensure_writable(args.out, what="--out")
    result = validate_external(
        args.run_dir,
        args.features,
        args.cohort,
        args.out,
        omics=args.omics,
        covariates=[c.strip() for c in args.covariates.split(",") if c.strip()],
        n_groups=args.groups,
        times=parse_times(args.times),
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        allow_mismatch=args.allow_mismatch,
        mask_missing_modalities=args.mask_missing_modalities,
        device=args.device,
        batch_size=args.batch_size,
        force=args.force,
    )
    for note in result.notes:
        print(note, file=sys.stderr)
    print(f"{len(result.predictions)} patient(s) predicted -> {result.folder / 'predictions.csv'}")
    print(f"report: {result.report.html}")
    for line in result.report.data["summary"]:
        print(f"  {line}")
    return 0
