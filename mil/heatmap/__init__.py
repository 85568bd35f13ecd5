"""Heatmaps for pathologists: tile scores drawn as PNG, pyramidal TIFF, Deep Zoom with an
offline viewer, QuPath GeoJSON and top-k galleries (``wsi-mil heatmap``).

Modules: ``scores`` (attention and signed contributions of a run on a slide's bag, or an
attention file), ``match`` (refusing scores of another slide), ``raster`` (overlap
averaging, tissue restriction, smoothing, colours), ``png``, ``pyramid`` (TIFF and DZI),
``qupath`` (GeoJSON), ``gallery`` (top-k tiles), ``viewer`` (DZI + HTML viewer) and
``render`` (all formats of one slide).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_mil._lazy import lazy_exports

if TYPE_CHECKING:
    from wsi_mil.mil.heatmap.match import SlideMismatchError, check_slide
    from wsi_mil.mil.heatmap.raster import ColourScale, Raster, rasterise, tile_average
    from wsi_mil.mil.heatmap.render import (
        FORMATS,
        HeatmapOptions,
        find_attention,
        find_co_attention,
        heatmap_slide,
        load_scores,
        parse_formats,
        render_heatmap,
    )
    from wsi_mil.mil.heatmap.scores import (
        SlideScores,
        rank_normalise,
        score_slide,
        scores_from_attention,
        scores_from_co_attention,
    )

_LAZY = {
    "FORMATS": "render",
    "ColourScale": "raster",
    "HeatmapOptions": "render",
    "Raster": "raster",
    "SlideMismatchError": "match",
    "SlideScores": "scores",
    "check_slide": "match",
    "find_attention": "render",
    "find_co_attention": "render",
    "heatmap_slide": "render",
    "load_scores": "render",
    "parse_formats": "render",
    "rank_normalise": "scores",
    "rasterise": "raster",
    "render_heatmap": "render",
    "score_slide": "scores",
    "scores_from_attention": "scores",
    "scores_from_co_attention": "scores",
    "tile_average": "raster",
}

__all__ = [
    "FORMATS",
    "ColourScale",
    "HeatmapOptions",
    "Raster",
    "SlideMismatchError",
    "SlideScores",
    "check_slide",
    "find_attention",
    "find_co_attention",
    "heatmap_slide",
    "load_scores",
    "parse_formats",
    "rank_normalise",
    "rasterise",
    "render_heatmap",
    "score_slide",
    "scores_from_attention",
    "scores_from_co_attention",
    "tile_average",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
