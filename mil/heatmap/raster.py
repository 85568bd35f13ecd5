"""Tile scores drawn on a pixel grid: overlap averaging, tissue restriction, smoothing.

A raster of scale ``s`` has pixel ``(r, c)`` covering level-0 ``[c*s, (c+1)*s) x
[r*s, (r+1)*s)``. A tile covers the raster pixels whose centres fall inside it (at
least the pixel under its centre, so tiles smaller than a pixel still count). Where
tiles overlap (``tile --stride-px`` below the tile size) a pixel takes the **mean** of
the scores of every tile covering it; pixels covered by no tile, or outside the tissue,
have no value (NaN) and are left uncoloured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["ColourScale", "Raster", "colourise", "rasterise", "tile_average"]


def _span(start: np.ndarray, side: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last raster index (along one axis) covered by each tile."""
    lo = np.ceil(start / scale - 0.5).astype(np.int64)
    hi = np.ceil((start + side) / scale - 0.5).astype(np.int64)
    tiny = hi <= lo
    centre = np.floor((start + side / 2) / scale).astype(np.int64)
    lo = np.where(tiny, centre, lo)
    hi = np.where(tiny, centre + 1, hi)
    return lo, hi


def tile_average(
    coords: np.ndarray,
    side: float,
    values: np.ndarray,
    scale: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per raster pixel over the tiles covering it.

    Uses summed-area (difference) arrays, so the cost is O(N + rows * cols) whatever the
    overlap.

    Args:
        coords: (N, 2) level-0 (x, y) of the tiles' top-left corners.
        side: Tile side in level-0 px.
        values: (N,) scores.
        scale: Level-0 px per raster px.
        shape: Raster ``(rows, cols)``.

    Returns:
        ``(mean (rows, cols) float64, NaN where no tile; count (rows, cols) int64)``.
    """
    rows, cols = shape
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    c0, c1 = (np.clip(v, 0, cols) for v in _span(xy[:, 0], side, scale))
    r0, r1 = (np.clip(v, 0, rows) for v in _span(xy[:, 1], side, scale))
    v = np.asarray(values, np.float64)
    total = _box_sum((rows, cols), r0, r1, c0, c1, v)
    count = np.rint(_box_sum((rows, cols), r0, r1, c0, c1, np.ones_like(v))).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean, count


def _box_sum(
    shape: tuple[int, int],
    r0: np.ndarray,
    r1: np.ndarray,
    c0: np.ndarray,
    c1: np.ndarray,
    v: np.ndarray,
) -> np.ndarray:
    """Sum over boxes ``[r0, r1) x [c0, c1)`` of weights ``v`` (rows, cols) float64."""
    rows, cols = shape
    acc = np.zeros((rows + 1, cols + 1), np.float64)
    np.add.at(acc, (r0, c0), v)
    np.add.at(acc, (r0, c1), -v)
    np.add.at(acc, (r1, c0), -v)
    np.add.at(acc, (r1, c1), v)
    return acc.cumsum(axis=0).cumsum(axis=1)[:rows, :cols]


@dataclass
class Raster:
    """Scores on a pixel grid.

    Attributes:
        value: (rows, cols) float64 score; NaN where there is none.
        scale: Level-0 px per raster px.
        mpp: µm/px of the raster.
    """

    value: np.ndarray
    scale: float
    mpp: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (int(self.value.shape[0]), int(self.value.shape[1]))


def rasterise(
    coords: np.ndarray,
    side: float,
    values: np.ndarray,
    *,
    dimensions: tuple[int, int],
    scale: float,
    slide_mpp: float,
    tissue: np.ndarray | None = None,
    sigma_um: float = 0.0,
) -> Raster:
    """Average tile scores onto a grid covering the slide, over tissue only, smoothed.

    Smoothing is a normalised Gaussian convolution within the scored tissue: pixels
    without a score neither contribute nor receive a value, so borders are not pulled
    towards zero.

    Args:
        coords: (N, 2) level-0 tile corners.
        side: Tile side in level-0 px.
        values: (N,) scores (already normalised as wanted).
        dimensions: Slide level-0 ``(width, height)``.
        scale: Level-0 px per raster px.
        slide_mpp: Level-0 µm/px.
        tissue: Optional (rows, cols) bool tissue mask on this grid; pixels outside it
            get no value.
        sigma_um: Gaussian σ in µm (0 = no smoothing).

    Returns:
        :class:`Raster` of shape ``(ceil(height / scale), ceil(width / scale))``.
    """
    width, height = dimensions
    shape = (max(1, int(np.ceil(height / scale))), max(1, int(np.ceil(width / scale))))
    mean, count = tile_average(coords, side, values, scale, shape)
    keep = count > 0
    if tissue is not None:
        keep &= tissue.astype(bool)
    mpp = scale * slide_mpp
    if sigma_um > 0:
        from scipy.ndimage import gaussian_filter

        sigma = sigma_um / mpp
        weight = keep.astype(np.float64)
        num = gaussian_filter(np.where(keep, mean, 0.0), sigma, mode="constant")
        den = gaussian_filter(weight, sigma, mode="constant")
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = num / den
    return Raster(np.where(keep, mean, np.nan), float(scale), float(mpp))


@dataclass
class ColourScale:
    """How scores become colours.

    Attributes:
        cmap: A matplotlib colormap name.
        vmin: Score shown with the colormap's first colour.
        vmax: Score shown with its last colour.
        label: What the scale shows (written beside the colour bar).
    """

    cmap: str
    vmin: float
    vmax: float
    label: str

    def rgba(self, value: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        """(..., 4) uint8 colours of ``value``; transparent where it is NaN."""
        return colourise(value, self, alpha)


def colourise(value: np.ndarray, scale: ColourScale, alpha: float = 1.0) -> np.ndarray:
    """Colour-map scores.

    Args:
        value: (...) scores, NaN = none.
        scale: Colormap and range.
        alpha: Opacity of scored pixels (0-1).

    Returns:
        (..., 4) uint8 RGBA; alpha 0 where ``value`` is NaN.
    """
    span = scale.vmax - scale.vmin
    t = (np.nan_to_num(value, nan=scale.vmin) - scale.vmin) / (span if span > 0 else 1.0)
    lut = _lut(scale.cmap)
    n = len(lut)
    # the index matplotlib's colormap takes for t in [0, 1]: floor(t * N), N -> N - 1
    index = np.minimum((np.clip(t, 0.0, 1.0) * n).astype(np.intp), n - 1)
    out = lut[index]
    out[..., 3] = np.where(np.isnan(value), 0, round(255 * alpha))
    return out


@functools.lru_cache(maxsize=16)
def _lut(cmap: str) -> np.ndarray:
    """(N, 4) uint8 colours of a matplotlib colormap's lookup table (N = ``cmap.N``)."""
    from matplotlib import colormaps

    colours = colormaps[cmap]
    return (colours(np.arange(colours.N)) * 255).round().astype(np.uint8)
