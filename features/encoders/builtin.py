"""``builtin``: weight-free, hand-crafted H&E tile features (159 dims).

Runs anywhere with no download and carries real signal about tissue composition:

* colour: RGB mean/std, grey-level histogram, HSV saturation;
* stains: optical density (OD) and Ruifrok–Johnston colour deconvolution into
  haematoxylin (nuclei), eosin (stroma/cytoplasm) and a residual channel — mean, std,
  10/50/90th percentiles and histograms of the stain concentrations;
* texture: Sobel gradient magnitude/orientation statistics at three scales, Laplacian
  energy, rotation-invariant uniform local binary patterns (8 neighbours, radius 1) and
  grey-level co-occurrence statistics (contrast, homogeneity, energy, correlation,
  entropy over four directions) of the grey and haematoxylin channels;
* nuclear-density proxies: haematoxylin-rich area at three thresholds, density of local
  haematoxylin maxima at two scales, mean nuclear stain, mean blob size and the
  boundary density of the nuclear mask.

Everything is vectorised torch on the encoder's device, float32 and deterministic. The
input is RGB in [0, 1], (B, 3, H, W), at whatever tile size the store holds; tiles larger
than 2 × 112 px are first averaged down by an integer factor to about 112 px (224 px tiles
at 0.5 µm/px are described at 1 µm/px), which keeps nuclei several pixels wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.features.registry import EncoderSpec, register_encoder

__all__ = ["BUILTIN_DIM", "HandcraftedFeatures", "feature_names"]

_STAIN_RGB_OD = (  # Ruifrok & Johnston (2001) H and E OD vectors
    (0.650, 0.704, 0.286),
    (0.072, 0.990, 0.105),
)
_WORK_PX = 112  # tiles are averaged down to about this size (≈1 µm/px for 224 px at 0.5)
_LEVELS = 8  # grey levels for co-occurrence matrices
_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx)
_GLCM_STATS = ("contrast", "homogeneity", "energy", "correlation", "entropy")


def _stain_unmixing() -> torch.Tensor:
    """(3, 3) matrix mapping OD (R, G, B) to concentrations (H, E, residual)."""
    h, e = (torch.tensor(v, dtype=torch.float64) for v in _STAIN_RGB_OD)
    h, e = h / h.norm(), e / e.norm()
    r = torch.linalg.cross(h, e)
    stains = torch.stack([h, e, r / r.norm()])  # rows: stain OD vectors
    return torch.linalg.inv(stains).float()  # OD row-vector @ inv → concentrations


def feature_names() -> list[str]:
    """Names of the 159 builtin features, in output order."""
    names = [f"rgb_{s}_{c}" for s in ("mean", "std") for c in "rgb"]
    names += [f"grey_hist_{i}" for i in range(16)]
    names += ["od_mean", "od_std", "tissue_fraction"]
    names += [f"{c}_{s}" for c in ("haem", "eosin", "resid") for s in _STATS]
    names += [f"haem_hist_{i}" for i in range(16)] + [f"eosin_hist_{i}" for i in range(16)]
    names += ["sat_mean", "sat_std", "grad_mean", "grad_std"]
    names += [f"grad_orient_{i}" for i in range(8)]
    names += ["haem_grad_mean", "haem_grad_std"]
    names += ["grad2_mean", "grad2_std", "grad4_mean", "grad4_std", "laplace_energy"]
    names += [f"lbp_{c}_{i}" for c in ("grey", "haem") for i in range(10)]
    names += [
        f"glcm_{c}_{s}_{dy}{dx}"
        for c in ("grey", "haem")
        for (dy, dx) in _OFFSETS
        for s in _GLCM_STATS
    ]
    names += [f"nuc_area_{t}" for t in (0.4, 0.7, 1.0)]
    names += ["nuc_peaks", "nuc_peaks_coarse", "nuc_haem_mean", "nuc_blob_size", "nuc_boundary"]
    return names


_STATS = ("mean", "std", "p10", "p50", "p90")
BUILTIN_DIM = 159


class HandcraftedFeatures(nn.Module):
    """Hand-crafted H&E features: (B, 3, H, W) RGB in [0, 1] → (B, 159) float32."""

    unmix: torch.Tensor
    sobel: torch.Tensor
    laplace: torch.Tensor
    riu2: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unmix", _stain_unmixing(), persistent=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        self.register_buffer("sobel", torch.stack([sobel, sobel.T]).unsqueeze(1), persistent=False)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplace", lap.view(1, 1, 3, 3), persistent=False)
        self.register_buffer("riu2", _riu2_table(), persistent=False)
        self.dim = BUILTIN_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute features for RGB tiles (B, 3, H, W) in [0, 1]; returns (B, 159)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            factor = min(x.shape[-2:]) // _WORK_PX
            if factor > 1:
                x = F.avg_pool2d(x, factor)
            return self._features(x.clamp(0.0, 1.0))

    def _features(self, rgb: torch.Tensor) -> torch.Tensor:
        b = rgb.shape[0]
        od = -torch.log((rgb * 255.0 + 1.0) / 256.0)  # (B, 3, H, W), ≥ 0
        conc = torch.einsum("bchw,cs->bshw", od, self.unmix)  # H, E, residual
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
        haem = conc[:, :1]
        flat = rgb.flatten(2)
        od_sum = od.sum(1).flatten(1)
        mx, mn = flat.max(1).values, flat.min(1).values
        sat = (mx - mn) / mx.clamp_min(1e-3)
        parts = [
            flat.mean(2),
            flat.std(2),
            _hist(grey.flatten(1), 0.0, 1.0, 16),
            torch.stack([od_sum.mean(1), od_sum.std(1), (od_sum > 0.3).float().mean(1)], 1),
            _stain_stats(conc),
            _hist(conc[:, 0].flatten(1), 0.0, 2.0, 16),
            _hist(conc[:, 1].flatten(1), 0.0, 2.0, 16),
            torch.stack([sat.mean(1), sat.std(1)], 1),
            self._gradients(grey, haem),
            _lbp_hist(grey[:, 0], self.riu2),
            _lbp_hist(haem[:, 0], self.riu2),
            _glcm_stats(_quantise(grey[:, 0], 0.0, 1.0)),
            _glcm_stats(_quantise(haem[:, 0], 0.0, 2.0)),
            _nuclear(haem),
        ]
        out = torch.cat([p.reshape(b, -1) for p in parts], 1)
        return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)

    def _gradients(self, grey: torch.Tensor, haem: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(grey, self.sobel)  # (B, 2, H-2, W-2): d/dx, d/dy
        mag = g.pow(2).sum(1).sqrt().flatten(1)
        angle = torch.atan2(g[:, 1], g[:, 0]).flatten(1) % math.pi  # orientation in [0, pi)
        orient = _hist(angle, 0.0, math.pi, 8, weights=mag)
        h = F.conv2d(haem, self.sobel).pow(2).sum(1).sqrt().flatten(1)
        scales = []
        for k in (2, 4):
            gk = F.conv2d(F.avg_pool2d(grey, k), self.sobel).pow(2).sum(1).sqrt().flatten(1)
            scales += [gk.mean(1), gk.std(1)]
        lap = F.conv2d(grey, self.laplace).flatten(1).pow(2).mean(1).sqrt()
        head = torch.stack([mag.mean(1), mag.std(1)], 1)
        tail = torch.stack([h.mean(1), h.std(1), *scales, lap], 1)
        return torch.cat([head, orient, tail], 1)


def _hist(
    v: torch.Tensor, lo: float, hi: float, bins: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row histogram of (B, N) values on [lo, hi] (edges clipped) → (B, bins) fractions."""
    idx = ((v - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    if weights is None:
        counts = torch.zeros(v.shape[0], bins, dtype=torch.int64, device=v.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx))
        return counts.float() / v.shape[1]
    out = torch.zeros(v.shape[0], bins, dtype=weights.dtype, device=v.device)
    out.scatter_add_(1, idx, weights)
    return out / weights.sum(1, keepdim=True).clamp_min(1e-6)


def _stain_stats(conc: torch.Tensor) -> torch.Tensor:
    """Mean, std, 10/50/90th percentiles of each stain channel → (B, 15)."""
    small = F.avg_pool2d(conc, 2) if min(conc.shape[-2:]) >= 64 else conc
    vals = small.flatten(2).sort(-1).values  # (B, 3, N)
    n = vals.shape[-1]
    pct = vals[..., [round(q * (n - 1)) for q in (0.1, 0.5, 0.9)]]
    flat = conc.flatten(2)
    return torch.cat([flat.mean(2, keepdim=True), flat.std(2, keepdim=True), pct], 2)


def _quantise(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((v - lo) * (_LEVELS / (hi - lo))).long().clamp_(0, _LEVELS - 1)


def _riu2_table() -> torch.Tensor:
    """(256, 10) one-hot map from an 8-bit LBP code to its rotation-invariant uniform class."""
    table = torch.zeros(256, 10)
    for code in range(256):
        bits = [(code >> k) & 1 for k in range(8)]
        transitions = sum(bits[k] != bits[(k + 1) % 8] for k in range(8))
        table[code, sum(bits) if transitions <= 2 else 9] = 1.0
    return table


_RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))


