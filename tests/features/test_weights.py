"""Weight loading: transformers parity, timm state dicts, safety and error messages."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_mil.errors import EncoderError
from wsi_mil.features import create_encoder, get_encoder_spec
from wsi_mil.features.encoders._vit import build_timm
from wsi_mil.features.registry import Encoder
from wsi_mil.features.weights import (
    check_state_dict,
    file_sha256,
    hf_to_timm_keys,
    load_weights,
)

transformers = pytest.importorskip("transformers")

PHIKON = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True,
)  # fmt: skip
PHIKON_V2 = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
    hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16, qkv_bias=True,
    layerscale_value=1e-5, use_swiglu_ffn=False,
)  # fmt: skip
DEPTH = 2  # shallow models for the cheaper checks; parity at full depth is tested last


def _tiles(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g)


def _save_hf(model, folder: Path, bin_file: bool = False) -> Path:
    model.save_pretrained(folder)
    if bin_file:  # the older pytorch_model.bin layout, same keys
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def _parity(hf_model, encoder: Encoder) -> None:
    tiles = _tiles()
    with torch.inference_mode():
        ours = encoder(tiles)
        pixel_values = encoder.preprocess(tiles)
        ref = hf_model(pixel_values=pixel_values).last_hidden_state[:, 0]
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


@pytest.fixture
def shallow_builders(monkeypatch):
    """Make the registered Owkin builders build DEPTH blocks (all other settings as is)."""
    import wsi_mil.features.encoders.owkin as owkin

    def shallow(*args, **kwargs):
        return build_timm(*args, **{**kwargs, "depth": DEPTH})

    monkeypatch.setattr(owkin, "build_timm", shallow)


def test_phikon_parity_from_a_pytorch_model_bin(tmp_path, shallow_builders):
    """The older ``pytorch_model.bin`` layout (read with ``weights_only=True``)."""
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(**{**PHIKON, "num_hidden_layers": DEPTH})
    hf = transformers.ViTModel(cfg).eval()
    folder = _save_hf(hf, tmp_path / "phikon", bin_file=True)
    encoder = create_encoder("phikon", weights=str(folder))  # the registered builder
    assert len(encoder.backbone.model.blocks) == DEPTH
    assert encoder.weights_sha256 == file_sha256(folder / "pytorch_model.bin")
    _parity(hf, encoder)


def test_load_weights_into_a_built_backbone(tmp_path):
    """The lower-level API: load_weights(backbone, spec, path) returns the sha256."""
    torch.manual_seed(3)
    cfg = transformers.ViTConfig(**{**PHIKON, "num_hidden_layers": DEPTH})
    folder = _save_hf(transformers.ViTModel(cfg).eval(), tmp_path / "phikon")
    backbone = build_timm(
        "vit_base_patch16_224", "cls", img_size=224, depth=DEPTH,
        norm_layer=partial(nn.LayerNorm, eps=1e-12),
    )  # fmt: skip
    spec = get_encoder_spec("phikon")
    assert load_weights(backbone, spec, folder) == file_sha256(folder / "model.safetensors")
    assert isinstance(Encoder(spec, backbone, "x").eval()(_tiles(1)), torch.Tensor)


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [("phikon", "ViTModel", PHIKON), ("phikon-v2", "Dinov2Model", PHIKON_V2)],
)
def test_full_published_configs_map_every_key(name, cls, config):
    """The full-depth transformers models map onto our timm builds key for key."""
    cfg_cls = transformers.ViTConfig if cls == "ViTModel" else transformers.Dinov2Config
    with torch.device("meta"):
        hf = getattr(transformers, cls)(cfg_cls(**config))
    state = hf_to_timm_keys(hf.state_dict())
    ours = create_encoder(name, weights="random", device="meta").backbone.model
    check_state_dict(ours, state, name, Path("meta"))  # raises on any mismatch
    assert len(state) == len(ours.state_dict())


def test_timm_state_dict_files_round_trip(tmp_path):
    enc = create_encoder("dinov2-s", weights="random")
    state = enc.backbone.model.state_dict()
    from safetensors.torch import save_file

    save_file(state, tmp_path / "w.safetensors")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "w.pth")
    tiles = _tiles(1)
    with torch.inference_mode():
        ref = enc(tiles)
        for file in ("w.safetensors", "w.pth"):
            other = create_encoder("dinov2-s", weights=str(tmp_path / file))
            assert other.weights_sha256 == file_sha256(tmp_path / file)
            assert torch.equal(other(tiles), ref)


def test_518px_dinov2_checkpoint_is_resampled_to_224(tmp_path):
    import timm
    from safetensors.torch import save_file

    big = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    assert big.pos_embed.shape[1] == 1 + 37 * 37
    save_file(big.state_dict(), tmp_path / "dinov2_518.safetensors")
    enc = create_encoder("dinov2-s", weights=str(tmp_path / "dinov2_518.safetensors"))
    assert enc.backbone.model.pos_embed.shape[1] == 1 + 16 * 16
    assert torch.equal(enc.backbone.model.cls_token, big.cls_token)
    assert enc(_tiles(1)).shape == (1, 384)


def test_wrong_architecture_names_keys(tmp_path):
    from safetensors.torch import save_file

    small = create_encoder("dinov2-s", weights="random").backbone.model.state_dict()
    save_file(small, tmp_path / "s.safetensors")
    with pytest.raises(EncoderError, match=r"do not fit encoder 'dinov2-b'.*wrong shape"):
        create_encoder("dinov2-b", weights=str(tmp_path / "s.safetensors"))

    cfg = transformers.ViTConfig(**{**PHIKON, "num_hidden_layers": DEPTH})
    folder = _save_hf(transformers.ViTModel(cfg), tmp_path / "shallow")
    with pytest.raises(EncoderError, match=r"120 missing: blocks\.2\.attn"):
        create_encoder("phikon", weights=str(folder))

    save_file({**small, "extra.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(EncoderError, match=r"1 unexpected: extra\.weight"):
        create_encoder("dinov2-s", weights=str(tmp_path / "x.safetensors"))


class _Evil:
    """Unpickling this would create a file (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = {"patch_embed.proj.weight": torch.zeros(1), "evil": _Evil(marker)}
    path = tmp_path / "weights.pth"
    if kind == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(EncoderError, match=r"refused to load .*nothing in it was executed"):
        create_encoder("dinov2-s", weights=str(path))
    assert not marker.exists()


def test_hub_unreachable_says_how_to_pass_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(EncoderError, match=r"Hugging Face hub \(owkin/phikon\).*--weights"):
        create_encoder("phikon")
    with pytest.raises(EncoderError, match=r"MahmoodLab/UNI.*--weights PATH"):
        create_encoder("uni", device="meta")


def test_weights_path_errors(tmp_path):
    with pytest.raises(EncoderError, match="do not exist"):
        create_encoder("dinov2-s", weights=str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match=r"holds none of model\.safetensors"):
        create_encoder("dinov2-s", weights=str(tmp_path / "empty"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(EncoderError, match="cannot read safetensors"):
        create_encoder("dinov2-s", weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(EncoderError, match="has no weights; drop --weights"):
        create_encoder("builtin", weights=str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [("phikon", "ViTModel", PHIKON), ("phikon-v2", "Dinov2Model", PHIKON_V2)],
)
def test_full_depth_parity_with_the_published_configs(tmp_path, name, cls, config):
    """The exact published architectures (12 and 24 blocks), randomly initialised, saved
    with ``save_pretrained`` and loaded through ``--weights``: transformers' embeddings."""
    torch.manual_seed(4)
    cfg_cls = transformers.ViTConfig if cls == "ViTModel" else transformers.Dinov2Config
    hf = getattr(transformers, cls)(cfg_cls(**config)).eval()
    with torch.no_grad():  # make layer scale matter in every block (initialised to 1e-5)
        for pname, p in hf.named_parameters():
            if "lambda" in pname:
                p.copy_(torch.rand_like(p))
    folder = _save_hf(hf, tmp_path / name)
    encoder = create_encoder(name, weights=str(folder))
    assert len(encoder.backbone.model.blocks) == config["num_hidden_layers"]
    assert encoder.weights_sha256 == file_sha256(folder / "model.safetensors")
    _parity(hf, encoder)
