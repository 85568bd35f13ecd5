"""MIL aggregators and their registry.

Every aggregator is an ``nn.Module`` built by ``create_aggregator(name, in_dim, n_outputs,
**kwargs)`` whose ``forward(features (B, N, D), mask (B, N) bool, *, omics, clinical,
omics_mask, clinical_mask, labels)`` returns a :class:`MILOutput` ``(logits (B, n_outputs),
attention (B, N) | None, aux_loss | None)``. ``mask`` is True for real tiles; attention is
0 on padding and sums to 1 over the real tiles.

Names: ``mean``, ``max``, ``abmil``, ``clam_sb``, ``transmil``, ``dual_xattn``. Importing
this package is cheap; torch and the models load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_mil._lazy import lazy_exports
from wsi_mil.mil.models.registry import (
    AggregatorInfo,
    aggregator_info,
    create_aggregator,
    list_aggregators,
    register_aggregator,
)

if TYPE_CHECKING:
    from wsi_mil.mil.models.abmil import ABMIL
    from wsi_mil.mil.models.base import (
        Aggregator,
        GatedAttention,
        MILOutput,
        attention_pool,
        masked_softmax,
    )
    from wsi_mil.mil.models.clam import CLAMSingleBranch
    from wsi_mil.mil.models.dual_xattn import DualCrossAttentionMIL
    from wsi_mil.mil.models.mean_max import MaxPoolMIL, MeanPoolMIL
    from wsi_mil.mil.models.transmil import TransMIL

__all__ = [
    "ABMIL",
    "Aggregator",
    "AggregatorInfo",
    "CLAMSingleBranch",
    "DualCrossAttentionMIL",
    "GatedAttention",
    "MILOutput",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "TransMIL",
    "aggregator_info",
    "attention_pool",
    "create_aggregator",
    "list_aggregators",
    "masked_softmax",
    "register_aggregator",
]

_LAZY = {
    "ABMIL": "abmil",
    "Aggregator": "base",
    "CLAMSingleBranch": "clam",
    "DualCrossAttentionMIL": "dual_xattn",
    "GatedAttention": "base",
    "MILOutput": "base",
    "MaxPoolMIL": "mean_max",
    "MeanPoolMIL": "mean_max",
    "TransMIL": "transmil",
    "attention_pool": "base",
    "masked_softmax": "base",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
