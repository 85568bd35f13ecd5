"""Deep Zoom images of a slide and its overlay, and one offline HTML viewer per folder.

For each slide: ``<slide_id>.dzi`` (the slide, down to ``dzi_mpp``),
``<slide_id>_overlay.dzi`` (the colour-mapped score raster, transparent where there is
no score) and ``<slide_id>_viewer.js`` (tile scores, top tiles, caption, colour scale).
For the folder: ``index.html`` — a slide list; choosing one opens the zoomable slide with
the overlay, an opacity slider, the tile score under the pointer and the top tiles
(click to zoom) — and ``viewer/`` with OpenSeadragon (BSD-3-Clause, from the npm
registry at build time, shipped as package data in ``mil/heatmap/assets``). The page
loads every file with ``<script>`` and ``<img>`` only, so it works from ``file://`` with
no network and no server.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.mil.heatmap.pyramid import write_dzi
from wsi_mil.mil.heatmap.raster import ColourScale, Raster
from wsi_mil.mil.heatmap.scores import SlideScores
from wsi_mil.outputs import atomic_path, contained_path

__all__ = ["ASSETS", "assets_dir", "write_index", "write_slide_dzi"]

#: Where ``make viewer-assets`` puts OpenSeadragon inside the package.
ASSETS = Path(__file__).parent / "assets" / "openseadragon"
_TEMPLATE = Path(__file__).parent / "templates" / "index.html"
_HOVER_TILES = 200_000  # tiles listed for the hover read-out
_READ_PX = 8192  # widest slide region read at once for the Deep Zoom image


def assets_dir() -> Path | None:
    """The OpenSeadragon files shipped with the package, or None when not installed."""
    return ASSETS if (ASSETS / "openseadragon.min.js").is_file() else None


def _dzi_source(name: str, fmt: str, size: tuple[int, int]) -> dict[str, Any]:
    """OpenSeadragon's inline form of a ``.dzi`` (no XML request, so ``file://`` works)."""
    return {
        "Image": {
            "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
            "Url": f"{name}_files/",
            "Format": fmt,
            "Overlap": "0",
            "TileSize": "256",
            "Size": {"Width": str(size[0]), "Height": str(size[1])},
        }
    }


def write_slide_dzi(
    out: Path,
    slide: Any,
    scores: SlideScores,
    raw: np.ndarray,
    norm: np.ndarray,
    raster: Raster,
    scale: ColourScale,
    opts: Any,
) -> dict[str, Path]:
    """Write the slide and overlay Deep Zoom images, the slide's viewer data and the
    folder's ``index.html``.

    Returns:
        ``{"dzi", "overlay_dzi", "viewer_data", "viewer"}`` (``viewer`` only when the
        OpenSeadragon assets are installed).
    """
    sid = scores.slide_id
    width, height = slide.dimensions
    dzi_mpp = max(slide.mpp, opts.dzi_mpp or scores.target_mpp or slide.mpp)
    b = dzi_mpp / slide.mpp  # level-0 px per full-size DZI px
    size = (max(1, math.ceil(width / b)), max(1, math.ceil(height / b)))

    def slide_rows(y: int, h: int) -> np.ndarray:
        parts = [
            slide.read_resampled(x * b, y * b, min(_READ_PX, size[0] - x), h, dzi_mpp)
            for x in range(0, size[0], _READ_PX)
        ]
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    rgba = scale.rgba(raster.value)
    rows, cols = raster.shape

    def overlay_rows(y: int, h: int) -> np.ndarray:
        return rgba[y : y + h]

    paths = {
        "dzi": write_dzi(contained_path(out, f"{sid}.dzi"), size, slide_rows, "jpeg"),
        "overlay_dzi": write_dzi(
            contained_path(out, f"{sid}_overlay.dzi"), (cols, rows), overlay_rows, "png"
        ),
    }
    data = _slide_data(scores, raw, norm, scale, size, b, (cols, rows))
    data["overlay_width"] = cols * raster.scale / (size[0] * b)
    data["caption"] = _caption(scores)
    paths["viewer_data"] = _write_js(contained_path(out, f"{sid}_viewer.js"), sid, data)
    index = write_index(out)
    if index is not None:
        paths["viewer"] = index
    return paths


def _caption(scores: SlideScores) -> str:
    pred = ", ".join(f"{k} {v:.3g}" for k, v in scores.prediction.items()) or "n/a"
    return f"prediction: {pred} · model {scores.model or '?'} ({scores.source or '?'})" + (
        f" · run {scores.run}" if scores.run else ""
    )


def _slide_data(
    scores: SlideScores,
    raw: np.ndarray,
    norm: np.ndarray,
    scale: ColourScale,
    size: tuple[int, int],
    b: float,
    overlay_size: tuple[int, int],
) -> dict[str, Any]:
    from matplotlib import colormaps

    sid = scores.slide_id
    order = np.argsort(-norm, kind="stable")[:20]
    keep = slice(0, _HOVER_TILES)
    stops = (colormaps[scale.cmap](np.linspace(0, 1, 11))[:, :3] * 255).round().astype(int)
    return {
        "id": sid,
        "slide": _dzi_source(sid, "jpeg", size),
        "overlay": _dzi_source(f"{sid}_overlay", "png", overlay_size),
        "level0_per_px": b,
        "side": int(scores.side),
        "x": scores.coords[keep, 0].tolist(),
        "y": scores.coords[keep, 1].tolist(),
        "score": np.round(norm[keep], 4).tolist(),
        "raw": [float(f"{v:.4g}") for v in raw[keep]],
        "top": [
            {
                "x": int(scores.coords[i, 0]),
                "y": int(scores.coords[i, 1]),
                "score": round(float(norm[i]), 4),
            }
            for i in order
        ],
        "scale": {
            "label": scale.label,
            "vmin": scale.vmin,
            "vmax": scale.vmax,
            "stops": [f"rgb({r},{g},{b_})" for r, g, b_ in stops.tolist()],
        },
    }


def _write_js(path: Path, sid: str, data: dict[str, Any]) -> Path:
    """``<slide_id>_viewer.js``: registers the slide's data for ``index.html``."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            "(window.WSI_MIL_SLIDES = window.WSI_MIL_SLIDES || {})"
            f"[{json.dumps(sid)}] = {json.dumps(data)};\n",
            encoding="utf-8",
        )
    return path


def write_index(out: Path) -> Path | None:
    """(Re)write ``index.html`` listing every slide with viewer data in ``out``.

    Copies the OpenSeadragon assets into ``out/viewer/``. Returns None (and writes no
    page) when the assets are not installed (``make viewer-assets``).
    """
    assets = assets_dir()
    if assets is None:
        return None
    target = out / "viewer"
    if not (target / "openseadragon.min.js").is_file():
        with atomic_path(target) as tmp:
            shutil.copytree(assets, tmp)
    slides = []
    for js in sorted(out.glob("*_viewer.js")):
        slides.append(js.name.removesuffix("_viewer.js"))
    page = _TEMPLATE.read_text(encoding="utf-8").replace(
        "/*SLIDES*/[]", json.dumps(slides).replace("</", "<\\/")
    )
    page = page.replace("<!--TITLE-->", html.escape(f"wsi-mil heatmaps ({len(slides)} slides)"))
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
