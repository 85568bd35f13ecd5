"""Nested cross-validation training of MIL models (``wsi-mil train``).

For each outer fold: fit the aggregator + head on the fold's training patients with
AdamW and a cosine schedule (autocast on CUDA, gradient clipping), early-stop and select
the epoch on the inner validation patients only, then predict the training and test
patients. The test fold is never evaluated before the model is fixed; every evaluation
is reported to an optional ``callback`` so this can be checked.

Each finished fold is a folder ``fold_<k>/`` (``model.safetensors``, ``fold.json``,
``predictions.csv``) renamed into place when complete; an interrupted run resumes from
its finished folds. At the end the run folder gets ``predictions.csv``,
``metrics.json`` and, for survival, the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from wsi_mil.errors import ConfigError
from wsi_mil.io import atomic_path
from wsi_mil.mil.attention import write_attention
from wsi_mil.mil.cohort import Cohort, load_cohort
from wsi_mil.mil.data import (
    BagBatch,
    BagScan,
    BagStore,
    Unit,
    event_batches,
    load_batch,
    make_units,
    prefetch,
    random_batches,
    scan_bags,
)
from wsi_mil.mil.heads import (
    ClassificationHead,
    Head,
    SurvivalHead,
    create_head,
    head_from_state,
)
from wsi_mil.mil.metrics import classification_metrics, survival_metrics
from wsi_mil.mil.run import TrainConfig, prepare_run_dir
from wsi_mil.mil.splits import check_cv_cohort, load_splits, make_splits, save_splits
from wsi_mil.mil.tabular import TabularPreprocessor

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


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU.

    Raises:
        ConfigError: CUDA requested but unavailable.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _as_tensors(
    pair: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if pair is None else (torch.from_numpy(pair[0]), torch.from_numpy(pair[1]))


@dataclass
class UnitSet:
    """Bags with their targets and tabular inputs, aligned by position.

    Attributes:
        units: The bags.
        targets: Head targets, each (U,).
        omics: (U, G) float32 and (U,) bool mask, or None.
        clinical: (U, C) float32 and (U,) bool mask, or None.
    """

    units: list[Unit]
    targets: dict[str, torch.Tensor]
    omics: tuple[torch.Tensor, torch.Tensor] | None = None
    clinical: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls, cohort: Cohort, units: list[Unit], head: Head | None, pre: TabularPreprocessor
    ) -> UnitSet:
        """Gather targets (when ``head`` is given and the cohort is labelled) and tables."""
        pids = [u.patient_id for u in units]
        targets = head.targets(cohort, pids) if head is not None else {}
        omics = pre.transform_omics(cohort, pids)
        clinical = pre.transform_clinical(cohort, pids)
        return cls(units, targets, _as_tensors(omics), _as_tensors(clinical))

    def __len__(self) -> int:
        return len(self.units)

    def extras(self, idx: Sequence[int], device: torch.device) -> dict[str, torch.Tensor | None]:
        """Keyword inputs of the aggregator for the units ``idx``."""
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        out: dict[str, torch.Tensor | None] = {
            "omics": None,
            "omics_mask": None,
            "clinical": None,
            "clinical_mask": None,
        }
        if self.omics is not None:
            out["omics"] = self.omics[0][ix].to(device)
            out["omics_mask"] = self.omics[1][ix].to(device)
        if self.clinical is not None:
            out["clinical"] = self.clinical[0][ix].to(device)
            out["clinical_mask"] = self.clinical[1][ix].to(device)
        return out

    def target_batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Targets of the units ``idx``."""
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return {k: v[ix] for k, v in self.targets.items()}


def build_model(
    config: TrainConfig, in_dim: int, head: Head, pre: TabularPreprocessor
) -> torch.nn.Module:
    """Create the aggregator for this config, passing omics groups / clinical width to
    aggregators that use those modalities.

    Raises:
        ConfigError: Omics or clinical inputs given to a histology-only aggregator.
    """
    from wsi_mil.mil.models import aggregator_info, create_aggregator

    info = aggregator_info(config.model)
    kwargs = dict(config.model_kwargs)
    uses_tables = bool(pre.n_omics or pre.clinical)
    if uses_tables:
        if not {"omics", "clinical"} & set(info.modalities):
            raise ConfigError(
                f"--model {config.model} uses histology only; --omics/--clinical need a fusion "
                "aggregator such as dual_xattn"
            )
        if "omics" in info.modalities:
            kwargs.setdefault("omics_groups", pre.omics_groups)
        if "clinical" in info.modalities:
            kwargs.setdefault("n_clinical", pre.n_clinical)
    return create_aggregator(config.model, in_dim, head.n_outputs, **kwargs)


