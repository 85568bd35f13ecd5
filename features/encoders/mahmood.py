"""Mahmood Lab encoders: UNI (ViT-L/16) and UNI2-h (ViT-H/14, SwiGLU, 8 registers).

Weights are gated on the Hugging Face hub (accept the licence there, download, then
pass ``--weights``). Embedding: the normed class token.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["build_uni", "build_uni2_h"]

_LICENCE = "CC-BY-NC-ND-4.0 (gated; see model card)"


@register_encoder(
    "uni",
    dim=1024,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls",
    licence=_LICENCE,
    source="https://huggingface.co/MahmoodLab/UNI",
    architecture="timm vit_large_patch16_224, layer scale 1e-5",
    hub=("MahmoodLab/UNI", "timm"),
)
def build_uni(spec: EncoderSpec) -> TimmBackbone:
    """UNI: ViT-L/16 at 224 px with layer scale."""
    return build_timm(
        "vit_large_patch16_224", "cls", img_size=224, init_values=1e-5, dynamic_img_size=True
    )


@register_encoder(
    "uni2-h",
    dim=1536,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls",
    licence=_LICENCE,
    source="https://huggingface.co/MahmoodLab/UNI2-h",
    architecture="timm vit_giant_patch14_224: depth 24, width 1536, 24 heads, SwiGLU, 8 registers",
    hub=("MahmoodLab/UNI2-h", "timm"),
)
def build_uni2_h(spec: EncoderSpec) -> TimmBackbone:
    """UNI2-h: ViT-H/14 (width 1536, depth 24) with SwiGLU MLP and 8 register tokens."""
    return build_timm(
        "vit_giant_patch14_224",
        "cls",
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        embed_dim=1536,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        no_embed_class=True,
        dynamic_img_size=True,
    )
