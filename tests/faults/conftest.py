"""Shared tiny inputs of the fault tests: slides, a trained run, bag writing."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.bags import write_bag
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.synthetic import SyntheticCohort, make_synthetic_cohort
from wsi_mil.mil.train import train_cv

#: What the bags of :func:`~wsi_mil.mil.synthetic.make_synthetic_cohort` record, so that
#: bags written here pass ``predict``'s check against the tiny run's encoder and tiles.
BAG_ATTRS = {"encoder": "enc0", "weights_sha256": "synthetic", "target_mpp": 0.5, "tile_px": 224}


@dataclass
class TinyRun:
    """A run trained for a few steps on a generated 8-dim cohort."""

    run: Path
    syn: SyntheticCohort


def _tiny_config(syn: SyntheticCohort) -> TrainConfig:
    """A training configuration that finishes in seconds."""
    return TrainConfig(
        task="classification",
        cohort=str(syn.cohort_csv),
        features=[str(d) for d in syn.features_dirs],
        model="abmil",
        model_kwargs={"hidden_dim": 16, "attn_dim": 8, "dropout": 0.0},
        folds=2,
        steps=4,
        warmup_steps=1,
        eval_every=2,
        batch_size=2,
        max_tiles=32,
        patience=10,
        n_boot=5,
        prefetch=0,
    )


def _tiny_cohort(root: Path) -> SyntheticCohort:
    """12 one-slide patients, 10-20 tiles of 8 features per slide."""
    return make_synthetic_cohort(
        root, task="classification", n_patients=12, n_tiles=(10, 20), dims=(8,)
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A finished two-fold run (read-only for the tests: copy before changing it)."""
    root = tmp_path_factory.mktemp("tiny_run")
    syn = _tiny_cohort(root / "data")
    result = train_cv(_tiny_config(syn), root / "run")
    return TinyRun(result.out, syn)


@pytest.fixture(scope="session")
def small_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two single-level slides at 0.5 µm/px: ``small`` (512x384) and ``large`` (1024x768)."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("fault_slides")
    return {
        name: make_synthetic_slide(root / f"{name}.svs", w, h, seed=i, levels=1).path
        for i, (name, w, h) in enumerate((("small", 512, 384), ("large", 1024, 768)))
    }


def _write_features(folder: Path, slide_id: str, feats: np.ndarray) -> Path:
    """Write a bag of ``feats`` (N, D) with coordinates on a 64-px grid."""
    coords = np.stack([np.arange(len(feats)) * 64, np.zeros(len(feats))], axis=1)
    attrs = {**BAG_ATTRS, "slide_id": slide_id}
    return write_bag(folder / f"{slide_id}.h5", feats, coords.astype(np.int64), attrs=attrs)


def _write_cohort(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    """Write a cohort CSV ``patient_id,slide_id,label`` in ``encoding``."""
    with open(path, "w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows([["patient_id", "slide_id", "label"], *rows])
    return path


@pytest.fixture
def write_features() -> Callable[[Path, str, np.ndarray], Path]:
    """The bag writer of these tests (see :func:`_write_features`)."""
    return _write_features


@pytest.fixture
def write_cohort() -> Callable[..., Path]:
    """The cohort writer of these tests (see :func:`_write_cohort`)."""
    return _write_cohort


@pytest.fixture
def tiny_training() -> tuple[Callable[[Path], SyntheticCohort], Callable[..., TrainConfig]]:
    """``(make cohort, make config)`` of the tiny run, for tests that alter the inputs."""
    return _tiny_cohort, _tiny_config
