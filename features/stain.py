"""Stain normalisation of H&E tiles: Macenko and Reinhard, as torch ops on any device.

Every function takes RGB tiles as a uint8 (or float, 0-255) tensor or array of shape
``(..., 3)`` — one tile (H, W, 3), a batch (B, H, W, 3) or a pixel list (N, 3) — and
works on the tensor's device. A method is *fitted* (``fit_macenko`` / ``fit_reinhard``
→ a named tuple of parameters) on a slide's tissue and *applied* (``apply_macenko`` /
``apply_reinhard`` → float tensor (..., 3) on 0-255) to map the slide's stain onto a
target's.

Fitting uses tissue pixels only (:func:`tissue_mask`): near-white background (optical
density below ``beta`` in any channel, as Macenko does), very dark pixels (the brightest
channel below 60: black ink, folds, dirt) and pixels that are not H&E-like (HSV
saturation above 0.85 or green optical density below half the red or blue one: green,
red and bright blue marker pen) are left out. Macenko's angle and concentration
percentiles (1 % / 99 %) absorb the rest. Ink whose colour resembles haematoxylin (dark
blue pen) can only be absorbed by those percentiles.

Targets: :data:`MACENKO_REFERENCE` is the reference stain matrix and maximal
concentrations published with Macenko et al.'s reference implementation (mitkovetta/
staining-normalization, the defaults of most ports); :data:`REINHARD_REFERENCE` holds
the CIELAB mean and standard deviation of the tissue pixels of the CMU-1-Small-Region
slide (OpenSlide test data, level 0, pixels selected by :func:`tissue_mask`). A user
tile can be the target instead (:func:`fit_target`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "MACENKO_REFERENCE",
    "REINHARD_REFERENCE",
    "STAIN_METHODS",
    "MacenkoParams",
    "ReinhardParams",
    "StainSpec",
    "apply_macenko",
    "apply_reinhard",
    "apply_stain",
    "fit_macenko",
    "fit_reinhard",
    "fit_stain",
    "fit_store",
    "fit_target",
    "lab_to_rgb",
    "od_to_rgb",
    "params_from_dict",
    "params_to_dict",
    "rgb_to_lab",
    "rgb_to_od",
    "stain_spec",
    "tissue_mask",
]

STAIN_METHODS = ("none", "macenko", "reinhard")
IO = 240.0
"""Transmitted light intensity of Macenko's optical density, ``OD = -ln((I + 1) / IO)``."""
BETA = 0.15
ALPHA = 1.0
DARK = 60
SATURATION = 0.85
MAX_FIT_PIXELS = 2_000_000


class MacenkoParams(NamedTuple):
    """Macenko stain parameters.

    Attributes:
        stain_matrix: (3, 2) float32: unit optical-density vectors (RGB rows) of
            haematoxylin (column 0) and eosin (column 1).
        max_conc: (2,) float32: 99th percentile of the H and E concentrations.
    """

    stain_matrix: torch.Tensor
    max_conc: torch.Tensor


class ReinhardParams(NamedTuple):
    """Reinhard colour statistics.

    Attributes:
        mean: (3,) float32: mean of CIELAB L*, a*, b* (L* on 0-100).
        std: (3,) float32: their standard deviations.
    """

    mean: torch.Tensor
    std: torch.Tensor


Params = MacenkoParams | ReinhardParams

MACENKO_REFERENCE = MacenkoParams(
    torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    torch.tensor([1.9705, 1.0308]),
)
REINHARD_REFERENCE = ReinhardParams(
    torch.tensor([43.7721, 30.2558, -14.3023]),
    torch.tensor([14.2323, 10.9123, 9.1410]),
)


