"""Loading encoder weights safely, from local files or the Hugging Face hub.

Accepted ``weights``:

* a Hugging Face folder as published for Phikon (transformers ``ViTModel``) and
  Phikon-v2 (``Dinov2Model``): ``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``; its keys are mapped onto the timm model;
* a timm state-dict file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), or a folder
  holding one as ``model.safetensors`` / ``pytorch_model.bin`` (timm hub layout);
* a publisher's own layout, where the backbone maps it with ``adapt_state_dict(state)``
  (CONCH's ``pytorch_model.bin`` of the whole CoCa model, CTransPath's ``ctranspath.pth``
  written by an old timm Swin);
* a transformers ``Dinov2WithRegistersModel`` folder (Hibou): the class token's position
  embedding is folded into the class token for timm's ``no_embed_class`` layout;
* ``None``: the publisher's weights are fetched from the hub (cached); offline, the
  error says how to pass ``--weights``;
* ``"random"``: seeded random initialisation (tests and benchmarks only).

Nothing is ever unpickled beyond tensors: safetensors, or ``torch.load(weights_only=True)``,
which refuses pickles that would build arbitrary objects or run code.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wsi_mil.errors import EncoderError

if TYPE_CHECKING:
    from wsi_mil.features.registry import EncoderSpec

__all__ = [
    "RANDOM_WEIGHTS",
    "WEIGHT_FREE",
    "ResolvedWeights",
    "check_state_dict",
    "file_sha256",
    "hf_to_timm_keys",
    "load_resolved",
    "load_weights",
    "read_state_dict",
    "resolve_weights",
]

RANDOM_WEIGHTS = "random"
#: ``weights_sha256`` recorded for weight-free encoders / random initialisation.
WEIGHT_FREE = "none"
_RANDOM_SHA = "random-init-seed0"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_PASS_WEIGHTS = (
    "pass --weights PATH: a Hugging Face folder (config.json + model.safetensors or "
    "pytorch_model.bin) or a timm state-dict file (.safetensors / .pth)"
)


@dataclass(frozen=True)
class ResolvedWeights:
    """Where an encoder's weights come from.

    Attributes:
        path: The weights file (``None`` for weight-free or random weights).
        sha256: Hex digest of that file, or a marker (``none``, ``random-init-seed0``).
    """

    path: Path | None
    sha256: str


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, streamed in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike[str] | None) -> ResolvedWeights:
    """Find the weights file for ``spec`` (downloading from the hub when ``weights`` is None).

    Raises:
        EncoderError: Path missing, folder without a weights file, weights given to a
            weight-free encoder, or hub unreachable.
    """
    if not spec.needs_weights:
        if weights not in (None, RANDOM_WEIGHTS):
            raise EncoderError(f"encoder {spec.name!r} has no weights; drop --weights {weights}")
        return ResolvedWeights(None, WEIGHT_FREE)
    if weights == RANDOM_WEIGHTS:
        return ResolvedWeights(None, _RANDOM_SHA)
    path = _fetch_from_hub(spec) if weights is None else Path(weights)
    file = _weights_file(path)
    return ResolvedWeights(file, file_sha256(file))


def _weights_file(path: Path) -> Path:
    if not path.exists():
        raise EncoderError(f"weights {path} do not exist; {_PASS_WEIGHTS}")
    if path.is_file():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise EncoderError(
        f"weights folder {path} holds none of {', '.join(_WEIGHT_FILES)}; {_PASS_WEIGHTS}"
    )


def _fetch_from_hub(spec: EncoderSpec) -> Path:
    if spec.hub is None:
        raise EncoderError(
            f"encoder {spec.name!r} has no public download; {_PASS_WEIGHTS} (see {spec.source})"
        )
    repo, layout = spec.hub
    try:
        from huggingface_hub import hf_hub_download

        if layout == "hf":
            hf_hub_download(repo, "config.json")
        for i, name in enumerate(("model.safetensors", "pytorch_model.bin")):
            try:
                return Path(hf_hub_download(repo, name))
            except Exception:
                if i == 1:
                    raise
    except Exception as exc:
        raise EncoderError(
            f"could not get the weights of {spec.name!r} from the Hugging Face hub ({repo}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Download them where the hub is reachable (for gated models accept the licence "
            f"on {spec.source} and log in), then {_PASS_WEIGHTS}"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a tensor-only pickle (``weights_only=True``).

    Checkpoints wrapping the weights under ``state_dict`` / ``model`` are unwrapped.

    Raises:
        EncoderError: The file is unreadable, or is a pickle holding anything but
            tensors and plain containers (it is refused without running its code).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as exc:
            raise EncoderError(f"cannot read safetensors file {path}: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(
                f"refused to load {path}: it is not a plain tensor checkpoint "
                f"(torch.load(weights_only=True) rejected it: {first}); nothing in it was "
                "executed. Convert trusted weights to .safetensors"
            ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


_HF_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.", "norm."),
]
_HF_DROP = re.compile(r"^(embeddings\.mask_token|pooler\.)")
_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)"
    r"\.(\w+)$"
)
_QKV_PART = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
_LAYERS = re.compile(r"^layers\.(\d+)\.")


def _is_hf(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in state)


def hf_to_timm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map transformers ``ViTModel`` / ``Dinov2Model`` keys onto timm ViT keys.

    Both the checkpoint names (``encoder.layer.N.attention.attention.query``, as
    published and as written by ``save_pretrained``) and the in-memory names of
    transformers 5 (``layers.N.attention.q_proj``) are understood. Separate
    query/key/value projections are concatenated into timm's ``qkv``; the ``pooler`` and
    ``mask_token`` (unused for embeddings) are dropped. Unknown keys are kept unchanged
    so they surface as "unexpected".
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _HF_DROP.match(key):
            continue
        key = _LAYERS.sub(r"encoder.layer.\1.", key)
        m = _HF_QKV.match(key)
        if m:
            part = _QKV_PART.get(m.group(2), m.group(2))
            qkv.setdefault((m.group(1), m.group(3)), {})[part] = value
            continue
        out[_map_key(key)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            for part, value in parts.items():  # incomplete: report as unexpected
                out[f"encoder.layer.{layer}.attention.attention.{part}.{kind}"] = value
            continue
        cat = [parts["query"], parts["key"], parts["value"]]
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(cat, 0)
    return out


def _map_key(key: str) -> str:
    for pattern, repl in _HF_RULES:
        new, n = re.subn(f"^{pattern}", repl, key)
        if n:
            return new
    return key


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone.", "vit.", "dinov2.", "model.", "encoder.model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _adapt_pos_embed(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Resample ``pos_embed`` of another input size (e.g. DINOv2's 518 px) to the model's."""
    target = getattr(model, "pos_embed", None)
    pos = state.get("pos_embed")
    if target is None or pos is None or pos.shape == target.shape or pos.ndim != 3:
        return
    from timm.layers import resample_abs_pos_embed

    grid = model.patch_embed.grid_size
    try:
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(grid), num_prefix_tokens=pos.shape[1] - _square_part(pos.shape[1])
        )
    except Exception:  # leave it; the shape check reports the mismatch
        return


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n


