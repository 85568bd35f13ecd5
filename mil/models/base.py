"""Shared pieces of the MIL aggregators: the output type, masked softmax, gated attention.

Shapes: ``B`` bags in a batch, ``N`` tiles per bag (padded), ``D`` input feature dim,
``K`` attention branches, ``L`` embedding dim. ``mask`` is ``(B, N)`` bool, ``True`` for a
real tile and ``False`` for padding.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from wsi_mil.errors import ConfigError

__all__ = [
    "Aggregator",
    "FeatureScaler",
    "GatedAttention",
    "MILOutput",
    "attention_pool",
    "check_bag_inputs",
    "masked_mean",
    "masked_softmax",
    "mlp_block",
]


class MILOutput(NamedTuple):
    """What every aggregator's ``forward`` returns.

    Attributes:
        logits: ``(B, n_outputs)`` raw scores (class logits, or the Cox risk for
            ``n_outputs=1``).
        attention: ``(B, N)`` per-tile attention, exactly 0 on padded tiles and summing to
            1 over the real tiles of each bag; ``None`` for aggregators without one.
        aux_loss: scalar auxiliary loss to add to the task loss (CLAM's instance loss), or
            ``None``.
        context_attention: fusion aggregators only: ``(B, T, N)`` attention of each
            context token (omics group, clinical) over the tiles (0 on padded tiles, mean
            over heads, last block), else ``None``.
        context_weights: fusion aggregators only: ``(B, T)`` pooling weight of each
            context token (0 where the modality is missing), else ``None``.
    """

    logits: Tensor
    attention: Tensor | None
    aux_loss: Tensor | None
    context_attention: Tensor | None = None
    context_weights: Tensor | None = None


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` that ignores masked-out entries.

    Masked entries get exactly 0; a slice with no valid entry is all zeros (never NaN).
    The softmax runs in float32 and is cast back to ``scores.dtype``.

    Args:
        scores: ``(..., N)`` raw scores (any float dtype).
        mask: bool, broadcastable to ``scores``; ``True`` = valid.
        dim: dimension to normalise over.

    Returns:
        Tensor shaped like ``scores``.
    """
    s = scores.float()
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    weights = torch.softmax(s, dim=dim) * mask
    return weights.to(scores.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real rows of each bag.

    Args:
        x: ``(B, N, L)`` tile embeddings.
        mask: ``(B, N)`` bool.

    Returns:
        ``(B, L)``; zeros for a bag with no real tile.
    """
    m = mask.unsqueeze(-1).to(x.dtype)
    count = m.sum(dim=1).clamp(min=1.0)
    return (x * m).sum(dim=1) / count


def mlp_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout``, the tile projection used by most aggregators."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018): ``w^T (tanh(V h) * sigmoid(U h))``.

    Args:
        in_dim: embedding dim ``L`` of the tiles.
        hidden_dim: attention hidden dim (the paper's 128; 256 here by default).
        n_branches: number of attention branches ``K`` (one per class for multi-branch).
        dropout: dropout on the tanh and sigmoid activations.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 256, n_branches: int = 1, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.attn_v = nn.Linear(in_dim, hidden_dim)
        self.attn_u = nn.Linear(in_dim, hidden_dim)
        self.attn_w = nn.Linear(hidden_dim, n_branches)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        """Raw scores.

        Args:
            h: ``(B, N, L)``.

        Returns:
            ``(B, K, N)`` unnormalised scores.
        """
        gate = self.dropout(torch.tanh(self.attn_v(h))) * self.dropout(
            torch.sigmoid(self.attn_u(h))
        )
        return self.attn_w(gate).transpose(1, 2)


def attention_pool(h: Tensor, scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Attention-weighted pooling of tiles.

    Args:
        h: ``(B, N, L)`` tile embeddings.
        scores: ``(B, K, N)`` raw attention scores.
        mask: ``(B, N)`` bool.

    Returns:
        ``(pooled (B, K, L), weights (B, K, N))``; weights are 0 on padding and sum to 1
        over the real tiles.
    """
    weights = masked_softmax(scores, mask.unsqueeze(1))
    pooled = torch.bmm(weights.to(h.dtype), h)
    return pooled, weights


def check_bag_inputs(
    name: str, features: Tensor, mask: Tensor | None, in_dim: int
) -> tuple[Tensor, Tensor]:
    """Validate ``features``/``mask`` and return them (an all-True mask when ``None``).

    Raises:
        ConfigError: wrong rank, wrong feature dim, no tiles at all (``N == 0``), or a
            mask of the wrong shape/dtype.
    """
    if features.ndim != 3:
        raise ConfigError(
            f"{name}: features must be (B, N, D), got shape {tuple(features.shape)}; "
            "add a batch dimension with features.unsqueeze(0)"
        )
    if features.shape[-1] != in_dim:
        raise ConfigError(
            f"{name}: features have dim {features.shape[-1]} but the model was built with "
            f"in_dim={in_dim}; build it with in_dim={features.shape[-1]}"
        )
    if features.shape[1] == 0:
        raise ConfigError(
            f"{name}: bags have no tiles (N=0); drop empty bags before calling the model"
        )
    if mask is None:
        return features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if mask.shape != features.shape[:2]:
        raise ConfigError(
            f"{name}: mask must be (B, N) = {tuple(features.shape[:2])}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ConfigError(
            f"{name}: mask must be a bool tensor (True = real tile), got {mask.dtype}"
        )
    return features, mask


class FeatureScaler(nn.Module):
    """Per-dimension standardisation of tile features, ``(x - mean) / std``.

    The statistics are buffers, so they are saved in ``model.safetensors`` with the
    weights; the trainer sets them from the training patients' tiles
    (:func:`wsi_mil.mil.scaling.fit_scaler`). Until then (and with ``--no-scale``) they
    are the identity (mean 0, std 1). Padded tiles stay exactly 0.

    Args:
        dim: feature dim ``D``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set(self, mean: Tensor, std: Tensor) -> None:
        """Set the statistics: ``mean`` and ``std`` ``(D,)``; ``std`` must be > 0."""
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """Standardise ``features (B, N, D)``; rows where ``mask (B, N)`` is False stay 0."""
        scaled = (features - self.mean.to(features.dtype)) / self.std.to(features.dtype)
        return scaled.masked_fill(~mask.unsqueeze(-1), 0.0)


class Aggregator(nn.Module, abc.ABC):
    """Base class: the public ``forward`` contract, input checks, feature scaling and
    per-class attention.

    :meth:`forward` validates ``features``/``mask`` with :func:`check_bag_inputs`,
    standardises the features with :attr:`scaler` and hands them, with the keyword
    inputs, to :meth:`_aggregate`, which each subclass implements. A subclass names the
    keyword inputs it uses and takes the rest as ``**_`` (ignored).

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
    """

    name: str = "aggregator"
    #: Factor on the task (bag) loss in training; the trainer adds ``aux_loss`` to
    #: ``task_weight * task_loss``.
    task_weight: float = 1.0

    def __init__(self, in_dim: int, n_outputs: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_outputs = n_outputs
        self.scaler = FeatureScaler(in_dim)

    @property
    def training_stages(self) -> tuple[str, ...]:
        """Names of the stages the trainer runs one after the other, each a full
        optimisation with early stopping after :meth:`set_stage`; ``()`` = one plain
        optimisation (every aggregator but ``dual_xattn``'s warm start)."""
        return ()

    def set_stage(self, stage: str | None) -> None:
        """Enter a stage of :attr:`training_stages` (which parameters train, what
        ``forward`` returns); ``None`` leaves staging (all parameters, full model)."""
        if stage is not None:
            raise ValueError(f"{self.name} has no training stage {stage!r}")

    def stage_lr_factor(self, stage: str) -> float:
        """Factor on the learning rate in ``stage`` (1)."""
        return 1.0

    @property
    def penalised_stages(self) -> tuple[str, ...]:
        """Stages of :attr:`training_stages` that are a linear model on per-bag
        covariates (:meth:`stage_design`), which the trainer fits by a penalised
        regression with a cross-validated penalty
        (:func:`wsi_mil.mil.penalised.fit_penalised`, L1 share
        :meth:`stage_l1_ratio`) instead of gradient steps, with the stage's output at
        zero coefficients as the fit's offset; ``()`` (every aggregator but
        ``dual_xattn``)."""
        return ()

    def stage_l1_ratio(self, stage: str) -> float:
        """The L1 share of a penalised stage's elastic-net penalty."""
        raise ValueError(f"{self.name} has no penalised stage {stage!r}")

    def stage_design(self, stage: str, **inputs: Tensor | None) -> Tensor:
        """(B, P) covariates of a penalised stage from the bags' tabular ``inputs``
        (``omics``, ``omics_mask``, ``clinical``, ``clinical_mask``)."""
        raise ValueError(f"{self.name} has no penalised stage {stage!r}")

    def set_stage_weight(self, stage: str, weight: Tensor) -> None:
        """Set a penalised stage's (P, n_outputs) coefficients."""
        raise ValueError(f"{self.name} has no penalised stage {stage!r}")

    def prepare(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Check the inputs (:func:`check_bag_inputs`) and standardise the features.

        Returns:
            ``(features (B, N, D) standardised, mask (B, N) bool)``.
        """
        features, mask = check_bag_inputs(self.name, features, mask, self.in_dim)
        return self.scaler(features, mask), mask

    def forward(
        self,
        features: Tensor,
        mask: Tensor | None = None,
        *,
        omics: Tensor | None = None,
        clinical: Tensor | None = None,
        omics_mask: Tensor | None = None,
        clinical_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> MILOutput:
        """Aggregate the tiles of each bag (with any other modality) into logits.

        Inputs an aggregator does not use (e.g. ``omics`` for a histology-only model) are
        ignored.

        Args:
            features: ``(B, N, D)`` float tile features.
            mask: ``(B, N)`` bool, True = real tile (None: all real).
            omics: ``(B, G_total)`` or None (omics missing for every bag).
            clinical: ``(B, C)`` or None (clinical missing for every bag).
            omics_mask: ``(B,)`` bool, True = omics present (None: all present).
            clinical_mask: ``(B,)`` bool, True = clinical present (None: all present).
            labels: ``(B,)`` long bag labels for an auxiliary loss, or None.

        Returns:
            ``MILOutput(logits (B, n_outputs), attention (B, N) | None,
            aux_loss scalar | None)``.

        Raises:
            ConfigError: malformed ``features``/``mask`` (see :func:`check_bag_inputs`)
                or other inputs.
        """
        features, mask = self.prepare(features, mask)
        return self._aggregate(
            features,
            mask,
            omics=omics,
            clinical=clinical,
            omics_mask=omics_mask,
            clinical_mask=clinical_mask,
            labels=labels,
        )

    @abc.abstractmethod
    def _aggregate(self, features: Tensor, mask: Tensor, **inputs: Tensor | None) -> MILOutput:
        """Model-specific forward on checked inputs: ``features (B, N, D)``, ``mask (B, N)``
        bool, and the keyword inputs of :meth:`forward`."""

    def class_attention(
        self, features: Tensor, mask: Tensor | None = None, **inputs: Any
    ) -> Tensor | None:
        """Per-class (per-branch) attention ``(B, K, N)``, or ``None`` when the model has one
        shared attention map (then use ``MILOutput.attention``).

        Args:
            features: ``(B, N, D)``.
            mask: ``(B, N)`` bool.
            **inputs: the same keyword inputs as ``forward``.
        """
        return None
