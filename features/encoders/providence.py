"""Providence / Microsoft Prov-GigaPath: the tile encoder (ViT-g, patch 16, SwiGLU).

As published for timm (``config.json`` of ``prov-gigapath/prov-gigapath``): architecture
``vit_giant_patch14_dinov2`` with ``img_size=224``, ``patch_size=16`` (the name says 14,
the checkpoint is patch 16: the issue's "ViT-g/14" is the timm architecture name),
depth 40, width 1536, 24 heads, layer scale, ``mlp_ratio=5.33334`` with timm's
SwiGLU (packed) MLP kept from the architecture's defaults, and a position embedding that
covers the class token (1, 197, 1536). ``global_pool="token"``: the embedding is the class
token after the final norm. Only the tile encoder is registered (the LongNet slide
encoder is not a tile encoder).
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["build_prov_gigapath"]


@register_encoder(
    "prov-gigapath",
    dim=1536,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls",
    licence=(
        "Apache-2.0 per the model card tag, gated, with the publisher's research-only terms "
        "(read the model card; the terms were not verified here)"
    ),
    source="https://huggingface.co/prov-gigapath/prov-gigapath",
    architecture=(
        "timm vit_giant_patch14_dinov2 with patch_size 16, img_size 224: depth 40, width 1536, "
        "SwiGLU (mlp ratio 5.33334), layer scale, class-token position embedding"
    ),
    hub=("prov-gigapath/prov-gigapath", "timm"),
)
def build_prov_gigapath(spec: EncoderSpec) -> TimmBackbone:
    """Prov-GigaPath tile encoder as published for timm, at 224 px."""
    return build_timm(
        "vit_giant_patch14_dinov2",
        "cls",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        mlp_ratio=5.33334,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
    )
