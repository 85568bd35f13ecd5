"""A trained fold: building its model, and its folder ``fold_<k>/`` on disk.

A fold folder holds ``model.safetensors`` (weights and the feature scaler fitted on the
fold's training tiles, no pickle), ``fold.json`` (aggregator
config, head, preprocessing, training history) and ``predictions.csv``; it is complete
only when all three are there (it is renamed into place when finished).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wsi_mil.errors import ConfigError
from wsi_mil.mil.heads import Head, SurvivalHead, head_from_state
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.tabular import TabularPreprocessor

__all__ = ["FOLD_FILES", "FoldModel", "build_model", "fold_complete", "fold_dir"]

log = logging.getLogger(__name__)

#: Files of a finished fold folder.
FOLD_FILES = ("fold.json", "model.safetensors", "predictions.csv")


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The folder of fold ``fold`` in a run folder."""
    return run_dir / f"fold_{fold}"


def fold_complete(run_dir: Path, fold: int) -> bool:
    """Whether fold ``fold`` of a run folder was finished (all :data:`FOLD_FILES`)."""
    d = fold_dir(run_dir, fold)
    return all((d / n).is_file() for n in FOLD_FILES)


def build_model(
    config: TrainConfig, in_dim: int, head: Head, pre: TabularPreprocessor
) -> torch.nn.Module:
    """Create the aggregator for this config, passing omics groups / clinical width to
    aggregators that use those modalities, and ``n_classes=2`` (early / late event
    pseudo-classes, see :meth:`SurvivalHead.instance_labels`) to survival aggregators with
    an instance loss (``clam_sb``); ``n_outputs`` stays the head's.

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
    if isinstance(head, SurvivalHead) and info.aux_loss and _accepts(info.cls, "n_classes"):
        kwargs.setdefault("n_classes", 2)
    return create_aggregator(config.model, in_dim, head.n_outputs, **kwargs)


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load a fold's weights; a fold saved before feature scaling existed (no
    ``scaler.*`` tensors) keeps the identity scaler, which is how it was trained.

    Raises:
        ConfigError: Other missing or unexpected tensors.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    other = [k for k in missing if k not in _SCALER_KEYS]
    if other or unexpected:
        raise ConfigError(
            f"{where}/model.safetensors does not fit the aggregator in fold.json (missing "
            f"{other[:4]}, unexpected {unexpected[:4]}); retrain the fold"
        )
    if missing:
        log.info("%s predates feature scaling: features are used unscaled, as trained", where)


#: Options whose default changed, with the value that folds saved before the change were
#: trained with (their ``fold.json`` does not name it).
_LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "transmil": {"attention": "exact"},
    "dual_xattn": {
        "omics_encoder": "snn",
        "residual": False,
        "modality_dropout": 0.0,
        "histology_dim": None,
        "histology_fallback": False,
        "warm_start": False,
        "context_linear": False,
        "context_fit": "sgd",
        "context_adjust": False,
    },
}

#: The feature scaler's tensors in a state dict.
_SCALER_KEYS = frozenset({"scaler.mean", "scaler.std"})


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` has a parameter ``name``."""
    import inspect

    return name in inspect.signature(cls).parameters


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

    def save(self, folder: Path) -> None:
        """Write ``model.safetensors`` and ``fold.json`` into an existing ``folder``."""
        save_file(
            {n: t.contiguous() for n, t in self.model.state_dict().items()},
            str(folder / "model.safetensors"),
        )
        (folder / "fold.json").write_text(json.dumps(self.meta, indent=1))

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
        cfg = {**_LEGACY_DEFAULTS.get(meta["aggregator"]["name"], {}), **meta["aggregator"]}
        model = create_aggregator(cfg.pop("name"), cfg.pop("in_dim"), cfg.pop("n_outputs"), **cfg)
        _load_weights(model, state, fold_dir)
        model.to(device).eval()
        pre = TabularPreprocessor.from_state(meta["preprocessing"])
        return cls(int(meta["fold"]), model, head_from_state(meta["head"]), pre, meta)
