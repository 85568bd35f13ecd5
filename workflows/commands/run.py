"""``wsi-mil run``: the whole pipeline, tile → extract → train (→ report)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

import yaml

from wsi_mil.errors import CohortError

__all__ = ["add_parser", "pipeline_steps", "run"]

_DESCRIPTION = """\
Run every stage on a folder of slides and a cohort table:

  OUT/tiles/<slide_id>.zarr             tile stores          (wsi-mil tile)
  OUT/features/<encoder>/<slide_id>.h5  feature bags         (wsi-mil extract)
  OUT/runs/<name>/                      cross-validated run  (wsi-mil train)
                                        with predictions, metrics, attention and,
                                        for survival, report.html

Every stage skips what is already complete, so re-running after an interruption
resumes. Slides that fail are listed in the stage's manifest.csv and left out of the
later stages. Exit status: 0 on success, 1 when some slides failed but training ran,
2 on invalid input."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run``."""
    p = subparsers.add_parser(
        "run",
        help="run tile → extract → train → report on slides and a cohort table",
        description=_DESCRIPTION,
    )
    p.add_argument("slides", help="folder of slides (searched recursively) or one slide")
    p.add_argument("cohort", help="cohort CSV (patient_id, slide_id, label or time+event)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--task",
        choices=("classification", "survival"),
        default=None,
        help="default: survival when the cohort has time and event columns",
    )
    p.add_argument("--name", default=None, help="run name under OUT/runs (default: model-task)")
    p.add_argument("--encoder", default="builtin", help="feature encoder (default builtin)")
    p.add_argument("--weights", default=None, help="encoder weights folder or file")
    p.add_argument("--devices", default=None, help="extraction devices (cpu, cuda:0,...)")
    p.add_argument("--model", default="abmil", help="MIL aggregator (default abmil)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per fold (default: train's)"
    )
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--pixels", choices=("lossless", "jpeg", "none"), default="lossless")
    p.add_argument("--workers", type=int, default=2, help="tiling processes")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for every slide")
    p.add_argument("--dask-scheduler", default=None, help="tile on a Dask cluster")
    p.add_argument("--seed", type=int, default=0)
    return p


def _cohort_task(cohort: Path) -> str:
    from wsi_mil.mil.cohort import read_utf8_text

    try:
        text = read_utf8_text(cohort)  # CohortError for UTF-16 / Windows-1252 tables
    except OSError as exc:
        raise CohortError(f"cannot read cohort table {cohort}: {exc}") from exc
    header = [h.strip() for h in next(csv.reader(io.StringIO(text, newline="")), [])]
    return "survival" if {"time", "event"} <= set(header) else "classification"


def _validate_cohort(args: argparse.Namespace) -> None:
    """Check the cohort table (columns, ids, targets) as ``train`` will, without bags.

    Raises:
        CohortError: Listing every problem as ``file:line: column: message``.
    """
    from wsi_mil.mil.cohort import load_cohort

    load_cohort(args.cohort, task=args.task or _cohort_task(Path(args.cohort)))


def pipeline_steps(args: argparse.Namespace) -> list[list[str]]:
    """The stage command lines that ``run`` executes, in order.

    Args:
        args: Parsed ``run`` arguments (``task`` may be None: taken from the cohort).

    Returns:
        One argv list per stage, for :func:`wsi_mil.workflows.cli.main`.
    """
    out: Path = args.out
    task = args.task or _cohort_task(Path(args.cohort))
    name = args.name or f"{args.model}-{task}"
    tile = ["tile", str(args.slides), "--out", str(out / "tiles"), "--workers", str(args.workers)]
    tile += ["--target-mpp", str(args.target_mpp), "--tile-px", str(args.tile_px)]
    tile += ["--pixels", args.pixels]
    if args.mpp is not None:
        tile += ["--mpp", str(args.mpp)]
    if args.dask_scheduler:
        tile += ["--dask-scheduler", args.dask_scheduler]
    extract = ["extract", str(out / "tiles"), "--encoder", args.encoder]
    extract += ["--out", str(out / "features")]
    if args.weights:
        extract += ["--weights", args.weights]
    if args.devices:
        extract += ["--devices", args.devices]
    train = ["train", str(args.cohort), "--features", str(out / "features" / args.encoder)]
    train += ["--task", task, "--model", args.model, "--folds", str(args.folds)]
    train += ["--seed", str(args.seed)]
    if args.steps is not None:
        train += ["--steps", str(args.steps)]
    train += ["--out", str(out / "runs" / name)]
    return [tile, extract, train]


def run(args: argparse.Namespace) -> int:
    """Run the stages in order; stop at the first stage that fails outright."""
    from wsi_mil.outputs import ensure_writable
    from wsi_mil.workflows.cli import main as cli_main

    steps = pipeline_steps(args)
    _validate_cohort(args)  # every problem of the table, before hours of tiling
    ensure_writable(args.out)
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    resolved = {k: v for k, v in resolved.items() if not k.startswith("_")}
    resolved["commands"] = [" ".join(["wsi-mil", *s]) for s in steps]
    (args.out / "run_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    partial = False
    for argv in steps:
        print(f"\n$ wsi-mil {' '.join(argv)}", flush=True)
        status = cli_main(argv)
        if status == 1 and argv[0] in ("tile", "extract"):
            partial = True  # some slides failed; their manifest says why
        elif status != 0:
            return status
    return 1 if partial else 0
