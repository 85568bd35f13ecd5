"""Export tile coordinates as a CLAM/TRIDENT-compatible HDF5 file.

The file holds one dataset ``coords`` (int64 (N, 2), level-0 (x, y) of each tile's
top-left corner) with the attributes both tools read:

- ``patch_size``: tile side in pixels at the target resolution. TRIDENT reads it so
  (it reads ``patch_size_level0`` level-0 px and resizes to ``patch_size``); CLAM reads
  ``patch_size`` px *at* ``patch_level``, which is the same thing when a pyramid level
  is at the target resolution;
- ``patch_level``: the pyramid level whose resolution equals the target (within 2 %).
  When no level does, it is 0 and CLAM would read a smaller field of view: CLAM users
  then read ``patch_size_level0`` px at level 0 and resize to ``patch_size`` (CLAM's
  ``target_patch_size``); ``wsi-mil tile`` says so in the manifest;
- ``patch_size_level0``: tile side in level-0 pixels (rounded);
- ``level0_magnification`` / ``target_magnification``: 10 / mpp (0.25 µm/px ↔ 40×),
  from which TRIDENT derives the resolutions;
- CLAM's ``downsample`` (of ``patch_level``, as (x, y)), ``level_dim`` and
  ``downsampled_level_dim`` (size of ``patch_level``) and ``name``; TRIDENT's
  ``overlap`` (target px) and ``level0_width`` / ``level0_height``.

Extra attributes: ``mpp``, ``target_mpp``, ``tile_px``, ``target_downsample`` (level-0 px
per target px).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_mil.outputs import atomic_path

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
    level_dimensions: Sequence[tuple[int, int]] | None = None,
    stride_px: int | None = None,
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
        level_dimensions: (width, height) of each level (default: level 0 divided by the
            downsamples).
        stride_px: Grid step in target pixels (default ``tile_px``: no overlap).

    Returns:
        The path written.
    """
    import h5py

    path = Path(path)
    found = matching_level(mpp, target_mpp, level_downsamples)
    level = found if found is not None else 0
    ds = float(level_downsamples[level])
    if level_dimensions is not None:
        level_dim = tuple(int(v) for v in level_dimensions[level])
    else:
        level_dim = tuple(round(v / ds) for v in level0_dimensions)
    stride_px = tile_px if stride_px is None else stride_px
    attrs = {
        "patch_size": int(tile_px),
        "patch_level": int(level),
        "patch_size_level0": round(tile_px * target_mpp / mpp),
        "level0_magnification": magnification(mpp),
        "target_magnification": magnification(target_mpp),
        "downsample": np.asarray([ds, ds], np.float64),
        "level_dim": np.asarray(level_dim, np.int64),
        "downsampled_level_dim": np.asarray(level_dim, np.int64),
        "overlap": int(tile_px - stride_px),
        "level0_width": int(level0_dimensions[0]),
        "level0_height": int(level0_dimensions[1]),
        "name": str(slide_id),
        "mpp": float(mpp),
        "target_mpp": float(target_mpp),
        "tile_px": int(tile_px),
        "target_downsample": float(target_mpp / mpp),
    }
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            dset = fh.create_dataset("coords", data=coords, maxshape=(None, 2))
            for key, value in attrs.items():
                dset.attrs[key] = value
    return path
