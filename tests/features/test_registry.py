"""Every registered encoder builds, has the declared output and is deterministic."""

from __future__ import annotations

import gc

import pytest
import torch

from wsi_mil.errors import EncoderError
from wsi_mil.features import create_encoder, get_encoder_spec, list_encoders
from wsi_mil.features.encoders.builtin import BUILTIN_DIM, feature_names
from wsi_mil.features.registry import Encoder

# ViT-L and larger (0.3-1.1 B parameters) are built with their exact architecture on
# the meta device, materialised on the CPU with `to_empty` and filled by a seeded uniform
# init (much cheaper than timm's truncated-normal init), one model per test, freed after.
HUGE = {
    "dinov2-g", "dinov2-g-reg", "uni2-h", "h-optimus-0", "virchow2",
    "dinov2-l", "dinov2-l-reg", "phikon-v2", "uni",
    "prov-gigapath", "h-optimus-1", "virchow", "hibou-l", "kaiko-vitl14",
}  # fmt: skip
PUBLISHED_PARAMS_M = {
    "h-optimus-0": 1134.8, "uni2-h": 681.4, "virchow2": 631.2, "uni": 303.4, "dinov2-l": 303.2,
}  # fmt: skip
# Tokens covered by `pos_embed` in the published checkpoints (224 px): the class token
# (and Virchow2's 4 registers) are included; UNI2-h and H-optimus-0 exclude all prefix tokens.
PUBLISHED_POS_TOKENS = {
    "virchow2": 261, "uni": 197, "uni2-h": 256, "h-optimus-0": 256,
    "virchow": 257, "prov-gigapath": 197, "h-optimus-1": 256,
}  # fmt: skip
NAMES = [s.name for s in list_encoders()]


def test_registry_contents():
    expected = {
        "builtin", "phikon", "phikon-v2", "uni", "uni2-h", "h-optimus-0", "virchow2",
        *(f"dinov2-{s}{r}" for s in "sblg" for r in ("", "-reg")),
        "prov-gigapath", "h-optimus-1", "virchow", "hibou-b", "hibou-l", "ctranspath", "conch",
        *(f"kaiko-vit{v}" for v in ("s16", "s8", "b16", "b8", "l14")),
    }  # fmt: skip
    assert set(NAMES) == expected
    for spec in list_encoders():
        d = spec.describe()
        assert d["dim"] and d["licence"] and d["source"] and d["pooling"]
    assert get_encoder_spec("uni").licence.startswith("CC-BY-NC-ND-4.0")
    assert get_encoder_spec("virchow2").pooling == "cls+mean"
    assert get_encoder_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_encoder_spec("h-optimus-1").mean == get_encoder_spec("h-optimus-0").mean
    assert get_encoder_spec("virchow").pooling == "cls+mean" == get_encoder_spec("virchow2").pooling
    assert get_encoder_spec("conch").input_px == 448 and get_encoder_spec("conch").dim == 512
    assert get_encoder_spec("kaiko-vits16").mean == (0.5, 0.5, 0.5)
    assert get_encoder_spec("ctranspath").dim == 768


@pytest.mark.parametrize("name", [n for n in NAMES if n not in HUGE])
def test_encoder_builds_and_is_deterministic(name):
    torch.set_num_threads(2)
    enc = create_encoder(name, weights="random")
    assert not enc.training
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = enc(tiles), enc(tiles)
    assert a.shape == (2, enc.spec.dim) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    if name == "dinov2-s":  # seeded random init: every process builds the same weights
        again = create_encoder(name, weights="random")
        with torch.inference_mode():
            assert torch.equal(again(tiles), a)
        assert enc.weights_sha256 == "random-init-seed0"


