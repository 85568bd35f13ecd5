"""Nested cross-validation training of MIL models (``wsi-mil train``).

For each outer fold: fit the aggregator + head on the fold's training patients with
AdamW and a cosine schedule (autocast on CUDA, gradient clipping), early-stop and select
the epoch on the inner validation patients only, then predict the training and test
patients. The test fold is never evaluated before the model is fixed; every evaluation
is reported to an optional ``callback`` so this can be checked.

Each finished fold is a folder ``fold_<k>/`` (see :mod:`wsi_mil.mil.fold`) renamed into
place when complete; an interrupted run resumes from its finished folds. At the end the
run folder gets ``predictions.csv``, ``metrics.json`` and, for survival, the report
(:mod:`wsi_mil.mil.evaluate`). Running a model on bags is :mod:`wsi_mil.mil.inference`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_mil.mil.cohort import Cohort, load_cohort
from wsi_mil.mil.data import (
    BagBatch,
    BagScan,
    BagStore,
    event_batches,
    load_batch,
    make_units,
    prefetch,
    random_batches,
    scan_bags,
)
from wsi_mil.mil.evaluate import compute_metrics, write_run_outputs
from wsi_mil.mil.fold import FoldModel, build_model, fold_complete, fold_dir
from wsi_mil.mil.heads import Head, SurvivalHead, create_head
from wsi_mil.mil.inference import (
    Predictions,
    UnitSet,
    forward_batch,
    patient_rows,
    predict_units,
    resolve_device,
)
from wsi_mil.mil.run import TrainConfig, prepare_run_dir
from wsi_mil.mil.splits import check_cv_cohort, load_splits, make_splits, save_splits
from wsi_mil.mil.tabular import TabularPreprocessor
from wsi_mil.mil.unit_attention import write_unit_attention
from wsi_mil.outputs import atomic_path

__all__ = [
    "Callback",
    "FoldModel",
    "Predictions",
    "RunResult",
    "UnitSet",
    "build_model",
    "compute_metrics",
    "patient_rows",
    "predict_units",
    "resolve_device",
    "train_cv",
    "train_fold",
    "write_unit_attention",
]

log = logging.getLogger(__name__)

#: ``callback(event, info)``; events: ``"select"`` (an inner-validation evaluation used
#: for early stopping / selection), ``"predict"`` (final predictions of a split),
#: ``"epoch"`` and ``"fold_done"``. ``info`` holds ``fold`` and ``patient_ids`` etc.
Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class RunResult:
    """What :func:`train_cv` produced.

    Attributes:
        out: The run folder.
        predictions: One row per fold and patient (``predictions.csv``).
        metrics: Contents of ``metrics.json``.
        resumed_folds: Folds loaded from a previous run rather than trained.
    """

    out: Path
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    resumed_folds: list[int] = field(default_factory=list)


@dataclass
class _Context:
    cohort: Cohort
    config: TrainConfig
    store: BagStore
    scan: BagScan
    device: torch.device
    out: Path
    callback: Callback


def _emit(ctx: _Context, event: str, **info: Any) -> None:
    ctx.callback(event, info)


def _unit_set(
    ctx: _Context, patient_ids: list[str], head: Head, pre: TabularPreprocessor
) -> UnitSet:
    """The non-empty bags of ``patient_ids`` with their targets and tables."""
    units = make_units(ctx.cohort, patient_ids, ctx.config.level, set(ctx.scan.empty))
    return UnitSet.build(ctx.cohort, units, head, pre)


def _predict(ctx: _Context, model: torch.nn.Module, data: UnitSet) -> Predictions:
    """:func:`predict_units` with the run's device, batch size and prefetch depth."""
    return predict_units(
        model,
        data,
        ctx.store,
        ctx.device,
        batch_size=ctx.config.batch_size,
        prefetch_depth=ctx.config.prefetch,
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _make_optimizer(
    model: torch.nn.Module, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, steps), eta_min=config.lr / 100
    )
    return opt, sched


