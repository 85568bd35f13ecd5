"""TransMIL (Shao et al., NeurIPS 2021): transformer MIL with a positional conv block.

Written from the paper: project tiles to 512, lay the sequence out on a square grid
(repeating the first tiles to fill it), prepend a class token, run a multi-head
self-attention layer, the PPEG block (depthwise 7/5/3 convs on the grid, summed with the
identity), a second attention layer, LayerNorm, and classify the class token.

Differences: attention is exact multi-head attention through
``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient kernels on GPU)
rather than the Nyström approximation, with a key mask so that bags of different sizes
share a batch. Each bag keeps its own ``ceil(sqrt(n))`` grid, placed in the top-left
corner of the batch's grid with zeros around it, so a padded batch gives the same result
as each bag alone. The model depends on tile order (not permutation invariant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models.base import (
    Aggregator,
    MILOutput,
    masked_softmax,
    mlp_block,
)
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["PPEG", "TransMIL"]


class _SelfAttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual: ``x + MSA(LN(x))``.

    Args:
        dim: token dim.
        n_heads: heads (``dim`` must be divisible by it).
        dropout: attention and output dropout.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over the unmasked tokens.

        Args:
            x: ``(B, T, C)`` tokens (class token first).
            key_mask: ``(B, T)`` bool, tokens that may be attended to.

        Returns:
            ``(x (B, T, C), cls_attention (B, H, T))`` — the class token's attention.
        """
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.n_heads, c // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, c/H)
        attn_mask = key_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, t, c)
        x = x + F.dropout(self.proj(out), p, self.training)
        return x, self._cls_attention(q[:, :, 0], k, key_mask)

    @staticmethod
    def _cls_attention(q_cls: Tensor, k: Tensor, key_mask: Tensor) -> Tensor:
        """Softmax attention of the class token (computed apart: SDPA returns no weights).

        Args:
            q_cls: ``(B, H, d)`` class-token queries.
            k: ``(B, H, T, d)`` keys.
            key_mask: ``(B, T)`` bool.

        Returns:
            ``(B, H, T)`` float32, 0 on masked keys.
        """
        scores = torch.einsum("bhd,bhtd->bht", q_cls.float(), k.float()) / math.sqrt(k.shape[-1])
        return masked_softmax(scores, key_mask[:, None, :])


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` on the grid.

    Args:
        dim: channels (depthwise convs, one group per channel).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, grid: Tensor) -> Tensor:
        """Add the positional convs.

        Args:
            grid: ``(B, C, S, S)`` with zeros outside each bag's own square.

        Returns:
            ``(B, C, S, S)``.
        """
        return grid + sum(conv(grid) for conv in self.convs)


@register_aggregator(
    "transmil",
    description="TransMIL (Shao et al. 2021): class-token transformer with PPEG positional conv.",
    permutation_invariant=False,
)
class TransMIL(Aggregator):
    """TransMIL aggregator.

    ``attention`` is the class token's last-layer attention over the tiles, averaged over
    heads; the weight of grid cells that repeat a tile is added to that tile, and the
    result is renormalised over the real tiles (the class token's self-attention dropped).

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        hidden_dim: token dim (512).
        n_heads: attention heads (8).
        dropout: dropout after the projection and in attention (0.1).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        n_heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if hidden_dim % n_heads:
            raise ConfigError(
                f"transmil: hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}"
            )
        self.encoder = mlp_block(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.layer1 = _SelfAttentionLayer(hidden_dim, n_heads, dropout)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = _SelfAttentionLayer(hidden_dim, n_heads, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    @staticmethod
    def _grid_layout(mask: Tensor) -> tuple[Tensor, Tensor, int]:
        """Where each grid cell takes its tile from.

        Bag ``b`` with ``n`` real tiles uses side ``s = ceil(sqrt(n))``; its cell ``(r, c)``
        (``r, c < s``) holds real tile number ``(r * s + c) mod n`` (in mask order).

        Args:
            mask: ``(B, N)`` bool.

        Returns:
            ``(tile_index (B, S*S) long, valid (B, S*S) bool, S)`` for the batch side ``S``.
        """
        n_real = mask.sum(dim=1)
        sides = torch.ceil(torch.sqrt(n_real.double())).long()
        side = max(int(sides.max()), 1)
        # real tile positions first, in their original order
        real_order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        rows = torch.arange(side, device=mask.device)
        r, c = torch.meshgrid(rows, rows, indexing="ij")
        r, c = r.reshape(1, -1), c.reshape(1, -1)
        s = sides[:, None]
        valid = (r < s) & (c < s)
        seq = (r * s + c) % n_real.clamp(min=1)[:, None]
        tile_index = real_order.gather(1, seq.clamp(max=mask.shape[1] - 1))
        return tile_index, valid & (n_real[:, None] > 0), side

    def _aggregate(self, features: Tensor, mask: Tensor, **_: Tensor | None) -> MILOutput:
        """Encode the tile sequence (in a meaningful order, e.g. raster order of coords)
        and classify the class token."""
        h = self.encoder(features)  # (B, N, C)
        b, _, c = h.shape
        tile_index, valid, side = self._grid_layout(mask)
        tokens = h.gather(1, tile_index[..., None].expand(-1, -1, c))
        tokens = tokens * valid[..., None]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        key_mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        x, _ = self.layer1(x, key_mask)
        grid = (x[:, 1:] * valid[..., None]).transpose(1, 2).reshape(b, c, side, side)
        grid = self.ppeg(grid).reshape(b, c, side * side).transpose(1, 2)
        x = torch.cat([x[:, :1], grid], dim=1)
        x, cls_attention = self.layer2(x, key_mask)
        logits = self.classifier(self.norm(x[:, 0]))
        per_cell = cls_attention.mean(dim=1)[:, 1:] * valid  # (B, S*S)
        attention = torch.zeros(mask.shape, dtype=per_cell.dtype, device=per_cell.device)
        attention.scatter_add_(1, tile_index, per_cell)
        attention = attention * mask
        attention = attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return MILOutput(logits, attention.to(h.dtype), None)
