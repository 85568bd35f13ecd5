"""Nested cross-validation training of MIL models (``wsi-mil train``).

For each outer fold: standardise tile features with the mean / std of the fold's
training tiles (:mod:`wsi_mil.mil.scaling`), fit the aggregator + head on the fold's
training patients for a fixed budget of optimisation steps with AdamW, a linear warmup
and a cosine decay (autocast on CUDA, gradient clipping), early-stop and select the
checkpoint on the inner validation patients only, then predict the training and test
patients. The test fold is never evaluated before the model is fixed; every evaluation
is reported to an optional ``callback`` so this can be checked.

With a ``search`` grid, every candidate is fitted that way in each outer fold and the
one with the lowest inner-validation loss is kept (:mod:`wsi_mil.mil.search`); with
``repeats`` > 1 the whole cross-validation is repeated on new partitions, repeat ``r``
in ``repeat_<r>/`` (:mod:`wsi_mil.mil.repeats`). Cox losses can be weighted per
patient and by event (:mod:`wsi_mil.mil.weights`).

Each finished fold is a folder ``fold_<k>/`` (see :mod:`wsi_mil.mil.fold`) renamed into
place when complete; an interrupted run resumes from its finished folds. At the end the
run folder gets ``predictions.csv``, ``metrics.json`` and, for survival, the report
(:mod:`wsi_mil.mil.evaluate`). Running a model on bags is :mod:`wsi_mil.mil.inference`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from wsi_mil.mil.co_attention import write_unit_co_attention
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
from wsi_mil.mil.models.base import Aggregator
from wsi_mil.mil.provenance import summarise_provenance
from wsi_mil.mil.repeats import repeat_dir, summarise_repeats, write_repeat_outputs
from wsi_mil.mil.run import TrainConfig, prepare_run_dir
from wsi_mil.mil.scaling import fit_scaler
from wsi_mil.mil.search import candidate_configs, check_search, chosen_per_fold, pick_candidate
from wsi_mil.mil.splits import check_cv_cohort, load_splits, make_splits, save_splits
from wsi_mil.mil.tabular import TabularPreprocessor
from wsi_mil.mil.unit_attention import write_unit_attention
from wsi_mil.mil.weights import load_patient_weights
from wsi_mil.outputs import atomic_path, ensure_writable

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

#: The inner-validation loss must fall by more than this to count as an improvement
#: (so a loss creeping towards 0 does not postpone early stopping for ever).
MIN_DELTA = 1e-3

#: ``callback(event, info)``; events: ``"scale"`` (the feature scaler was fitted on
#: ``patient_ids``), ``"select"`` (an inner-validation evaluation used for early stopping /
#: selection), ``"eval"`` (every ``eval_every`` steps: ``step``, ``train_loss``,
#: ``val_loss``), ``"search"`` (a ``--search`` candidate was fitted: ``params``,
#: ``val_loss``), ``"predict"`` (final predictions of a split) and ``"fold_done"``.
#: ``info`` holds ``fold`` and ``patient_ids`` etc., and ``repeat`` when ``repeats`` > 1.
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
    patient_weights: dict[str, float] | None = None


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
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warmup over ``warmup_steps``, then a cosine decay to ``lr / 100``
    at ``steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _pass_batches(data: UnitSet, config: TrainConfig, rng: np.random.Generator) -> list[list[int]]:
    """One shuffled pass over the training units (every Cox batch holds an event)."""
    if config.task == "survival" and config.survival_loss == "cox":
        return event_batches(data.targets["event"].tolist(), config.batch_size, rng)
    return random_batches(len(data), config.batch_size, rng)


def _step_plan(data: UnitSet, config: TrainConfig, fold: int) -> list[tuple[int, list[int]]]:
    """``(seed, unit indices)`` of each of the ``config.steps`` optimisation steps.

    Passes over the training units follow each other, each reshuffled with its own seed
    (which also seeds the tiles sampled from each bag), so a fold gets the same number of
    steps whatever the cohort size.
    """
    plan: list[tuple[int, list[int]]] = []
    for n_pass in range(config.steps):  # a pass holds at least one step
        seed = config.seed * 1_000_003 + fold * 10_007 + n_pass
        plan += [(seed, idx) for idx in _pass_batches(data, config, np.random.default_rng(seed))]
        if len(plan) >= config.steps or not len(data):
            break
    return plan[: config.steps]


def _train_step(
    ctx: _Context,
    model: torch.nn.Module,
    head: Head,
    data: UnitSet,
    idx: list[int],
    batch: BagBatch,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One optimisation step on the units ``idx``; returns the (detached) loss."""
    targets = data.target_batch(idx)
    labels = head.instance_labels(targets)  # class, or survival pseudo-class
    labels = None if labels is None else labels.to(ctx.device)
    out = forward_batch(model, batch, data.extras(idx, ctx.device), ctx.device, labels)
    loss = head.loss(out.logits, targets)
    if out.aux_loss is not None:  # CLAM: bag_weight * bag loss + instance loss
        loss = getattr(model, "task_weight", 1.0) * loss + out.aux_loss.float()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.config.grad_clip)
    opt.step()
    sched.step()
    return loss.detach()  # no GPU sync per step


