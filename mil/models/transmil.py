"""TransMIL (Shao et al., NeurIPS 2021): transformer MIL with a positional conv block.

Written from the paper: project tiles to 512, lay the sequence out on a square grid
(repeating the first tiles to fill it), prepend a class token, run a multi-head
self-attention layer, the PPEG block (depthwise 7/5/3 convs on the grid, summed with the
identity), a second attention layer, LayerNorm, and classify the class token.

Attention is Nyström attention with 256 landmarks and a 6-step iterative pseudo-inverse
(``attention="nystrom"``, the paper's choice; :mod:`~wsi_mil.mil.models.nystrom`), so
time and memory grow linearly with the number of tiles; bags of at most 256 tokens get
exact attention (Nyström would cost more and approximate nothing there).
``attention="exact"`` uses exact attention for every bag
(``torch.nn.functional.scaled_dot_product_attention``; memory-efficient kernels on GPU).
Unlike the paper's code, the Nyström block has no convolutional residual over the values
(it would mix tokens across grid rows and across bags of a padded batch). Key masks let
bags of different sizes share a batch; each bag keeps its own ``ceil(sqrt(n))`` grid,
placed in the top-left corner of the batch's grid with zeros around it, so a padded
batch gives the same result as each bag alone. The model depends on tile order (not
permutation invariant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models.base import Aggregator, MILOutput, mlp_block
from wsi_mil.mil.models.nystrom import compact, exact_attention, nystrom_attention
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["MAX_PINV_ITERATIONS", "PPEG", "TransMIL"]

#: Most steps of the iterative pseudo-inverse (beyond, float32 rounding noise blows up).
MAX_PINV_ITERATIONS = 20


class _SelfAttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual: ``x + MSA(LN(x))``.

    Args:
        dim: token dim.
        n_heads: heads (``dim`` must be divisible by it).
        dropout: attention and output dropout.
        attention: ``nystrom`` or ``exact`` (see :class:`TransMIL`).
        landmarks: Nyström landmarks ``m``.
        pinv_iterations: steps of the iterative pseudo-inverse.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        dropout: float,
        attention: str = "nystrom",
        landmarks: int = 256,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.attention = attention
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations

    def forward(self, x: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over the unmasked tokens (padded tokens are left unchanged).

        Args:
            x: ``(B, T, C)`` tokens (class token first).
            key_mask: ``(B, T)`` bool, tokens that may be attended to.

        Returns:
            ``(x (B, T, C), cls_attention (B, H, T))`` — the class token's attention,
            float32, 0 on masked tokens.
        """
        b, t, c = x.shape
        idx = compact(key_mask)  # every bag's real tokens first, in order
        spread = idx[..., None].expand(-1, -1, c)
        mask = key_mask.gather(1, idx)
        qkv = self.qkv(self.norm(x.gather(1, spread))).view(
            b, -1, 3, self.n_heads, c // self.n_heads
        )
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # (B, H, T', c/H)
        out, first = self._attend(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, -1, c)
        p = self.dropout if self.training else 0.0
        update = F.dropout(self.proj(out), p, self.training) * mask[..., None]
        heads = idx[:, None, :].expand(-1, self.n_heads, -1)
        cls_attention = first.new_zeros(b, self.n_heads, t).scatter(2, heads, first)
        return x.scatter_add(1, spread, update), cls_attention

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Exact attention for bags of at most ``landmarks`` tokens (or all, in ``exact``
        mode), Nyström for the others; shapes as :func:`exact_attention`."""
        p = self.dropout if self.training else 0.0
        n = mask.sum(dim=1)
        large = n > self.landmarks if self.attention == "nystrom" else torch.zeros_like(mask[:, 0])
        if not bool(large.any()):
            return exact_attention(q, k, v, mask, p)
        if bool(large.all()):
            return nystrom_attention(q, k, v, mask, self.landmarks, self.pinv_iterations)
        small, ts = ~large, int(n[~large].max())
        out_s, first_s = exact_attention(
            q[small, :, :ts], k[small, :, :ts], v[small, :, :ts], mask[small, :ts], p
        )
        out_l, first_l = nystrom_attention(
            q[large], k[large], v[large], mask[large], self.landmarks, self.pinv_iterations
        )
        out, first = q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=torch.float32)
        out[small, :, :ts], first[small, :, :ts] = out_s, first_s
        out[large], first[large] = out_l, first_l
        return out, first


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

    ``attention`` is the class token's attention over the tiles averaged over heads and
    over both layers (on the 2 % planted-signal cohort of ``benchmarks/learning.py`` the
    last layer alone found the planted tiles with AUROC 0.87, the two layers averaged
    with 0.97); a tile repeated in several grid cells gets the mean of their weights,
    and the result is renormalised over the real tiles (the class token's
    self-attention dropped).

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        hidden_dim: token dim (512).
        n_heads: attention heads (8).
        dropout: dropout after the projection and in attention (0.1).
        attention: ``nystrom`` (the paper's, default) or ``exact``.
        landmarks: Nyström landmarks (256, half the token dim as in the paper); bags of
            at most this many tokens get exact attention.
        pinv_iterations: steps of the iterative pseudo-inverse (6, as in the paper; up to
            20 — more steps make it more exact until float32 rounding in the null space,
            amplified about 3× per step, takes over).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        n_heads: int = 8,
        dropout: float = 0.1,
        attention: str = "nystrom",
        landmarks: int = 256,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if hidden_dim % n_heads:
            raise ConfigError(
                f"transmil: hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}"
            )
        if attention not in ("nystrom", "exact"):
            raise ConfigError(
                f"transmil: attention must be 'nystrom' or 'exact', got {attention!r}"
            )
        if landmarks < 1 or not 1 <= pinv_iterations <= MAX_PINV_ITERATIONS:
            raise ConfigError(
                f"transmil: landmarks must be positive (got {landmarks}) and pinv_iterations "
                f"in 1..{MAX_PINV_ITERATIONS} (got {pinv_iterations})"
            )
        self.encoder = mlp_block(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.layer1, self.layer2 = (
            _SelfAttentionLayer(hidden_dim, n_heads, dropout, attention, landmarks, pinv_iterations)
            for _ in range(2)
        )
        self.ppeg = PPEG(hidden_dim)
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
        x, cls_attention1 = self.layer1(x, key_mask)
        grid = (x[:, 1:] * valid[..., None]).transpose(1, 2).reshape(b, c, side, side)
        grid = self.ppeg(grid).reshape(b, c, side * side).transpose(1, 2)
        x = torch.cat([x[:, :1], grid], dim=1)
        x, cls_attention2 = self.layer2(x, key_mask)
        logits = self.classifier(self.norm(x[:, 0]))
        both = (cls_attention1.mean(dim=1) + cls_attention2.mean(dim=1)) / 2
        attention = self._per_tile(both[:, 1:], tile_index, valid, mask)
        return MILOutput(logits, attention.to(h.dtype), None)

    @staticmethod
    def _per_tile(per_cell: Tensor, tile_index: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
        """Grid-cell weights ``(B, S*S)`` to tile weights ``(B, N)``: the mean over the
        cells showing a tile, renormalised to sum to 1 over the real tiles."""
        total = torch.zeros(mask.shape, dtype=per_cell.dtype, device=per_cell.device)
        total.scatter_add_(1, tile_index, per_cell * valid)
        cells = torch.zeros_like(total).scatter_add_(1, tile_index, valid.to(total.dtype))
        attention = total / cells.clamp(min=1) * mask
        return attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