def _forward(
    model: torch.nn.Module,
    batch: BagBatch,
    extras: dict[str, torch.Tensor | None],
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> Any:
    features = batch.features.to(device, non_blocking=True).float()
    mask = batch.mask.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(features, mask, labels=labels, **extras)


@dataclass
class Predictions:
    """Outputs of a model on a :class:`UnitSet`.

    Attributes:
        logits: (U, n_outputs) float32.
        attention: Per unit, (N_u,) attention over all its tiles, or None.
    """

    logits: torch.Tensor
    attention: list[np.ndarray | None]


@torch.no_grad()
def predict_units(
    model: torch.nn.Module,
    data: UnitSet,
    store: BagStore,
    device: torch.device,
    *,
    batch_size: int = 8,
    prefetch_depth: int = 2,
) -> Predictions:
    """Logits and attention of every unit, using all tiles (no subsampling).

    Returns:
        :class:`Predictions` aligned with ``data.units``.
    """
    model.eval()
    jobs = [list(range(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]
    logits: list[torch.Tensor] = []
    attention: list[np.ndarray | None] = []
    loader = prefetch(
        jobs, lambda idx: load_batch(store, [data.units[i] for i in idx]), prefetch_depth
    )
    for idx, batch in zip(jobs, loader, strict=True):
        out = _forward(model, batch, data.extras(idx, device), device)
        logits.append(out.logits.float().cpu())
        for b in range(len(idx)):
            n = int(batch.mask[b].sum())
            att = out.attention
            attention.append(None if att is None else att[b, :n].float().cpu().numpy())
    n_out = logits[0].shape[1] if logits else 1
    return Predictions(torch.cat(logits) if logits else torch.zeros(0, n_out), attention)


@dataclass
class FoldModel:
    """A trained fold: model, head and preprocessing.

    Attributes:
        fold: Fold index.
        model: The aggregator (eval mode).
        head: Its head.
        pre: Clinical/omics preprocessing fitted on the fold's training patients.
        meta: Contents of ``fold.json``.
    """

    fold: int
    model: torch.nn.Module
    head: Head
    pre: TabularPreprocessor
    meta: dict[str, Any]

    @classmethod
    def load(cls, fold_dir: str | Path, device: torch.device | str = "cpu") -> FoldModel:
        """Load ``fold_<k>/`` (safetensors weights, no pickle).

        Raises:
            ConfigError: Missing or damaged fold files.
        """
        from wsi_mil.mil.models import create_aggregator

        fold_dir = Path(fold_dir)
        try:
            meta = json.loads((fold_dir / "fold.json").read_text())
            state = load_file(str(fold_dir / "model.safetensors"), device=str(device))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{fold_dir}: cannot load the fold ({exc}); retrain it") from exc
        cfg = dict(meta["aggregator"])
        model = create_aggregator(cfg.pop("name"), cfg.pop("in_dim"), cfg.pop("n_outputs"), **cfg)
        model.load_state_dict(state)
        model.to(device).eval()
        pre = TabularPreprocessor.from_state(meta["preprocessing"])
        return cls(int(meta["fold"]), model, head_from_state(meta["head"]), pre, meta)


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

    def load(idx: list[int]) -> BagBatch:
        units = [data.units[i] for i in idx]
        return load_batch(ctx.store, units, max_tiles=cfg.max_tiles, seed=epoch_seed)

    losses = []
    for idx, batch in zip(batches, prefetch(batches, load, cfg.prefetch), strict=True):
        targets = data.target_batch(idx)
        labels = targets["label"].to(ctx.device) if "label" in targets else None
        out = _forward(model, batch, data.extras(idx, ctx.device), ctx.device, labels)
        loss = head.loss(out.logits, targets)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else math.nan


def _validation_loss(
    ctx: _Context, model: torch.nn.Module, head: Head, data: UnitSet, fold: int, epoch: int
) -> float:
    """Loss on the inner validation units (reported as a ``select`` event)."""
    preds = predict_units(
        model,
        data,
        ctx.store,
        ctx.device,
        batch_size=ctx.config.batch_size,
        prefetch_depth=ctx.config.prefetch,
    )
    with torch.no_grad():
        loss = float(head.loss(preds.logits, data.targets))
    pids = sorted({u.patient_id for u in data.units})
    _emit(ctx, "select", fold=fold, epoch=epoch, patient_ids=pids, loss=loss)
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
    cfg, cohort, k = ctx.config, ctx.cohort, int(fold_spec["fold"])
    skip = set(ctx.scan.empty)
    pre = TabularPreprocessor.fit(cohort, fold_spec["train"])
    head = create_head(
        cohort, fold_spec["train"], survival_loss=cfg.survival_loss, n_bins=cfg.n_bins
    )
    fit = UnitSet.build(cohort, make_units(cohort, fold_spec["train"], cfg.level, skip), head, pre)
    val = UnitSet.build(cohort, make_units(cohort, fold_spec["val"], cfg.level, skip), head, pre)
    torch.manual_seed(cfg.seed)  # same initial weights in every fold (weight soup)
    model = build_model(cfg, ctx.scan.dim, head, pre).to(ctx.device)
    torch.manual_seed(cfg.seed * 1009 + k + 1)
    n_steps = cfg.epochs * max(1, math.ceil(len(fit) / cfg.batch_size))
    opt, sched = _make_optimizer(model, cfg, n_steps)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best = (math.inf, -1, {k_: v.detach().clone() for k_, v in model.state_dict().items()})
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
            best = (score, epoch, {k_: v.detach().clone() for k_, v in model.state_dict().items()})
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


def patient_rows(
    cohort: Cohort,
    units: list[Unit],
    outputs: np.ndarray,
    head: Head,
    base: dict[str, Any] | None = None,
    *,
    details: bool = False,
) -> list[dict[str, Any]]:
    """One row per patient: the mean of its units' outputs, with its targets if known.

    Args:
        cohort: Gives the targets.
        units: Bags, aligned with ``outputs``.
        outputs: (U, C) probabilities or (U,) risks.
        head: The head that produced them (names the classes).
        base: Extra leading columns (e.g. ``fold``, ``split``).
        details: Add ``n_slides`` (slides with tiles) and, for classification, ``pred``
            (the most probable class); off for the run folder's ``predictions.csv``,
            whose columns are fixed by DESIGN.md.

    Returns:
        Rows with ``patient_id``, ``base``, then ``label`` + ``prob_<class>`` or
        ``time`` + ``event`` + ``risk`` (plus the ``details`` columns).
    """
    by_patient: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_patient.setdefault(u.patient_id, []).append(i)
    rows = []
    for pid, idx in by_patient.items():
        p = cohort.patients[pid]
        row: dict[str, Any] = {"patient_id": pid, **(base or {})}
        if details:
            row["n_slides"] = sum(len(units[i].slide_ids) for i in idx)
        value = outputs[idx].mean(axis=0)
        if isinstance(head, ClassificationHead):
            if p.label is not None:
                row["label"] = p.label
            for c, prob in zip(head.classes, value, strict=True):
                row[f"prob_{c}"] = float(prob)
            if details:
                row["pred"] = head.classes[int(np.argmax(value))]
        else:
            if p.time is not None:
                row["time"], row["event"] = p.time, p.event
            row["risk"] = float(value)
        rows.append(row)
    return rows


def write_unit_attention(
    att_dir: Path,
    store: BagStore,
    units: Sequence[Unit],
    attention: Sequence[np.ndarray | None],
    *,
    source: str,
    model_name: str,
) -> None:
    """Split each unit's attention by slide into ``<att_dir>/<slide_id>.h5``."""
    for unit, att in zip(units, attention, strict=True):
        if att is None:
            continue
        _, coords, which = store.unit(unit)
        for j, slide_id in enumerate(unit.slide_ids):
            sel = which == j
            write_attention(
                att_dir / f"{slide_id}.h5",
                att[sel],
                coords[sel],
                attrs={
                    "tile_level0": store.tile_level0.get(slide_id),
                    "slide_id": slide_id,
                    "patient_id": unit.patient_id,
                    "model": model_name,
                    "source": source,
                },
            )


def _finish_fold(ctx: _Context, fm: FoldModel, fold_spec: dict[str, Any]) -> pd.DataFrame:
    """Predict train and test patients, write attention of the test slides, save the fold."""
    cfg, cohort, k = ctx.config, ctx.cohort, fm.fold
    skip = set(ctx.scan.empty)
    frames = []
    for split, pids in (
        ("train", fold_spec["train"] + fold_spec["val"]),
        ("test", fold_spec["test"]),
    ):
        data = UnitSet.build(cohort, make_units(cohort, pids, cfg.level, skip), fm.head, fm.pre)
        _emit(
            ctx,
            "predict",
            fold=k,
            split=split,
            patient_ids=sorted({u.patient_id for u in data.units}),
        )
        preds = predict_units(
            fm.model,
            data,
            ctx.store,
            ctx.device,
            batch_size=cfg.batch_size,
            prefetch_depth=cfg.prefetch,
        )
        if split == "train" and isinstance(fm.head, SurvivalHead):
            fm.head.calibrate(preds.logits)
            fm.meta["head"] = fm.head.state_dict()
        outputs = fm.head.predict(preds.logits)
        rows = patient_rows(cohort, data.units, outputs, fm.head, {"fold": k, "split": split})
        frames.append(pd.DataFrame(rows))
        if split == "test":
            write_unit_attention(
                ctx.out / "attention",
                ctx.store,
                data.units,
                preds.attention,
                source=f"fold_{k}",
                model_name=cfg.model,
            )
    table = pd.concat(frames, ignore_index=True)
    with atomic_path(ctx.out / f"fold_{k}") as tmp:
        tmp.mkdir()
        save_file(
            {n: t.contiguous() for n, t in fm.model.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        table.to_csv(tmp / "predictions.csv", index=False)
        (tmp / "fold.json").write_text(json.dumps(fm.meta, indent=1))
    return table


def _fold_done(out: Path, k: int) -> bool:
    d = out / f"fold_{k}"
    return all((d / n).is_file() for n in ("fold.json", "model.safetensors", "predictions.csv"))


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
    splits_path = out / "splits.json"
    resolved = config.resolved()
    resolved["device"] = str(device)  # "auto" resolved (a runtime option: may change on resume)
    resumed = prepare_run_dir(out, resolved)
    if resumed:
        _remove_stale_temps(out)
    if resumed and splits_path.is_file():
        splits = load_splits(splits_path, usable)
    else:
        splits = make_splits(
            cohort, usable, n_folds=config.folds, seed=config.seed, val_fraction=config.val_fraction
        )
        save_splits(splits_path, splits)
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
    predictions = _contract_columns(pd.concat(frames, ignore_index=True), cohort)
    _write_table(out / "predictions.csv", predictions)
    metrics = compute_metrics(predictions, cohort, n_boot=config.n_boot, seed=config.seed)
    metrics["excluded_empty_slides"] = list(scan.empty)
    metrics["n_excluded_empty_slides"] = len(scan.empty)
    metrics["n_patients"] = len(usable)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if config.task == "survival":
        _survival_report(out, config.seed, config.n_boot)
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
        fold_csv = ctx.out / f"fold_{k}" / "predictions.csv"
        if _fold_done(ctx.out, k):
            done.append(k)
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


def _contract_columns(table: pd.DataFrame, cohort: Cohort) -> pd.DataFrame:
    """Keep the ``predictions.csv`` columns of DESIGN.md, in order: ``patient_id``,
    ``fold``, ``split``, then ``label`` + ``prob_<class>`` or ``time`` + ``event`` +
    ``risk``."""
    if cohort.task == "classification":
        tail = ["label", *(f"prob_{c}" for c in cohort.classes)]
    else:
        tail = ["time", "event", "risk"]
    return table[["patient_id", "fold", "split", *tail]]


def _write_table(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def compute_metrics(
    predictions: pd.DataFrame, cohort: Cohort, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold metrics from the test rows of ``predictions``.

    Classification: AUC and balanced accuracy; survival: Harrell's and Uno's C (Uno's
    censoring weights from each fold's training rows). All with bootstrap CIs.
    """
    test = predictions[predictions["split"] == "test"]
    per_fold = {}
    for k, rows in test.groupby("fold", sort=True):
        train = predictions[(predictions["fold"] == k) & (predictions["split"] == "train")]
        per_fold[str(k)] = _metrics_of(rows, train, cohort, n_boot, seed)
    pooled = _metrics_of(test, predictions[predictions["split"] == "train"], cohort, n_boot, seed)
    return {"task": cohort.task, "pooled": pooled, "folds": per_fold, "n_boot": n_boot}


def _metrics_of(
    rows: pd.DataFrame, train: pd.DataFrame, cohort: Cohort, n_boot: int, seed: int
) -> dict[str, Any]:
    if cohort.task == "classification":
        index = {c: i for i, c in enumerate(cohort.classes)}
        y = [index[str(v)] for v in rows["label"]]
        probs = rows[[f"prob_{c}" for c in cohort.classes]].to_numpy()
        return classification_metrics(y, probs, n_boot=n_boot, seed=seed)
    return survival_metrics(
        rows["time"].to_numpy(float),
        rows["event"].to_numpy(int),
        rows["risk"].to_numpy(float),
        train_time=train["time"].to_numpy(float),
        train_event=train["event"].to_numpy(int),
        n_boot=n_boot,
        seed=seed,
    )


def _survival_report(out: Path, seed: int, n_boot: int) -> None:
    """Write ``report.html``/``report.json`` with :func:`wsi_mil.survival.report.make_report`."""
    from wsi_mil.survival.report import make_report

    make_report(out, out, n_bootstrap=n_boot, seed=seed, force=True)
