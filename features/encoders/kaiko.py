"""kaiko.ai "Towards large-scale training of pathology foundation models" ViTs.

ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 (DINO) and ViT-L/14 with 4 registers (DINOv2), as
the publisher's ``torch.hub`` entry points (``kaiko-ai/towards_large_pathology_fms``:
``vits16``, ``vits8``, ``vitb16``, ``vitb8``, ``vitl14``) build them with timm; the weights
are timm state dicts (GitHub releases; timm-layout mirrors on the hub as
``1aurent/<arch>.kaiko_ai_towards_large_pathology_fms``). Input normalised with mean
and std 0.5; embedding as the hub models return it: timm's ``global_pool="token"``,
the class token after the final norm.
"""

from __future__ import annotations

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import EncoderSpec, register_encoder

__all__ = ["KAIKO_MODELS"]

_HALF = (0.5, 0.5, 0.5)
#: registry suffix → (timm architecture, embedding dim)
KAIKO_MODELS = {
    "s16": ("vit_small_patch16_224", 384),
    "s8": ("vit_small_patch8_224", 384),
    "b16": ("vit_base_patch16_224", 768),
    "b8": ("vit_base_patch8_224", 768),
    "l14": ("vit_large_patch14_reg4_dinov2", 1024),
}


def _register(suffix: str, arch: str, dim: int) -> None:
    @register_encoder(
        f"kaiko-vit{suffix}",
        dim=dim,
        input_px=224,
        mean=_HALF,
        std=_HALF,
        mpp=None,
        pooling="cls",
        licence="kaiko.ai non-commercial licence (kaiko-non-commercial; see the repository)",
        source="https://github.com/kaiko-ai/towards_large_pathology_fms",
        architecture=(
            f"timm {arch}, img_size 224 (trained on TCGA at several magnifications, so no "
            "single mpp; the publisher's pooling for ViT-L/14 not verified beyond the hub "
            "models' class-token output)"
        ),
        hub=None,
    )
    def build(spec: EncoderSpec) -> TimmBackbone:
        return build_timm(arch, "cls", img_size=224, dynamic_img_size=True)


for _suffix, (_arch, _dim) in KAIKO_MODELS.items():
    _register(_suffix, _arch, _dim)
