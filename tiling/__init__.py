"""Tissue detection, tile grids and per-slide zarr tile stores.

Public API (imported lazily, so ``import wsi_mil.tiling`` stays cheap)::

    from wsi_mil.tiling import detect_tissue, tile_grid, tile_slide, open_tile_store

Coordinates are level-0 ``(x, y)`` of a tile's top-left corner; sizes are
``(width, height)``; arrays are ``(rows, cols[, channels])``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "IncompleteStoreError",
    "TileGrid",
    "TileStore",
    "TissueParams",
    "detect_tissue",
    "export_coords_h5",
    "open_tile_store",
    "qc_overlay",
    "tile_grid",
    "tile_slide",
    "tissue_geojson",
]

_WHERE = {
    "IncompleteStoreError": "store",
    "TileGrid": "grid",
    "TileStore": "store",
    "TissueParams": "tissue",
    "detect_tissue": "tissue",
    "export_coords_h5": "export",
    "open_tile_store": "store",
    "qc_overlay": "qc",
    "tile_grid": "grid",
    "tile_slide": "pipeline",
    "tissue_geojson": "qc",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module = importlib.import_module(f"wsi_mil.tiling.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'wsi_mil.tiling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
