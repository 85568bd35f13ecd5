"""Shared helpers for timm vision transformers: construction and pooling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TimmBackbone", "build_timm"]


class TimmBackbone(nn.Module):
    """A timm model plus the pooling that turns its tokens into one embedding.

    Args:
        model: A timm model built with ``num_classes=0``.
        pooling: ``cls`` (class token after the final norm), ``cls+mean`` (class token
            concatenated with the mean of the patch tokens, prefix/register tokens
            excluded) or ``timm`` (the model's own ``forward``).

    Input (B, 3, S, S) normalised float; output (B, dim).
    """

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls", "cls+mean", "timm"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.model: Any = model
        self.pooling = pooling
        width = int(getattr(model, "num_features", 0))
        self.dim = 2 * width if pooling == "cls+mean" else width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "timm":
            return self.model(x)
        tokens = self.model.forward_features(x)  # (B, prefix + patches, width)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        return torch.cat([cls, tokens[:, n_prefix:].mean(1)], dim=-1)


def build_timm(model_name: str, pooling: str, **kwargs: Any) -> TimmBackbone:
    """Create ``model_name`` with timm (``pretrained=False``, no head) and wrap it.

    Weights are loaded afterwards by :func:`wsi_mil.features.weights.load_weights`.
    """
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    return TimmBackbone(model, pooling)
