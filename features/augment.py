"""Stain augmentation: H&E-jittered views of tiles, for training (``extract --augment K``).

Each tile is deconvolved into haematoxylin, eosin and DAB concentrations with Ruifrok &
Johnston's stain vectors (optical density ``OD = C · M``, ``M`` the (3, 3) matrix of the
three stains' unit OD vectors), each channel is scaled and shifted,
``C'_c = α_c · C_c + β_c`` with ``α_c ~ U(1 − σ, 1 + σ)`` and ``β_c ~ U(−σ, σ)`` (Tellez
et al. 2018, "HED" augmentation), and re-rendered to RGB. A *view* is one draw of
(α, β) per slide: view ``k`` of a slide applies the same jitter to every tile, as a
different staining run of the same section would. Draws are seeded by
``(seed, slide id, view)``, so a re-run reproduces them; they are recorded in the bag.

The optical density convention is :mod:`wsi_mil.features.stain`'s (natural log,
``I₀ = 240``), so a jitter with α = 1, β = 0 returns the tile unchanged up to rounding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsi_mil.features.stain import _rgb, od_to_rgb, rgb_to_od

__all__ = [
    "DEFAULT_SIGMA",
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "AugmentSpec",
    "draw_jitter",
    "hed_jitter",
    "view_functions",
]

#: Default jitter strength σ ("HED-light" of Tellez et al. uses 0.05).
DEFAULT_SIGMA = 0.05
#: Unit OD vectors of haematoxylin, eosin and DAB (rows), Ruifrok & Johnston 2001.
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = torch.tensor(_HED / np.linalg.norm(_HED, axis=1, keepdims=True), dtype=torch.float32)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def hed_jitter(tiles: Any, alpha: Any, beta: Any) -> torch.Tensor:
    """Scale and shift the H, E and D concentrations of RGB tiles.

    Args:
        tiles: RGB (..., 3), uint8 or float on 0-255 (numpy or torch).
        alpha: (3,) scale of the H, E, D concentrations.
        beta: (3,) shift of the H, E, D concentrations (OD units).

    Returns:
        float32 (..., 3) on 0-255, on the tiles' device.
    """
    od = rgb_to_od(_rgb(tiles))
    dev = od.device
    a = torch.as_tensor(alpha, dtype=torch.float32, device=dev).reshape(3)
    b = torch.as_tensor(beta, dtype=torch.float32, device=dev).reshape(3)
    to_hed, from_hed = HED_FROM_RGB.to(dev), RGB_FROM_HED.to(dev)
    # OD (…,3) → C = OD · M⁻¹ → C·diag(α) + β → OD' = C' · M, folded: OD · A + b
    mat = to_hed @ torch.diag(a) @ from_hed
    return od_to_rgb(od @ mat + b @ from_hed)


def _slide_seed(seed: int, slide_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_jitter(k: int, sigma: float, seed: int, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The (α, β) of ``k`` views of one slide.

    Args:
        k: Number of views.
        sigma: Jitter strength σ (α ~ U(1 − σ, 1 + σ), β ~ U(−σ, σ)).
        seed: Run seed.
        slide_id: Slide identifier (each slide gets its own draws).

    Returns:
        alpha (k, 3) and beta (k, 3) float64.
    """
    rng = np.random.default_rng(_slide_seed(seed, slide_id))
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=(k, 3))
    beta = rng.uniform(-sigma, sigma, size=(k, 3))
    return alpha, beta


@dataclass(frozen=True)
class AugmentSpec:
    """``extract --augment K``: K stain-jittered views per tile (picklable).

    Attributes:
        k: Views per tile (≥ 1).
        sigma: Jitter strength (0 < σ < 1).
        seed: Seed of the draws.
    """

    k: int
    sigma: float = DEFAULT_SIGMA
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ValueError(f"--augment must be a positive number of views, got {self.k}")
        if not 0.0 < float(self.sigma) < 1.0:
            raise ValueError(f"--augment-sigma must be in (0, 1), got {self.sigma}")

    def record(self, slide_id: str | None = None) -> dict[str, Any]:
        """The bag's ``augment`` attribute (with the slide's draws when ``slide_id``)."""
        out: dict[str, Any] = {"method": "hed", "k": int(self.k), "sigma": float(self.sigma),
                               "seed": int(self.seed)}  # fmt: skip
        if slide_id is not None:
            alpha, beta = draw_jitter(self.k, self.sigma, self.seed, slide_id)
            out.update(alpha=alpha.round(6).tolist(), beta=beta.round(6).tolist())
        return out


def view_functions(
    spec: AugmentSpec,
    slide_id: str,
    device: torch.device,
    base: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """One tile transform per view: ``base`` (e.g. stain normalisation), then the jitter.

    Args:
        spec: The augmentation setting.
        slide_id: The slide (its draws).
        device: Where the tiles are.
        base: Applied first when given (uint8/float (B, H, W, 3) → float 0-255).

    Returns:
        ``spec.k`` functions mapping tiles (B, H, W, 3) to float32 (B, H, W, 3) on 0-255.
    """
    alpha, beta = draw_jitter(spec.k, spec.sigma, spec.seed, slide_id)
    a = torch.as_tensor(alpha, dtype=torch.float32, device=device)
    b = torch.as_tensor(beta, dtype=torch.float32, device=device)

    def make(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def view(tiles: torch.Tensor) -> torch.Tensor:
            return hed_jitter(tiles if base is None else base(tiles), a[i], b[i])

        return view

    return [make(i) for i in range(spec.k)]
