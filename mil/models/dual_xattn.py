"""Dual cross-attention fusion of histology tiles with omics groups and clinical covariates.

Tokens: each tile is projected to a *tile token*; each omics group (the columns of one
gene group or pathway, standardised per gene on the fold's training patients) goes
through its own linear embedding and a layer norm (``omics_encoder="linear"``, the
default) or its own small self-normalising MLP (``"snn"``, SELU and alpha dropout, as in
folds trained before the change) to one *omics token*; the clinical vector goes to one
*clinical token*. The omics and clinical tokens form the *context* stream.

One block (``n_layers`` of them) updates both streams at once from their previous state:

* tile stream: tile tokens (queries) attend to the context tokens (keys/values);
* context stream: context tokens (queries) attend to the tile tokens (keys/values);

each followed by a feed-forward layer, pre-norm and residual. There is no tile-to-tile
attention, so memory is linear in the number of tiles: the largest tensors are
``(B, heads, N, T)`` with ``T`` context tokens.

Missing modalities are masked, not zero-filled: the tokens of a missing modality are
removed from the keys of the tile stream (a tile with no context key keeps its own
representation through the residual) and from the context pooling, and the fused
context embedding receives a learned "missing omics" / "missing clinical" embedding
instead. Their input values are never read (set to 0 before encoding).

Each stream is pooled by gated attention (over real tiles; over present context tokens),
the two embeddings are concatenated and passed through an MLP to the head.

Two additions keep the fusion from costing the histology signal (``residual=True`` and
``modality_dropout > 0``, the defaults; folds saved before them are rebuilt without):

* a *residual histology path*: ABMIL on the tile features (its own projection to
  ``histology_dim``, gated attention and linear head; older folds pooled the shared tile
  tokens instead), whose logits are added to the fused logits — the model contains
  ABMIL and learns what the context adds on top;
* *modality dropout*: in training, each bag's omics and clinical inputs are masked
  (exactly as a missing modality) with probability ``modality_dropout`` each, so the
  histology path and the "missing" embeddings are trained on every batch and a patient
  without omics is no surprise at prediction time.

Three more make the histology path ABMIL in its own right, so that a patient without
any context is scored as ABMIL would score them and the context only adds what it
carries (``warm_start`` and ``histology_fallback``, the defaults since the missing-omics
benchmark; older folds are rebuilt without them):

* *warm start* (:attr:`training_stages`): the trainer first fits the histology path alone
  (stage ``"histology"``: ABMIL, with its own early stopping), then freezes it and fits
  the rest (stage ``"fusion"``); the fused classifier starts at zero, so the second stage
  starts from the first one's model and keeps it where the context does not help the
  inner validation loss. The histology path is built before the other modules, in
  ``abmil``'s order and shapes, and its stage makes no other random draw, so from the
  same seed this stage trains exactly the ``abmil`` run of the same options: what the
  context adds is measured against ``abmil`` itself, not against another random start;
* *histology fallback*: the fused correction is added only for bags with at least one
  context modality present; a bag with none gets the histology path's logits alone.

One more keeps the context's main effects learnable from a small cohort
(``context_linear``, the default since the fusion benchmark's seed study; older folds
are rebuilt without it):

* a *context linear path*: a linear model on each omics group's score (the mean of its
  standardised genes, the "mean z-score" pathway score) and the clinical vector, zero at
  the start, whose logits are added for bags with context. With the warm start it is
  fitted in a stage of its own (``"context"``) on top of the frozen histology path: in
  that stage the prediction is the histology logits plus the linear path's
  (``context_adjust``), so the model starts the cross-attention stage from the two
  modalities' main effects in one model, and the cross-attention only has to learn what
  their sum does not explain. The stage is a penalised regression (``context_fit``: the
  lasso by default, elastic net or ridge; :attr:`penalised_stages`): the trainer fits it
  with the head's own loss, the histology logits as offset, on all of the fold's
  training patients and chooses the penalty by cross-validation among them, the largest
  within one standard error of the best (:func:`wsi_mil.mil.penalised.fit_penalised`).
  Adjusting for the histology path matters: a hazard (or log-odds) model that leaves out
  a strong covariate underestimates the others (non-collapsibility), and the residual
  signal is easier to tell from noise, so fitted alone (``context_adjust=False``) the
  lasso often kept no omics group and the sum of the two separately fitted
  paths under-weighted the omics (the fusion benchmark). (Early-stopped gradient
  steps, ``"sgd"`` at ``context_lr`` × ``--lr``, chose on 16 inner-validation patients
  and kept either no omics or noise groups as large as the informative one.) A missing
  modality contributes 0 (its inputs are 0, the training mean of standardised values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models.base import (
    Aggregator,
    GatedAttention,
    MILOutput,
    attention_pool,
    masked_softmax,
    mlp_block,
)
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["CrossAttention", "DualCrossAttentionMIL", "GroupedLinear", "GroupedSNN"]

#: ``omics_encoder`` choices.
OMICS_ENCODERS = ("linear", "snn")
#: ``context_fit`` choices: the L1 share of each penalised fit, and ``"sgd"``.
CONTEXT_L1_RATIOS = {"lasso": 1.0, "elastic_net": 0.5, "ridge": 0.0}
CONTEXT_FITS = (*CONTEXT_L1_RATIOS, "sgd")


def _group_index(groups: list[list[int]]) -> tuple[Tensor, Tensor]:
    """``(index (n_groups, longest) long, valid (n_groups, longest) bool)`` of the groups,
    zero-padded to the longest one."""
    longest = max(len(g) for g in groups)
    index = torch.zeros(len(groups), longest, dtype=torch.long)
    valid = torch.zeros(len(groups), longest, dtype=torch.bool)
    for i, g in enumerate(groups):
        index[i, : len(g)] = torch.tensor(g, dtype=torch.long)
        valid[i, : len(g)] = True
    return index, valid


class GroupedLinear(nn.Module):
    """One linear embedding per omics group, then a layer norm over the token.

    Group ``g`` maps ``omics[:, groups[g]]`` (standardised genes) through its own
    ``Linear(len(groups[g]), dim)``; groups are zero-padded to the longest one. Fewer
    parameters than :class:`GroupedSNN` (a group of ``k`` genes costs ``k * dim``), which
    matters with many noise groups and few patients.

    Args:
        groups: column indices of the omics vector per group.
        dim: token dim.
        dropout: dropout on the genes (input dropout).
    """

    index: Tensor
    valid: Tensor

    def __init__(self, groups: list[list[int]], dim: int, dropout: float) -> None:
        super().__init__()
        index, valid = _group_index(groups)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        sizes = torch.tensor([len(g) for g in groups], dtype=torch.float32)
        self.weight = nn.Parameter(
            torch.randn(len(groups), index.shape[1], dim) / sizes.sqrt()[:, None, None]
        )
        self.bias = nn.Parameter(torch.zeros(len(groups), dim))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, omics: Tensor) -> Tensor:
        """Encode the groups: ``omics (B, G_total)`` -> ``(B, n_groups, dim)`` tokens."""
        x = self.dropout(omics[:, self.index] * self.valid)  # (B, n_groups, longest)
        return self.norm(torch.einsum("bgl,gld->bgd", x, self.weight) + self.bias)


class GroupedSNN(nn.Module):
    """One two-layer SNN per omics group, run as a batch of group-wise matmuls.

    Group ``g`` maps ``omics[:, groups[g]]`` through ``Linear -> SELU -> AlphaDropout ->
    Linear -> SELU -> AlphaDropout`` to a ``dim`` token. Groups are zero-padded to the
    longest one (the padded inputs are always 0 and contribute nothing).

    Args:
        groups: column indices of the omics vector per group.
        dim: token dim.
        dropout: alpha dropout rate.
    """

    index: Tensor
    valid: Tensor

    def __init__(self, groups: list[list[int]], dim: int, dropout: float) -> None:
        super().__init__()
        index, valid = _group_index(groups)
        longest = index.shape[1]
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        sizes = torch.tensor([len(g) for g in groups], dtype=torch.float32)
        # LeCun-normal initialisation with each group's own fan-in
        self.w1 = nn.Parameter(torch.randn(len(groups), longest, dim) / sizes.sqrt()[:, None, None])
        self.b1 = nn.Parameter(torch.zeros(len(groups), dim))
        self.w2 = nn.Parameter(torch.randn(len(groups), dim, dim) / math.sqrt(dim))
        self.b2 = nn.Parameter(torch.zeros(len(groups), dim))
        self.act = nn.SELU()
        self.dropout = nn.AlphaDropout(dropout)

    def forward(self, omics: Tensor) -> Tensor:
        """Encode the groups.

        Args:
            omics: ``(B, G_total)``.

        Returns:
            ``(B, n_groups, dim)`` omics tokens.
        """
        x = omics[:, self.index] * self.valid  # (B, n_groups, longest)
        x = self.dropout(self.act(torch.einsum("bgl,gld->bgd", x, self.w1) + self.b1))
        return self.dropout(self.act(torch.einsum("bgd,gde->bge", x, self.w2) + self.b2))


class CrossAttention(nn.Module):
    """Multi-head cross-attention with a key mask; queries with no valid key get 0.

    Args:
        dim: token dim.
        n_heads: heads (``dim`` divisible by it).
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend.

        Args:
            queries: ``(B, Q, C)``.
            keys: ``(B, K, C)`` (also the values).
            key_mask: ``(B, K)`` bool, keys that may be attended to.

        Returns:
            ``(out (B, Q, C), weights (B, Q, K))``: ``out`` is exactly 0 for a bag without
            any valid key; ``weights`` are the attention weights averaged over heads
            (before dropout).
        """
        b, nq, c = queries.shape
        nk, h = keys.shape[1], self.n_heads
        q = self.q(queries).view(b, nq, h, c // h).transpose(1, 2)  # (B, H, Q, d)
        k, v = self.kv(keys).view(b, nk, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (B, H, K, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)  # (B, H, Q, K)
        weights = masked_softmax(scores, key_mask[:, None, None, :])
        out = self.out((self.dropout(weights) @ v).transpose(1, 2).reshape(b, nq, c))
        return out * key_mask.any(dim=1)[:, None, None], weights.mean(dim=1)


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, 2 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
        )


class _DualBlock(nn.Module):
    """Tile tokens attend to context tokens and context tokens attend to tile tokens."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_tiles = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.tiles_to_context = CrossAttention(dim, n_heads, dropout)
        self.context_to_tiles = CrossAttention(dim, n_heads, dropout)
        self.ff_tiles = _FeedForward(dim, dropout)
        self.ff_context = _FeedForward(dim, dropout)

    def forward(
        self, tiles: Tensor, tile_mask: Tensor, context: Tensor, context_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Update both streams.

        Args:
            tiles: ``(B, N, C)``; tile_mask ``(B, N)`` bool.
            context: ``(B, T, C)``; context_mask ``(B, T)`` bool.

        Returns:
            ``(tiles (B, N, C), context (B, T, C), co_attention (B, T, N))`` — the
            context tokens' attention over the tiles.
        """
        t, c = self.norm_tiles(tiles), self.norm_context(context)
        tiles = tiles + self.tiles_to_context(t, c, context_mask)[0]
        update, co_attention = self.context_to_tiles(c, t, tile_mask)
        context = context + update
        return tiles + self.ff_tiles(tiles), context + self.ff_context(context), co_attention


def _check_groups(omics_groups: list[list[int]] | None) -> list[list[int]]:
    groups = [list(g) for g in (omics_groups or [])]
    for i, g in enumerate(groups):
        if not g:
            raise ConfigError(f"dual_xattn: omics_groups[{i}] is empty; drop it or add columns")
        if any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in g):
            raise ConfigError(
                f"dual_xattn: omics_groups[{i}] must hold non-negative column indices, got {g}"
            )
    return groups


@register_aggregator(
    "dual_xattn",
    description=(
        "Dual cross-attention fusion: tiles <-> omics-group and clinical tokens "
        "(linear in tiles), gated pooling per stream, masked missing modalities."
    ),
    permutation_invariant=True,
    modalities=("histology", "omics", "clinical"),
)
class DualCrossAttentionMIL(Aggregator):
    """Token-level dual cross-attention fusion (see the module docstring).

    ``attention`` is the histology stream's gated-attention weights over tiles;
    ``context_attention`` the last block's context-to-tile attention (which tiles each
    omics group / the clinical token reads) and ``context_weights`` the context pooling
    weights (how much each token counts for the bag).

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        omics_groups: column indices of the omics vector per gene group / pathway; one
            token per group. ``None`` or ``[]``: no omics.
        n_clinical: length of the clinical vector (0: no clinical token).
        dim: token dim (256).
        n_heads: cross-attention heads (4).
        n_layers: dual cross-attention blocks (1).
        attn_dim: gated-attention hidden dim of the poolings (``dim // 2``).
        dropout: dropout (0.25).
        omics_encoder: ``"linear"`` (one linear embedding per group, default) or
            ``"snn"`` (one two-layer SNN per group).
        residual: add the logits of a histology-only gated-attention path (default).
        modality_dropout: in training, probability of masking a bag's omics (and,
            independently, its clinical input) as missing (0.25).
        histology_dim: with ``residual``, the histology path's projection dim (512, as
            ``abmil``); ``None`` pools the shared tile tokens (folds saved before it).
        histology_fallback: with ``residual``, a bag without any context modality gets
            the histology path's logits alone (default).
        warm_start: with ``residual`` and ``histology_dim``, train in stages: the
            histology path alone, then the context linear path, then the rest with both
            frozen (default).
        fusion_lr: learning-rate factor of the warm start's cross-attention stage (0.1:
            the cross-attention overfits a small cohort within tens of steps at ``--lr``).
        context_linear: add the context linear path (group scores and clinical values
            to logits; default).
        context_lr: learning-rate factor of the warm start's context stage with
            ``context_fit="sgd"`` (10: a linear model on a few scores moves by about
            ``lr`` a step under AdamW, and at ``--lr`` it was still growing at the step
            limit).
        context_fit: how the warm start fits the context linear path: ``"lasso"``
            (default), ``"elastic_net"`` (half L1, half L2) or ``"ridge"``: a penalised
            regression with the head's loss on all the fold's training patients, the
            penalty chosen by cross-validation among them (:attr:`penalised_stages`);
            ``"sgd"``: gradient steps, early stopped on the inner validation patients
            (folds trained before the option).
        context_adjust: fit the context linear path adjusted for the histology path:
            in the ``"context"`` stage ``forward`` returns the frozen histology logits
            plus the linear path's, so the penalised fit sees the histology logits as an
            offset (default); ``False``: the linear path alone (folds trained before
            the option).

    Raises:
        ConfigError: no omics group and no clinical input, an empty group, a bad index,
            ``dim`` not divisible by ``n_heads``, an unknown ``omics_encoder``,
            ``modality_dropout`` outside [0, 1), ``fusion_lr <= 0``, ``context_lr <= 0``
            or an unknown ``context_fit``.
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        omics_groups: list[list[int]] | None = None,
        n_clinical: int = 0,
        dim: int = 256,
        n_heads: int = 4,
        n_layers: int = 1,
        attn_dim: int | None = None,
        dropout: float = 0.25,
        omics_encoder: str = "linear",
        residual: bool = True,
        modality_dropout: float = 0.25,
        histology_dim: int | None = 512,
        histology_fallback: bool = True,
        warm_start: bool = True,
        fusion_lr: float = 0.1,
        context_linear: bool = True,
        context_lr: float = 10.0,
        context_fit: str = "lasso",
        context_adjust: bool = True,
    ) -> None:
        super().__init__(in_dim, n_outputs)
        groups = _check_groups(omics_groups)
        if omics_encoder not in OMICS_ENCODERS:
            raise ConfigError(
                f"dual_xattn: omics_encoder={omics_encoder!r}; choose one of {OMICS_ENCODERS}"
            )
        if context_fit not in CONTEXT_FITS:
            raise ConfigError(
                f"dual_xattn: context_fit={context_fit!r}; choose one of {CONTEXT_FITS}"
            )
        if not 0 <= modality_dropout < 1:
            raise ConfigError(f"dual_xattn: modality_dropout={modality_dropout} must be in [0, 1)")
        if not groups and n_clinical < 1:
            raise ConfigError(
                "dual_xattn needs omics_groups or n_clinical > 0; for histology alone use abmil"
            )
        for name, factor in (("fusion_lr", fusion_lr), ("context_lr", context_lr)):
            if not factor > 0:
                raise ConfigError(f"dual_xattn: {name}={factor} must be > 0")
        if dim % n_heads:
            raise ConfigError(f"dual_xattn: dim={dim} must be divisible by n_heads={n_heads}")
        if n_layers < 1:
            raise ConfigError(f"dual_xattn: n_layers must be >= 1, got {n_layers}")
        # the histology path first, in abmil's order and shapes: from the same seed it
        # starts from abmil's initial weights (the trainer reseeds before training)
        h_dim = histology_dim or dim
        self.histology_proj = (
            mlp_block(in_dim, h_dim, dropout) if residual and histology_dim else None
        )
        self.histology_pool = GatedAttention(h_dim, h_dim // 2, 1, dropout) if residual else None
        self.histology_head = nn.Linear(h_dim, n_outputs) if residual else None
        self.n_groups = len(groups)
        self.n_omics_columns = max((max(g) + 1 for g in groups), default=0)
        self.n_clinical = n_clinical
        self.tile_proj = mlp_block(in_dim, dim, dropout)
        encoder = GroupedLinear if omics_encoder == "linear" else GroupedSNN
        self.omics_encoder = encoder(groups, dim, dropout) if groups else None
        self.modality_dropout = modality_dropout
        self.clinical_encoder = (
            nn.Sequential(
                nn.Linear(n_clinical, dim),
                nn.SELU(),
                nn.AlphaDropout(dropout),
                nn.Linear(dim, dim),
                nn.SELU(),
            )
            if n_clinical > 0
            else None
        )
        n_tokens = self.n_groups + (1 if n_clinical > 0 else 0)
        self.token_type = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_DualBlock(dim, n_heads, dropout) for _ in range(n_layers))
        self.norm_tiles = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        hidden = attn_dim or dim // 2
        self.tile_pool = GatedAttention(dim, hidden, 1, dropout)
        self.context_pool = GatedAttention(dim, hidden, 1, dropout)
        self.missing_omics = nn.Parameter(torch.zeros(dim)) if groups else None
        self.missing_clinical = nn.Parameter(torch.zeros(dim)) if n_clinical > 0 else None
        self.fusion = mlp_block(2 * dim, dim, dropout)
        self.classifier = nn.Linear(dim, n_outputs)
        self.histology_fallback = histology_fallback and residual
        self.warm_start = warm_start and self.histology_proj is not None
        self.fusion_lr, self.context_lr, self.context_fit = fusion_lr, context_lr, context_fit
        self.context_adjust = context_adjust
        self.context_linear = (
            nn.Linear(self.n_groups + n_clinical, n_outputs, bias=False) if context_linear else None
        )
        self._stage: str | None = None
        if residual:  # zero start: the model begins as its histology path
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)
        if self.context_linear is not None:
            nn.init.zeros_(self.context_linear.weight)

    @property
    def training_stages(self) -> tuple[str, ...]:
        """With ``warm_start``: ``("histology", "context", "fusion")`` (no ``"context"``
        without ``context_linear``); else ``()``."""
        if not self.warm_start:
            return ()
        context = ("context",) if self.context_linear is not None else ()
        return ("histology", *context, "fusion")

    def stage_lr_factor(self, stage: str) -> float:
        """``fusion_lr`` in the ``"fusion"`` stage, ``context_lr`` in ``"context"``, else 1."""
        return {"fusion": self.fusion_lr, "context": self.context_lr}.get(stage, 1.0)

    @property
    def penalised_stages(self) -> tuple[str, ...]:
        """``("context",)`` when the warm start has that stage and ``context_fit`` is a
        penalised regression; else ``()``."""
        penalised = self.context_fit in CONTEXT_L1_RATIOS
        return ("context",) if penalised and "context" in self.training_stages else ()

    def stage_l1_ratio(self, stage: str) -> float:
        """The L1 share of ``context_fit``'s penalty (1 lasso, 0.5, 0 ridge)."""
        if stage not in self.penalised_stages:
            raise ValueError(f"dual_xattn has no penalised stage {stage!r}")
        return CONTEXT_L1_RATIOS[self.context_fit]

    def stage_design(self, stage: str, **inputs: Tensor | None) -> Tensor:
        """(B, n_groups + n_clinical) covariates of the context linear path: each
        group's mean standardised gene value, then the clinical values; 0 for a missing
        modality (no modality dropout: this is not a training forward pass)."""
        if stage not in self.penalised_stages:
            raise ValueError(f"dual_xattn has no penalised stage {stage!r}")
        omics, clinical = inputs.get("omics"), inputs.get("clinical")
        present = [v for v in (omics, clinical) if v is not None]
        if not present:
            raise ConfigError("dual_xattn.stage_design: no omics and no clinical input")
        b, like = present[0].shape[0], present[0].float()
        omics_present, clinical_present = (
            self._present(name, value, inputs.get(f"{name}_mask"), b, like.device, drop=False)
            for name, value in (("omics", omics), ("clinical", clinical))
        )
        return self._scores(
            *self._inputs(b, omics, clinical, omics_present, clinical_present, like)
        )

    def set_stage_weight(self, stage: str, weight: Tensor) -> None:
        """Set the context linear path's coefficients, ``weight`` (P, n_outputs) as
        fitted on :meth:`stage_design`."""
        if stage not in self.penalised_stages or self.context_linear is None:
            raise ValueError(f"dual_xattn has no penalised stage {stage!r}")
        with torch.no_grad():
            self.context_linear.weight.copy_(weight.T)

    def _histology_modules(self) -> list[nn.Module]:
        mods = [self.histology_proj, self.histology_pool, self.histology_head]
        return [m for m in mods if m is not None]

    def _stage_of(self, p: nn.Parameter) -> str:
        """The warm-start stage that trains ``p``."""
        if any(p is q for m in self._histology_modules() for q in m.parameters()):
            return "histology"
        if self.context_linear is not None and p is self.context_linear.weight:
            return "context"
        return "fusion"

    def set_stage(self, stage: str | None) -> None:
        """``"histology"``: only the histology path trains and ``forward`` returns its
        logits; ``"context"``: only the context linear path trains and ``forward``
        returns its logits; ``"fusion"``: the histology and context
        linear paths are frozen, the rest trains; ``None``: everything trains, full
        model."""
        if stage not in (None, *self.training_stages):
            raise ValueError(f"dual_xattn has no training stage {stage!r}")
        self._stage = stage
        for p in self.parameters():
            p.requires_grad_(stage is None or self._stage_of(p) == stage)

    def _present(
        self,
        name: str,
        value: Tensor | None,
        flags: Tensor | None,
        batch: int,
        device: torch.device,
        drop: bool = True,
    ) -> Tensor:
        """Which bags have the modality: ``(B,)`` bool (all False when ``value`` is None);
        in training (and with ``drop``), each present modality is dropped with
        probability ``modality_dropout``."""
        if value is None:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        if flags is None:
            flags = torch.ones(batch, dtype=torch.bool, device=device)
        elif flags.shape != (batch,) or flags.dtype != torch.bool:
            raise ConfigError(f"dual_xattn: {name}_mask must be a ({batch},) bool tensor")
        if drop and self.training and self.modality_dropout > 0:
            keep = torch.rand(batch, device=device) >= self.modality_dropout
            flags = flags & keep
        return flags

    def _inputs(
        self,
        batch: int,
        omics: Tensor | None,
        clinical: Tensor | None,
        omics_present: Tensor,
        clinical_present: Tensor,
        like: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The checked omics ``(B, >= n_omics_columns)`` and clinical ``(B, n_clinical)``
        inputs, 0 where absent (``None`` for a modality the model does not have)."""
        if self.omics_encoder is None:
            omics = None
        elif omics is None:
            omics = like.new_zeros(batch, self.n_omics_columns)
        elif omics.ndim != 2 or omics.shape[0] != batch or omics.shape[1] < self.n_omics_columns:
            raise ConfigError(
                f"dual_xattn: omics must be (B={batch}, >= {self.n_omics_columns}) "
                f"for the configured omics_groups, got {tuple(omics.shape)}"
            )
        if self.clinical_encoder is None:
            clinical = None
        elif clinical is None:
            clinical = like.new_zeros(batch, self.n_clinical)
        elif clinical.shape != (batch, self.n_clinical):
            raise ConfigError(
                f"dual_xattn: clinical must be ({batch}, n_clinical={self.n_clinical}), "
                f"got {tuple(clinical.shape)}"
            )
        if omics is not None:
            omics = torch.where(omics_present[:, None], omics.to(like.dtype), 0.0)
        if clinical is not None:
            clinical = torch.where(clinical_present[:, None], clinical.to(like.dtype), 0.0)
        return omics, clinical

    def _context(
        self,
        omics: Tensor | None,
        clinical: Tensor | None,
        omics_present: Tensor,
        clinical_present: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Context tokens ``(B, T, C)`` and their mask ``(B, T)`` of :meth:`_inputs`."""
        tokens, masks = [], []
        if self.omics_encoder is not None and omics is not None:
            tokens.append(self.omics_encoder(omics))
            masks.append(omics_present[:, None].expand(-1, self.n_groups))
        if self.clinical_encoder is not None and clinical is not None:
            tokens.append(self.clinical_encoder(clinical)[:, None])
            masks.append(clinical_present[:, None])
        return torch.cat(tokens, dim=1) + self.token_type, torch.cat(masks, dim=1)

    def _scores(self, omics: Tensor | None, clinical: Tensor | None) -> Tensor:
        """``(B, n_groups + n_clinical)``: each group's mean gene value, then the
        clinical values, of :meth:`_inputs`."""
        values = [] if clinical is None else [clinical]
        if self.omics_encoder is not None and omics is not None:
            enc = self.omics_encoder
            values.insert(0, (omics[:, enc.index] * enc.valid).sum(-1) / enc.valid.sum(-1))
        return torch.cat(values, dim=1)

    def _linear(self, omics: Tensor | None, clinical: Tensor | None) -> Tensor | None:
        """The context linear path's logits ``(B, n_outputs)`` of :meth:`_inputs`;
        ``None`` without the path."""
        if self.context_linear is None:
            return None
        return self.context_linear(self._scores(omics, clinical))

    def _aggregate(
        self,
        features: Tensor,
        mask: Tensor,
        *,
        omics: Tensor | None = None,
        clinical: Tensor | None = None,
        omics_mask: Tensor | None = None,
        clinical_mask: Tensor | None = None,
        **_: Tensor | None,
    ) -> MILOutput:
        """Fuse tiles with omics and clinical tokens (``clinical``: ``(B, n_clinical)``)."""
        b, dev = features.shape[0], features.device
        tiles, residual = None, None
        if self.histology_pool is not None and self.histology_head is not None:
            if self.histology_proj is None:  # folds saved before histology_dim
                h_in = tiles = self.tile_proj(features)
            else:
                h_in = self.histology_proj(features)
            h_hist, h_weights = attention_pool(h_in, self.histology_pool(h_in), mask)
            residual = self.histology_head(h_hist[:, 0])
            if self._stage == "histology":  # the warm start's first stage: ABMIL alone
                return MILOutput(residual, h_weights[:, 0], None)  # (abmil's random draws)
        omics_present = self._present("omics", omics, omics_mask, b, dev)
        clinical_present = self._present("clinical", clinical, clinical_mask, b, dev)
        omics, clinical = self._inputs(b, omics, clinical, omics_present, clinical_present,
                                       features)  # fmt: skip
        linear = self._linear(omics, clinical)
        if self._stage == "context":  # the linear path, on top of ABMIL with context_adjust
            assert linear is not None  # the stage exists only with the path
            if self.context_adjust and residual is not None:
                return MILOutput(residual + linear, h_weights[:, 0], None)
            return MILOutput(linear, None, None)
        if tiles is None:
            tiles = self.tile_proj(features)
        context, context_mask = self._context(omics, clinical, omics_present, clinical_present)
        for block in self.blocks:
            tiles, context, co_attention = block(tiles, mask, context, context_mask)
        tiles, context = self.norm_tiles(tiles), self.norm_context(context)
        h_tiles, attention = attention_pool(tiles, self.tile_pool(tiles), mask)
        h_context, context_weights = attention_pool(
            context, self.context_pool(context), context_mask
        )
        h_context = h_context[:, 0]
        if self.missing_omics is not None:
            h_context = h_context + (~omics_present)[:, None] * self.missing_omics
        if self.missing_clinical is not None:
            h_context = h_context + (~clinical_present)[:, None] * self.missing_clinical
        fused = self.fusion(torch.cat([h_tiles[:, 0], h_context], dim=-1))
        logits = self.classifier(fused)
        if linear is not None:
            logits = logits + linear
        if residual is not None:
            if self.histology_fallback:  # no context at all: the histology path alone
                logits = logits * context_mask.any(dim=1, keepdim=True)
            logits = logits + residual
        co_attention = co_attention * context_mask[..., None]
        return MILOutput(logits, attention[:, 0], None, co_attention, context_weights[:, 0])
