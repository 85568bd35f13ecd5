"""Baseline aggregators: masked mean pooling and masked max pooling."""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from wsi_mil.mil.models.base import (
    Aggregator,
    MILOutput,
    masked_mean,
    mlp_block,
)
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["MaxPoolMIL", "MeanPoolMIL"]


class _PoolMIL(Aggregator):
    """Pooling baseline: optional tile projection, a masked pooling, a linear head.

    Subclasses implement :meth:`_pool`. ``omics``, ``clinical``, their masks and
    ``labels`` are ignored; ``aux_loss`` is None.

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        hidden_dim: tile projection ``D -> hidden_dim`` (Linear, ReLU, dropout) before
            pooling; 0 pools the raw features.
        dropout: dropout after the projection.
    """

    def __init__(
        self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if hidden_dim > 0:
            self.encoder: nn.Module = mlp_block(in_dim, hidden_dim, dropout)
            dim = hidden_dim
        else:
            self.encoder = nn.Identity()
            dim = in_dim
        self.classifier = nn.Linear(dim, n_outputs)

    def _aggregate(self, features: Tensor, mask: Tensor, **_: Tensor | None) -> MILOutput:
        pooled, attention = self._pool(self.encoder(features), mask)
        return MILOutput(self.classifier(pooled), attention, None)

    @abc.abstractmethod
    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool the tile embeddings.

        Args:
            h: ``(B, N, L)`` tile embeddings.
            mask: ``(B, N)`` bool.

        Returns:
            ``(pooled (B, L), attention (B, N))``.
        """


@register_aggregator(
    "mean",
    description="Mean of projected tile embeddings, linear head (baseline).",
    permutation_invariant=True,
)
class MeanPoolMIL(_PoolMIL):
    """Masked mean pooling.

    ``attention`` is the uniform weight ``1 / n_real`` each real tile has in the mean.
    Constructor arguments: ``in_dim``, ``n_outputs``, ``hidden_dim`` (512; 0 pools the raw
    features), ``dropout`` (0.25), as for every pooling baseline.
    """

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        m = mask.to(h.dtype)
        return masked_mean(h, mask), m / m.sum(dim=1, keepdim=True).clamp(min=1.0)


@register_aggregator(
    "max",
    description="Channel-wise max of projected tile embeddings, linear head (baseline).",
    permutation_invariant=True,
)
class MaxPoolMIL(_PoolMIL):
    """Masked max pooling (per embedding channel).

    ``attention`` is each tile's *argmax share*: the fraction of embedding channels whose
    maximum comes from that tile. It is 0 on padded tiles, sums to 1 over the real tiles,
    and is the tile's exact share of the pooled vector's entries (max pooling has no
    softmax attention). A channel whose maximum is shared by several tiles (e.g. 0 after
    the ReLU) is split equally among them, so the attention is permutation invariant too.
    A bag without real tiles pools to zeros and gets zero attention. Constructor
    arguments as for :class:`MeanPoolMIL`.
    """

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        filled = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)
        pooled = filled.max(dim=1).values  # (B, L)
        has_tiles = mask.any(dim=1, keepdim=True)
        pooled = torch.where(has_tiles, pooled, torch.zeros_like(pooled))
        return pooled, self._argmax_share(filled.detach(), pooled.detach(), mask)

    @staticmethod
    def _argmax_share(filled: Tensor, pooled: Tensor, mask: Tensor) -> Tensor:
        """Fraction of channels each tile holds the maximum of.

        Args:
            filled: ``(B, N, L)`` embeddings with padding set to the dtype's minimum.
            pooled: ``(B, L)`` channel maxima.
            mask: ``(B, N)`` bool.

        Returns:
            ``(B, N)``; zeros for a bag without real tiles.
        """
        is_max = (filled == pooled.unsqueeze(1)) & mask.unsqueeze(-1)
        share = is_max.to(filled.dtype) / is_max.sum(dim=1, keepdim=True).clamp(min=1)
        return share.sum(dim=-1) / filled.shape[-1]
