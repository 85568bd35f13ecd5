"""Paige Virchow (v1) and Virchow2: ViT-H/14 with SwiGLU MLP; Virchow2 adds 4 registers.

Virchow (v1, timm config of ``paige-ai/Virchow``): ``vit_huge_patch14_224``, layer scale,
``mlp_ratio=5.3375`` with SwiGLU/SiLU, no registers, position embedding (1, 257, 1280)
over the class token and patches; embedding = class token concatenated with the mean of
the 256 patch tokens (2560), as in its model card — the same pooling as Virchow2, whose
mean excludes its 4 registers.

As published (timm config of ``paige-ai/Virchow2``) the position embedding also covers
the class and register tokens (timm's default ``no_embed_class=False``): (1, 261, 1280).
The embedding is the class token concatenated with the mean of the patch tokens
(register tokens excluded), 2 × 1280 = 2560 dims, as in the model card.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["build_virchow", "build_virchow2"]


@register_encoder(
    "virchow2",
    dim=2560,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls+mean",
    licence="CC-BY-NC-ND-4.0 (gated; see model card)",
    source="https://huggingface.co/paige-ai/Virchow2",
    architecture="timm vit_huge_patch14_224: SwiGLU (mlp ratio 5.3375), 4 registers",
    hub=("paige-ai/Virchow2", "timm"),
)
def build_virchow2(spec: EncoderSpec) -> TimmBackbone:
    """Virchow2 at 224 px; CLS + mean patch token pooling."""
    return _virchow(reg_tokens=4)


def _virchow(reg_tokens: int) -> TimmBackbone:
    """The Virchow ViT-H/14 (SwiGLU, layer scale) with ``reg_tokens`` registers."""
    return build_timm(
        "vit_huge_patch14_224",
        "cls+mean",
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.3375,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=reg_tokens,
        dynamic_img_size=True,
    )


@register_encoder(
    "virchow",
    dim=2560,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls+mean",
    licence="Apache-2.0 (gated; see model card)",
    source="https://huggingface.co/paige-ai/Virchow",
    architecture="timm vit_huge_patch14_224: SwiGLU (mlp ratio 5.3375), no registers",
    hub=("paige-ai/Virchow", "timm"),
)
def build_virchow(spec: EncoderSpec) -> TimmBackbone:
    """Virchow (v1) at 224 px; CLS + mean patch token pooling."""
    return _virchow(reg_tokens=0)