def _validation_loss(
    ctx: _Context, model: torch.nn.Module, head: Head, data: UnitSet, fold: int, step: int
) -> float:
    """Loss on the inner validation units (reported as a ``select`` event)."""
    preds = _predict(ctx, model, data)
    with torch.no_grad():
        loss = float(head.loss(preds.logits, data.targets))
    _emit(ctx, "select", fold=fold, step=step, patient_ids=data.patient_ids(), loss=loss)
    return loss


def _informative(val: UnitSet, config: TrainConfig, fold: int) -> bool:
    """Whether the inner validation set can rank checkpoints (a Cox loss needs an event)."""
    if not len(val):
        return False
    if config.task == "survival" and config.survival_loss == "cox":
        if not int(val.targets["event"].sum()):
            log.warning(
                "fold %d: the inner validation patients have no event; early stopping is "
                "off and the last step is kept (use a larger --val-fraction)",
                fold,
            )
            return False
    return True


def _fit_scaler(ctx: _Context, model: torch.nn.Module, fit: UnitSet, fold: int) -> None:
    """Set the model's feature scaler from the fold's training tiles (``scale`` event)."""
    if not ctx.config.scale:
        return
    stats = fit_scaler(ctx.store, fit.units)
    cast(Aggregator, model).scaler.set(torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
    _emit(ctx, "scale", fold=fold, patient_ids=fit.patient_ids(), n_tiles=stats.n_tiles)


def _optimise(
    ctx: _Context,
    model: torch.nn.Module,
    head: Head,
    fit: UnitSet,
    val: UnitSet,
    k: int,
    *,
    keep_start: bool = False,
) -> tuple[int, dict[str, list[float]]]:
    """Train for up to ``steps`` steps, evaluating the inner validation loss every
    ``eval_every`` steps; stop after ``patience`` steps without an improvement of more
    than :data:`MIN_DELTA` and restore
    the best checkpoint (the last one when the validation set cannot rank them).
    With ``keep_start`` the starting model is a candidate too (step 0: a later stage
    that does not improve on the stage before it keeps that stage's model).

    Returns:
        The selected step and the history: ``step`` and ``train`` loss per evaluation,
        and the ``val`` loss when the validation set can rank checkpoints.
    """
    cfg = ctx.config
    opt, sched = _make_optimizer(model, cfg)
    plan = _step_plan(fit, cfg, k)
    pin = ctx.device.type == "cuda"

    def load(job: tuple[int, list[int]]) -> BagBatch:
        units = [fit.units[i] for i in job[1]]
        return load_batch(
            ctx.store, units, max_tiles=cfg.max_tiles, seed=job[0], pin=pin, views=True
        )

    history: dict[str, list[float]] = {"step": [], "train": [], "val": []}
    best = (math.inf, 0, _snapshot(model))
    use_val = _informative(val, cfg, k)
    if keep_start and use_val:
        best = (_validation_loss(ctx, model, head, val, k, 0), 0, best[2])
    losses: list[torch.Tensor] = []
    model.train()
    batches = zip(plan, prefetch(plan, load, cfg.prefetch), strict=True)
    for step, ((_, idx), batch) in enumerate(batches, 1):
        losses.append(_train_step(ctx, model, head, fit, idx, batch, opt, sched))
        if step % cfg.eval_every and step != len(plan):
            continue
        train_loss = float(torch.stack(losses).float().mean())
        losses = []
        score = _validation_loss(ctx, model, head, val, k, step) if use_val else -step
        model.train()
        history["step"].append(step)
        history["train"].append(train_loss)
        if use_val:
            history["val"].append(score)
        if score < best[0] - MIN_DELTA:
            best = (score, step, _snapshot(model))
        _emit(ctx, "eval", fold=k, step=step, train_loss=train_loss, val_loss=score)
        log.debug("fold %d step %d: train %.4f val %.4f", k, step, train_loss, score)
        if step - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return best[1], history


def _fit_penalised_stage(
    ctx: _Context, model: Aggregator, head: Head, stage: str, sets: tuple[UnitSet, ...], k: int
) -> dict[str, Any]:
    """Fit a penalised stage (:attr:`Aggregator.penalised_stages`) by an elastic-net
    regression with the head's loss on all the units of ``sets`` (the fold's training
    and inner validation patients), the penalty chosen by cross-validation among them.

    The stage's output with its coefficients at zero (what the rest of the model
    contributes in that stage: ``dual_xattn``'s frozen histology path) is the fit's
    offset.

    Returns:
        The stage record: ``stage``, ``fit`` (``"penalised"``), ``l1_ratio``, the
        chosen ``penalty`` (``None`` for infinite: no covariate kept), ``penalties``,
        ``cv_loss``, ``cv_se`` and ``offset`` (whether the offset was non-zero).
    """
    from wsi_mil.mil.penalised import fit_penalised

    cpu = torch.device("cpu")
    sets = tuple(u for u in sets if len(u))  # an empty inner validation set adds nothing
    x = torch.cat([model.stage_design(stage, **u.extras(range(len(u)), cpu)) for u in sets])
    targets = {key: torch.cat([u.targets[key] for u in sets]) for key in sets[0].targets}
    strata = targets.get("event", targets.get("label"))
    model.set_stage_weight(stage, torch.zeros(x.shape[1], model.n_outputs, device=ctx.device))
    offset = torch.cat([_predict(ctx, model, u).logits for u in sets])  # float32, CPU

    def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return head.loss(logits + offset[idx], {key: v[idx] for key, v in targets.items()})

    fit = fit_penalised(
        x,
        loss,
        [unit.patient_id for u in sets for unit in u.units],
        n_outputs=model.n_outputs,
        l1_ratio=model.stage_l1_ratio(stage),
        strata=None if strata is None else strata.tolist(),
        seed=ctx.config.seed * 1009 + k,
    )
    model.set_stage_weight(stage, fit.weight.to(ctx.device))
    log.debug("fold %d stage %s: penalty %s", k, stage, fit.penalty)
    return {
        "stage": stage,
        "fit": "penalised",
        "l1_ratio": fit.l1_ratio,
        "penalty": fit.penalty if math.isfinite(fit.penalty) else None,
        "penalties": [p if math.isfinite(p) else None for p in fit.penalties],
        "cv_loss": list(fit.cv_loss),
        "cv_se": list(fit.cv_se),
        "offset": bool(offset.abs().max() > 0),
    }


def _optimise_stages(
    ctx: _Context, model: torch.nn.Module, head: Head, fit: UnitSet, val: UnitSet, k: int
) -> tuple[int, dict[str, list[float]], list[dict[str, Any]]]:
    """:func:`_optimise` once, or once per stage of the model's ``training_stages``.

    Each stage runs at ``--lr`` times the model's ``stage_lr_factor(stage)``; a
    penalised stage is fitted by :func:`_fit_penalised_stage` instead.

    Returns:
        The last stage's selected step and history, and one record per stage
        (``stage``, ``best_step``, ``steps_run``, ``lr``; empty without stages).
    """
    staged_model = cast(Aggregator, model)
    stages = tuple(getattr(model, "training_stages", ()))
    if not stages:
        return (*_optimise(ctx, model, head, fit, val, k), [])
    records = []
    best_step = 0  # a last stage may be penalised
    history: dict[str, list[float]] = {"step": [], "train": [], "val": []}
    for i, stage in enumerate(stages):
        staged_model.set_stage(stage)
        if stage in staged_model.penalised_stages:
            records.append(_fit_penalised_stage(ctx, staged_model, head, stage, (fit, val), k))
            continue
        lr = ctx.config.lr * staged_model.stage_lr_factor(stage)
        staged = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, lr=lr))
        best_step, history = _optimise(staged, model, head, fit, val, k, keep_start=i > 0)
        steps_run = history["step"][-1] if history["step"] else 0
        records.append({"stage": stage, "best_step": best_step, "steps_run": steps_run, "lr": lr})
        log.debug("fold %d stage %s: best step %d of %d", k, stage, best_step, steps_run)
    staged_model.set_stage(None)
    model.eval()
    return best_step, history, records


