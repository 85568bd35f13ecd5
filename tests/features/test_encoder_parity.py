"""Parity of the newer registry entries with the publishers' reference implementations.

Each test builds the exact published architecture (full depth) with random weights as the
publisher's code would (timm with the publisher's config, transformers'
``Dinov2WithRegistersModel``, open_clip's CoCa attentional pooler), saves the weights in
the publisher's layout (file names, key names, wrappers), loads them through the real
path (``create_encoder(name, weights=path)``) and compares embeddings of the same tiles
(tissue of the real Aperio slide in ``../shared/data`` when it is there, else seeded
noise): cosine ≥ 0.999 and a small absolute difference. Nothing is downloaded.

The ViT-g models (1.1 B parameters) are built on the meta device and filled with a
cheap seeded init, embed one tile, and free the reference before the copy under test is
built, so the peak stays near two copies (~10 GB).
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.features import create_encoder, get_encoder_spec
from wsi_mil.features.registry import Encoder
from wsi_mil.features.weights import file_sha256

timm = pytest.importorskip("timm")


# the real slide beside the checkout (../shared/data), as in tests/wsi/conftest.py
REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def _tiles(n: int, px: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` tiles ``(n, px, px, 3)`` uint8: the real slide's tissue (a row of tiles at
    level-0 (800, 2300), at least 74 % tissue each) when present, else seeded noise."""
    if REAL.is_file():
        from wsi_mil.wsi import open_slide

        region = open_slide(REAL).read_region((800, 2300), 0, (n * px, px))
        tiles = np.ascontiguousarray(region[..., :3]).reshape(px, n, px, 3).swapaxes(0, 1)
        return torch.from_numpy(np.ascontiguousarray(tiles))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, generator=g)


def _randomise(module: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Seeded uniform init of every parameter and BN buffer (norm weights around 1).

    Layer-scale gammas, class/register tokens and position embeddings get the same spread
    as the weights, so every one of them changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    half = scale * 3**0.5
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.uniform_(0.8, 1.2, generator=g)
            elif name.endswith(("gamma", "lambda1")):
                p.uniform_(0.2, 1.0, generator=g)
            else:
                p.uniform_(-half, half, generator=g)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.1, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)


def _on_meta(fn, *args, **kwargs) -> nn.Module:
    """Build ``fn(...)`` on the meta device and materialise it on the CPU, uninitialised."""
    with torch.device("meta"):
        model = fn(*args, **kwargs)
    return model.to_empty(device="cpu")


def _check(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-3) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert (cos >= 0.999).all(), cos
    scale = ref.abs().max().clamp_min(1.0)
    assert ((ours - ref).abs().max() / scale) < atol, (ours - ref).abs().max()


def _need_disk(path: Path, model: nn.Module) -> None:
    """Skip (with the numbers) when ``path``'s disk cannot hold the model's fp32 weights."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    need = int(need * 1.2) + (512 << 20)  # the file, its header and working room
    free = shutil.disk_usage(path).free
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free under {path}, has {free / 2**30:.1f}")


def _timm_parity(
    name: str, tmp_path: Path, arch: str, kwargs: dict, pool, *, n: int = 2, fmt: str = "st"
) -> None:
    """timm reference built with the publisher's config → saved as published → ours."""
    torch.set_num_threads(2)
    ref_model = _on_meta(timm.create_model, arch, pretrained=False, num_classes=0, **kwargs)
    _need_disk(tmp_path, ref_model)
    _randomise(ref_model)
    ref_model.eval()
    tiles = _tiles(n)
    with torch.inference_mode():
        x = Encoder(get_encoder_spec(name), nn.Identity(), "").preprocess(tiles)
        ref = pool(ref_model(x))
    state = ref_model.state_dict()
    if fmt == "st":
        from safetensors.torch import save_file

        path = tmp_path / name
        path.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
        weights_file = path / "model.safetensors"
    else:  # a plain tensor pickle, as in GitHub releases / torch.hub checkpoints
        path = weights_file = tmp_path / f"{name}.pth"
        torch.save(state, path)
    del ref_model, state
    gc.collect()
    enc = create_encoder(name, weights=str(path))
    assert enc.weights_sha256 == file_sha256(weights_file)
    with torch.inference_mode():
        ours = enc(tiles)
    del enc
    gc.collect()
    _check(ours, ref)


