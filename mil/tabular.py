"""Clinical and omics preprocessing fitted on training patients only.

:class:`TabularPreprocessor` learns means / standard deviations (numeric columns) and
category lists (categorical clinical columns) from the training patients of a fold and
turns any patients into dense float32 matrices plus a per-patient mask (False = the
modality is missing for that patient, so the aggregator masks it instead of seeing
zeros). Its state is JSON-serialisable and saved with each fold's model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_mil.mil.cohort import Cohort

__all__ = ["TabularPreprocessor"]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _column_stats(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring mean and s.d. per column of (P, G); 0 / 1 where undefined or constant."""
    present = ~np.isnan(block)
    count = present.sum(axis=0)
    filled = np.where(present, block, 0.0)
    mean = filled.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(present, block - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    std = np.sqrt(var)
    return mean, np.where(std > 0, std, 1.0)


@dataclass
class TabularPreprocessor:
    """Scaling / one-hot encoding of clinical covariates and omics, fitted on training ids.

    Attributes:
        clinical: Per clinical column: ``{"kind": "numeric", "mean", "std"}`` or
            ``{"kind": "categorical", "categories": [...]}``.
        omics_mean: (G,) means of omics columns over training patients.
        omics_std: (G,) standard deviations (1 where constant).
        omics_groups: Column indices of each omics group.
    """

    clinical: dict[str, dict[str, Any]] = field(default_factory=dict)
    omics_mean: list[float] = field(default_factory=list)
    omics_std: list[float] = field(default_factory=list)
    omics_groups: list[list[int]] = field(default_factory=list)

    @classmethod
    def fit(cls, cohort: Cohort, train_ids: Sequence[str]) -> TabularPreprocessor:
        """Fit on the training patients ``train_ids`` of ``cohort``."""
        out = cls()
        for col in cohort.clinical_columns:
            values = [cohort.patients[p].clinical.get(col, "") for p in train_ids]
            present = [v for v in values if v != ""]
            if present and all(_is_number(v) for v in present):
                arr = np.array([float(v) for v in present])
                std = float(arr.std()) or 1.0
                out.clinical[col] = {"kind": "numeric", "mean": float(arr.mean()), "std": std}
            else:
                out.clinical[col] = {"kind": "categorical", "categories": sorted(set(present))}
        if cohort.omics is not None:
            rows = [
                cohort.omics.patient_index[p] for p in train_ids if p in cohort.omics.patient_index
            ]
            col_mean, col_std = _column_stats(cohort.omics.values[rows])
            out.omics_mean, out.omics_std = col_mean.tolist(), col_std.tolist()
            out.omics_groups = [list(g) for g in cohort.omics.groups]
        return out

    @property
    def n_clinical(self) -> int:
        """Width of the encoded clinical vector."""
        return sum(
            1 if spec["kind"] == "numeric" else len(spec["categories"])
            for spec in self.clinical.values()
        )

    @property
    def n_omics(self) -> int:
        """Width of the omics vector."""
        return len(self.omics_mean)

    def transform_clinical(
        self, cohort: Cohort, patient_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Encode clinical covariates.

        Returns:
            (P, C) float32 values and (P,) bool mask (False = all covariates missing),
            or None when no clinical columns are used.
        """
        if not self.clinical:
            return None
        x = np.zeros((len(patient_ids), self.n_clinical), np.float32)
        mask = np.zeros(len(patient_ids), bool)
        for i, pid in enumerate(patient_ids):
            raw = cohort.patients[pid].clinical
            j = 0
            for col, spec in self.clinical.items():
                text = raw.get(col, "")
                mask[i] |= text != ""
                if spec["kind"] == "numeric":
                    if text != "" and _is_number(text):
                        x[i, j] = (float(text) - spec["mean"]) / spec["std"]
                    j += 1
                else:
                    cats = spec["categories"]
                    if text in cats:
                        x[i, j + cats.index(text)] = 1.0
                    j += len(cats)
        return x, mask

    def transform_omics(
        self, cohort: Cohort, patient_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Standardise omics values; missing values become the training mean (0).

        Returns:
            (P, G) float32 values and (P,) bool mask (False = patient has no omics row),
            or None when no omics table is used.
        """
        if cohort.omics is None or not self.omics_mean:
            return None
        table = cohort.omics
        if len(table.columns) != self.n_omics:
            from wsi_mil.errors import CohortError

            raise CohortError(
                f"{table.path}: {len(table.columns)} omics columns but the model was trained "
                f"with {self.n_omics}; give the same omics columns as in training"
            )
        x = np.zeros((len(patient_ids), self.n_omics), np.float32)
        mask = np.zeros(len(patient_ids), bool)
        mean, std = np.asarray(self.omics_mean), np.asarray(self.omics_std)
        for i, pid in enumerate(patient_ids):
            row = table.patient_index.get(pid)
            if row is None:
                continue
            z = (table.values[row] - mean) / std
            x[i] = np.where(np.isfinite(z), z, 0.0)
            mask[i] = True
        return x, mask

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "clinical": self.clinical,
            "omics_mean": self.omics_mean,
            "omics_std": self.omics_std,
            "omics_groups": self.omics_groups,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TabularPreprocessor:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            clinical=dict(state.get("clinical", {})),
            omics_mean=list(state.get("omics_mean", [])),
            omics_std=list(state.get("omics_std", [])),
            omics_groups=[list(g) for g in state.get("omics_groups", [])],
        )
