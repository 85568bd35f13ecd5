"""Tile grids: which tiles of a slide hold enough tissue.

Tiles are ``tile_px`` pixels at ``target_mpp`` µm/px, i.e. ``tile_px * target_mpp / mpp``
level-0 pixels wide, placed every ``stride_px`` target pixels from the slide's top-left
corner and lying entirely inside the slide. A tile's tissue fraction is the exact
area-weighted mean of the tissue mask over the tile's footprint, computed from an
integral image of the mask (bilinear interpolation of the integral image is exact for a
piecewise-constant mask), so it does not depend on how the footprint aligns with mask
pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["TileGrid", "integral_image", "tile_grid"]


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of a slide.

    Attributes:
        coords: int64 (N, 2) level-0 (x, y) of each kept tile's top-left corner, in
            row-major grid order (by y, then x).
        tissue: float32 (N,) tissue fraction of each kept tile.
        index: int64 (N, 2) (row, col) grid position of each kept tile.
        grid_shape: (rows, cols) of the full grid.
        tile_level0: Tile side in level-0 pixels (float).
        stride_level0: Grid step in level-0 pixels (float).
    """

    coords: np.ndarray
    tissue: np.ndarray
    index: np.ndarray
    grid_shape: tuple[int, int]
    tile_level0: float
    stride_level0: float

    @property
    def n_tiles(self) -> int:
        """Number of kept tiles."""
        return int(self.coords.shape[0])


@njit(cache=True)
def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a bool/uint8 mask.

    Args:
        mask: (h, w) bool or integer.

    Returns:
        int64 (h + 1, w + 1) with ``out[i, j] = mask[:i, :j].sum()``.
    """
    h, w = mask.shape
    out = np.zeros((h + 1, w + 1), np.int64)
    for i in range(h):
        acc = 0
        for j in range(w):
            acc += 1 if mask[i, j] else 0
            out[i + 1, j + 1] = out[i, j + 1] + acc
    return out


@njit(cache=True)
def _area_at(ii: np.ndarray, u: float, v: float) -> float:
    """Integral of the mask over [0, u) × [0, v) (continuous mask coordinates)."""
    h = ii.shape[0] - 1
    w = ii.shape[1] - 1
    u = min(max(u, 0.0), float(w))
    v = min(max(v, 0.0), float(h))
    j0 = min(int(u), w - 1) if w > 0 else 0
    i0 = min(int(v), h - 1) if h > 0 else 0
    fu = u - j0
    fv = v - i0
    a = ii[i0, j0]
    b = ii[i0, j0 + 1]
    c = ii[i0 + 1, j0]
    d = ii[i0 + 1, j0 + 1]
    return a * (1 - fu) * (1 - fv) + b * fu * (1 - fv) + c * (1 - fu) * fv + d * fu * fv


@njit(cache=True)
def _grid_fractions(
    ii: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    tile: float,
    sx: float,
    sy: float,
) -> np.ndarray:
    """Tissue fraction of every grid tile (float32 (len(ys), len(xs)))."""
    out = np.zeros((ys.shape[0], xs.shape[0]), np.float32)
    area = (tile / sx) * (tile / sy)
    for r in range(ys.shape[0]):
        y0 = float(ys[r])
        v0 = y0 / sy
        v1 = (y0 + tile) / sy
        for c in range(xs.shape[0]):
            x0 = float(xs[c])
            u0 = x0 / sx
            u1 = (x0 + tile) / sx
            s = (
                _area_at(ii, u1, v1)
                - _area_at(ii, u0, v1)
                - _area_at(ii, u1, v0)
                + _area_at(ii, u0, v0)
            )
            out[r, c] = min(1.0, max(0.0, s / area))
    return out


def _grid_count(extent: int, tile: float, stride: float) -> int:
    """Number of tiles of side ``tile`` every ``stride`` fitting in ``extent`` px."""
    if extent + 1e-6 < tile:
        return 0
    return math.floor((extent - tile) / stride + 1e-9) + 1


def _positions(n: int, stride: float, last: float) -> np.ndarray:
    """Level-0 offsets (int64 (n,)) of ``n`` grid steps, none beyond ``last``."""
    pos = np.floor(np.arange(n) * stride + 0.5)
    return np.minimum(pos, max(0.0, math.floor(last + 1e-6))).astype(np.int64)


def tile_grid(
    mask: np.ndarray,
    dimensions: tuple[int, int],
    *,
    mpp: float,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    stride_px: int | None = None,
    min_tissue: float = 0.5,
    mask_scale: tuple[float, float] | None = None,
) -> TileGrid:
    """Tiles of a slide whose tissue fraction reaches ``min_tissue``.

    Args:
        mask: bool (h, w) tissue mask covering the whole slide, mask pixel (r, c)
            covering level-0 ``[c·sx, (c+1)·sx) × [r·sy, (r+1)·sy)``.
        dimensions: Slide (width, height) in level-0 pixels.
        mpp: Level-0 resolution in µm/px.
        target_mpp: Resolution of the tiles in µm/px.
        tile_px: Tile side in pixels at ``target_mpp``.
        stride_px: Grid step in pixels at ``target_mpp`` (default ``tile_px``: no overlap).
        min_tissue: Minimum tissue fraction (0–1) of a kept tile; 0 keeps every tile.
        mask_scale: (sx, sy) level-0 pixels per mask pixel, when the mask may extend
            past the slide (e.g. ``mask_mpp / mpp`` for ``Slide.get_thumbnail(mpp=...)``);
            default ``(width / w, height / h)``.

    Returns:
        The kept tiles.

    Raises:
        ValueError: A size or fraction is out of range.
    """
    stride_px = tile_px if stride_px is None else stride_px
    if tile_px <= 0 or stride_px <= 0:
        raise ValueError(f"tile_px and stride_px must be positive, got {tile_px}, {stride_px}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within 0..1, got {min_tissue}")
    if mpp <= 0 or target_mpp <= 0:
        raise ValueError(f"mpp and target_mpp must be positive, got {mpp}, {target_mpp}")
    width, height = int(dimensions[0]), int(dimensions[1])
    tile = tile_px * target_mpp / mpp
    stride = stride_px * target_mpp / mpp
    n_cols = _grid_count(width, tile, stride)
    n_rows = _grid_count(height, tile, stride)
    xs = _positions(n_cols, stride, width - tile)
    ys = _positions(n_rows, stride, height - tile)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if n_rows == 0 or n_cols == 0 or mask.size == 0:
        fractions = np.zeros((n_rows, n_cols), np.float32)
    else:
        if mask_scale is None:
            sx, sy = width / mask.shape[1], height / mask.shape[0]
        else:
            sx, sy = float(mask_scale[0]), float(mask_scale[1])
        fractions = _grid_fractions(integral_image(mask), xs, ys, tile, sx, sy)
    keep = fractions >= np.float32(min_tissue) if min_tissue > 0 else np.ones_like(fractions, bool)
    rows, cols = np.nonzero(keep)
    coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    return TileGrid(
        coords=coords.reshape(-1, 2),
        tissue=fractions[rows, cols].astype(np.float32),
        index=np.stack([rows, cols], axis=1).astype(np.int64).reshape(-1, 2),
        grid_shape=(n_rows, n_cols),
        tile_level0=tile,
        stride_level0=stride,
    )
