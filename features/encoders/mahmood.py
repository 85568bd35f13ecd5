"""Mahmood Lab encoders: UNI (ViT-L/16), UNI2-h (ViT-H/14, SwiGLU, 8 registers) and the
image tower of CONCH (v1; a CoCa ViT-B/16 with an attentional pooler, written here).

Weights are gated on the Hugging Face hub (accept the licence there, download, then
pass ``--weights``). Embedding: the normed class token (UNI, UNI2-h); CONCH's pooled,
layer-normed attentional-pooler output.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked
from torch import nn

from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

__all__ = ["AttentionalPooler", "ConchImageTower", "build_conch", "build_uni", "build_uni2_h"]

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


class _CrossAttentionParams(nn.Module):
    """Parameters of a cross-attention, named as ``torch.nn.MultiheadAttention``'s when
    ``kdim != embed_dim`` (so the publisher's checkpoint loads as is)."""

    def __init__(self, d_model: int, context_dim: int) -> None:
        super().__init__()
        self.q_proj_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.k_proj_weight = nn.Parameter(torch.empty(d_model, context_dim))
        self.v_proj_weight = nn.Parameter(torch.empty(d_model, context_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)


class AttentionalPooler(nn.Module):
    """Learned queries attending over the tokens (CoCa's attentional pooling).

    Queries (``n_queries``, ``d_model``) are layer-normed (``ln_q``), the tokens (width
    ``context_dim``) too (``ln_k``); one multi-head cross-attention with separate query,
    key and value projections returns (B, n_queries, d_model).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = _CrossAttentionParams(d_model, context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        a = self.attn
        b_q, b_k, b_v = a.in_proj_bias.chunk(3)
        kv = self.ln_k(x)  # (B, L, C)
        q = F.linear(self.ln_q(self.query), a.q_proj_weight, b_q)  # (Q, D)
        k = F.linear(kv, a.k_proj_weight, b_k)  # (B, L, D)
        v = F.linear(kv, a.v_proj_weight, b_v)
        batch, _, width = k.shape
        heads = self.n_head

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, heads, width // heads).transpose(1, 2)

        q = split(q.unsqueeze(0).expand(batch, -1, -1))
        out = F.scaled_dot_product_attention(q, split(k), split(v))  # (B, H, Q, D/H)
        out = out.transpose(1, 2).reshape(batch, -1, width)
        return a.out_proj(out)


class ConchImageTower(nn.Module):
    """CONCH's image tower: a ViT-B/16 at 448 px and its contrastive attentional pooler.

    As in the publisher's CoCa (``conch_ViT-B-16``): a timm ``VisionTransformer`` trunk
    (width 768, depth 12, 12 heads, class token, final norm), then ``attn_pool_contrast``
    (one query of width 512, 8 heads, over all 785 tokens) and ``ln_contrast``. The
    embedding is that pooled, layer-normed vector (512) — the publisher's
    ``encode_image(x, proj_contrast=False, normalize=False)``, as CLAM and TRIDENT use it;
    the contrastive projection and the captioning pooler are not used.

    Input (B, 3, 448, 448) normalised float; output (B, 512).
    """

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=448,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(512, 768, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)
        self.dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the image tower of the publisher's whole-model checkpoint (``visual.*``).

        The text tower, the captioning decoder and pooler, the contrastive projection and
        the logit scale are dropped. A checkpoint of the tower alone loads as is.
        """
        if any(k.startswith("visual.") for k in state):
            state = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
        unused = ("attn_pool_caption.", "ln_caption.", "proj_contrast", "head.")
        return {k: v for k, v in state.items() if not k.startswith(unused)}


@register_encoder(
    "conch",
    dim=512,
    input_px=448,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    mpp=0.5,
    pooling="attn-pool",
    licence=_LICENCE,
    source="https://huggingface.co/MahmoodLab/CONCH",
    architecture=(
        "CoCa image tower (written here): timm ViT-B/16 at 448 px + attentional pooler "
        "(1 query, width 512, 8 heads) + LayerNorm; OpenAI CLIP mean/std"
    ),
    hub=("MahmoodLab/CONCH", "timm"),
)
def build_conch(spec: EncoderSpec) -> ConchImageTower:
    """CONCH (v1) image tower at 448 px."""
    return ConchImageTower()
