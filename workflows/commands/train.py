"""``wsi-mil train``: patient-level nested cross-validation of a MIL model."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train``."""
    from wsi_mil.mil.run import TrainConfig

    d = TrainConfig("classification", "", [])  # the defaults
    p = subparsers.add_parser(
        "train",
        help="train a MIL model with patient-level cross-validation",
        description=(
            "Train an aggregator on feature bags with K outer folds grouped by patient; "
            "early stopping uses an inner validation split of the training folds only. "
            "Writes the run folder: config.yaml, splits.json, fold_<k>/model.safetensors, "
            "predictions.csv, metrics.json, attention/<slide_id>.h5 (and the survival "
            "report). Re-running with the same options resumes from finished folds."
        ),
    )
    p.add_argument("cohort", help="cohort CSV: patient_id (or case_id), slide_id, targets")
    p.add_argument(
        "--features",
        action="append",
        required=True,
        metavar="DIR",
        help="folder of bags (features/<encoder>); repeat to join encoders tile by tile",
    )
    p.add_argument("--task", choices=("classification", "survival"), required=True)
    p.add_argument("--model", default="abmil", help="aggregator (see mil.list_aggregators())")
    p.add_argument(
        "--model-kwargs",
        default="{}",
        metavar="JSON",
        help="aggregator options, e.g. '{\"dropout\": 0.1}'",
    )
    p.add_argument("--folds", type=int, default=5, help="outer folds")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument(
        "--steps",
        type=int,
        default=d.steps,
        help="most optimisation steps (batches) per fold, whatever the cohort size",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="steps between inner-validation evaluations",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="early stopping: steps without a better inner-validation loss; the best "
        "checkpoint is kept",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="bags per step")
    p.add_argument(
        "--no-scale",
        dest="scale",
        action="store_false",
        help="feed tile features unscaled (default: standardised with the mean / std of "
        "each fold's training tiles)",
    )
    p.add_argument(
        "--max-tiles", type=int, default=4096, help="random tiles per bag in training (0 = all)"
    )
    p.add_argument("--level", choices=("patient", "slide"), default="patient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="inner validation share")
    p.add_argument("--survival-loss", choices=("cox", "discrete"), default="cox")
    p.add_argument("--label-column", default="label")
    p.add_argument("--time-column", default="time")
    p.add_argument("--event-column", default="event")
    p.add_argument("--clinical", default="", help="comma-separated clinical covariate columns")
    p.add_argument("--omics", help="omics table (CSV/TSV keyed by patient_id)")
    p.add_argument("--omics-groups", help='gene groups JSON {"group": ["gene", ...]}')
    p.add_argument(
        "--omics-group-size", type=int, default=32, help="columns per group without --omics-groups"
    )
    p.add_argument(
        "--event-weight",
        type=float,
        default=d.event_weight,
        metavar="W",
        help="Cox loss: weight of patients with an event relative to censored ones",
    )
    p.add_argument(
        "--weight-column",
        metavar="COL",
        help="Cox loss: per-patient weights from this cohort column (finite, >= 0); at "
        "--level slide a patient's slides share its weight (total 1 by default)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        metavar="R",
        help="repeat the outer cross-validation R times with seeds seed..seed+R-1 "
        "(repeat r >= 1 in repeat_<r>/); metrics as mean ± SD over repeats",
    )
    p.add_argument(
        "--search",
        nargs="+",
        default=[],
        metavar="NAME=V1,V2",
        help="inner model choice: fit every combination in each outer fold and keep the "
        "lowest inner-validation loss, e.g. --search lr=1e-3,3e-4 dropout=0.1,0.25 "
        "(training options lr, weight_decay, batch_size, max_tiles, steps, warmup_steps, "
        "patience, grad_clip; other names are aggregator options)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--cache-gb", type=float, default=4.0, help="in-memory bag cache bound")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``train``; prints the pooled out-of-fold metrics."""
    from wsi_mil.errors import ConfigError
    from wsi_mil.mil.run import TrainConfig
    from wsi_mil.mil.search import parse_search
    from wsi_mil.mil.train import train_cv

    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not valid JSON ({exc})") from exc
    if not isinstance(model_kwargs, dict):
        raise ConfigError("--model-kwargs must be a JSON object")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TrainConfig(
        task=args.task,
        cohort=args.cohort,
        features=list(args.features),
        model=args.model,
        model_kwargs=model_kwargs,
        folds=args.folds,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_tiles=args.max_tiles or None,
        level=args.level,
        seed=args.seed,
        patience=args.patience,
        scale=args.scale,
        val_fraction=args.val_fraction,
        survival_loss=args.survival_loss,
        label_column=args.label_column,
        time_column=args.time_column,
        event_column=args.event_column,
        clinical=[c.strip() for c in args.clinical.split(",") if c.strip()],
        omics=args.omics,
        omics_groups=args.omics_groups,
        omics_group_size=args.omics_group_size,
        event_weight=args.event_weight,
        weight_column=args.weight_column,
        repeats=args.repeats,
        search=parse_search(args.search),
        n_boot=args.n_boot,
        device=args.device,
        cache_gb=args.cache_gb,
        progress=True,
    )
    result = train_cv(config, args.out)
    pooled = result.metrics["pooled"]
    names = (
        ("auc", "balanced_accuracy") if args.task == "classification" else ("harrell_c", "uno_c")
    )
    for name in names:
        m = pooled[name]
        ci = f" (95% CI {m['ci_low']:.3f}-{m['ci_high']:.3f})" if m["ci_low"] is not None else ""
        value = "undefined" if m["value"] is None else f"{m['value']:.3f}"
        print(f"out-of-fold {name}: {value}{ci}")
    repeats = result.metrics.get("repeats")
    if repeats:
        for name in names:
            s = repeats["pooled"][name]
            if s["mean"] is None:
                continue
            sd = "" if s["sd"] is None else f" ± {s['sd']:.3f} (SD)"
            values = ", ".join("-" if v is None else f"{v:.3f}" for v in s["values"])
            print(f"out-of-fold {name} over {repeats['n']} repeats: {s['mean']:.3f}{sd} [{values}]")
    n_empty = result.metrics.get("n_excluded_empty_slides", 0)
    if n_empty:
        listed = ", ".join(result.metrics["excluded_empty_slides"][:10])
        more = " ..." if n_empty > 10 else ""
        print(f"excluded {n_empty} slide(s) with empty bags: {listed}{more}")
    if result.resumed_folds:
        print(f"resumed folds {result.resumed_folds} from {result.out}")
    print(f"run folder: {result.out}")
    return 0