def train_fold(
    ctx: _Context, fold_spec: dict[str, Any]
) -> tuple[FoldModel, dict[str, list[float]]]:
    """Fit one outer fold with early stopping on its inner validation patients.

    Returns:
        The selected :class:`FoldModel` and the loss history
        (``{"step": [...], "train": [...], "val": [...]}``, one entry per evaluation).
    """
    cfg, k = ctx.config, int(fold_spec["fold"])
    pre = TabularPreprocessor.fit(ctx.cohort, fold_spec["train"])
    head = create_head(
        ctx.cohort,
        fold_spec["train"],
        survival_loss=cfg.survival_loss,
        n_bins=cfg.n_bins,
        event_weight=cfg.event_weight,
        patient_weights=ctx.patient_weights,
    )
    fit = _unit_set(ctx, fold_spec["train"], head, pre)
    val = _unit_set(ctx, fold_spec["val"], head, pre)
    torch.manual_seed(cfg.seed)  # same initial weights in every fold (weight soup)
    model = build_model(cfg, ctx.scan.dim, head, pre).to(ctx.device)
    _fit_scaler(ctx, model, fit, k)
    torch.manual_seed(cfg.seed * 1009 + k + 1)
    best_step, history, stages = _optimise_stages(ctx, model, head, fit, val, k)
    meta = {
        "fold": k,
        "aggregator": dict(getattr(model, "aggregator_config", {})),
        "head": head.state_dict(),
        "preprocessing": pre.state_dict(),
        "scaled": cfg.scale,
        "best_step": best_step,
        "steps_run": history["step"][-1] if history["step"] else 0,
        "history": history,
        **({"stages": stages} if stages else {}),
        "n_train": len(fold_spec["train"]),
        "n_val": len(fold_spec["val"]),
        "n_test": len(fold_spec["test"]),
        "in_dim": ctx.scan.dim,
        "dims": ctx.scan.dims,
        "features": [Path(f).name for f in cfg.features],
        "bags": summarise_provenance(ctx.scan, [Path(f).name for f in cfg.features]),
        "level": cfg.level,
        "device": str(ctx.device),
    }
    return FoldModel(k, model, head, pre, meta), history