def _epoch_batches(data: UnitSet, config: TrainConfig, rng: np.random.Generator) -> list[list[int]]:
    if config.task == "survival" and config.survival_loss == "cox":
        return event_batches(data.targets["event"].tolist(), config.batch_size, rng)
    return random_batches(len(data), config.batch_size, rng)


def _train_epoch(
    ctx: _Context,
    model: torch.nn.Module,
    head: Head,
    data: UnitSet,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    epoch_seed: int,
) -> float:
    """One pass over the training units; returns the mean training loss."""
    cfg = ctx.config
    model.train()
    batches = _epoch_batches(data, cfg, np.random.default_rng(epoch_seed))
    pin = ctx.device.type == "cuda"

    def load(idx: list[int]) -> BagBatch:
        units = [data.units[i] for i in idx]
        return load_batch(ctx.store, units, max_tiles=cfg.max_tiles, seed=epoch_seed, pin=pin)

    losses = []
    for idx, batch in zip(batches, prefetch(batches, load, cfg.prefetch), strict=True):
        targets = data.target_batch(idx)
        labels = head.instance_labels(targets)  # class, or survival pseudo-class
        labels = None if labels is None else labels.to(ctx.device)
        out = forward_batch(model, batch, data.extras(idx, ctx.device), ctx.device, labels)
        loss = head.loss(out.logits, targets)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.detach())  # no GPU sync per step
    return float(torch.stack(losses).float().mean()) if losses else math.nan


def _validation_loss(
    ctx: _Context, model: torch.nn.Module, head: Head, data: UnitSet, fold: int, epoch: int
) -> float:
    """Loss on the inner validation units (reported as a ``select`` event)."""
    preds = _predict(ctx, model, data)
    with torch.no_grad():
        loss = float(head.loss(preds.logits, data.targets))
    _emit(ctx, "select", fold=fold, epoch=epoch, patient_ids=data.patient_ids(), loss=loss)
    return loss


def _informative(val: UnitSet, config: TrainConfig, fold: int) -> bool:
    """Whether the inner validation set can rank epochs (a Cox loss needs an event)."""
    if not len(val):
        return False
    if config.task == "survival" and config.survival_loss == "cox":
        if not int(val.targets["event"].sum()):
            log.warning(
                "fold %d: the inner validation patients have no event; early stopping is "
                "off and the last epoch is kept (use a larger --val-fraction)",
                fold,
            )
            return False
    return True


def train_fold(
    ctx: _Context, fold_spec: dict[str, Any]
) -> tuple[FoldModel, dict[str, list[float]]]:
    """Fit one outer fold with early stopping on its inner validation patients.

    Returns:
        The selected :class:`FoldModel` and the loss history
        (``{"train": [...], "val": [...]}``).
    """
    cfg, k = ctx.config, int(fold_spec["fold"])
    pre = TabularPreprocessor.fit(ctx.cohort, fold_spec["train"])
    head = create_head(
        ctx.cohort, fold_spec["train"], survival_loss=cfg.survival_loss, n_bins=cfg.n_bins
    )
    fit = _unit_set(ctx, fold_spec["train"], head, pre)
    val = _unit_set(ctx, fold_spec["val"], head, pre)
    torch.manual_seed(cfg.seed)  # same initial weights in every fold (weight soup)
    model = build_model(cfg, ctx.scan.dim, head, pre).to(ctx.device)
    torch.manual_seed(cfg.seed * 1009 + k + 1)
    n_steps = cfg.epochs * max(1, math.ceil(len(fit) / cfg.batch_size))
    opt, sched = _make_optimizer(model, cfg, n_steps)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best = (math.inf, -1, _snapshot(model))
    use_val = _informative(val, cfg, k)
    for epoch in range(cfg.epochs):
        seed = cfg.seed * 1_000_003 + k * 10_007 + epoch
        history["train"].append(_train_epoch(ctx, model, head, fit, opt, sched, seed))
        if use_val:
            history["val"].append(_validation_loss(ctx, model, head, val, k, epoch))
            score = history["val"][-1]
        else:
            score = -epoch  # no inner validation: keep the last epoch
        if score < best[0]:
            best = (score, epoch, _snapshot(model))
        _emit(ctx, "epoch", fold=k, epoch=epoch, train_loss=history["train"][-1], val_loss=score)
        log.debug("fold %d epoch %d: train %.4f val %.4f", k, epoch, history["train"][-1], score)
        if epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    meta = {
        "fold": k,
        "aggregator": dict(getattr(model, "aggregator_config", {})),
        "head": head.state_dict(),
        "preprocessing": pre.state_dict(),
        "best_epoch": best[1],
        "epochs_run": len(history["train"]),
        "history": history,
        "n_train": len(fold_spec["train"]),
        "n_val": len(fold_spec["val"]),
        "n_test": len(fold_spec["test"]),
        "in_dim": ctx.scan.dim,
        "dims": ctx.scan.dims,
        "features": [Path(f).name for f in cfg.features],
        "level": cfg.level,
        "device": str(ctx.device),
    }
    return FoldModel(k, model, head, pre, meta), history


