"""Slide access: open any whole-slide image and read it at a physical resolution.

Conventions used throughout wsi-mil:

* locations are ``(x, y)`` in **level-0 pixels** (x = column, y = row), top-left origin;
* sizes are ``(width, height)``;
* arrays are ``(rows, cols[, channels])``, RGB ``uint8``;
* resolution is physical, in µm per pixel (``mpp``); a tile is asked for by
  ``tile_px`` at ``target_mpp`` and covers ``tile_px * target_mpp / slide.mpp``
  level-0 pixels, read from the best level at or finer than the target.

Example:
    >>> from wsi_mil.wsi import open_slide
    >>> with open_slide("slide.svs") as slide:  # doctest: +SKIP
    ...     tile = slide.read_tile(1000, 2000, tile_px=224, target_mpp=0.5)

Importing this package is cheap; the slide libraries load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_mil._lazy import lazy_exports

if TYPE_CHECKING:
    from wsi_mil.wsi.mpp import MPP_RANGE, resolve_mpp
    from wsi_mil.wsi.slide import OPENSLIDE_ONLY, Slide, open_slide, slide_id_from_path
    from wsi_mil.wsi.synthetic import SyntheticSlide, make_synthetic_slide

__all__ = [
    "MPP_RANGE",
    "OPENSLIDE_ONLY",
    "Slide",
    "SyntheticSlide",
    "make_synthetic_slide",
    "open_slide",
    "resolve_mpp",
    "slide_id_from_path",
]

_WHERE = {
    "MPP_RANGE": "mpp",
    "resolve_mpp": "mpp",
    "Slide": "slide",
    "open_slide": "slide",
    "OPENSLIDE_ONLY": "slide",
    "slide_id_from_path": "slide",
    "SyntheticSlide": "synthetic",
    "make_synthetic_slide": "synthetic",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
