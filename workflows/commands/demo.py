"""``wsi-mil demo``: the whole pipeline on generated slides with the built-in encoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo",
        help="generate a small synthetic cohort and run every stage on it",
        description=(
            "Generate synthetic H&E-like slides and a cohort whose outcome depends on the "
            "tumour burden, then run info, tile, extract (built-in encoder), train "
            "(survival, cross-validated) with its report, predict and an attention heatmap. "
            "No download."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--patients", type=int, default=24, help="number of patients")
    p.add_argument("--slide-px", type=int, default=3072, help="slide side in px")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per fold (default: train's)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    """Generate the data, then run the stages through the same CLI users call."""
    from wsi_mil.workflows.cli import main as cli_main
    from wsi_mil.workflows.demo import make_demo_data

    out: Path = args.out
    print(f"generating {args.patients} synthetic patients in {out} ...", flush=True)
    data = make_demo_data(out, n_patients=args.patients, slide_px=args.slide_px, seed=args.seed)
    first = sorted(data.slides.glob("*.svs"))[0]
    steps = [
        ["info", str(first)],
        ["run", str(data.slides), str(data.cohort), "--out", str(out), "--task", "survival",
         "--folds", str(args.folds), "--seed", str(args.seed),
         *(["--steps", str(args.steps)] if args.steps is not None else [])],
        ["predict", str(out / "runs" / "abmil-survival"), "--features",
         str(out / "features" / "builtin"), "--out", str(out / "predictions-new.csv")],
        ["heatmap", str(out / "runs" / "abmil-survival"), "--slide", str(first),
         "--out", str(out / "heatmaps")],
    ]  # fmt: skip
    for argv in steps:
        print(f"\n$ wsi-mil {' '.join(argv)}", flush=True)
        status = cli_main(argv)
        if status != 0:
            return status
    print(
        f"\ndemo done: open {out / 'runs' / 'abmil-survival' / 'report.html'} and "
        f"{out / 'heatmaps'} (attention), {out / 'tiles' / 'qc'} (tissue QC)"
    )
    return 0
