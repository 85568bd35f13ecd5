"""A large real-tissue test slide, mosaicked from a small real scan (benchmark helper).

:func:`make_mosaic_slide` writes an Aperio-style pyramidal SVS (tiled JPEG, levels
downsampled by 4, ``MPP`` in the description) of ``size x size`` level-0 pixels at
0.5 µm/px: copies of the source scan (flipped and rotated by multiples of 90°), each in
its own cell of a regular grid with a random offset, some cells left empty, on the
source's own background colour. OpenSlide, tiffslide and every peer read it like a scan.

Level 0 is rendered one strip of tiles at a time (bounded memory); level 1 is rendered
from 4× box-downsampled copies and the coarser levels box-downsampled from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["make_mosaic_slide"]

_TILE = 256
_FACTOR = 4


def _variants(src: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of ``src`` (uint8 (h, w, 3))."""
    out = []
    for k in range(4):
        rot = np.rot90(src, k)
        out += [np.ascontiguousarray(rot), np.ascontiguousarray(rot[:, ::-1])]
    return out


def _layout(size: int, cell: int, shapes: list[tuple[int, int]], fill: float, seed: int):
    """Placements ``(x, y, variant)``: one copy in each kept cell, offsets multiples of 16."""
    rng = np.random.default_rng(seed)
    placements = []
    n = size // cell
    for r in range(n):
        for c in range(n):
            if rng.random() > fill:
                continue
            v = int(rng.integers(len(shapes)))
            h, w = shapes[v]
            x = c * cell + int(rng.integers(0, max(1, cell - w) // 16 + 1)) * 16
            y = r * cell + int(rng.integers(0, max(1, cell - h) // 16 + 1)) * 16
            placements.append((x, y, v))
    return placements


def _paste(canvas: np.ndarray, x0: int, y0: int, placements, images) -> None:
    """Paste every placement overlapping ``canvas`` whose origin is level (x0, y0)."""
    ch, cw = canvas.shape[:2]
    for x, y, v in placements:
        img = images[v]
        h, w = img.shape[:2]
        ax, ay = max(x, x0), max(y, y0)
        bx, by = min(x + w, x0 + cw), min(y + h, y0 + ch)
        if ax < bx and ay < by:
            canvas[ay - y0 : by - y0, ax - x0 : bx - x0] = img[ay - y : by - y, ax - x : bx - x]


def _strips(size, placements, images, background) -> Iterator[np.ndarray]:
    for y0 in range(0, size, _TILE):
        strip = np.empty((_TILE, -(-size // _TILE) * _TILE, 3), np.uint8)
        strip[:] = background
        _paste(strip, 0, y0, placements, images)
        for x0 in range(0, size, _TILE):
            yield strip[:, x0 : x0 + _TILE]


def _tiles(img: np.ndarray) -> Iterator[np.ndarray]:
    h, w = img.shape[:2]
    for y in range(0, h, _TILE):
        for x in range(0, w, _TILE):
            tile = np.zeros((_TILE, _TILE, 3), np.uint8)
            part = img[y : y + _TILE, x : x + _TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def _box(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    blocks = img[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.uint32)
    return ((blocks.sum(axis=(1, 3)) + f * f // 2) // (f * f)).astype(np.uint8)


def make_mosaic_slide(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    size: int = 30_000,
    *,
    mpp: float = 0.5,
    cell: int = 3_000,
    fill: float = 0.85,
    seed: int = 7,
    quality: int = 80,
) -> Path:
    """Write the mosaic slide (if ``path`` does not exist yet) and return ``path``.

    Args:
        source: A small real scan OpenSlide reads (e.g. ``CMU-1-Small-Region.svs``).
        path: Output ``.svs`` (written to a temporary name, then renamed).
        size: Side of level 0 in pixels.
        mpp: Level-0 µm/px written into the description.
        cell: Side of the grid cells holding one copy each (≥ the source's long side).
        fill: Fraction of cells holding a copy.
        seed: Layout seed.
        quality: JPEG quality.
    """
    import openslide
    import tifffile

    path = Path(path)
    if path.exists():
        return path
    with openslide.OpenSlide(str(source)) as src:
        rgba = np.asarray(src.read_region((0, 0), 0, src.dimensions))
    rgb = np.ascontiguousarray(rgba[..., :3])
    bright = rgb.reshape(-1, 3)[rgb.reshape(-1, 3).min(axis=1) > 225]
    background = np.median(bright, axis=0).astype(np.uint8) if len(bright) else (240, 240, 240)
    images = _variants(rgb)
    placements = _layout(size, cell, [im.shape[:2] for im in images], fill, seed)
    small = [_box(im[: im.shape[0] // 4 * 4, : im.shape[1] // 4 * 4], _FACTOR) for im in images]
    level1 = np.empty((size // _FACTOR, size // _FACTOR, 3), np.uint8)
    level1[:] = background
    _paste(level1, 0, 0, [(x // 4, y // 4, v) for x, y, v in placements], small)
    levels = [level1]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(_box(levels[-1], _FACTOR))
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] "
        f"({_TILE}x{_TILE}) JPEG/RGB Q={quality}|AppMag = {10 / mpp:g}|"
        f"Filename = mosaic|MPP = {mpp:.4f}"
    )
    common = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality},
              "tile": (_TILE, _TILE), "metadata": None}  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(_strips(size, placements, images, background), shape=(size, size, 3),
                  dtype=np.uint8, description=desc, **common)  # fmt: skip
        thumb = levels[-1]
        tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                  description=f"Aperio Image Library v12.0.15\r\n{size}x{size} -> "
                  f"{thumb.shape[1]}x{thumb.shape[0]}")  # fmt: skip
        for level in levels:
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, **common)
    tmp.replace(path)
    return path