def _selected_loss(history: dict[str, list[float]], best_step: int) -> float | None:
    """Inner-validation loss of the restored checkpoint (None when not evaluated)."""
    if not history["val"] or best_step not in history["step"]:
        return None
    return history["val"][history["step"].index(best_step)]


def search_fold(
    ctx: _Context, fold_spec: dict[str, Any]
) -> tuple[FoldModel, dict[str, list[float]]]:
    """:func:`train_fold` for every ``--search`` candidate; keep the one with the lowest
    inner-validation loss (the first candidate when the inner validation patients cannot
    rank them). Without a grid this is :func:`train_fold`.

    Returns:
        The chosen :class:`FoldModel` (its ``meta["search"]`` lists every candidate's
        loss and the choice) and its loss history.
    """
    candidates = candidate_configs(ctx.config)
    if len(candidates) == 1 and not ctx.config.search:
        return train_fold(ctx, fold_spec)
    k = int(fold_spec["fold"])
    records: list[dict[str, Any]] = []
    kept: tuple[FoldModel, dict[str, list[float]]] | None = None
    for params, cfg in candidates:
        fm, history = train_fold(dataclasses.replace(ctx, config=cfg), fold_spec)
        loss = _selected_loss(history, int(fm.meta["best_step"]))
        records.append({"params": params, "val_loss": loss, "best_step": fm.meta["best_step"]})
        _emit(ctx, "search", fold=k, params=params, val_loss=loss)
        if kept is None or pick_candidate([r["val_loss"] for r in records]) == len(records) - 1:
            kept = (fm, history)  # only the best model so far stays in memory
    assert kept is not None  # the grid has at least one candidate
    chosen = pick_candidate([r["val_loss"] for r in records])
    if chosen is None:
        log.warning(
            "fold %d: the inner validation patients cannot rank the --search candidates; "
            "kept the first (%s)",
            k,
            records[0]["params"],
        )
    kept[0].meta["search"] = {
        "candidates": records,
        "chosen": records[chosen or 0]["params"],
        "chosen_on": "first candidate (no inner validation loss)"
        if chosen is None
        else "lowest inner validation loss",
    }
    return kept


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
        frame = pd.DataFrame(rows)
        if isinstance(fm.head, SurvivalHead):  # the Breslow baseline needs the own scale
            frame["linear_predictor"] = fm.head.linear_predictor(frame["risk"])
        frames.append(frame)
        if split == "test":
            write_unit_attention(
                ctx.out / "attention",
                ctx.store,
                data.units,
                preds.attention,
                source=f"fold_{k}",
                model_name=ctx.config.model,
            )
            write_unit_co_attention(
                ctx.out / "co_attention",
                ctx.store,
                data.units,
                preds.context_attention,
                preds.context_weights,
                tokens=_context_tokens(ctx, fm.pre),
                source=f"fold_{k}",
                model_name=ctx.config.model,
            )
    table = pd.concat(frames, ignore_index=True)
    with atomic_path(fold_dir(ctx.out, k)) as tmp:
        tmp.mkdir()
        fm.save(tmp)
        table.to_csv(tmp / "predictions.csv", index=False)
    return table


