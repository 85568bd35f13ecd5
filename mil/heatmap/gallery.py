"""Top-k and bottom-k tiles read from the slide at full resolution.

``topk/<slide_id>/top_<rank>_x<x>_y<y>_<score>.png`` (and ``bottom_...``) hold single
tiles, read from the slide at the tiles' µm/px (level 0 when unknown);
``topk/<slide_id>_top.png`` and ``_bottom.png`` are grids with each tile's rank,
coordinates and score written under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.mil.heatmap.scores import SlideScores
from wsi_mil.outputs import atomic_path, contained_path

__all__ = ["pick", "write_gallery"]

_PNG_LEVEL = 1  # zlib level of the tiles: 2-3 times faster than the default 6
_MAX_PX = 512  # tiles larger than this at level 0 are shrunk when the tile mpp is unknown


def pick(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest values (descending) and ``k`` lowest (ascending).

    Ties keep the tiles' order (stable sort).
    """
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")
    k = min(k, len(order))
    low = np.argsort(np.asarray(values, np.float64), kind="stable")[:k]
    return order[:k], low


def _read(slide: Any, scores: SlideScores, x: int, y: int) -> np.ndarray:
    """One tile (px, px, 3) uint8 at the tiles' resolution."""
    if scores.target_mpp and scores.tile_px:
        return np.asarray(slide.read_tile(x, y, scores.tile_px, scores.target_mpp))
    px = min(scores.side, _MAX_PX)
    return np.asarray(slide.read_tile(x, y, px, slide.mpp * scores.side / px))


def write_gallery(
    out_dir: Path, slide: Any, scores: SlideScores, values: np.ndarray, k: int
) -> dict[str, Path]:
    """Write the top-k / bottom-k tiles of ``values`` and their grids.

    Args:
        out_dir: The heatmap folder (``topk/`` is created in it).
        slide: The open slide (:class:`~wsi_mil.wsi.Slide`).
        scores: Tiles of the slide.
        values: (N,) the score ranked.
        k: Tiles per side.

    Returns:
        ``{"topk": grid of the top tiles, "bottomk": grid of the bottom tiles}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from wsi_mil.mil.heatmap.pyramid import encode_threads

    top, bottom = pick(values, k)
    sid = scores.slide_id
    paths: dict[str, Path] = {}
    # slide reads and PNG encoding release the GIL: a few threads use the cores
    with ThreadPoolExecutor(encode_threads()) as pool:
        saved = []
        for kind, idx in (("top", top), ("bottom", bottom)):
            xy = [tuple(int(v) for v in scores.coords[i]) for i in idx]
            read = pool.map(lambda c: _read(slide, scores, *c), xy)
            tiles, labels = [], []
            for rank, (i, (x, y), tile) in enumerate(zip(idx, xy, read, strict=True), start=1):
                name = f"{kind}_{rank:02d}_x{x}_y{y}_{float(values[i]):+.4g}.png"
                saved.append(pool.submit(_save, contained_path(out_dir, "topk", sid, name), tile))
                tiles.append(tile)
                labels.append(f"#{rank} ({x}, {y}) {float(values[i]):+.3g}")
            grid = contained_path(out_dir, "topk", f"{sid}_{kind}.png")
            saved.append(pool.submit(_save, grid, _grid(tiles, labels)))
            paths[f"{kind}k"] = grid
        for future in saved:
            future.result()
    return paths


def _save(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=_PNG_LEVEL)


def _grid(tiles: list[np.ndarray], labels: list[str], cols: int = 4) -> np.ndarray:
    """Tiles in a grid, each with its label under it (rows, cols, 3) uint8."""
    from PIL import Image, ImageDraw

    from wsi_mil.mil.heatmap.png import font

    if not tiles:
        return np.full((8, 8, 3), 255, np.uint8)
    px = max(t.shape[0] for t in tiles)
    text = max(14, px // 14)
    n_rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (px + 4), n_rows * (px + text + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    face = font(text - 2)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        r, c = divmod(i, cols)
        x0, y0 = c * (px + 4), r * (px + text + 8)
        sheet.paste(Image.fromarray(tile), (x0, y0))
        draw.text((x0 + 2, y0 + px + 2), label, fill=(0, 0, 0), font=face)
    return np.asarray(sheet)