# ---------------------------------------------------------------- timm-layout encoders


def _cls(out: torch.Tensor) -> torch.Tensor:
    return out  # timm global_pool="token": forward() already returns the class token


def _cls_mean(tokens: torch.Tensor) -> torch.Tensor:  # Virchow's model-card pooling
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


KAIKO = {
    "kaiko-vits16": "vit_small_patch16_224",
    "kaiko-vits8": "vit_small_patch8_224",
    "kaiko-vitb16": "vit_base_patch16_224",
    "kaiko-vitb8": "vit_base_patch8_224",
    "kaiko-vitl14": "vit_large_patch14_reg4_dinov2",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "l14" in n else n for n in sorted(KAIKO)],
)
def test_kaiko_parity_with_timm(tmp_path, name):
    """As kaiko's torch.hub entry points build them (timm, dynamic size), from a .pth."""
    kwargs = {"img_size": 224, "dynamic_img_size": True}
    _timm_parity(name, tmp_path, KAIKO[name], kwargs, _cls, fmt="pth")


@pytest.mark.slow
def test_prov_gigapath_parity_with_timm(tmp_path):
    """``model_args`` of the published timm config.json, timm's global_pool='token'."""
    kwargs = dict(
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
        init_values=1e-5, mlp_ratio=5.33334,
    )  # fmt: skip
    _timm_parity("prov-gigapath", tmp_path, "vit_giant_patch14_dinov2", kwargs, _cls, n=1)


@pytest.mark.slow
def test_h_optimus_1_parity_with_timm(tmp_path):
    """The model card's ``timm.create_model(..., init_values=1e-5, dynamic_img_size=False)``."""
    kwargs = {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}
    _timm_parity(
        "h-optimus-1", tmp_path, "vit_giant_patch14_reg4_dinov2", kwargs, _cls, n=1, fmt="pth"
    )


@pytest.mark.slow
def test_virchow_parity_with_timm(tmp_path):
    """The published timm config (global_pool '') and the model card's CLS + mean pooling."""
    from timm.layers import SwiGLUPacked

    kwargs = dict(
        img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="",
        dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
    )  # fmt: skip
    _timm_parity("virchow", tmp_path, "vit_huge_patch14_224", kwargs, _cls_mean, n=1)


# ------------------------------------------------------------- transformers: Hibou