def _rgb_tensor(tiles: Any, name: str = "tiles") -> torch.Tensor:
    """``tiles`` as a tensor (..., 3) of their own dtype (validated RGB)."""
    if isinstance(tiles, np.ndarray) and not tiles.flags.writeable:
        tiles = np.array(tiles)  # torch refuses to wrap read-only arrays silently
    t = torch.as_tensor(tiles)
    if t.ndim < 2 or t.shape[-1] != 3:
        raise ValueError(f"{name} must be RGB (..., 3), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be uint8 or float, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _rgb(tiles: Any, name: str = "tiles") -> torch.Tensor:
    """``tiles`` as a float32 tensor (..., 3) on 0-255 (validated)."""
    return _rgb_tensor(tiles, name).float()


def rgb_to_od(rgb: Any, io: float = IO) -> torch.Tensor:
    """Optical density ``-ln((I + 1) / io)`` of RGB (..., 3) on 0-255 → float (..., 3)."""
    return -torch.log((_rgb(rgb, "rgb") + 1.0) / io)


def od_to_rgb(od: torch.Tensor, io: float = IO) -> torch.Tensor:
    """Inverse of :func:`rgb_to_od`: OD (..., 3) → RGB float (..., 3) clamped to 0-255."""
    return (io * torch.exp(-od) - 1.0).clamp_(0.0, 255.0)


def tissue_mask(tiles: Any, *, beta: float = BETA, io: float = IO) -> torch.Tensor:
    """Pixels usable for fitting: stained tissue, not background, dark specks or ink.

    Args:
        tiles: RGB (..., 3), uint8 or float on 0-255.
        beta: Minimal optical density of every channel (Macenko's transparency cut).
        io: Transmitted light intensity.

    Returns:
        bool (...) mask (the input's shape without its channel axis).
    """
    rgb = _rgb(tiles)
    od = rgb_to_od(rgb, io)
    hi, lo = rgb.amax(-1), rgb.amin(-1)
    stained = (od >= beta).all(-1)
    not_dark = hi >= DARK
    not_ink = (hi - lo) <= SATURATION * hi.clamp(min=1.0)
    he_like = od[..., 1] >= 0.5 * torch.maximum(od[..., 0], od[..., 2])
    return stained & not_dark & not_ink & he_like


def _pixels(tiles: Any, tissue_only: bool, beta: float, io: float) -> torch.Tensor:
    """The fitting pixels of ``tiles`` as (N, 3) float (at most MAX_FIT_PIXELS, strided)."""
    rgb = _rgb(tiles).reshape(-1, 3)
    if tissue_only:
        rgb = rgb[tissue_mask(rgb, beta=beta, io=io)]
    if len(rgb) > MAX_FIT_PIXELS:
        rgb = rgb[:: -(-len(rgb) // MAX_FIT_PIXELS)]
    if len(rgb) < 100:
        raise ValueError(
            f"tiles have {len(rgb)} tissue pixels (fewer than 100) to fit the stain on; "
            "is this background only?"
        )
    return rgb


def fit_macenko(
    tiles: Any,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    io: float = IO,
    tissue_only: bool = True,
) -> MacenkoParams:
    """Fit Macenko's stain matrix and maximal concentrations.

    The optical densities of the fitting pixels are projected on the plane of their two
    principal directions; the ``alpha`` and ``100 - alpha`` percentiles of the angle in
    that plane give the two stain vectors (haematoxylin: the one with larger red OD);
    the 99th percentile of each stain's concentration gives ``max_conc``.

    Args:
        tiles: RGB (..., 3) uint8 or float on 0-255 (tiles of one slide).
        alpha: Angle percentile, in percent.
        beta: Transparency cut (see :func:`tissue_mask`).
        io: Transmitted light intensity.
        tissue_only: Fit on :func:`tissue_mask` pixels; False = textbook Macenko (only
            the eigen-directions use pixels with OD ≥ ``beta``; concentrations use all).

    Returns:
        :class:`MacenkoParams` on the device of ``tiles``.

    Raises:
        ValueError: Not RGB, or fewer than 100 usable pixels.
    """
    if not 0.0 <= alpha < 50.0:
        raise ValueError(f"alpha must be in [0, 50) percent, got {alpha}")
    if tissue_only:
        od = rgb_to_od(_pixels(tiles, True, beta, io), io).double()
        od_all = od
    else:
        od_all = rgb_to_od(_rgb(tiles).reshape(-1, 3), io).double()
        od = od_all[(od_all >= beta).all(-1)]
        if len(od) < 100:
            raise ValueError(f"tiles have {len(od)} pixels with OD ≥ {beta} (fewer than 100)")
    cov = torch.cov(od.T)
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # the two largest eigenvalues
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    q = torch.tensor([alpha / 100.0, 1.0 - alpha / 100.0], dtype=phi.dtype, device=phi.device)
    lo, hi = _quantile(phi, q)
    v_lo = plane @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v_hi = plane @ torch.stack([torch.cos(hi), torch.sin(hi)])
    he = torch.stack([v_lo, v_hi], 1) if v_lo[0] > v_hi[0] else torch.stack([v_hi, v_lo], 1)
    he = he / he.norm(dim=0, keepdim=True)
    conc = od_all @ torch.linalg.pinv(he).T  # (N, 2)
    max_conc = torch.stack([_quantile(conc[:, k], 0.99) for k in range(2)])
    return MacenkoParams(he.float(), max_conc.float())


def _quantile(x: torch.Tensor, q: Any) -> torch.Tensor:
    """``torch.quantile`` of a 1-D tensor of any length (subsampled above 16 M values)."""
    if x.numel() >= 1 << 24:
        x = x[:: -(-x.numel() // ((1 << 24) - 1))]
    q = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    return torch.quantile(x, q)


def apply_macenko(
    tiles: Any, source: MacenkoParams, target: MacenkoParams, *, io: float = IO
) -> torch.Tensor:
    """Map tiles with stain ``source`` onto stain ``target``.

    Concentrations ``C = pinv(source.stain_matrix) · OD`` are scaled by
    ``target.max_conc / source.max_conc`` and re-rendered with ``target.stain_matrix``.

    Args:
        tiles: RGB (..., 3) uint8 or float on 0-255.
        source: Parameters fitted on the tiles' slide.
        target: Parameters of the reference.
        io: Transmitted light intensity.

    Returns:
        float32 (..., 3) on 0-255, on the tiles' device.
    """
    od = rgb_to_od(tiles, io)
    src_m, src_c = _check_macenko(source, "source", od.device)
    tgt_m, tgt_c = _check_macenko(target, "target", od.device)
    # OD (…,3) → C (…,2) → OD' (…,3), folded into one 3×3 matrix: OD' = OD · Mᵀ
    m = tgt_m @ torch.diag(tgt_c / src_c) @ torch.linalg.pinv(src_m)
    return od_to_rgb(od @ m.T, io)


def _check_macenko(p: Any, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(p, MacenkoParams):
        raise TypeError(f"{name} must be MacenkoParams, got {type(p).__name__}")
    m = torch.as_tensor(p.stain_matrix, dtype=torch.float32, device=device)
    c = torch.as_tensor(p.max_conc, dtype=torch.float32, device=device)
    if m.shape != (3, 2) or c.shape != (2,):
        raise ValueError(
            f"{name}: stain_matrix must be (3, 2) and max_conc (2,), got "
            f"{tuple(m.shape)} and {tuple(c.shape)}"
        )
    if not bool((c > 0).all()):
        raise ValueError(f"{name}.max_conc must be positive, got {c.tolist()}")
    return m, c


# sRGB (D65) ↔ CIE XYZ
_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_EPS = 216.0 / 24389.0
_KAPPA = 24389.0 / 27.0


def rgb_to_lab(rgb: Any) -> torch.Tensor:
    """sRGB (..., 3) on 0-255 → CIELAB (..., 3) float (L* 0-100, D65 white)."""
    x = _rgb(rgb, "rgb") / 255.0
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = lin @ _RGB2XYZ.to(x.device).T / _WHITE.to(x.device)
    f = torch.where(xyz > _EPS, xyz.clamp(min=_EPS) ** (1.0 / 3.0), (_KAPPA * xyz + 16.0) / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (..., 3) → sRGB float (..., 3) clamped to 0-255."""
    lab = torch.as_tensor(lab).float()
    fy = (lab[..., 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    xyz = torch.where(f**3 > _EPS, f**3, (116.0 * f - 16.0) / _KAPPA) * _WHITE.to(lab.device)
    lin = (xyz @ torch.linalg.inv(_RGB2XYZ).to(lab.device).T).clamp(min=0.0)
    srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=1e-12) ** (1 / 2.4) - 0.055,
                       12.92 * lin)  # fmt: skip
    return (srgb * 255.0).clamp_(0.0, 255.0)


def fit_reinhard(tiles: Any, *, tissue_only: bool = True) -> ReinhardParams:
    """Fit Reinhard's statistics: CIELAB mean and standard deviation of the pixels.

    Args:
        tiles: RGB (..., 3) uint8 or float on 0-255.
        tissue_only: Use :func:`tissue_mask` pixels only; False = every pixel (textbook).

    Returns:
        :class:`ReinhardParams` on the device of ``tiles``.
    """
    lab = rgb_to_lab(_pixels(tiles, tissue_only, BETA, IO)).double()
    return ReinhardParams(lab.mean(0).float(), lab.std(0).float())


def apply_reinhard(tiles: Any, source: ReinhardParams, target: ReinhardParams) -> torch.Tensor:
    """Map tiles with statistics ``source`` onto ``target`` (per CIELAB channel).

    The same arithmetic as ``lab_to_rgb((rgb_to_lab(tiles) - μs) · σt / σs + μt)``, in
    fewer passes over the pixels: uint8 tiles are linearised through a 256-entry table,
    and since CIELAB is linear in ``f = (f(X), f(Y), f(Z))`` the per-channel affine map
    is folded into one 3×3 matrix and offset on ``f``.

    Args:
        tiles: RGB (..., 3) uint8 or float on 0-255.
        source: Statistics fitted on the tiles' slide.
        target: Statistics of the reference.

    Returns:
        float32 (..., 3) on 0-255, on the tiles' device.
    """
    t = _rgb_tensor(tiles)
    dev = t.device
    s_mu, s_sd = _check_reinhard(source, "source", dev)
    t_mu, t_sd = _check_reinhard(target, "target", dev)
    lin = _linearise(t)
    xyz = lin @ (_RGB2XYZ.to(dev).T / _WHITE.to(dev)[None, :])
    f = torch.where(
        xyz > _EPS, xyz.clamp(min=_EPS).pow_(1.0 / 3.0), xyz.mul_(_KAPPA).add_(16.0).div_(116.0)
    )
    # lab = f @ P + q; lab' = (lab - μs)·g + μt; f' = lab' @ P⁻¹ - q @ P⁻¹
    p_mat = torch.tensor(
        [[0.0, 500.0, 0.0], [116.0, -500.0, 200.0], [0.0, 0.0, -200.0]], device=dev
    )
    q = torch.tensor([-16.0, 0.0, 0.0], device=dev)
    p_inv = torch.linalg.inv(p_mat)
    g = t_sd / s_sd
    m = p_mat @ torch.diag(g) @ p_inv
    c = ((q - s_mu) * g + t_mu - q) @ p_inv
    f = torch.addmm(c, f.reshape(-1, 3), m).reshape(f.shape)
    cube = f**3
    xyz = torch.where(cube > _EPS, cube, f.mul_(116.0).sub_(16.0).div_(_KAPPA))
    lin = (xyz @ (_WHITE.to(dev)[:, None] * torch.linalg.inv(_RGB2XYZ).to(dev).T)).clamp_(min=0.0)
    srgb = torch.where(lin > 0.0031308, lin.clamp(min=1e-12).pow_(1 / 2.4).mul_(1.055).sub_(0.055),
                       lin * 12.92)  # fmt: skip
    return srgb.mul_(255.0).clamp_(0.0, 255.0)


_SRGB_LUT: dict[torch.device, torch.Tensor] = {}


def _linearise(t: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3) on 0-255 → linear float32 on 0-1 (a table lookup for uint8)."""
    if t.dtype == torch.uint8:
        lut = _SRGB_LUT.get(t.device)
        if lut is None:
            x = torch.arange(256, dtype=torch.float64) / 255.0
            lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
            lut = _SRGB_LUT.setdefault(t.device, lin.float().to(t.device))
        return lut[t.long()]
    x = _rgb(t) / 255.0
    return torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)


def _check_reinhard(p: Any, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(p, ReinhardParams):
        raise TypeError(f"{name} must be ReinhardParams, got {type(p).__name__}")
    mu = torch.as_tensor(p.mean, dtype=torch.float32, device=device)
    sd = torch.as_tensor(p.std, dtype=torch.float32, device=device)
    if mu.shape != (3,) or sd.shape != (3,):
        raise ValueError(f"{name}: mean and std must be (3,), got {tuple(mu.shape)}")
    if not bool((sd > 0).all()):
        raise ValueError(f"{name}.std must be positive, got {sd.tolist()}")
    return mu, sd


# ---------------------------------------------------------------- method dispatch


def fit_stain(method: str, tiles: Any) -> Params:
    """Fit ``method`` (``macenko`` / ``reinhard``) on tissue pixels of ``tiles`` (..., 3)."""
    if method == "macenko":
        return fit_macenko(tiles)
    if method == "reinhard":
        return fit_reinhard(tiles)
    raise ValueError(f"method must be 'macenko' or 'reinhard', got {method!r}")


def apply_stain(tiles: Any, source: Params, target: Params) -> torch.Tensor:
    """Apply the method of ``source``/``target`` to RGB (..., 3) → float (..., 3) 0-255."""
    if isinstance(source, MacenkoParams):
        return apply_macenko(tiles, source, target)  # type: ignore[arg-type]
    return apply_reinhard(tiles, source, target)  # type: ignore[arg-type]


def params_to_dict(p: Params) -> dict[str, Any]:
    """Parameters as plain lists (for bag attributes and config.yaml), 6 decimals."""
    return {k: np.round(np.asarray(v.detach().cpu(), np.float64), 6).tolist()
            for k, v in p._asdict().items()}  # fmt: skip


def params_from_dict(method: str, d: dict[str, Any]) -> Params:
    """Inverse of :func:`params_to_dict`."""
    cls = MacenkoParams if method == "macenko" else ReinhardParams
    return cls(*(torch.tensor(d[k], dtype=torch.float32) for k in cls._fields))


@dataclass(frozen=True)
class StainSpec:
    """A stain setting of an extraction (picklable).

    Attributes:
        method: ``macenko`` or ``reinhard``.
        target: ``default`` (the bundled reference) or ``<file name>#<sha256[:12]>``.
        target_params: The target's parameters (:func:`params_to_dict`).
    """

    method: str
    target: str
    target_params: dict[str, Any]

    @property
    def folder_suffix(self) -> str:
        """``macenko`` with the bundled target, else ``macenko-<target sha256[:8]>``."""
        if self.target == "default":
            return self.method
        return f"{self.method}-{self.target.rsplit('#', 1)[-1][:8]}"

    def target_tuple(self) -> Params:
        return params_from_dict(self.method, self.target_params)

    def record(self, slide_params: Params | None = None) -> dict[str, Any]:
        """What a bag records: method, target, target and slide parameters."""
        out: dict[str, Any] = {"method": self.method, "target": self.target,
                               "target_params": self.target_params}  # fmt: skip
        if slide_params is not None:
            out["slide_params"] = params_to_dict(slide_params)
        return out


def fit_target(method: str, png: str | os.PathLike[str]) -> Params:
    """Fit ``method`` on a user's reference tile (PNG/JPEG/TIFF, RGB or RGBA)."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    try:
        return fit_stain(method, rgb)
    except ValueError as exc:
        raise ValueError(f"--stain-target {png}: {exc}") from exc


def stain_spec(method: str, target: str | os.PathLike[str] | None = None) -> StainSpec | None:
    """The :class:`StainSpec` of ``--stain METHOD [--stain-target PNG]`` (None for none).

    Raises:
        ValueError: Unknown method, a target without a method, unreadable target.
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"--stain must be one of {', '.join(STAIN_METHODS)}, got {method!r}")
    if method == "none":
        if target is not None:
            raise ValueError("--stain-target needs --stain macenko or reinhard")
        return None
    if target is None:
        ref = MACENKO_REFERENCE if method == "macenko" else REINHARD_REFERENCE
        return StainSpec(method, "default", params_to_dict(ref))
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise ValueError(f"--stain-target {path} is not a file")
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    params = params_to_dict(fit_target(method, path))
    return StainSpec(method, f"{os.path.basename(path)}#{sha[:12]}", params)


def fit_store(store: Any, method: str, max_tiles: int = 64) -> Params:
    """Fit ``method`` on up to ``max_tiles`` tiles spread evenly over a tile store.

    Args:
        store: An open :class:`~wsi_mil.tiling.store.TileStore` or its path.
        method: ``macenko`` or ``reinhard``.
        max_tiles: Tiles read (evenly spaced over the store's tissue tiles).

    Raises:
        ValueError: The store has no tiles or no tissue pixels.
    """
    from wsi_mil.tiling import open_tile_store

    st = open_tile_store(store) if isinstance(store, str | os.PathLike) else store
    n = int(st.n_tiles)
    if n == 0:
        raise ValueError(f"{st.path} has no tiles to fit the stain on")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_tiles)).round().astype(int))
    if st.has_pixels:
        tiles = _read_spread(st, idx)
    else:
        from wsi_mil.wsi import open_slide

        slide = open_slide(st.source_path, mpp=st.attrs.get("mpp"))
        tiles = slide.read_tiles(st.coords[idx], st.tile_px, st.target_mpp)
    return fit_stain(method, tiles)


def _read_spread(st: Any, idx: np.ndarray) -> np.ndarray:
    """Tiles ``idx`` (sorted) of a store, decoding each chunk that holds some only once.

    Returns:
        uint8 (len(idx), tile_px, tile_px, 3).
    """
    per = max(1, int(getattr(st, "chunk_tiles", 1) or 1))
    out = []
    for c in np.unique(idx // per):
        start = int(c) * per
        block = st.read_pixels(start, min(int(st.n_tiles), start + per))
        out.append(block[idx[(idx // per) == c] - start])
    return np.concatenate(out)