def _fold_class_pos(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Fold the class token's position embedding into the class token.

    DINOv2 (Meta's and transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``, e.g.
    Hibou) adds a position embedding to the class token and none to the registers; timm's
    ``no_embed_class`` models embed patches only. As the class token is a constant,
    ``cls + pos[0]`` is the same input to the first block.
    """
    pos, cls = state.get("pos_embed"), state.get("cls_token")
    if not getattr(model, "no_embed_class", False) or pos is None or cls is None:
        return
    n = pos.shape[1] if pos.ndim == 3 else 0
    if _is_square(n) or not _is_square(n - 1):
        return
    state["cls_token"] = cls + pos[:, :1]
    state["pos_embed"] = pos[:, 1:]


def _square_part(n_tokens: int) -> int:
    """Largest square ≤ n_tokens whose remainder is a plausible prefix (0–8 tokens)."""
    for prefix in range(0, 9):
        side = round((n_tokens - prefix) ** 0.5)
        if side * side == n_tokens - prefix:
            return n_tokens - prefix
    return n_tokens


def load_weights(
    backbone: torch.nn.Module, spec: EncoderSpec, weights: str | os.PathLike[str] | None
) -> str:
    """Load ``weights`` into ``backbone`` (a :class:`TimmBackbone`) and return their sha256.

    Raises:
        EncoderError: Unreadable or unsafe file, or keys/shapes that do not fit the
            architecture (the message lists missing and unexpected keys).
    """
    return load_resolved(backbone, spec, resolve_weights(spec, weights))


def load_resolved(backbone: torch.nn.Module, spec: EncoderSpec, resolved: ResolvedWeights) -> str:
    """Load already-resolved weights (see :func:`load_weights`); returns their sha256."""
    if resolved.path is None:
        return resolved.sha256
    model = getattr(backbone, "model", backbone)
    state = read_state_dict(resolved.path)
    adapt = getattr(backbone, "adapt_state_dict", None)
    if callable(adapt):  # the publisher's own layout (CONCH, CTransPath): the builder maps it
        state = adapt(state)
    else:
        state = _strip_prefixes(state)
        if _is_hf(state):
            state = hf_to_timm_keys(state)
    if not any(k.startswith("head.") for k in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    _fold_class_pos(model, state)
    _adapt_pos_embed(model, state)
    check_state_dict(model, state, spec.name, resolved.path)
    model.load_state_dict(state, strict=True)
    return resolved.sha256


def _natural(key: str) -> list[Any]:
    """Sort key putting ``blocks.2`` before ``blocks.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path
) -> None:
    """Raise :class:`EncoderError` naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(own), key=_natural)
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state), key=_natural)
        if state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{more}")
    raise EncoderError(
        f"weights {path} do not fit encoder {name!r} (wrong architecture?): "
        + "; ".join(parts)
        + f". Pass the weights published for {name!r}"
    )