def _finish_fold(ctx: _Context, fm: FoldModel, fold_spec: dict[str, Any]) -> pd.DataFrame:
    """Predict train and test patients, write attention of the test slides, save the fold."""
    k = fm.fold
    frames = []
    for split, pids in (
        ("train", fold_spec["train"] + fold_spec["val"]),
        ("test", fold_spec["test"]),
    ):
        data = _unit_set(ctx, pids, fm.head, fm.pre)
        _emit(ctx, "predict", fold=k, split=split, patient_ids=data.patient_ids())
        preds = _predict(ctx, fm.model, data)
        if split == "train" and isinstance(fm.head, SurvivalHead):
            fm.head.calibrate(preds.logits)
            fm.meta["head"] = fm.head.state_dict()
        outputs = fm.head.predict(preds.logits)
        rows = patient_rows(ctx.cohort, data.units, outputs, fm.head, {"fold": k, "split": split})
        frames.append(pd.DataFrame(rows))
        if split == "test":
            write_unit_attention(
                ctx.out / "attention",
                ctx.store,
                data.units,
                preds.attention,
                source=f"fold_{k}",
                model_name=ctx.config.model,
            )
    table = pd.concat(frames, ignore_index=True)
    with atomic_path(fold_dir(ctx.out, k)) as tmp:
        tmp.mkdir()
        fm.save(tmp)
        table.to_csv(tmp / "predictions.csv", index=False)
    return table


def _prepare(config: TrainConfig) -> tuple[Cohort, BagScan, list[str]]:
    """Validate cohort and bags before any compute."""
    cohort = load_cohort(
        config.cohort,
        task=config.task,
        features_dirs=config.features,
        label_column=config.label_column,
        time_column=config.time_column,
        event_column=config.event_column,
        clinical=config.clinical,
        omics=config.omics,
        omics_groups=config.omics_groups,
        omics_group_size=config.omics_group_size,
    )
    scan = scan_bags(list(cohort.slides), config.features)
    empty = set(scan.empty)
    usable = [p for p, pt in cohort.patients.items() if any(s not in empty for s in pt.slide_ids)]
    if scan.empty:
        log.warning(
            "%d slide(s) with empty bags excluded (%s); %d patient(s) left",
            len(scan.empty),
            ", ".join(scan.empty[:5]),
            len(usable),
        )
    return cohort, scan, usable


def train_cv(
    config: TrainConfig,
    out: str | Path,
    *,
    callback: Callback | None = None,
) -> RunResult:
    """Train and evaluate with patient-level nested cross-validation into a run folder.

    Args:
        config: All options (see :class:`~wsi_mil.mil.run.TrainConfig`).
        out: Run folder; resumed when it holds the same configuration.
        callback: Optional ``callback(event, info)`` observer (see :data:`Callback`).

    Returns:
        :class:`RunResult`.

    Raises:
        CohortError: Invalid cohort (every problem listed) or one that cannot be
            cross-validated.
        BagError: Bags with a different feature dim.
        OutputExistsError: ``out`` holds a different configuration.
    """
    config.validate()
    cohort, scan, usable = _prepare(config)
    check_cv_cohort(cohort, usable, config.folds)  # before anything is written
    _check_model(config, cohort, usable, scan.dim)
    device = resolve_device(config.device)
    out = Path(out)
    splits = _start_run(config, cohort, usable, device, out)
    ctx = _Context(
        cohort,
        config,
        BagStore(config.features, int(config.cache_gb * 2**30)),
        scan,
        device,
        out,
        callback or (lambda event, info: None),
    )
    with _progress(ctx) as ctx.callback:
        frames, done = _run_folds(ctx, splits["folds"])
    predictions, metrics = write_run_outputs(
        out, frames, cohort, config, excluded=scan.empty, n_patients=len(usable)
    )
    return RunResult(out, predictions, metrics, done)


