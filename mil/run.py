"""Run folders (``runs/<name>/``): the resolved configuration and resume rules.

A run folder holds ``config.yaml`` (every option, resolved: absolute paths, defaults
filled in). Training into a folder whose ``config.yaml`` matches resumes it; a folder
with a different configuration is refused, naming the options that differ.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsi_mil.errors import ConfigError, OutputExistsError
from wsi_mil.outputs import atomic_path

__all__ = ["RUNTIME_KEYS", "TrainConfig", "load_config", "prepare_run_dir", "write_config"]

#: Options that do not change results; they may differ when a run is resumed.
RUNTIME_KEYS = frozenset({"device", "cache_gb", "prefetch", "progress", "wsi_mil_version"})


@dataclass
class TrainConfig:
    """Every option of a training run (written to ``config.yaml``).

    Attributes:
        task: ``classification`` or ``survival``.
        cohort: Cohort CSV.
        features: Feature folders (``features/<encoder>``); several are joined.
        model: Aggregator name (:func:`wsi_mil.mil.models.list_aggregators`).
        model_kwargs: Aggregator options.
        folds: Outer cross-validation folds.
        steps: Maximum optimisation steps per fold (one step = one batch), whatever
            the cohort size; bags are reshuffled after each pass over the training set.
        warmup_steps: Steps of linear learning-rate warmup before the cosine decay.
        eval_every: Steps between evaluations on the inner validation patients.
        lr: AdamW peak learning rate (warmup, then cosine-annealed to ``lr / 100``).
        weight_decay: AdamW weight decay.
        batch_size: Bags per optimiser step.
        max_tiles: Random tiles kept per bag in training (None = all).
        level: ``patient`` (one bag per patient) or ``slide``.
        seed: Seed of splits, initialisation, sampling.
        patience: Early-stopping patience in steps: training stops when the inner
            validation loss has not improved for this many steps; the best
            checkpoint is restored.
        val_fraction: Share of each outer training set used for inner validation.
        grad_clip: Gradient-norm clip (0 = off).
        scale: Standardise tile features with the mean / std of the fold's training
            tiles (stored in ``model.safetensors``).
        survival_loss: ``cox`` or ``discrete`` (survival).
        n_bins: Time bins of the discrete-time loss.
        label_column / time_column / event_column: Target columns of the cohort.
        clinical: Clinical covariate columns.
        omics / omics_groups / omics_group_size: Omics table, gene-group JSON, chunk size.
        event_weight: Cox loss weight of a patient with an event relative to a
            censored one (1 = unweighted).
        weight_column: Cohort column of per-patient Cox loss weights (finite, >= 0,
            one value per patient), or None (every patient weighs 1). At ``level``
            ``slide`` a patient's slides share its weight equally.
        repeats: Repeated outer cross-validation: ``repeats`` partitions with seeds
            ``seed``, ``seed + 1``, ...; repeat 0 is the run folder itself, repeat
            ``r`` >= 1 the folder ``repeat_<r>/`` (:mod:`wsi_mil.mil.repeats`).
        search: Inner model choice: option name -> candidate values; every
            combination is fitted in each outer fold and the one with the lowest
            inner-validation loss is kept (:mod:`wsi_mil.mil.search`). Empty = off.
        n_boot: Bootstrap resamples of the metrics' CIs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cache_gb: Bound of the in-memory bag cache.
        prefetch: Batches loaded ahead by a background thread.
        progress: Show progress bars.
    """

    task: str
    cohort: str
    features: list[str]
    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    folds: int = 5
    steps: int = 1500
    warmup_steps: int = 100
    eval_every: int = 25
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_tiles: int | None = 4096
    level: str = "patient"
    seed: int = 0
    patience: int = 200
    val_fraction: float = 0.2
    grad_clip: float = 1.0
    scale: bool = True
    survival_loss: str = "cox"
    n_bins: int = 4
    label_column: str = "label"
    time_column: str = "time"
    event_column: str = "event"
    clinical: list[str] = field(default_factory=list)
    omics: str | None = None
    omics_groups: str | None = None
    omics_group_size: int = 32
    event_weight: float = 1.0
    weight_column: str | None = None
    repeats: int = 1
    search: dict[str, list[Any]] = field(default_factory=dict)
    n_boot: int = 1000
    device: str = "auto"
    cache_gb: float = 4.0
    prefetch: int = 2
    progress: bool = False

    def resolved(self) -> dict[str, Any]:
        """The configuration as a plain dict with absolute paths."""
        from wsi_mil import __version__

        out = dataclasses.asdict(self)
        out["cohort"] = str(Path(self.cohort).resolve())
        out["features"] = [str(Path(f).resolve()) for f in self.features]
        for key in ("omics", "omics_groups"):
            if out[key] is not None:
                out[key] = str(Path(out[key]).resolve())
        out["wsi_mil_version"] = __version__
        return out

    def validate(self) -> None:
        """Check option values.

        Raises:
            ConfigError: Naming the option and the allowed values.
        """
        checks = [
            (
                self.task in ("classification", "survival"),
                "--task must be classification or survival",
            ),
            (self.level in ("patient", "slide"), "--level must be patient or slide"),
            (self.steps >= 1, "--steps must be >= 1"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.max_tiles is None or self.max_tiles >= 1, "--max-tiles must be >= 1"),
            (self.patience >= 1, "--patience must be >= 1 (steps)"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.survival_loss in ("cox", "discrete"), "--survival-loss must be cox or discrete"),
            (bool(self.features), "give at least one --features folder"),
            (self.repeats >= 1, "--repeats must be >= 1"),
            (
                math.isfinite(self.event_weight) and self.event_weight > 0,
                f"--event-weight must be a finite number > 0, got {self.event_weight}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        weighted = self.event_weight != 1.0 or self.weight_column is not None
        if weighted and (self.task != "survival" or self.survival_loss != "cox"):
            raise ConfigError(
                "--event-weight and --weight-column weight the Cox loss; use them with "
                "--task survival --survival-loss cox"
            )
        if self.search and self.val_fraction <= 0:
            raise ConfigError(
                "--search chooses among candidates on the inner validation patients; "
                "give a --val-fraction > 0"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`resolved` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def write_config(path: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Write ``config.yaml`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<run_dir>/config.yaml``.

    Raises:
        ConfigError: Not a run folder.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a wsi-mil run folder (no config.yaml); give runs/<name>"
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping; the run folder is damaged")
    return data


#: Options added after runs were first written, with the value that older runs (whose
#: ``config.yaml`` lacks them) were trained with, so such runs still resume.
_ADDED_OPTIONS = ("event_weight", "weight_column", "repeats", "search")


def _added_defaults() -> dict[str, Any]:
    """``{option: default}`` of :data:`_ADDED_OPTIONS`."""
    defaults = TrainConfig("survival", "", [])
    return {k: getattr(defaults, k) for k in _ADDED_OPTIONS}


def prepare_run_dir(out: str | os.PathLike[str], config: dict[str, Any]) -> bool:
    """Create the run folder or check that it holds the same run.

    Args:
        out: The run folder.
        config: Resolved configuration (see :meth:`TrainConfig.resolved`).

    Returns:
        True when an existing run with the same configuration is resumed.

    Raises:
        OutputExistsError: The folder holds a different configuration, or files that are
            not a wsi-mil run.
    """
    out = Path(out)
    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        old = {**_added_defaults(), **load_config(out)}
        diff = sorted(
            k
            for k in set(old) | set(config)
            if k not in RUNTIME_KEYS and old.get(k) != config.get(k)
        )
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:8])
            raise OutputExistsError(
                f"{out} already holds a run with a different configuration ({changes}); "
                "re-run with the original options to resume it, or pick a new --out name"
            )
        write_config(cfg_path, config)  # runtime options may have changed
        return True
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists, is not empty and is not a wsi-mil run (no config.yaml); "
            "pick a new --out name"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg_path, config)
    return False
