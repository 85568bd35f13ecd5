"""Export tile coordinates as a CLAM/TRIDENT-compatible HDF5 file.

The file holds one dataset ``coords`` (int64 (N, 2), level-0 (x, y) of each tile's
top-left corner) with the attributes both tools read:

- ``patch_size``: tile side in pixels at the target resolution (TRIDENT's meaning);
- ``patch_level``: the pyramid level whose resolution equals the target (within 2 %),
  where ``patch_size`` is also CLAM's "size at ``patch_level``"; when no level matches,
  ``patch_level`` is 0 and CLAM users must read ``patch_size_level0`` px at level 0 and
  resize to ``patch_size`` (CLAM's ``custom_downsample``);
- ``patch_size_level0``: tile side in level-0 pixels;
- ``level0_magnification`` / ``target_magnification``: 10 / mpp (0.25 µm/px ↔ 40×).

Extra attributes: ``mpp``, ``target_mpp``, ``tile_px``, ``downsample``, ``name``,
``level_dim``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_mil.io import atomic_path

__all__ = ["export_coords_h5", "magnification", "matching_level"]


def magnification(mpp: float) -> float:
    """Nominal objective magnification of a resolution (10 / mpp, 2 decimals)."""
    return round(10.0 / mpp, 2)


def matching_level(
    mpp: float, target_mpp: float, downsamples: Sequence[float], tol: float = 0.02
) -> int | None:
    """Index of the pyramid level whose mpp equals ``target_mpp`` within ``tol``."""
    for level, ds in enumerate(downsamples):
        if abs(mpp * ds / target_mpp - 1.0) <= tol:
            return level
    return None


def export_coords_h5(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    *,
    slide_id: str,
    tile_px: int,
    target_mpp: float,
    mpp: float,
    level_downsamples: Sequence[float],
    level0_dimensions: tuple[int, int],
) -> Path:
    """Write the coordinates h5 atomically.

    Args:
        path: Output file (``<slide_id>.h5``).
        coords: int64 (N, 2) level-0 (x, y).
        slide_id: Written as the ``name`` attribute.
        tile_px: Tile side at ``target_mpp``.
        target_mpp: Tile resolution (µm/px).
        mpp: Level-0 resolution (µm/px).
        level_downsamples: Pyramid downsample factors.
        level0_dimensions: Slide (width, height).

    Returns:
        The path written.
    """
    import h5py

    path = Path(path)
    level = matching_level(mpp, target_mpp, level_downsamples)
    size0 = round(tile_px * target_mpp / mpp)
    attrs = {
        "patch_size": int(tile_px),
        "patch_level": int(level if level is not None else 0),
        "patch_size_level0": int(size0),
        "level0_magnification": magnification(mpp),
        "target_magnification": magnification(target_mpp),
        "mpp": float(mpp),
        "target_mpp": float(target_mpp),
        "tile_px": int(tile_px),
        "downsample": float(target_mpp / mpp),
        "name": str(slide_id),
        "level_dim": np.asarray(level0_dimensions, np.int64),
    }
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            ds = fh.create_dataset("coords", data=coords, maxshape=(None, 2))
            for key, value in attrs.items():
                ds.attrs[key] = value
    return path