def _check_model(config: TrainConfig, cohort: Cohort, patient_ids: list[str], dim: int) -> None:
    """Build the model once on the whole cohort's shapes, so an unknown aggregator or
    option is reported before the run folder is created.

    Raises:
        ConfigError: Unknown aggregator, bad ``model_kwargs``, or tables given to a
            histology-only aggregator.
    """
    head = create_head(
        cohort, patient_ids, survival_loss=config.survival_loss, n_bins=config.n_bins
    )
    build_model(config, dim, head, TabularPreprocessor.fit(cohort, patient_ids))


def _start_run(
    config: TrainConfig, cohort: Cohort, usable: list[str], device: torch.device, out: Path
) -> dict[str, Any]:
    """Create or resume the run folder (``config.yaml``, ``splits.json``); returns the splits.

    Raises:
        OutputExistsError: ``out`` holds a different configuration.
    """
    splits_path = out / "splits.json"
    resolved = config.resolved()
    resolved["device"] = str(device)  # "auto" resolved (a runtime option: may change on resume)
    resumed = prepare_run_dir(out, resolved)
    if resumed:
        _remove_stale_temps(out)
    if resumed and splits_path.is_file():
        return load_splits(splits_path, usable)
    splits = make_splits(
        cohort, usable, n_folds=config.folds, seed=config.seed, val_fraction=config.val_fraction
    )
    save_splits(splits_path, splits)
    return splits


def _remove_stale_temps(out: Path) -> None:
    """Delete temporaries (``.<name>.<random>.tmp``) that a killed run left behind."""
    import shutil

    for folder in (out, out / "attention"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            log.info("removing %s left by an interrupted run", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _run_folds(ctx: _Context, folds: list[dict[str, Any]]) -> tuple[list[pd.DataFrame], list[int]]:
    """Train the unfinished folds; load the predictions of finished ones."""
    frames, done = [], []
    for spec in folds:
        k = int(spec["fold"])
        if fold_complete(ctx.out, k):
            done.append(k)
            fold_csv = fold_dir(ctx.out, k) / "predictions.csv"
            frames.append(pd.read_csv(fold_csv, dtype={"patient_id": str, "label": str}))
            _emit(ctx, "fold_done", fold=k, resumed=True)
            continue
        t0 = time.perf_counter()
        fm, _ = train_fold(ctx, spec)
        fm.meta["seconds"] = round(time.perf_counter() - t0, 2)
        frames.append(_finish_fold(ctx, fm, spec))
        _emit(ctx, "fold_done", fold=k, resumed=False)
    return frames, done


@contextlib.contextmanager
def _progress(ctx: _Context) -> Iterator[Callback]:
    """Yield the callback, wrapped to drive a rich progress bar when enabled."""
    inner = ctx.callback
    if not ctx.config.progress:
        yield inner
        return
    from rich.progress import Progress

    epochs, n_folds = ctx.config.epochs, ctx.config.folds
    with Progress(transient=False) as bar:
        task = bar.add_task("training", total=epochs * n_folds)

        def callback(event: str, info: dict[str, Any]) -> None:
            inner(event, info)
            if event == "epoch":
                bar.update(
                    task, advance=1, description=f"fold {info['fold']} epoch {info['epoch']}"
                )
            elif event == "fold_done":
                bar.update(task, completed=(info["fold"] + 1) * epochs)

        yield callback