def _lbp_hist(img: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant uniform LBP (P=8, R=1) histogram of (B, H, W) → (B, 10)."""
    c = img[:, 1:-1, 1:-1]
    h, w = c.shape[-2:]
    code = torch.zeros(c.shape, dtype=torch.uint8, device=img.device)
    for k, (y, x) in enumerate(_RING):
        code |= (img[:, y : y + h, x : x + w] >= c).to(torch.uint8) << k
    b = code.shape[0]
    offset = torch.arange(b, device=img.device).view(b, 1) * 256
    flat = (code.flatten(1).long() + offset).flatten()
    counts = torch.bincount(flat, minlength=b * 256).view(b, 256)
    return (counts.float() @ table) / (h * w)


def _glcm_stats(q: torch.Tensor) -> torch.Tensor:
    """Symmetric co-occurrence statistics of quantised (B, H, W) over 4 offsets → (B, 20)."""
    b, h, w = q.shape
    levels = _LEVELS
    i = torch.arange(levels, device=q.device, dtype=torch.float32)
    ii, jj = i.view(-1, 1), i.view(1, -1)
    out = []
    for dy, dx in _OFFSETS:
        x0, x1 = max(0, -dx), w - max(0, dx)
        a = q[:, : h - dy, x0:x1]
        c = q[:, dy:, x0 + dx : x1 + dx]
        pair = (a * levels + c).flatten(1)
        counts = torch.zeros(b, levels * levels, dtype=torch.int64, device=q.device)
        counts.scatter_add_(1, pair, torch.ones_like(pair))
        p = counts.view(b, levels, levels).float()
        p = p + p.transpose(1, 2)
        p = p / p.sum((1, 2), keepdim=True).clamp_min(1.0)
        mu = (p.sum(2) * i).sum(1).view(b, 1, 1)
        var = (p.sum(2) * (i - mu.view(b, 1)) ** 2).sum(1).view(b, 1, 1)
        stats = [
            (p * (ii - jj) ** 2).sum((1, 2)),
            (p / (1.0 + (ii - jj).abs())).sum((1, 2)),
            p.pow(2).sum((1, 2)),
            ((p * (ii - mu) * (jj - mu)).sum((1, 2)) / var.view(b).clamp_min(1e-6)),
            -(p * torch.log(p + 1e-12)).sum((1, 2)),
        ]
        out.append(torch.stack(stats, 1))
    return torch.cat(out, 1)


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Separable k × k maximum filter of (B, 1, H, W), same size."""
    p = k // 2
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, p))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(p, 0))


