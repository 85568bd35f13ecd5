"""The PNG figure: the plain slide beside the overlay, with a caption and colour scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.mil.heatmap.raster import ColourScale, Raster
from wsi_mil.outputs import atomic_path

__all__ = ["blend", "colour_bar", "font", "write_png"]

_GAP = 8  # px between the two panels
_PNG_LEVEL = 3  # zlib level: about twice as fast as the default 6, files no larger


def blend(image: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """Alpha-blend ``rgba`` (rows, cols, 4) uint8 over ``image`` (rows, cols, 3) uint8."""
    a = rgba[..., 3:4].astype(np.uint16)
    mixed = image.astype(np.uint16) * (255 - a) + rgba[..., :3].astype(np.uint16) * a
    return ((mixed + 127) // 255).astype(np.uint8)  # rounded; exact in integers


def colour_bar(width: int, scale: ColourScale) -> np.ndarray:
    """A strip (rows, width, 3) uint8: the colour ramp with its end values and meaning."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    rows = max(40, width // 30)
    strip = Image.new("RGB", (width, rows), (255, 255, 255))
    pad = max(4, rows // 6)
    bar_w = max(16, width // 3)
    bar_h = rows // 2 - pad
    ramp = (colormaps[scale.cmap](np.linspace(0, 1, bar_w))[:, :3] * 255).round()
    bar = np.repeat(ramp[None].astype(np.uint8), bar_h, axis=0)
    strip.paste(Image.fromarray(bar), (pad, pad))
    draw = ImageDraw.Draw(strip)
    face = font(max(10, rows // 4))
    draw.text((pad, pad + bar_h + 2), f"{scale.vmin:.3g}", fill=(0, 0, 0), font=face)
    draw.text(
        (pad + bar_w, pad + bar_h + 2), f"{scale.vmax:.3g}", fill=(0, 0, 0), font=face, anchor="ra"
    )
    draw.text(
        (2 * pad + bar_w, pad + bar_h // 2), scale.label, fill=(0, 0, 0), font=face, anchor="lm"
    )
    return np.asarray(strip)


def font(size: int) -> Any:
    """DejaVu Sans from matplotlib (it has µ, σ and dashes), else Pillow's default font."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError):
        return ImageFont.load_default(size=size)


def _caption(width: int, lines: list[str]) -> np.ndarray:
    """White band (rows, width, 3) uint8 with ``lines`` of text."""
    from PIL import Image, ImageDraw

    size = max(11, min(22, width // 60))
    rows = (size + 6) * len(lines) + 8
    band = Image.new("RGB", (width, rows), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    face = font(size)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * (size + 6)), line, fill=(0, 0, 0), font=face)
    return np.asarray(band)


def write_png(
    path: Path,
    plain: np.ndarray,
    raster: Raster,
    scale: ColourScale,
    alpha: float,
    caption: list[str],
) -> Path:
    """Write ``[plain | overlay]`` with a caption above and the colour scale below.

    Args:
        path: Output ``.png`` (written atomically).
        plain: (rows, cols, 3) uint8 slide image at the raster's resolution.
        raster: Scores on the same grid as ``plain`` (cropped/padded to it).
        scale: Colours.
        alpha: Overlay opacity.
        caption: Lines written above the panels (slide, prediction, model, score).
    """
    from PIL import Image

    rows, cols = plain.shape[:2]
    value = np.full((rows, cols), np.nan)
    r, c = min(rows, raster.shape[0]), min(cols, raster.shape[1])
    value[:r, :c] = raster.value[:r, :c]
    overlay = blend(plain, scale.rgba(value, alpha))
    gap = np.full((rows, _GAP, 3), 255, np.uint8)
    panels = np.hstack([plain, gap, overlay])
    width = panels.shape[1]
    image = np.vstack([_caption(width, caption), panels, colour_bar(width, scale)])
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=_PNG_LEVEL)
    return path
