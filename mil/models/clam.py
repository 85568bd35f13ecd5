"""Single-branch CLAM-style aggregator with an instance-level clustering loss.

Written from the description in Lu et al., "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nature Biomedical Engineering 2021: gated
attention pooling for the bag prediction, plus per-class instance classifiers trained on
pseudo-labels — the ``k`` most attended tiles of a bag are positives and the ``k`` least
attended are negatives for the classifier of the bag's class; with mutually exclusive
classes (``subtyping``) the most attended tiles are also negatives for the other classes'
classifiers. The instance loss is a smooth top-1 SVM (Berrada et al. 2018) or
cross-entropy.

Survival: the bags have no class, so the trainer passes binary pseudo-classes derived
from the fold's training patients only (:func:`wsi_mil.mil.heads.survival_pseudo_labels`):
1 = early event (event at or before the training patients' median time), 0 = late
(followed beyond that median, censored or not), -1 = unknown (censored at or before the
median). Bags labelled -1 add nothing to the instance loss; the model is built with
``n_classes=2`` and keeps one output (the Cox risk). Labels reach the model on training
batches only, never in evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models.base import (
    Aggregator,
    GatedAttention,
    MILOutput,
    attention_pool,
    mlp_block,
)
from wsi_mil.mil.models.registry import register_aggregator

__all__ = ["CLAMSingleBranch", "smooth_svm_loss"]


def smooth_svm_loss(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 multiclass SVM loss, averaged.

    ``tau * log sum_j exp((alpha * [j != y] + s_j - s_y) / tau)``; as ``tau -> 0`` this is
    the multiclass hinge loss ``max_j(alpha * [j != y] + s_j) - s_y``.

    Args:
        logits: ``(M, C)`` scores.
        target: ``(M,)`` long class indices.
        alpha: margin.
        tau: smoothing temperature (> 0).

    Returns:
        Scalar mean loss.
    """
    margin = torch.full_like(logits, alpha).scatter(1, target[:, None], 0.0)
    true = logits.gather(1, target[:, None])
    return (tau * torch.logsumexp((margin + logits - true) / tau, dim=1)).mean()