HIBOU = {
    "hibou-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "hibou-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


@pytest.mark.parametrize("name", ["hibou-b", pytest.param("hibou-l", marks=pytest.mark.slow)])
def test_hibou_parity_with_transformers(tmp_path, name):
    """A ``Dinov2WithRegistersModel`` folder (Hibou's weight layout), full depth."""
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    cfg = transformers.Dinov2WithRegistersConfig(
        **HIBOU[name], mlp_ratio=4, num_register_tokens=4, image_size=224, patch_size=14,
        layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(cfg).eval()
    _randomise(hf, seed=1)
    _need_disk(tmp_path, hf)
    hf.save_pretrained(tmp_path / name)
    tiles = _tiles(2)
    enc = create_encoder(name, weights=str(tmp_path / name))
    assert len(enc.backbone.model.blocks) == cfg.num_hidden_layers
    with torch.inference_mode():
        ours = enc(tiles)
        ref = hf(pixel_values=enc.preprocess(tiles)).pooler_output
    _check(ours, ref)


# ---------------------------------------------------------- CONCH (open_clip pooler)


class _ConchReference(nn.Module):
    """CONCH's ``VisualModel`` as its code builds it: timm ViT trunk + open_clip pooler."""

    def __init__(self) -> None:
        super().__init__()
        from open_clip.transformer import AttentionalPooler
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16,
            num_classes=0, dynamic_img_size=True,
        )  # fmt: skip
        self.attn_pool_contrast = AttentionalPooler(512, 768, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)
        self.proj_contrast = nn.Parameter(torch.randn(512, 512))
        self.attn_pool_caption = AttentionalPooler(768, 768, n_head=8, n_queries=256)
        self.ln_caption = nn.LayerNorm(768)

    def forward_no_head(self, x: torch.Tensor) -> torch.Tensor:
        """``encode_image(x, proj_contrast=False, normalize=False)``."""
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


@pytest.mark.slow
def test_conch_parity_with_open_clip_pooler(tmp_path):
    """The publisher's folder: ``pytorch_model.bin`` of the whole CoCa model."""
    pytest.importorskip("open_clip")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ref = _ConchReference().eval()
    _randomise(ref, seed=2, scale=0.05)
    state = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    state |= {  # other towers of the published checkpoint (dropped when loading)
        "text.token_embedding.weight": torch.zeros(8, 768),
        "text_decoder.ln_final.weight": torch.ones(768),
        "logit_scale": torch.tensor(4.6),
    }
    folder = tmp_path / "CONCH"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    enc = create_encoder("conch", weights=str(folder))
    assert enc.weights_sha256 == file_sha256(folder / "pytorch_model.bin")
    tiles = _tiles(2, px=448)
    with torch.inference_mode():
        ours = enc(tiles)
        expected = ref.forward_no_head(enc.preprocess(tiles))
    assert ours.shape == (2, 512)
    _check(ours, expected)
    # resized input (224 px tiles → 448) goes through the same path
    assert enc(_tiles(1)).shape == (1, 512)


# ---------------------------------------------------------------------- CTransPath


class _RefStem(nn.Module):
    """Reference conv stem, from the paper's description (functional forward)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__()
        c = embed_dim // 8
        self.proj = nn.ModuleDict()
        self.proj["0"] = nn.Conv2d(in_chans, c, 3, 2, 1, bias=False)
        self.proj["1"] = nn.BatchNorm2d(c)
        self.proj["3"] = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False)
        self.proj["4"] = nn.BatchNorm2d(2 * c)
        self.proj["6"] = nn.Conv2d(2 * c, embed_dim, 1)
        self.norm = nn.LayerNorm(embed_dim)
        size = img_size if isinstance(img_size, int) else img_size[0]
        self.img_size, self.patch_size = (size, size), (4, 4)
        self.grid_size = (size // 4, size // 4)
        self.num_patches = (size // 4) ** 2

    def forward(self, x):
        p = self.proj
        for conv, bn in (("0", "1"), ("3", "4")):
            b = p[bn]
            x = F.relu(F.batch_norm(p[conv](x), b.running_mean, b.running_var, b.weight, b.bias))
        x = p["6"](x)
        return self.norm(x.permute(0, 2, 3, 1))


def _old_timm_swin_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 1.x Swin keys → the layout of ctranspath.pth (timm 0.5: downsample at the end
    of a stage, relative_position_index and attn_mask saved as buffers)."""
    import re

    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
        rel = re.match(r"(layers\.\d+\.blocks\.(\d+)\.attn)\.relative_position_bias_table", k)
        if rel:
            out[f"{rel.group(1)}.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if int(rel.group(2)) % 2:
                out[rel.group(1)[:-5] + ".attn_mask"] = torch.zeros(4, 49, 49)
    return out


def test_ctranspath_parity_from_the_published_layout(tmp_path):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ref = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=_RefStem
    ).eval()
    _randomise(ref, seed=3, scale=0.05)
    old = _old_timm_swin_layout(ref.state_dict())
    assert "layers.0.downsample.reduction.weight" in old  # the published layout
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    enc = create_encoder("ctranspath", weights=str(tmp_path / "ctranspath.pth"))
    tiles = _tiles(2)
    with torch.inference_mode():
        ours = enc(tiles)
        expected = ref(enc.preprocess(tiles))
    assert ours.shape == (2, 768)
    _check(ours, expected)