def _nuclear(haem: torch.Tensor) -> torch.Tensor:
    """Nuclear-density proxies from the haematoxylin channel (B, 1, H, W) → (B, 8)."""
    smooth = F.avg_pool2d(haem, 3, stride=1, padding=1, count_include_pad=False)
    flat = smooth.flatten(1)
    areas = [(flat > t).float().mean(1) for t in (0.4, 0.7, 1.0)]
    n_px = flat.shape[1]
    peaks = (smooth == _max_filter(smooth, 5)) & (smooth > 0.6)
    peak_density = peaks.flatten(1).float().sum(1) * (1000.0 / n_px)
    coarse = F.avg_pool2d(haem, 2)
    coarse_peaks = (coarse == _max_filter(coarse, 5)) & (coarse > 0.6)
    coarse_density = coarse_peaks.flatten(1).float().sum(1) * (1000.0 / coarse[0, 0].numel())
    mask = (flat > 0.7).float()
    nuc_mean = (flat * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    blob_size = areas[1] * n_px / (peaks.flatten(1).float().sum(1) + 1.0) / 100.0
    m2 = (smooth > 0.7).float()
    boundary = (m2[..., 1:, :] != m2[..., :-1, :]).float().mean((1, 2, 3)) + (
        m2[..., :, 1:] != m2[..., :, :-1]
    ).float().mean((1, 2, 3))
    return torch.stack([*areas, peak_density, coarse_density, nuc_mean, blob_size, boundary], 1)


@register_encoder(
    "builtin",
    dim=BUILTIN_DIM,
    input_px=None,
    mean=None,
    std=None,
    mpp=None,
    pooling="handcrafted",
    licence="Apache-2.0 (part of wsi-mil; no weights)",
    source="wsi-mil (colour deconvolution, texture and nuclear-density features)",
    architecture="hand-crafted features, torch",
    needs_weights=False,
)
def build_builtin(spec: EncoderSpec) -> HandcraftedFeatures:
    """Build the weight-free hand-crafted feature extractor."""
    return HandcraftedFeatures()
