"""``wsi-mil predict``: apply a trained run's fold ensemble to new slides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_check_overrides", "add_parser", "run"]


def add_check_overrides(p: argparse.ArgumentParser) -> None:
    """``--allow-mismatch`` and ``--mask-missing-modalities`` (shared with ``validate``)."""
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help=(
            "predict bags whose encoder, weights hash, target_mpp or tile_px differ from "
            "the bags the run was trained on (default: refused, exit 2, naming the bag)"
        ),
    )
    p.add_argument(
        "--mask-missing-modalities",
        action="store_true",
        help=(
            "apply a model trained with omics / clinical inputs (e.g. dual_xattn) without "
            "them, masked as for a training patient who lacks them (default: refused)"
        ),
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``predict``."""
    p = subparsers.add_parser(
        "predict",
        help="predict new slides with a trained run (fold ensemble)",
        description=(
            "Average the fold models of RUN_DIR over every bag (or the patients of "
            "--cohort; targets optional) and write a predictions CSV, per-slide attention "
            "(<csv stem>_attention/<slide_id>.h5 beside the CSV) and the resolved options (.yaml). "
            "With --soup a single model whose weights are the mean of the folds' is used "
            "instead (all folds start from the same initial weights). Patients of the "
            "run's splits.json (by patient or slide id) are flagged seen_in_training "
            "and left out of the metrics unless --allow-in-sample."
        ),
    )
    p.add_argument("run_dir", help="run folder written by `wsi-mil train`")
    p.add_argument(
        "--features",
        action="append",
        required=True,
        metavar="DIR",
        help="folder of bags; repeat in the training order for joined encoders",
    )
    p.add_argument("--cohort", help="cohort CSV (labels optional); default: one patient per bag")
    p.add_argument("--omics", help="omics table for fusion models")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--attention-dir", help="default: <--out without .csv>_attention/")
    p.add_argument(
        "--soup",
        action="store_true",
        help=(
            "use a uniform weight soup (the fold models' weights averaged into one model) "
            "instead of the fold ensemble; refused for runs with clinical/omics inputs or "
            "the discrete-time survival loss, whose folds are not interchangeable"
        ),
    )
    p.add_argument(
        "--allow-in-sample",
        action="store_true",
        help=(
            "keep patients seen in training in the metrics (default: they are flagged "
            "seen_in_training and excluded); the metrics file then says in_sample: true"
        ),
    )
    add_check_overrides(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``predict``."""
    from wsi_mil.mil.predict import predict_cohort
    from wsi_mil.outputs import ensure_writable

    ensure_writable(Path(args.out).parent, what="--out")
    if args.attention_dir is not None:
        ensure_writable(args.attention_dir, what="--attention-dir")
    table = predict_cohort(
        args.run_dir,
        args.features,
        out=args.out,
        cohort=args.cohort,
        omics=args.omics,
        attention_dir=args.attention_dir,
        soup=args.soup,
        device=args.device,
        batch_size=args.batch_size,
        allow_in_sample=args.allow_in_sample,
        allow_mismatch=args.allow_mismatch,
        mask_missing_modalities=args.mask_missing_modalities,
    )
    print(f"{len(table)} patient(s) predicted -> {args.out}")
    n_seen = table.attrs.get("n_seen_in_training", 0)
    note = table.attrs.get("metrics_note")
    if n_seen and note is None:
        print(
            f"{n_seen} of {len(table)} patient(s) were seen in training (seen_in_training)",
            file=sys.stderr,
        )
    if note is not None and (n_seen or args.allow_in_sample):
        print(note, file=sys.stderr)
    empty = table.attrs.get("excluded_empty_slides", [])
    if empty:
        more = " ..." if len(empty) > 10 else ""
        print(f"excluded {len(empty)} slide(s) with empty bags: {', '.join(empty[:10])}{more}")
    return 0
