"""Shared generated cohorts and trained runs for the MIL training tests (kept tiny)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.synthetic import SyntheticCohort, make_synthetic_cohort
from wsi_mil.mil.train import RunResult, train_cv

SMALL_MODEL = {"hidden_dim": 64, "attn_dim": 32, "dropout": 0.1}


@dataclass
class EventLog:
    """Records every training callback event in order."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        self.events.append((event, dict(info)))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [info for event, info in self.events if event == name]


def small_config(syn: SyntheticCohort, task: str, **overrides: Any) -> TrainConfig:
    """A fast configuration for generated cohorts."""
    options: dict[str, Any] = {
        "task": task,
        "cohort": str(syn.cohort_csv),
        "features": [str(d) for d in syn.features_dirs],
        "model": "abmil",
        "model_kwargs": dict(SMALL_MODEL),
        "folds": 3,
        "steps": 200,
        "warmup_steps": 10,
        "eval_every": 20,
        "lr": 1e-3 if task == "classification" else 3e-3,
        "batch_size": 1 if task == "classification" else 4,
        "max_tiles": 96,
        "patience": 80,
        "n_boot": 50,
        "prefetch": 1,
    }
    options.update(overrides)
    return TrainConfig(**options)


@dataclass
class TrainedRun:
    syn: SyntheticCohort
    result: RunResult
    log: EventLog


def _train(
    tmp_factory: Any, name: str, make: Callable[[Any], SyntheticCohort], task: str
) -> TrainedRun:
    root = tmp_factory.mktemp(name)
    syn = make(root)
    log = EventLog()
    result = train_cv(small_config(syn, task), root / "run", callback=log)
    return TrainedRun(syn, result, log)


@pytest.fixture(scope="session")
def classification_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """ABMIL trained on 30 one-slide patients whose label is a planted tile cluster."""

    def make(root: Any) -> SyntheticCohort:
        return make_synthetic_cohort(
            root / "data",
            task="classification",
            n_patients=30,
            n_tiles=(80, 120),
            planted_fraction=(0.1, 0.2),
            shift=3.0,
            seed=1,
        )

    return _train(tmp_path_factory, "cls", make, "classification")


@pytest.fixture(scope="session")
def survival_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """ABMIL + Cox on 40 patients whose planted cluster size drives the hazard."""

    def make(root: Any) -> SyntheticCohort:
        return make_synthetic_cohort(
            root / "data",
            task="survival",
            n_patients=40,
            n_tiles=(80, 120),
            planted_fraction=(0.0, 0.3),
            seed=2,
        )

    return _train(tmp_path_factory, "surv", make, "survival")


@pytest.fixture
def tiny_cohort(tmp_path: Any) -> SyntheticCohort:
    """12 patients with 1-3 slides, few tiles: for plumbing tests."""
    return make_synthetic_cohort(
        tmp_path / "data", n_patients=12, slides_per_patient=(1, 3), n_tiles=(20, 40), dims=(8,)
    )


@pytest.fixture
def make_config() -> Callable[..., TrainConfig]:
    """The :func:`small_config` factory, for tests."""
    return small_config


@pytest.fixture
def event_log() -> EventLog:
    """A fresh callback recorder."""
    return EventLog()
