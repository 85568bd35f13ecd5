"""Quality-control outputs: an overlay PNG and QuPath-importable tissue GeoJSON.

Both are drawn from a thumbnail/mask at ``mask_mpp`` whose scale to level 0 is
``(sx, sy)`` level-0 pixels per mask pixel (mask pixel ``(r, c)`` covers level-0
``[c·sx, (c+1)·sx) × [r·sy, (r+1)·sy)``).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsi_mil.outputs import atomic_path

__all__ = ["qc_overlay", "save_qc_png", "save_tissue_geojson", "tissue_geojson"]

_OUTLINE = (0, 120, 255)
_TILE = (255, 200, 0)
_REGIONS = (230, 0, 200)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask (tissue pixels with a 4-neighbour outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~inner


def _line(mask: np.ndarray, k: int) -> np.ndarray:
    """Outline (bool (h·k, w·k)) of a bool (h, w) mask enlarged ``k`` times."""
    big = np.repeat(np.repeat(mask, k, axis=0), k, axis=1) if k > 1 else mask
    line = _outline(big)
    if k > 2:  # thicken the outline on enlarged images
        thick = line.copy()
        thick[1:] |= line[:-1]
        thick[:, 1:] |= line[:, :-1]
        line = thick
    return line


def qc_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    coords: np.ndarray,
    tile_level0: float,
    scale: tuple[float, float],
    *,
    min_side: int = 800,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """Thumbnail with the tissue outline (blue), the kept tiles (yellow boxes) and the
    outline of annotated regions (magenta), if any.

    Args:
        thumbnail: uint8 (h, w, 3) at the mask's resolution.
        mask: bool (h, w) tissue mask.
        coords: int64 (N, 2) level-0 (x, y) of the kept tiles.
        tile_level0: Tile side in level-0 pixels.
        scale: (sx, sy) level-0 pixels per thumbnail pixel.
        min_side: Small thumbnails are enlarged (integer factor) to at least this.
        regions: bool (h, w) where annotations allowed tiles, or None.

    Returns:
        uint8 (H, W, 3) image.
    """
    h, w = mask.shape
    k = max(1, int(np.ceil(min_side / max(1, max(h, w)))))
    img = np.ascontiguousarray(thumbnail[..., :3], dtype=np.uint8)
    if k > 1:
        img = np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    img = img.copy()
    img[_line(mask, k)] = _OUTLINE
    if regions is not None:
        img[_line(regions, k)] = _REGIONS
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    fx, fy = k / scale[0], k / scale[1]
    for x, y in np.asarray(coords).reshape(-1, 2):
        x0, y0 = x * fx, y * fy
        draw.rectangle(
            [x0, y0, x0 + tile_level0 * fx - 1, y0 + tile_level0 * fy - 1], outline=_TILE
        )
    return np.asarray(pil)


def save_qc_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a uint8 (H, W, 3) image as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def tissue_geojson(
    mask: np.ndarray, scale: tuple[float, float], *, name: str = "Tissue"
) -> dict[str, Any]:
    """Tissue regions as a GeoJSON FeatureCollection in level-0 coordinates.

    Each connected tissue region becomes one ``Polygon`` feature (outer ring first, then
    its holes), classified as ``name`` so QuPath imports it as an annotation.

    Args:
        mask: bool (h, w) tissue mask.
        scale: (sx, sy) level-0 pixels per mask pixel.
        name: Classification name.

    Returns:
        A GeoJSON FeatureCollection (dict).
    """
    import contourpy

    features: list[dict[str, Any]] = []
    if mask.any():
        padded = np.pad(np.asarray(mask, np.float64), 1)
        gen = contourpy.contour_generator(z=padded, fill_type="OuterOffset", name="serial")
        filled: Any = gen.filled(0.5, 2.0)
        points, offsets = filled[0], filled[1]
        sx, sy = scale
        for pts, offs in zip(points, offsets, strict=True):
            rings = []
            for a, b in itertools.pairwise(offs):
                ring = pts[a:b]
                xy = np.column_stack([(ring[:, 0] - 0.5) * sx, (ring[:, 1] - 0.5) * sy])
                xy = np.round(xy, 2)
                if not np.array_equal(xy[0], xy[-1]):
                    xy = np.vstack([xy, xy[:1]])
                rings.append(xy.tolist())
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": [0, 120, 255]},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def save_tissue_geojson(
    path: str | os.PathLike[str], mask: np.ndarray, scale: tuple[float, float]
) -> Path:
    """Write :func:`tissue_geojson` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(tissue_geojson(mask, scale)))
    return path
