"""Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsi_mil.mil.models.base import (
    Aggregator,
    GatedAttention,
    MILOutput,
    attention_pool,
    mlp_block,
)
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["ABMIL"]


@register_aggregator(
    "abmil",
    description="Gated attention MIL (Ilse et al. 2018): attention-weighted mean of tiles.",
    permutation_invariant=True,
)
class ABMIL(Aggregator):
    """Gated attention pooling of projected tiles, then a linear head.

    ``h_i = Dropout(ReLU(W x_i))`` (``D -> hidden_dim``), scores
    ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))`` (``hidden_dim -> attn_dim -> 1``), masked
    softmax over the real tiles, ``z = sum_i a_i h_i``, ``logits = C z``.

    With ``multi_branch=True`` there is one attention branch and one linear scorer per
    output (CLAM-MB style); ``attention`` is then the mean of the branches and
    :meth:`class_attention` returns each branch ``(B, n_outputs, N)``.

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        hidden_dim: tile embedding dim (512).
        attn_dim: gated-attention hidden dim (256).
        dropout: dropout after the projection and in the attention (0.25).
        multi_branch: one attention branch per output.
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        multi_branch: bool = False,
    ) -> None:
        super().__init__(in_dim, n_outputs)
        self.multi_branch = multi_branch
        n_branches = n_outputs if multi_branch else 1
        self.encoder = mlp_block(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attn_dim, n_branches, dropout)
        if multi_branch:
            # one scorer per output, applied to that output's pooled embedding
            self.branch_weight = nn.Parameter(torch.empty(n_outputs, hidden_dim))
            self.branch_bias = nn.Parameter(torch.zeros(n_outputs))
            nn.init.normal_(self.branch_weight, std=hidden_dim**-0.5)
        else:
            self.classifier = nn.Linear(hidden_dim, n_outputs)

    def _pool(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled (B, K, L), weights (B, K, N))`` of checked inputs."""
        h = self.encoder(features)
        return attention_pool(h, self.attention(h), mask)

    def _logits(self, pooled: Tensor) -> Tensor:
        if self.multi_branch:
            return (pooled * self.branch_weight).sum(-1) + self.branch_bias
        return self.classifier(pooled[:, 0])

    def _aggregate(self, features: Tensor, mask: Tensor, **_: Tensor | None) -> MILOutput:
        """``attention`` is the mean over the branches; ``aux_loss`` is None."""
        pooled, weights = self._pool(features, mask)
        return MILOutput(self._logits(pooled), weights.mean(dim=1), None)

    def class_attention(
        self, features: Tensor, mask: Tensor | None = None, **inputs: Any
    ) -> Tensor | None:
        """Per-output attention ``(B, n_outputs, N)`` with ``multi_branch``; else ``None``."""
        if not self.multi_branch:
            return None
        features, mask = self.prepare(features, mask)
        return self._pool(features, mask)[1]
