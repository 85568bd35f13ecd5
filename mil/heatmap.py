"""Attention heatmaps for pathologists: a PNG overlay and a QuPath GeoJSON.

* ``<slide_id>_heatmap.png`` — the slide thumbnail with each tile coloured by its
  attention rank (percentile within the slide, so a few extreme tiles do not wash out
  the rest), blended over the tissue;
* ``<slide_id>_attention.geojson`` — one square polygon per tile (level-0 pixels) with
  ``measurements`` ``attention`` and ``attention_percentile``, importable in QuPath
  (File → Import objects) and colourable by measurement there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError
from wsi_mil.mil.attention import SlideAttention, read_attention
from wsi_mil.outputs import atomic_path, contained_path

_CMAP = "inferno"

__all__ = ["attention_geojson", "find_attention", "percentiles", "render_heatmap", "tile_side"]


def find_attention(source: str | os.PathLike[str], slide_id: str) -> Path:
    """The attention file of ``slide_id``: ``source`` itself if it is an ``.h5``, else
    ``<source>/attention/<slide_id>.h5`` (a run folder) or ``<source>/<slide_id>.h5``.

    Raises:
        ConfigError: No attention file found.
    """
    src = Path(source)
    if src.is_file():
        return src
    for candidate in (src / "attention" / f"{slide_id}.h5", src / f"{slide_id}.h5"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no attention for slide {slide_id!r} under {src} (looked for attention/{slide_id}.h5); "
        "give a run folder of `wsi-mil train`/`predict` or an attention .h5"
    )


def tile_side(att: SlideAttention) -> int:
    """Tile side in level-0 px: the file's ``tile_level0``, else the grid spacing."""
    if att.attrs.get("tile_level0"):
        return round(float(att.attrs["tile_level0"]))
    steps = [np.diff(np.unique(att.coords[:, k])) for k in (0, 1)]
    positive = np.concatenate([s[s > 0] for s in steps])
    if positive.size == 0:
        raise ConfigError("cannot infer the tile size from a single tile; re-run prediction")
    return int(positive.min())


def percentiles(values: np.ndarray) -> np.ndarray:
    """Rank of each value in [0, 1] (ties share the mean rank)."""
    if len(values) <= 1:
        return np.ones(len(values))
    from scipy.stats import rankdata

    return (rankdata(values) - 1) / (len(values) - 1)


def attention_geojson(att: SlideAttention, side: int) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of tile squares with attention measurements.

    Each feature is a QuPath tile object (``objectType: "tile"``) whose polygon is in
    level-0 pixels, with ``measurements`` ``attention`` and ``attention_percentile`` and
    a ``color`` (the heatmap's colour of its percentile), so QuPath shows the heatmap on
    import and can re-colour it by either measurement.

    Args:
        att: One slide's attention (N tiles).
        side: Tile side in level-0 px.

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}`` with N features.
    """
    from matplotlib import colormaps

    pct = percentiles(att.attention)
    colours = (colormaps[_CMAP](pct)[:, :3] * 255).round().astype(int).tolist()
    features = []
    for (x, y), value, rank, rgb in zip(
        att.coords.tolist(), att.attention.tolist(), pct.tolist(), colours, strict=True
    ):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": "attention",
                    "color": rgb,
                    "measurements": {"attention": value, "attention_percentile": rank},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _overlay(
    thumb: np.ndarray, att: SlideAttention, side: int, scale: float, alpha: float
) -> np.ndarray:
    """Blend attention percentiles (colour-mapped) over the thumbnail (h, w, 3) uint8."""
    from matplotlib import colormaps

    h, w = thumb.shape[:2]
    value = np.full((h, w), np.nan, np.float32)
    pct = percentiles(att.attention)
    for (x, y), p in zip(att.coords, pct, strict=True):
        c0, r0 = int(x / scale), int(y / scale)
        c1, r1 = (
            max(c0 + 1, int(np.ceil((x + side) / scale))),
            max(r0 + 1, int(np.ceil((y + side) / scale))),
        )
        value[r0:r1, c0:c1] = p
    covered = ~np.isnan(value)
    colour = colormaps[_CMAP](np.nan_to_num(value))[..., :3] * 255
    out = thumb.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colour[covered]
    return out.clip(0, 255).astype(np.uint8)


def _legend(width: int) -> np.ndarray:
    """A colour-scale strip (rows, width, 3) uint8 to stack under the overlay.

    The bar runs from the least to the most attended tile of the slide (percentiles),
    with its meaning written beside it, so the PNG reads on its own.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    rows = max(28, width // 24)
    strip = Image.new("RGB", (width, rows), (255, 255, 255))
    pad = rows // 4
    bar_w = max(2, width // 3)
    ramp = colormaps[_CMAP](np.linspace(0, 1, bar_w))[:, :3] * 255
    bar = np.repeat(ramp[None].round().astype(np.uint8), rows - 2 * pad, axis=0)
    strip.paste(Image.fromarray(bar), (pad, pad))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=max(10, rows // 2 - 2))
    text = "attention percentile within the slide: low (left) to high (right)"
    draw.text((2 * pad + bar_w, rows // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(strip)


def _check_fits(
    att: SlideAttention, side: int, size: tuple[int, int], attention: Path, slide: Path
) -> None:
    """Refuse attention whose tiles lie outside the slide (a file of another slide)."""
    if not len(att.coords):
        raise ConfigError(f"{attention} has no tiles; nothing to draw")
    far = att.coords.max(axis=0)
    if far[0] >= size[0] or far[1] >= size[1] or att.coords.min() < 0:
        raise ConfigError(
            f"{attention}: tiles reach ({int(far[0])}, {int(far[1])}) but {slide} is "
            f"{size[0]} x {size[1]} px; the attention belongs to another slide - pass the "
            "slide it was computed on"
        )


def render_heatmap(
    attention: str | os.PathLike[str],
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_size: int = 2048,
    alpha: float = 0.55,
    mpp: float | None = None,
) -> dict[str, Path]:
    """Write the PNG overlay and the GeoJSON of one slide.

    Args:
        attention: An attention ``.h5`` (see :mod:`wsi_mil.mil.attention`).
        slide: The whole-slide image the attention belongs to.
        out_dir: Output folder.
        max_size: Longest side of the thumbnail in px.
        alpha: Opacity of the attention colours.
        mpp: Level-0 µm/px override for slides without one.

    Returns:
        ``{"png": path, "geojson": path}``.

    Raises:
        ConfigError: The attention file has no tiles or its tiles lie outside the slide.
        UnsafePathError: The slide id (from the attention file) is not a plain file name.
    """
    from PIL import Image

    from wsi_mil.wsi import open_slide

    att = read_attention(attention)
    side = tile_side(att)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide, mpp=mpp) as s:
        width, height = s.dimensions
        _check_fits(att, side, (width, height), Path(attention), Path(slide))
        thumb = s.get_thumbnail(size=(max_size, max_size))
        slide_id = str(att.attrs.get("slide_id") or s.slide_id)
    scale = width / thumb.shape[1]
    png = contained_path(out, f"{slide_id}_heatmap.png")
    with atomic_path(png) as tmp:
        image = np.vstack([_overlay(thumb, att, side, scale, alpha), _legend(thumb.shape[1])])
        Image.fromarray(image).save(tmp, format="PNG")
    geojson = contained_path(out, f"{slide_id}_attention.geojson")
    with atomic_path(geojson) as tmp:
        tmp.write_text(json.dumps(attention_geojson(att, side)))
    return {"png": png, "geojson": geojson}
