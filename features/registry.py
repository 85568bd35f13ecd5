"""Encoder registry: one factory, :func:`create_encoder`, for every tile encoder.

Encoders are registered by decorating a builder with :func:`register_encoder`; the
vendor/family modules in :mod:`wsi_mil.features.encoders` do so when first needed. A
registered entry (:class:`EncoderSpec`) records the embedding dimension, input size,
normalisation, expected resolution, pooling, licence and source. Any timm model is also
available as ``timm:<model name>``.

Every encoder is wrapped in :class:`Encoder`, which takes uint8 tiles (B, H, W, 3),
converts and normalises them on the encoder's device and returns (B, dim) embeddings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from wsi_mil.errors import EncoderError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TIMM_PREFIX",
    "Encoder",
    "EncoderSpec",
    "build_encoder",
    "create_encoder",
    "get_encoder_spec",
    "list_encoders",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
_FAMILIES = (
    "builtin", "owkin", "meta", "mahmood", "bioptimus", "paige", "providence", "histai", "kaiko",
    "transpath",
)  # fmt: skip
_REGISTRY: dict[str, EncoderSpec] = {}


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is and how to feed it.

    Attributes:
        name: Registry name (``phikon``, ``dinov2-b``, ...).
        dim: Embedding dimension D of the (B, D) output.
        input_px: Side of the square input the model expects (tiles are resized to it);
            ``None`` = any size (hand-crafted features).
        mean: Per-channel normalisation mean on [0, 1] RGB (``None`` = no normalisation).
        std: Per-channel normalisation std.
        mpp: Resolution (µm/px) the model was trained at, ``None`` when not
            histology-specific.
        pooling: How the embedding is formed: ``cls``, ``cls+mean`` (CLS concatenated
            with the mean of patch tokens), ``timm`` (the timm model's own pooling),
            ``attn-pool`` (a learned attentional pooler, CONCH) or ``handcrafted``.
        licence: Licence of the published weights.
        source: Where the weights are published.
        architecture: The timm architecture and settings, for humans.
        hub: ``(repo_id, layout)`` to try on the Hugging Face hub when no weights are
            given; layout is ``timm`` (a timm ``model.safetensors``) or ``hf`` (a
            transformers folder). ``None`` = weight-free or no public download.
        builder: ``builder(spec) -> torch.nn.Module`` taking normalised (B, 3, S, S)
            float input and returning (B, dim).
        needs_weights: False for weight-free encoders.
    """

    name: str
    dim: int | None
    input_px: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    mpp: float | None
    pooling: str
    licence: str
    source: str
    architecture: str = ""
    hub: tuple[str, str] | None = None
    builder: Callable[[EncoderSpec], Any] | None = field(default=None, repr=False, compare=False)
    needs_weights: bool = True

    def describe(self) -> dict[str, Any]:
        """Return the spec as a plain dict (for ``wsi-mil encoders`` and config.yaml)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_px": self.input_px,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "mpp": self.mpp,
            "pooling": self.pooling,
            "licence": self.licence,
            "source": self.source,
            "architecture": self.architecture,
        }


def register_encoder(name: str, **spec: Any) -> Callable[[Callable], Callable]:
    """Decorator registering ``builder(spec) -> nn.Module`` under ``name``.

    Args:
        name: Registry name; must be unique.
        **spec: The remaining :class:`EncoderSpec` fields.
    """

    def decorate(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = EncoderSpec(name=name, builder=builder, **spec)
        return builder

    return decorate


def _load_families() -> None:
    for family in _FAMILIES:
        importlib.import_module(f"wsi_mil.features.encoders.{family}")


def list_encoders() -> list[EncoderSpec]:
    """Return the specs of all registered encoders, sorted by name.

    ``timm:<model name>`` (any timm model) is not listed; see :func:`get_encoder_spec`.
    """
    _load_families()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_encoder_spec(name: str) -> EncoderSpec:
    """Return the spec of ``name`` (``timm:<model>`` specs are resolved from timm).

    Raises:
        EncoderError: Unknown name; the message lists the valid names.
    """
    _load_families()
    if name.startswith(TIMM_PREFIX):
        from wsi_mil.features.encoders.timm_any import timm_spec

        return timm_spec(name)
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise EncoderError(
            f"unknown encoder {name!r}; choose one of: {valid}, or timm:<any timm model name> "
            "(see `wsi-mil encoders`)"
        )
    return _REGISTRY[name]


def create_encoder(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Build an encoder in eval mode with its weights loaded.

    Args:
        name: A registered name (see :func:`list_encoders`) or ``timm:<model name>``.
        weights: ``None`` — fetch the published weights from the Hugging Face hub (fails
            with instructions when offline); a path to a Hugging Face folder
            (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or a timm
            state-dict file (``.safetensors``, ``.pth``, ``.bin``); or ``"random"`` —
            seeded random initialisation, for tests and benchmarks only. Ignored by
            weight-free encoders.
        device: Torch device; ``"meta"`` builds the architecture without memory.

    Returns:
        :class:`Encoder` mapping uint8 tiles (B, H, W, 3) to embeddings (B, dim).

    Raises:
        EncoderError: Unknown name, unreadable/unsafe weights, wrong architecture, or
            hub unreachable with no ``weights``.
    """
    from wsi_mil.features.weights import resolve_weights

    spec = get_encoder_spec(name)
    resolved = resolve_weights(spec, weights)  # fail fast, before building a big model
    return build_encoder(spec, resolved, device)


