"""CTransPath (Wang et al., Medical Image Analysis 2022): Swin-T with a convolutional stem.

The patch embedding of timm's ``swin_tiny_patch4_window7_224`` is replaced by a stem of
two stride-2 3×3 convolutions (no bias) with batch norm and ReLU (3 → 12 → 24 channels)
and a 1×1 convolution to the embedding width (96), followed by the patch norm. The
embedding is the average of the last stage's tokens after the final norm (768).

The published ``ctranspath.pth`` (``{"model": state_dict}``) was written by an old timm
Swin (downsampling at the end of a stage, ``relative_position_index`` and ``attn_mask``
saved as buffers); :meth:`CTransPath.adapt_state_dict` maps it onto timm 1.x with timm's
own Swin checkpoint filter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wsi_mil.features.encoders._vit import TimmBackbone
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["CTransPath", "ConvStem", "build_ctranspath"]


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding (4× downsampling), NHWC output.

    Accepts timm's patch-embedding keyword arguments; ``patch_size`` must be 4.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4:
            raise ValueError("ConvStem downsamples by 4 (patch_size 4)")
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, embed_dim, 1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        side = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = side
        self.patch_size = (4, 4)
        self.grid_size = (side[0] // 4, side[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class CTransPath(TimmBackbone):
    """timm Swin-T with :class:`ConvStem`; (B, 3, 224, 224) → (B, 768)."""

    def __init__(self) -> None:
        import timm

        model = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem
        )
        super().__init__(model, "timm")

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the published (old timm) Swin keys onto this model's."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = {k.removeprefix("module."): v for k, v in state.items()}
        return checkpoint_filter_fn(state, self.model)


@register_encoder(
    "ctranspath",
    dim=768,
    input_px=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=1.0,
    pooling="timm",
    licence=(
        "GPL-3.0 (the TransPath repository that distributes the weights); no separate "
        "weight licence stated — verify before commercial use"
    ),
    source="https://github.com/Xiyue-Wang/TransPath (ctranspath.pth, Google Drive link)",
    architecture=(
        "timm swin_tiny_patch4_window7_224 with a convolutional stem (written here), "
        "average of the last stage's tokens; mpp 1.0 is the commonly used 10× setting, the "
        "training magnification was not verified here"
    ),
    hub=None,
)
def build_ctranspath(spec: EncoderSpec) -> CTransPath:
    """CTransPath at 224 px."""
    return CTransPath()
