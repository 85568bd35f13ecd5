"""Meta DINOv2 encoders (ViT-S/B/L/g with patch 14, with or without 4 registers).

Built at 224 px input (not the 518 px of the published checkpoints; position
embeddings are resampled when loading). Embedding: the normed class token.
"""

from __future__ import annotations

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["DINOV2_SIZES"]

#: size letter → (timm size word, embedding dim)
DINOV2_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}


def _register(letter: str, word: str, dim: int, reg: bool) -> None:
    timm_name = f"vit_{word}_patch14_{'reg4_' if reg else ''}dinov2"
    name = f"dinov2-{letter}{'-reg' if reg else ''}"

    @register_encoder(
        name,
        dim=dim,
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=None,
        pooling="cls",
        licence="Apache-2.0",
        source=f"https://huggingface.co/timm/{timm_name}.lvd142m",
        architecture=f"timm {timm_name}, img_size 224",
        hub=(f"timm/{timm_name}.lvd142m", "timm"),
    )
    def build(spec: EncoderSpec) -> TimmBackbone:
        return build_timm(timm_name, "cls", img_size=224)


for _letter, (_word, _dim) in DINOV2_SIZES.items():
    for _reg in (False, True):
        _register(_letter, _word, _dim, _reg)
