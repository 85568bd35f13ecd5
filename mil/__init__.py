"""Multiple-instance learning: cohorts, bags, aggregators, heads, cross-validated training.

Public API (imported lazily, so ``import wsi_mil.mil`` stays cheap):

* cohorts — :func:`load_cohort`, :class:`Cohort` (``mil/cohort.py``);
* bags — :class:`BagStore`, :func:`scan_bags`, :func:`collate_bags`,
  :func:`event_batches` (``mil/data.py``);
* aggregators — :func:`create_aggregator`, :func:`list_aggregators` (``mil/models/``);
* heads — :func:`create_head` (``mil/heads.py``);
* splits — :func:`make_splits` (``mil/splits.py``);
* training — :class:`TrainConfig`, :func:`train_cv` (``mil/train.py``; fold folders in
  ``mil/fold.py``, running a model on bags in ``mil/inference.py``, run metrics in
  ``mil/evaluate.py``);
* inference — :func:`predict_cohort`, :func:`load_ensemble`, :func:`uniform_soup`
  (``mil/predict.py``); external validation — :func:`validate_external`
  (``mil/validate.py``; bag checks in ``mil/provenance.py``);
* attention files — :func:`read_attention`, :func:`write_attention`; heatmaps —
  :func:`render_heatmap` (``mil/heatmap/``);
* generated cohorts — :func:`make_synthetic_cohort`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_mil._lazy import lazy_exports

if TYPE_CHECKING:
    from wsi_mil.mil.attention import read_attention, write_attention
    from wsi_mil.mil.cohort import Cohort, load_cohort
    from wsi_mil.mil.data import BagStore, collate_bags, event_batches, scan_bags
    from wsi_mil.mil.heads import create_head
    from wsi_mil.mil.heatmap import render_heatmap
    from wsi_mil.mil.models import create_aggregator, list_aggregators
    from wsi_mil.mil.predict import load_ensemble, predict_cohort, uniform_soup
    from wsi_mil.mil.run import TrainConfig
    from wsi_mil.mil.splits import make_splits
    from wsi_mil.mil.synthetic import make_synthetic_cohort
    from wsi_mil.mil.train import RunResult, train_cv
    from wsi_mil.mil.validate import validate_external

_LAZY = {
    "BagStore": "data",
    "Cohort": "cohort",
    "RunResult": "train",
    "TrainConfig": "run",
    "collate_bags": "data",
    "create_aggregator": "models",
    "create_head": "heads",
    "event_batches": "data",
    "list_aggregators": "models",
    "load_cohort": "cohort",
    "load_ensemble": "predict",
    "make_splits": "splits",
    "make_synthetic_cohort": "synthetic",
    "predict_cohort": "predict",
    "read_attention": "attention",
    "render_heatmap": "heatmap",
    "scan_bags": "data",
    "train_cv": "train",
    "uniform_soup": "predict",
    "validate_external": "validate",
    "write_attention": "attention",
}

__all__ = [
    "BagStore",
    "Cohort",
    "RunResult",
    "TrainConfig",
    "collate_bags",
    "create_aggregator",
    "create_head",
    "event_batches",
    "list_aggregators",
    "load_cohort",
    "load_ensemble",
    "make_splits",
    "make_synthetic_cohort",
    "predict_cohort",
    "read_attention",
    "render_heatmap",
    "scan_bags",
    "train_cv",
    "uniform_soup",
    "validate_external",
    "write_attention",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