@register_aggregator(
    "clam_sb",
    description=(
        "CLAM single-branch: gated attention + instance clustering loss (Lu et al. 2021); "
        "survival trains it on early/late-event pseudo-classes of the training patients."
    ),
    permutation_invariant=True,
    aux_loss=True,
)
class CLAMSingleBranch(Aggregator):
    """Gated attention MIL with CLAM's instance-level clustering loss.

    Bag path as :class:`~wsi_mil.mil.models.abmil.ABMIL`. When ``labels`` are passed (in
    training or evaluation) ``aux_loss = instance_weight * L_inst``, the mean over the bags
    of the instance loss described in the module docstring; the trainer adds it to
    ``bag_weight * L_bag`` (:attr:`task_weight`), so by default bag and instance losses
    weigh 0.7 / 0.3 as in the paper. ``k`` is
    ``min(k_sample, n_real // 2)`` per bag; a bag with fewer than 2 tiles, or with label
    -1 (unknown, e.g. a survival patient censored early), adds nothing; with no bag left
    ``aux_loss`` is 0 (still attached to the graph).

    Args:
        in_dim: tile feature dim ``D``.
        n_outputs: number of logits.
        hidden_dim: tile embedding dim (512).
        attn_dim: gated-attention hidden dim (256).
        dropout: dropout after the projection and in the attention (0.25).
        k_sample: tiles per pseudo-label side (8).
        n_classes: classes of ``labels`` for the instance classifiers; default
            ``max(n_outputs, 2)`` (survival training sets 2: early / late event).
        subtyping: classes are mutually exclusive: also push the top tiles negative for
            the other classes' instance classifiers.
        instance_loss: ``"svm"`` (smooth top-1 SVM) or ``"ce"``.
        instance_weight: factor on the instance loss in ``aux_loss`` (0.3).
        bag_weight: factor on the task (bag) loss in training (0.7).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        n_classes: int | None = None,
        subtyping: bool = False,
        instance_loss: str = "svm",
        instance_weight: float = 0.3,
        bag_weight: float = 0.7,
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if instance_loss not in ("svm", "ce"):
            raise ConfigError(
                f"clam_sb: instance_loss must be 'svm' or 'ce', got {instance_loss!r}"
            )
        if k_sample < 1:
            raise ConfigError(f"clam_sb: k_sample must be >= 1, got {k_sample}")
        self.n_classes = n_classes if n_classes is not None else max(n_outputs, 2)
        if self.n_classes < 2:
            raise ConfigError(f"clam_sb: n_classes must be >= 2, got {self.n_classes}")
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.instance_loss = instance_loss
        self.instance_weight = instance_weight
        if not bag_weight > 0:
            raise ConfigError(f"clam_sb: bag_weight must be > 0, got {bag_weight}")
        self.task_weight = bag_weight
        self.encoder = mlp_block(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        # one binary (in-class / out-of-class) instance classifier per class, stacked
        self.instance_classifiers = nn.Linear(hidden_dim, 2 * self.n_classes)

    def _aggregate(
        self, features: Tensor, mask: Tensor, *, labels: Tensor | None = None, **_: Tensor | None
    ) -> MILOutput:
        """Pool, classify and, with ``labels``, compute the instance loss.

        ``labels``: ``(B,)`` long in ``[0, n_classes)`` or -1 (unknown: the bag is left out
        of the instance loss), or None (then ``aux_loss`` is None).
        """
        h = self.encoder(features)
        scores = self.attention(h)  # (B, 1, N)
        pooled, weights = attention_pool(h, scores, mask)
        logits = self.classifier(pooled[:, 0])
        aux = None
        if labels is not None:
            aux = self.instance_weight * self._instance_loss(h, scores[:, 0].detach(), mask, labels)
        return MILOutput(logits, weights[:, 0], aux)

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ConfigError(f"clam_sb: labels must be ({batch},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.n_classes):
            raise ConfigError(
                f"clam_sb: labels must lie in [0, {self.n_classes}) or be -1 (unknown); got "
                f"{labels.min().item()}..{labels.max().item()}; set n_classes"
            )

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.instance_loss == "svm":
            return smooth_svm_loss(logits, target)
        return F.cross_entropy(logits, target)

    def _instance_loss(self, h: Tensor, scores: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Mean instance-clustering loss over the bags.

        Args:
            h: ``(B, N, L)`` tile embeddings.
            scores: ``(B, N)`` raw attention scores (detached; used only to rank tiles).
            mask: ``(B, N)`` bool.
            labels: ``(B,)`` long; -1 = unknown (the bag is skipped).

        Returns:
            Scalar mean over the bags with a known label and at least 2 tiles; 0 (still
            attached to the graph) when there is none.
        """
        self._check_labels(labels, h.shape[0])
        losses = []
        for b in range(h.shape[0]):
            y = int(labels[b])
            real = torch.nonzero(mask[b]).flatten()
            k = min(self.k_sample, real.numel() // 2)
            if k == 0 or y < 0:
                continue
            order = torch.argsort(scores[b, real], descending=True, stable=True)
            top, bottom = real[order[:k]], real[order[-k:]]
            inst = self.instance_classifiers(h[b, torch.cat([top, bottom])])
            inst = inst.view(2 * k, self.n_classes, 2)
            target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
            terms = [self._loss(inst[:, y], target)]
            if self.subtyping:
                negatives = torch.zeros(k, dtype=torch.long, device=h.device)
                terms += [
                    self._loss(inst[:k, c], negatives) for c in range(self.n_classes) if c != y
                ]
            losses.append(torch.stack(terms).mean())
        if not losses:
            return h.sum() * 0.0
        return torch.stack(losses).mean()