def build_encoder(spec: EncoderSpec, resolved: Any, device: str | torch.device = "cpu") -> Encoder:
    """Build ``spec`` with weights already found by ``resolve_weights`` (no re-hashing).

    Args:
        spec: From :func:`get_encoder_spec`.
        resolved: A :class:`~wsi_mil.features.weights.ResolvedWeights`.
        device: Torch device; ``"meta"`` builds the architecture without memory.

    Returns:
        :class:`Encoder` in eval mode (see :func:`create_encoder`).
    """
    from wsi_mil.features.weights import load_resolved

    if spec.builder is None:
        raise EncoderError(f"encoder {spec.name!r} has no builder")
    meta = torch.device(device).type == "meta"
    # "random" weights (resolved.path None) are drawn on the CPU from one seed, so every
    # process and every device gets the same ones; loaded weights overwrite the init, so
    # the model is built straight on its device (no host copy of a 1B-parameter ViT).
    torch.manual_seed(0)
    with torch.device(device if meta or resolved.path is not None else "cpu"):
        backbone = spec.builder(spec)
    sha = resolved.sha256 if meta else load_resolved(backbone, spec, resolved)
    if spec.dim is None:  # timm:<name>: known once built
        spec = replace(spec, dim=int(backbone.dim))
    encoder = Encoder(spec, backbone, sha)
    return encoder.to(device).eval()


class Encoder(torch.nn.Module):
    """A tile encoder: uint8 tiles in, (B, dim) float embeddings out.

    Attributes:
        spec: The registry entry.
        backbone: The network; takes normalised (B, 3, S, S) float input.
        weights_sha256: SHA-256 of the weights file (or a marker for weight-free /
            random weights), recorded in every bag.
    """

    _mean: torch.Tensor
    _scale: torch.Tensor

    def __init__(self, spec: EncoderSpec, backbone: Any, weights_sha256: str) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_sha256 = weights_sha256
        mean = spec.mean or (0.0, 0.0, 0.0)
        std = spec.std or (1.0, 1.0, 1.0)
        scale = torch.tensor(std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_scale", scale, persistent=False)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.spec.dim or 0)

    def preprocess(
        self, tiles: torch.Tensor, stain: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Convert uint8 tiles (B, H, W, 3) to normalised float (B, 3, S, S) on-device.

        ``stain`` (see :mod:`~wsi_mil.features.stain`) maps the tiles to float
        (B, H, W, 3) on 0-255 first, in float32 (outside autocast). Tiles are resized
        (bilinear, antialiased) when their side differs from ``spec.input_px``.
        """
        import torch.nn.functional as F

        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise EncoderError(f"tiles must be uint8 (B, H, W, 3), got shape {tuple(tiles.shape)}")
        if stain is not None:
            with torch.autocast(tiles.device.type, enabled=False):
                tiles = stain(tiles)
        x = tiles.permute(0, 3, 1, 2).float()
        size = self.spec.input_px
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x.div_(self._scale).sub_(self._mean / self._scale * 255.0)

    def forward(
        self, tiles: torch.Tensor, stain: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Embed uint8 tiles (B, H, W, 3) → (B, dim) (``stain``: see :meth:`preprocess`)."""
        return self.backbone(self.preprocess(tiles, stain))