def _context_tokens(ctx: _Context, pre: TabularPreprocessor) -> list[str]:
    """Names of a fusion model's context tokens: the omics groups, then ``clinical``."""
    groups = ctx.cohort.omics.group_names if ctx.cohort.omics is not None and pre.n_omics else []
    return [*groups, *(["clinical"] if pre.n_clinical else [])]


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
        :class:`RunResult` (repeat 0's predictions; the metrics with the ``repeats``
        summary when ``config.repeats`` > 1).

    Raises:
        CohortError: Invalid cohort (every problem listed) or one that cannot be
            cross-validated, or invalid ``weight_column`` values.
        BagError: Bags with a different feature dim.
        ConfigError: Invalid options (also every ``search`` candidate's model).
        OutputExistsError: ``out`` holds a different configuration.
        OutputNotWritableError: ``out`` cannot be created or written (before training).
    """
    config.validate()
    check_search(config)
    cohort, scan, usable = _prepare(config)
    check_cv_cohort(cohort, usable, config.folds)  # before anything is written
    weights = None
    if config.weight_column is not None:
        weights = load_patient_weights(config.cohort, config.weight_column, usable)
    for _, candidate in candidate_configs(config):
        _check_model(candidate, cohort, usable, scan.dim)
    device = resolve_device(config.device)
    out = ensure_writable(out)
    splits = _start_run(config, cohort, usable, device, out)
    store = BagStore(config.features, int(config.cache_gb * 2**30))
    observer = callback or (lambda event, info: None)
    runs: list[tuple[TrainConfig, Path, list[pd.DataFrame]]] = []
    done: list[int] = []
    for r in range(config.repeats):
        rcfg = config if r == 0 else dataclasses.replace(config, seed=config.seed + r)
        rout = repeat_dir(out, r)
        rsplits = splits if r == 0 else _repeat_splits(rcfg, cohort, usable, rout)
        cb = observer if config.repeats == 1 else _with_repeat(observer, r)
        ctx = _Context(cohort, rcfg, store, scan, device, rout, cb, weights)
        with _progress(ctx) as ctx.callback:
            frames, resumed = _run_folds(ctx, rsplits["folds"])
        runs.append((rcfg, rout, frames))
        done += resumed if r == 0 else []
    extra = [
        write_repeat_outputs(rout, frames, cohort, n_boot=rcfg.n_boot, seed=rcfg.seed)
        for rcfg, rout, frames in runs[1:]
    ]
    predictions, metrics = write_run_outputs(
        out, runs[0][2], cohort, config, excluded=scan.empty, n_patients=len(usable)
    )
    if config.repeats > 1 or config.search:
        metrics = _add_run_summaries(out, config, metrics, extra)
    return RunResult(out, predictions, metrics, done)


def _with_repeat(callback: Callback, repeat: int) -> Callback:
    """``callback`` with ``repeat`` added to every event's info."""

    def wrapped(event: str, info: dict[str, Any]) -> None:
        callback(event, {**info, "repeat": repeat})

    return wrapped


def _repeat_splits(
    config: TrainConfig, cohort: Cohort, usable: list[str], folder: Path
) -> dict[str, Any]:
    """Splits of a repeat r >= 1 (seed ``config.seed``): loaded from
    ``repeat_<r>/splits.json`` when resumed, else made and saved there."""
    path = folder / "splits.json"
    folder.mkdir(exist_ok=True)
    if path.is_file():
        _remove_stale_temps(folder)
        return load_splits(path, usable)
    splits = make_splits(
        cohort, usable, n_folds=config.folds, seed=config.seed, val_fraction=config.val_fraction
    )
    save_splits(path, splits)
    return splits


def _add_run_summaries(
    out: Path, config: TrainConfig, metrics: dict[str, Any], extra: list[dict[str, Any]]
) -> dict[str, Any]:
    """Add the repeats summary (mean ± SD over repeats) and the ``--search`` choices to
    the run's ``metrics.json``."""
    if config.repeats > 1:
        seeds = [config.seed + r for r in range(config.repeats)]
        metrics["repeats"] = summarise_repeats([metrics, *extra], seeds)
    if config.search:
        folds = [
            repeat_dir(out, r) / f"fold_{k}"
            for r in range(config.repeats)
            for k in range(config.folds)
        ]
        metrics["search"] = {"grid": config.search, "chosen": chosen_per_fold(out, folds)}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return metrics


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

    for folder in (out, out / "attention", out / "co_attention"):
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
        fm, _ = search_fold(ctx, spec)
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

    steps, n_folds = ctx.config.steps, ctx.config.folds
    with Progress(transient=False) as bar:
        task = bar.add_task("training", total=steps * n_folds)

        def callback(event: str, info: dict[str, Any]) -> None:
            inner(event, info)
            if event == "eval":
                bar.update(
                    task,
                    completed=info["fold"] * steps + info["step"],
                    description=f"fold {info['fold']} step {info['step']}",
                )
            elif event == "fold_done":
                bar.update(task, completed=(info["fold"] + 1) * steps)

        yield callback
