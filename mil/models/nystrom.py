"""Nyström self-attention (Xiong et al., AAAI 2021), as TransMIL uses it, with key masks.

Softmax attention ``softmax(Q Kᵀ) V`` over ``n`` tokens costs ``O(n²)``. Nyström attention
approximates it through ``m`` landmarks (segment means of the queries and keys):

``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V`` — ``O(n·m)`` time and memory.

Written from the paper for bags of different sizes in one padded batch:

* each bag's landmarks are the means of its *own* valid tokens, cut into ``m`` consecutive
  segments of (nearly) equal size in token order, so padding never enters a landmark and a
  bag gives the same result alone or in a batch;
* the Moore–Penrose pseudo-inverse is the paper's iterative one (Razavi et al. 2014),
  scaled per bag and head, not over the batch;
* a bag with at most ``m`` tokens gets exact softmax attention: every landmark would be
  one token, which costs more than exact attention and approximates nothing.

Tokens are ``(B, H, T, d)``; ``key_mask`` ``(B, T)`` marks the real ones, valid tokens
first (compact the sequence before calling, see :func:`compact`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_mil.mil.models.base import masked_softmax

__all__ = ["compact", "exact_attention", "nystrom_attention", "pinv_iterative"]


def compact(mask: Tensor) -> Tensor:
    """Positions that move every bag's valid tokens to the front, in their order.

    Args:
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, T')`` long gather index with ``T' = max(mask.sum(1))``.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order[:, : max(int(mask.sum(dim=1).max()), 1)]


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, dropout: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention over the unmasked keys.

    Args:
        q, k, v: ``(B, H, T, d)``.
        key_mask: ``(B, T)`` bool.
        dropout: dropout on the attention weights (training only; 0 in eval).

    Returns:
        ``(out (B, H, T, d), first_row (B, H, T))`` — the first query's (the class
        token's) attention weights, float32, 0 on masked keys.
    """
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=dropout
    )
    scores = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float()) / math.sqrt(k.shape[-1])
    return out, masked_softmax(scores, key_mask[:, None, :])


def pinv_iterative(a: Tensor, iterations: int = 6) -> Tensor:
    """Iterative Moore–Penrose pseudo-inverse of square matrices (Razavi et al. 2014).

    ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``, then ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))``; the
    scaling is per matrix, so a batch gives each matrix its own inverse.

    Args:
        a: ``(..., m, m)``.
        iterations: Newton–Schulz-type steps (6 in the paper).

    Returns:
        ``(..., m, m)``.
    """
    norm1 = a.abs().sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1)  # max row sum
    z = a.transpose(-1, -2) / (norm1 * norm_inf)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _landmarks(x: Tensor, key_mask: Tensor, m: int) -> Tensor:
    """Means of ``m`` consecutive segments of each bag's valid tokens.

    Token of rank ``r`` (among its bag's ``n ≥ m`` valid tokens) joins segment
    ``floor(r m / n)``, so every segment holds at least one token.

    Args:
        x: ``(B, H, T, d)``.
        key_mask: ``(B, T)`` bool.
        m: landmarks.

    Returns:
        ``(B, H, m, d)``.
    """
    n = key_mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    rank = key_mask.long().cumsum(dim=1) - 1
    segment = torch.where(key_mask, rank * m // n, 0)  # (B, T)
    weight = key_mask.to(x.dtype)
    b, h, _, d = x.shape
    index = segment[:, None, :, None].expand(b, h, -1, d)
    sums = x.new_zeros(b, h, m, d).scatter_add_(2, index, x * weight[:, None, :, None])
    counts = x.new_zeros(b, m).scatter_add_(1, segment, weight).clamp(min=1)
    return sums / counts[:, None, :, None]


def nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, landmarks: int, iterations: int = 6
) -> tuple[Tensor, Tensor]:
    """Nyström attention of bags that each hold more than ``landmarks`` valid tokens.

    Args:
        q, k, v: ``(B, H, T, d)``.
        key_mask: ``(B, T)`` bool.
        landmarks: ``m``.
        iterations: steps of :func:`pinv_iterative`.

    Returns:
        ``(out (B, H, T, d), first_row (B, H, T))`` — the first query's approximate
        attention weights (clipped at 0, renormalised over the valid keys), float32.
    """
    with torch.autocast(q.device.type, enabled=False):  # the pseudo-inverse needs float32
        out, first = _nystrom(q.float(), k.float(), v.float(), key_mask, landmarks, iterations)
    return out.to(q.dtype), first


def _nystrom(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, landmarks: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """:func:`nystrom_attention` in float32."""
    q = q * k.shape[-1] ** -0.5
    q_l, k_l = _landmarks(q, key_mask, landmarks), _landmarks(k, key_mask, landmarks)
    kernel1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, T, m)
    kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
    kernel3 = masked_softmax(q_l @ k.transpose(-1, -2), key_mask[:, None, None, :])  # (B,H,m,T)
    left = kernel1 @ pinv_iterative(kernel2, iterations)  # (B, H, T, m)
    out = left @ (kernel3 @ v)
    first = (left[:, :, :1] @ kernel3)[:, :, 0].clamp(min=0) * key_mask[:, None, :]
    return out, first / first.sum(dim=-1, keepdim=True).clamp(min=1e-12)