def _fast_random_init(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place: uniform with std 0.02, norm weights 1 (seeded)."""
    g = torch.Generator().manual_seed(seed)
    half_width = 0.02 * 3**0.5
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-half_width, half_width, generator=g)


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_encoder_builds_and_is_deterministic(name):
    """Exact architecture, random weights, a real forward pass on a (2, 224, 224, 3) batch.

    The batch holds one tile twice: in eval mode both rows must be identical (dropout,
    drop-path or attention dropout would draw a different mask per sample), which tests
    determinism with a single forward pass of these 0.3-1.1 B parameter models.
    """
    torch.set_num_threads(2)
    meta = create_encoder(name, weights="random", device="meta")
    assert not any(m.training for m in meta.modules())  # create_encoder returns eval mode
    if name in PUBLISHED_POS_TOKENS:
        assert meta.backbone.model.pos_embed.shape[1] == PUBLISHED_POS_TOKENS[name]
    backbone = meta.backbone.to_empty(device="cpu")
    assert not list(backbone.buffers())  # nothing left uninitialised by to_empty
    _fast_random_init(backbone)
    enc = Encoder(meta.spec, backbone, meta.weights_sha256).eval()
    del meta
    n_params = sum(p.numel() for p in enc.parameters()) / 1e6
    if name in PUBLISHED_PARAMS_M:
        assert n_params == pytest.approx(PUBLISHED_PARAMS_M[name], rel=2e-3)
    tile = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    try:
        with torch.inference_mode():
            out = enc(tile.expand(2, -1, -1, -1).contiguous())
        assert out.shape == (2, enc.spec.dim) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.std() > 0
        assert torch.equal(out[0], out[1])
    finally:
        del enc, backbone
        gc.collect()


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(EncoderError, match=r"unknown encoder 'phikon3'.*builtin.*virchow2"):
        create_encoder("phikon3")
    with pytest.raises(EncoderError, match="timm has no model"):
        create_encoder("timm:not_a_model_xyz")


def test_timm_any_model():
    enc = create_encoder("timm:vit_tiny_patch16_224", weights="random")
    assert enc.spec.dim == 192 and enc.spec.mean == (0.5, 0.5, 0.5)
    out = enc(torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8))  # resized to 224
    assert out.shape == (3, 192)


def _tile(rgb, n=2, px=96, noise=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(rgb, dtype=torch.float32).view(1, 1, 1, 3).expand(n, px, px, 3)
    jitter = torch.randint(-noise, noise + 1, (n, px, px, 3), generator=g) if noise else 0
    return (base + jitter).clamp(0, 255).to(torch.uint8)


def test_builtin_features_carry_signal():
    enc = create_encoder("builtin")
    names = feature_names()
    assert len(names) == BUILTIN_DIM == enc.dim
    col = {n: i for i, n in enumerate(names)}
    purple = enc(_tile((90, 60, 150), noise=20))  # haematoxylin-like
    pink = enc(_tile((230, 150, 190), noise=20))  # eosin-like
    white = enc(_tile((245, 245, 245), noise=3))  # background
    assert (purple[:, col["haem_mean"]] > pink[:, col["haem_mean"]] + 0.2).all()
    assert (pink[:, col["eosin_mean"]] > white[:, col["eosin_mean"]] + 0.1).all()
    assert (white[:, col["tissue_fraction"]] < 0.05).all()
    assert (purple[:, col["tissue_fraction"]] > 0.95).all()
    flat = enc(_tile((90, 60, 150), noise=0))
    assert (purple[:, col["grad_mean"]] > flat[:, col["grad_mean"]]).all()
    # the same tile at two sizes (224 px is averaged down to 112) gives close colour stats
    big = enc(_tile((230, 150, 190), px=224, noise=0))
    small = enc(_tile((230, 150, 190), px=112, noise=0))
    assert torch.allclose(big[:, : col["od_mean"]], small[:, : col["od_mean"]], atol=1e-4)
    assert torch.isfinite(torch.cat([purple, pink, white, flat])).all()
    assert (torch.cat([purple, pink, white]).abs() < 6e4).all()  # fits float16 bags
