"""Registry of MIL aggregators: register, create and list them by name.

Importing this module does not import torch; the built-in aggregators are imported the
first time the registry is queried.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = [
    "AggregatorInfo",
    "aggregator_info",
    "create_aggregator",
    "list_aggregators",
    "register_aggregator",
]

MODALITIES = ("histology", "omics", "clinical")
_BUILTIN_MODULES = ("mean_max", "abmil", "clam", "transmil", "dual_xattn")
_REGISTRY: dict[str, AggregatorInfo] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class AggregatorInfo:
    """Metadata of a registered aggregator.

    Attributes:
        name: registry name (``--model`` on the command line).
        cls: the ``nn.Module`` class; built as ``cls(in_dim, n_outputs, **kwargs)``.
        description: one line for ``--help`` and docs.
        permutation_invariant: outputs do not depend on the order of the tiles.
        modalities: inputs it uses, a subset of ``("histology", "omics", "clinical")``.
        has_attention: ``MILOutput.attention`` is a per-tile attention (else ``None``).
        aux_loss: it may return an auxiliary loss (when ``labels`` are given).
    """

    name: str
    cls: type
    description: str
    permutation_invariant: bool
    modalities: tuple[str, ...]
    has_attention: bool
    aux_loss: bool = False


def register_aggregator(
    name: str,
    *,
    description: str,
    permutation_invariant: bool,
    modalities: tuple[str, ...] = ("histology",),
    has_attention: bool = True,
    aux_loss: bool = False,
) -> Callable[[type], type]:
    """Class decorator adding an aggregator to the registry.

    The class must accept ``(in_dim, n_outputs, **kwargs)`` and implement the
    ``forward(features, mask, *, omics, clinical, omics_mask, clinical_mask, labels)
    -> MILOutput`` contract of :mod:`wsi_mil.mil.models.base` (subclass ``Aggregator``,
    which provides ``forward``, and implement ``_aggregate``).

    Raises:
        ValueError: the name is taken or a modality is unknown (a programming error).
    """
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise ValueError(f"unknown modalities {bad}; use a subset of {MODALITIES}")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = AggregatorInfo(
            name=name,
            cls=cls,
            description=description,
            permutation_invariant=permutation_invariant,
            modalities=tuple(modalities),
            has_attention=has_attention,
            aux_loss=aux_loss,
        )
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"wsi_mil.mil.models.{module}")
        _builtins_loaded = True


def list_aggregators() -> list[str]:
    """Names of all registered aggregators, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def aggregator_info(name: str) -> AggregatorInfo:
    """Metadata of one aggregator.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown aggregator {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def _check_kwargs(info: AggregatorInfo, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(info.cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", "in_dim", "n_outputs")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"aggregator {info.name!r} has no option(s) {unknown}; "
            f"valid options: {', '.join(allowed) or '(none)'}"
        )


def create_aggregator(name: str, in_dim: int, n_outputs: int, **kwargs: Any) -> Any:
    """Build an aggregator by name.

    Args:
        name: one of :func:`list_aggregators`.
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits (classes; 1 for a Cox risk).
        **kwargs: aggregator options (hidden sizes, dropout, ``omics_groups`` ...).

    Returns:
        The ``nn.Module``; its ``aggregator_config`` attribute holds ``name``, ``in_dim``,
        ``n_outputs``, the scalar defaults and the kwargs, enough to rebuild it before
        loading weights.

    Raises:
        ConfigError: unknown name, unknown option, or a non-positive ``in_dim``/``n_outputs``.
    """
    info = aggregator_info(name)
    for arg, value in (("in_dim", in_dim), ("n_outputs", n_outputs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"aggregator {name!r}: {arg} must be a positive int, got {value!r}")
    _check_kwargs(info, kwargs)
    model = info.cls(in_dim, n_outputs, **kwargs)
    model.aggregator_config = {
        "name": name,
        "in_dim": in_dim,
        "n_outputs": n_outputs,
        **_scalar_defaults(info.cls),
        **kwargs,
    }
    return model


def _scalar_defaults(cls: type) -> dict[str, Any]:
    """The constructor's int/float/str/bool defaults, recorded with every model so that a
    saved fold is rebuilt as trained even after a default changes."""
    params = inspect.signature(cls).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name not in ("in_dim", "n_outputs") and isinstance(p.default, int | float | str)
    }
