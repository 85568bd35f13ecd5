"""Zoomable outputs: a pyramidal tiled TIFF of the overlay and Deep Zoom (DZI) images.

* ``<slide_id>_overlay.tif`` — the colour-mapped scores (white where there is none) as a
  tiled, JPEG-compressed pyramid whose level 0 has the slide's level-0 size, so pixel
  ``(x, y)`` of the overlay is pixel ``(x, y)`` of the slide at every level (each level
  halves the previous one, sizes rounded up). The µm/px of each level is in the
  resolution tags. OpenSlide (generic tiled TIFF), tiffslide and QuPath open it. It is
  written tile by tile from the score raster, so memory stays small for any slide.
* Deep Zoom: ``<name>.dzi`` (XML) and ``<name>_files/<level>/<col>_<row>.<ext>`` with
  256 px tiles and no overlap; level ``L`` is the image downsampled ``2**(max - L)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from wsi_mil.outputs import atomic_path

__all__ = ["TILE", "dzi_levels", "write_dzi", "write_overlay_tiff"]

TILE = 256


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """Level sizes from ``(width, height)`` halving (rounded up) until one tile fits."""
    sizes = [(width, height)]
    while max(sizes[-1]) > TILE:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def _raster_tiles(
    rgb: np.ndarray, raster_scale: float, size: tuple[int, int], downsample: float
) -> Iterator[np.ndarray]:
    """Tiles (TILE, TILE, 3) of one pyramid level, row by row, sampled from ``rgb``.

    Level pixel ``j`` has its centre at level-0 ``(j + 0.5) * downsample``; it takes the
    raster pixel under that centre.
    """
    width, height = size
    rows, cols = rgb.shape[:2]
    for y0 in range(0, height, TILE):
        ri = np.clip(
            ((y0 + np.arange(TILE) + 0.5) * downsample / raster_scale).astype(np.int64), 0, rows - 1
        )
        for x0 in range(0, width, TILE):
            ci = np.clip(
                ((x0 + np.arange(TILE) + 0.5) * downsample / raster_scale).astype(np.int64),
                0,
                cols - 1,
            )
            yield rgb[ri[:, None], ci[None, :]]


def write_overlay_tiff(
    path: Path,
    rgb: np.ndarray,
    raster_scale: float,
    dimensions: tuple[int, int],
    slide_mpp: float,
    description: str,
) -> Path:
    """Write the overlay as a pyramidal tiled TIFF aligned with the slide's level 0.

    Args:
        path: Output ``.tif`` (written atomically).
        rgb: (rows, cols, 3) uint8 colours of the score raster (white where no score).
        raster_scale: Level-0 px per raster px.
        dimensions: Slide level-0 ``(width, height)``.
        slide_mpp: Level-0 µm/px (resolution tags).
        description: ImageDescription of level 0.
    """
    import tifffile

    width, height = dimensions
    sizes = _level_sizes(width, height)
    big = width * height * 3 > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        for level, (w, h) in enumerate(sizes):
            downsample = 2.0**level
            per_cm = 1e4 / (slide_mpp * downsample)
            tw.write(
                _raster_tiles(rgb, raster_scale, (w, h), downsample),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=0 if level == 0 else 1,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                description=description if level == 0 else None,
                metadata=None,
            )
    return path


def dzi_levels(width: int, height: int) -> int:
    """Index of the full-size Deep Zoom level, ``ceil(log2(max(width, height)))``."""
    return max(0, math.ceil(math.log2(max(width, height, 1))))


def write_dzi(
    path: Path,
    size: tuple[int, int],
    read: Callable[[int, int, int, int, float], np.ndarray],
    fmt: str,
) -> Path:
    """Write a Deep Zoom image.

    Args:
        path: Output ``<name>.dzi``; tiles go to ``<name>_files/`` (both atomic).
        size: Full-size ``(width, height)`` of the image.
        read: ``read(x, y, w, h, f)`` returns (h, w, C) uint8 of the full-size region
            ``[x, x + w*f) x [y, y + h*f)`` downsampled by ``f`` to ``w x h``.
        fmt: ``"jpeg"`` (RGB) or ``"png"`` (RGBA allowed).

    Returns:
        ``path``.
    """
    from PIL import Image

    width, height = size
    top = dzi_levels(width, height)
    files = path.with_name(f"{path.stem}_files")
    ext = "jpeg" if fmt == "jpeg" else "png"
    with atomic_path(files) as tmp_dir:
        for level in range(top + 1):
            f = 2.0 ** (top - level)
            lw, lh = max(1, math.ceil(width / f)), max(1, math.ceil(height / f))
            folder = tmp_dir / str(level)
            folder.mkdir(parents=True)
            for row, y in enumerate(range(0, lh, TILE)):
                for col, x in enumerate(range(0, lw, TILE)):
                    w, h = min(TILE, lw - x), min(TILE, lh - y)
                    tile = Image.fromarray(read(round(x * f), round(y * f), w, h, f))
                    out = folder / f"{col}_{row}.{ext}"
                    if ext == "jpeg":
                        tile.convert("RGB").save(out, format="JPEG", quality=85)
                    else:
                        tile.save(out, format="PNG")
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{ext}" '
        f'Overlap="0" TileSize="{TILE}"><Size Width="{width}" Height="{height}"/></Image>\n'
    )
    with atomic_path(path) as tmp:
        tmp.write_text(xml)
    return path
