"""Bioptimus H-optimus-0 and H-optimus-1: ViT-g/14 with SwiGLU MLP and 4 registers (1536).

Both are published for timm with the same architecture (``vit_giant_patch14_reg4_dinov2``,
``init_values=1e-5``, position embedding over the patches only) and the same
normalisation; the embedding is the class token after the final norm.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import EncoderSpec, register_encoder

__all__ = ["build_h_optimus_0", "build_h_optimus_1"]

_MEAN = (0.707223, 0.578729, 0.703617)
_STD = (0.211883, 0.230117, 0.177517)
_ARCH = "timm vit_giant_patch14_reg4_dinov2: depth 40, SwiGLU, 4 registers, 224 px"


@register_encoder(
    "h-optimus-0",
    dim=1536,
    input_px=224,
    mean=_MEAN,
    std=_STD,
    mpp=0.5,
    pooling="cls",
    licence="Apache-2.0",
    source="https://huggingface.co/bioptimus/H-optimus-0",
    architecture=_ARCH,
    hub=("bioptimus/H-optimus-0", "timm"),
)
def build_h_optimus_0(spec: EncoderSpec) -> TimmBackbone:
    """H-optimus-0 as published for timm, at 224 px."""
    return _build()


@register_encoder(
    "h-optimus-1",
    dim=1536,
    input_px=224,
    mean=_MEAN,
    std=_STD,
    mpp=0.5,
    pooling="cls",
    licence=(
        "gated on the hub, access on request; licence terms not verified here "
        "(read the model card before use)"
    ),
    source="https://huggingface.co/bioptimus/H-optimus-1",
    architecture=_ARCH + " (same as H-optimus-0, per the model card's timm snippet)",
    hub=("bioptimus/H-optimus-1", "timm"),
)
def build_h_optimus_1(spec: EncoderSpec) -> TimmBackbone:
    """H-optimus-1 as published for timm, at 224 px (H-optimus-0's architecture)."""
    return _build()


def _build() -> TimmBackbone:
    return build_timm(
        "vit_giant_patch14_reg4_dinov2",
        "cls",
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.33334,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=4,
        no_embed_class=True,
        dynamic_img_size=True,
    )
