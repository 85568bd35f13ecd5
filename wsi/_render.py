"""Numba kernel that draws synthetic H&E pixels from low-resolution scene fields.

One pass per pixel, no large temporaries: interpolate the tissue / tumour / texture
fields bilinearly, add two jittered lattices of nuclei (at most one nucleus per lattice
cell, parameters hashed from the cell index so any region renders independently of the
others), wavy stroma fibres and a few debris specks, and composite onto the background.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numpy.typing import NDArray

__all__ = ["render_kernel"]

CELL_UM = 18.0  # nucleus lattice spacing (µm)
R_MAX_UM = 4.5  # largest nucleus radius (µm): (2.0 + 1.3) * 1.35 in tumour
EDGE = 0.04  # soft edge width of the tissue / tumour thresholds (field units)

_BG = (241.0, 240.0, 238.0)
_STROMA = (236.0, 166.0, 202.0)
_STROMA_T = (212.0, 146.0, 198.0)
_NUC = (104.0, 62.0, 146.0)
_NUC_T = (70.0, 38.0, 118.0)
_DEBRIS = (60.0, 52.0, 58.0)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0xBF58476D1CE4E5B9)
_M4 = np.uint64(0x94D049BB133111EB)
_OFF = np.int64(1 << 20)


@numba.njit(cache=True, nogil=True)
def _hash(ci: int, cj: int, salt: np.uint64) -> np.uint64:
    h = (np.uint64(ci + _OFF) * _M1) ^ (np.uint64(cj + _OFF) * _M2) ^ salt
    h = (h ^ (h >> np.uint64(30))) * _M3
    h = (h ^ (h >> np.uint64(27))) * _M4
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def _unit(h: np.uint64, k: int) -> float:
    """k-th 12-bit uniform [0, 1) value packed in a 64-bit hash."""
    return float((h >> np.uint64(12 * k)) & np.uint64(0xFFF)) / 4096.0


@numba.njit(cache=True, nogil=True)
def _axis(start: int, n: int, mpp: float, field_mpp: float, size: int) -> tuple:
    """Per-pixel µm positions, field indices and weights along one axis."""
    pos = np.empty(n)
    idx = np.empty(n, np.int64)
    frac = np.empty(n)
    for i in range(n):
        p = (start + i + 0.5) * mpp
        u = min(max(p / field_mpp - 0.5, 0.0), size - 1.0)
        i0 = min(int(u), size - 2) if size > 1 else 0
        pos[i] = p
        idx[i] = i0
        frac[i] = u - i0
    return pos, idx, frac


@numba.njit(cache=True, nogil=True, inline="always")
def _bilerp(fields: NDArray, k: int, j: int, i: int, s: float, t: float) -> float:
    top = fields[k, j, i] * (1 - t) + fields[k, j, i + 1] * t
    bot = fields[k, j + 1, i] * (1 - t) + fields[k, j + 1, i + 1] * t
    return top * (1 - s) + bot * s


@numba.njit(cache=True, nogil=True, inline="always")
def _lerp3(a: tuple, b: tuple, t: float) -> tuple:
    return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]), a[2] + t * (b[2] - a[2]))


@numba.njit(cache=True, nogil=True)
def render_kernel(
    out: NDArray[np.uint8],
    x0: int,
    y0: int,
    mpp: float,
    fields: NDArray[np.float32],
    field_mpp: float,
    tissue_thr: float,
    tumour_thr: float,
    debris: NDArray[np.float64],
    seed: int,
) -> None:
    """Draw level-0 pixels ``[x0, x0 + cols) x [y0, y0 + rows)`` into ``out``.

    Args:
        out: uint8 (rows, cols, 3), overwritten.
        x0: Level-0 x of ``out[:, 0]``.
        y0: Level-0 y of ``out[0]``.
        mpp: µm per level-0 pixel.
        fields: float32 (3, frows, fcols) tissue, tumour and texture fields, sampled
            at the centres of ``field_mpp`` pixels.
        field_mpp: µm per field pixel.
        tissue_thr: Tissue where the tissue field exceeds this.
        tumour_thr: Tumour where the tumour field exceeds this (inside tissue).
        debris: float64 (n, 3) specks as (x_um, y_um, radius_um).
        seed: Content seed.
    """
    rows, cols = out.shape[0], out.shape[1]
    _, frows, fcols = fields.shape
    xs, xi, xt = _axis(x0, cols, mpp, field_mpp, fcols)
    ys, yi, yt = _axis(y0, rows, mpp, field_mpp, frows)
    salts = (np.uint64(seed * 2 + 1) * _M4, np.uint64(seed * 2 + 2) * _M4)
    margin = R_MAX_UM
    span = CELL_UM - 2 * margin
    last_ci = np.full(2, -(1 << 40), np.int64)
    last_cj = np.full(2, -(1 << 40), np.int64)
    last_h = np.zeros(2, np.uint64)
    for r in range(rows):
        j, s = yi[r], yt[r]
        py = ys[r]
        for c in range(cols):
            i, t = xi[c], xt[c]
            alpha = min(max((_bilerp(fields, 0, j, i, s, t) - tissue_thr) / EDGE + 0.5, 0), 1)
            px = xs[c]
            colour = _BG
            if alpha > 0:
                tum = min(max((_bilerp(fields, 1, j, i, s, t) - tumour_thr) / EDGE + 0.5, 0), 1)
                stroma = _lerp3(_STROMA, _STROMA_T, tum)
                texture = _bilerp(fields, 2, j, i, s, t)
                fibre = 0.96 + 0.04 * math.sin(px * 0.9 + py * 0.35 + 4.0 * texture)
                tissue = (stroma[0] * fibre, stroma[1] * fibre, stroma[2] * fibre)
                cover, shade = 0.0, 0.0
                for lattice in range(2):
                    off = lattice * CELL_UM / 2
                    qx, qy = px + off, py + off
                    ci, cj = math.floor(qx / CELL_UM), math.floor(qy / CELL_UM)
                    if ci != last_ci[lattice] or cj != last_cj[lattice]:
                        last_ci[lattice], last_cj[lattice] = ci, cj
                        last_h[lattice] = _hash(ci, cj, salts[lattice])
                    h = last_h[lattice]
                    if _unit(h, 3) >= 0.12 + 0.55 * tum:
                        continue
                    dx = (qx - ci * CELL_UM - margin - _unit(h, 0) * span) * (
                        1.0 + 0.5 * _unit(h, 4)
                    )
                    dy = qy - cj * CELL_UM - margin - _unit(h, 1) * span
                    rad = (2.0 + 1.3 * _unit(h, 2)) * (1.0 + 0.35 * tum)
                    d2 = (dx * dx + dy * dy) / (rad * rad)
                    cov = min(max((1.0 - d2) * 3.0, 0.0), 1.0)
                    if cov > cover:
                        cover, shade = cov, min(d2, 1.0)
                if cover > 0:
                    nuc = _lerp3(_NUC, _NUC_T, tum)
                    g = 0.85 + 0.25 * shade
                    tissue = _lerp3(tissue, (nuc[0] * g, nuc[1] * g, nuc[2] * g), cover)
                colour = _lerp3(_BG, tissue, alpha)
            for d in range(debris.shape[0]):
                ddx, ddy, dr = px - debris[d, 0], py - debris[d, 1], debris[d, 2]
                if abs(ddx) < dr and abs(ddy) < dr:
                    cov = min(max((1.0 - (ddx * ddx + ddy * ddy) / (dr * dr)) * 4.0, 0.0), 1.0)
                    colour = _lerp3(colour, _DEBRIS, cov)
            for k in range(3):
                out[r, c, k] = np.uint8(min(max(colour[k] + 0.5, 0.0), 255.0))
