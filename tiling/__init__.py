"""Tissue detection, tile grids and per-slide zarr tile stores.

Public API (imported lazily, so ``import wsi_mil.tiling`` stays cheap)::

    from wsi_mil.tiling import detect_tissue, tile_grid, tile_slide, open_tile_store
    from wsi_mil.tiling import verify_store  # [] when a store is intact

Coordinates are level-0 ``(x, y)`` of a tile's top-left corner; sizes are
``(width, height)``; arrays are ``(rows, cols[, channels])``.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_exports

__all__ = [
    "DamagedStoreError",
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
    "verify_store",
]

_WHERE = {
    "DamagedStoreError": "store",
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
    "verify_store": "store",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
