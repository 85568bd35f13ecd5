"""Running a MIL model on bags: inputs, forward pass, predictions and patient rows.

Shared by training (validation and final predictions of a fold) and by
``wsi-mil predict`` (fold ensemble / weight soup on a new cohort).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil.cohort import Cohort
from wsi_mil.mil.data import BagBatch, BagStore, Unit, load_batch, prefetch
from wsi_mil.mil.heads import ClassificationHead, Head
from wsi_mil.mil.tabular import TabularPreprocessor

__all__ = [
    "Predictions",
    "UnitSet",
    "forward_batch",
    "patient_rows",
    "predict_units",
    "resolve_device",
]


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

    def patient_ids(self) -> list[str]:
        """The distinct patients of the units, sorted."""
        return sorted({u.patient_id for u in self.units})

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


def forward_batch(
    model: torch.nn.Module,
    batch: BagBatch,
    extras: dict[str, torch.Tensor | None],
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> Any:
    """One forward pass (bfloat16 autocast on CUDA).

    Args:
        model: An aggregator.
        batch: Padded bags: features (B, N, D), mask (B, N).
        extras: Tabular inputs from :meth:`UnitSet.extras`.
        device: Where the model lives.
        labels: (B,) class labels for aggregators with an instance loss, or None.

    Returns:
        The aggregator's ``MILOutput``.
    """
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
        context_attention: Per unit, (T, N_u) attention of each context token over the
            tiles (fusion aggregators), or None.
        context_weights: Per unit, (T,) context pooling weights, or None.
    """

    logits: torch.Tensor
    attention: list[np.ndarray | None]
    context_attention: list[np.ndarray | None] = field(default_factory=list)
    context_weights: list[np.ndarray | None] = field(default_factory=list)


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
    context: list[np.ndarray | None] = []
    weights: list[np.ndarray | None] = []
    pin = device.type == "cuda"
    loader = prefetch(
        jobs, lambda idx: load_batch(store, [data.units[i] for i in idx], pin=pin), prefetch_depth
    )
    for idx, batch in zip(jobs, loader, strict=True):
        out = forward_batch(model, batch, data.extras(idx, device), device)
        logits.append(out.logits.float().cpu())
        for b in range(len(idx)):
            n = int(batch.mask[b].sum())
            attention.append(_numpy(out.attention, b, n))
            context.append(_numpy(out.context_attention, b, n))
            weights.append(_numpy(out.context_weights, b))
    n_out = logits[0].shape[1] if logits else 1
    all_logits = torch.cat(logits) if logits else torch.zeros(0, n_out)
    return Predictions(all_logits, attention, context, weights)


def _numpy(values: torch.Tensor | None, b: int, n: int | None = None) -> np.ndarray | None:
    """Row ``b`` of a batched output (cut to its ``n`` real tiles on the last axis)."""
    if values is None:
        return None
    row = values[b] if n is None else values[b, ..., :n]
    return row.float().cpu().numpy()


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
