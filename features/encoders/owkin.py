"""Owkin encoders: Phikon (ViT-B/16, iBOT) and Phikon-v2 (ViT-L/16, DINOv2).

Both are distributed as Hugging Face ``transformers`` folders (``ViTModel`` and
``Dinov2Model``); :mod:`wsi_mil.features.weights` maps those keys onto the timm models.
The embedding is the class token of the final (layer-normed) hidden state, as in the
publisher's examples.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["build_phikon", "build_phikon_v2"]

_OWKIN_LICENCE = "Owkin non-commercial licence (see model card)"


@register_encoder(
    "phikon",
    dim=768,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls",
    licence=_OWKIN_LICENCE,
    source="https://huggingface.co/owkin/phikon",
    architecture="timm vit_base_patch16_224, LayerNorm eps 1e-12 (transformers ViTModel)",
    hub=("owkin/phikon", "hf"),
)
def build_phikon(spec: EncoderSpec) -> TimmBackbone:
    """ViT-B/16 at 224 px matching transformers' ViTModel (eps 1e-12)."""
    return build_timm(
        "vit_base_patch16_224", "cls", img_size=224, norm_layer=partial(nn.LayerNorm, eps=1e-12)
    )


@register_encoder(
    "phikon-v2",
    dim=1024,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    pooling="cls",
    licence=_OWKIN_LICENCE,
    source="https://huggingface.co/owkin/phikon-v2",
    architecture="timm vit_large_patch16_224, layer scale 1e-5 (transformers Dinov2Model)",
    hub=("owkin/phikon-v2", "hf"),
)
def build_phikon_v2(spec: EncoderSpec) -> TimmBackbone:
    """ViT-L/16 at 224 px with layer scale, matching transformers' Dinov2Model."""
    return build_timm("vit_large_patch16_224", "cls", img_size=224, init_values=1e-5)
