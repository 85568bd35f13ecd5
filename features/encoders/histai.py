"""HistAI Hibou-B and Hibou-L: DINOv2 ViT-B/14 and ViT-L/14 with 4 register tokens.

Published as ``transformers`` folders (``model_type: dinov2`` with the publisher's custom
modelling code adding registers; the weights have the layout of transformers'
``Dinov2WithRegistersModel``: ``embeddings.register_tokens``, a position embedding over the
class token and the patches, registers inserted after it). No remote code is run here:
:mod:`wsi_mil.features.weights` maps the keys onto timm's ``vit_*_patch14_reg4_dinov2``
and folds the class token's position embedding into the class token. The embedding is
the class token after the final layer norm (the model's ``pooler_output``).
"""

from __future__ import annotations

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import EncoderSpec, register_encoder

__all__ = ["HIBOU_MEAN", "HIBOU_STD"]

#: ``preprocessor_config.json`` of histai/hibou-b and hibou-L (as recalled; see the entry).
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
_SIZES = {"b": ("base", 768, "hibou-b"), "l": ("large", 1024, "hibou-L")}


def _register(letter: str, word: str, dim: int, repo: str) -> None:
    timm_name = f"vit_{word}_patch14_reg4_dinov2"

    @register_encoder(
        f"hibou-{letter}",
        dim=dim,
        input_px=224,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        mpp=0.5,
        pooling="cls",
        licence=(
            "Apache-2.0" + (" (gated: accept the conditions on the hub)" if letter == "l" else "")
        ),
        source=f"https://huggingface.co/histai/{repo}",
        architecture=(
            f"transformers Dinov2WithRegisters layout → timm {timm_name}, img_size 224 "
            "(mean/std and mpp from the publisher's preprocessor config and paper as "
            "recalled, not verified against the files here)"
        ),
        hub=(f"histai/{repo}", "hf"),
    )
    def build(spec: EncoderSpec) -> TimmBackbone:
        return build_timm(timm_name, "cls", img_size=224)


for _letter, (_word, _dim, _repo) in _SIZES.items():
    _register(_letter, _word, _dim, _repo)
