"""Repeated outer cross-validation (``wsi-mil train --repeats R``): folders and summary.

Repeat ``r`` re-partitions the same patients into the outer folds with the seed
``seed + r`` (which also seeds initialisation and sampling). Layout of a run folder::

    runs/<name>/                 repeat 0: exactly the layout of a single-repeat run
        config.yaml  splits.json  fold_<k>/  predictions.csv  metrics.json
        attention/  report.*     (predict, heatmap and report use these)
        repeat_<r>/              repeats r = 1 .. R-1
            splits.json  fold_<k>/  predictions.csv  metrics.json  attention/

The run's ``metrics.json`` keeps repeat 0's per-fold and pooled metrics under the
usual keys and adds ``repeats``: every pooled metric's mean, standard deviation
(ddof 1) and per-repeat values over the R repeats. The model applied to new slides
(``predict``, ``heatmap``) is repeat 0's fold ensemble; the other repeats measure how
much the estimate depends on one random partition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_mil.mil.cohort import Cohort
from wsi_mil.mil.evaluate import compute_metrics, contract_columns
from wsi_mil.outputs import atomic_path

__all__ = ["repeat_dir", "repeat_dirs", "summarise_repeats", "write_repeat_outputs"]


def repeat_dir(run_dir: Path, repeat: int) -> Path:
    """The folder of repeat ``repeat`` (the run folder itself for repeat 0)."""
    return run_dir if repeat == 0 else run_dir / f"repeat_{repeat}"


def repeat_dirs(run_dir: Path) -> list[Path]:
    """The run folder and every ``repeat_<r>/`` in it, in repeat order."""
    extra = [d for d in run_dir.glob("repeat_*") if d.is_dir() and d.name[7:].isdigit()]
    return [run_dir, *sorted(extra, key=lambda d: int(d.name[7:]))]


def write_repeat_outputs(
    folder: Path, frames: Sequence[pd.DataFrame], cohort: Cohort, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """Write ``predictions.csv`` and ``metrics.json`` of a repeat r >= 1.

    Returns:
        The repeat's metrics (per fold and pooled out-of-fold, as the run's).
    """
    predictions = contract_columns(pd.concat(frames, ignore_index=True), cohort)
    with atomic_path(folder / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    metrics = compute_metrics(predictions, cohort, n_boot=n_boot, seed=seed)
    metrics["seed"] = seed
    with atomic_path(folder / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return metrics


def summarise_repeats(per_repeat: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean ± SD over repeats of every pooled metric with a ``value``.

    Args:
        per_repeat: Each repeat's metrics (``{"pooled": {name: {"value", ...}}}``).
        seeds: The seed of each repeat.

    Returns:
        ``{"n", "seeds", "folders", "pooled": {name: {"mean", "sd", "values",
        "n_defined"}}}``; ``values`` holds each repeat's pooled out-of-fold value (None
        where undefined), ``mean``/``sd`` are over the defined ones (``sd`` None with
        fewer than two).
    """
    pooled: dict[str, Any] = {}
    for name, first in per_repeat[0]["pooled"].items():
        if not isinstance(first, dict) or "value" not in first:
            continue
        values = [_number(m["pooled"].get(name, {}).get("value")) for m in per_repeat]
        defined = [v for v in values if v is not None]
        pooled[name] = {
            "mean": float(np.mean(defined)) if defined else None,
            "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
            "values": values,
            "n_defined": len(defined),
        }
    folders = ["."] + [f"repeat_{r}" for r in range(1, len(per_repeat))]
    return {"n": len(per_repeat), "seeds": list(seeds), "folders": folders, "pooled": pooled}


def _number(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
