"""Per-slide attention files: ``attention/<slide_id>.h5``.

| name | dtype, shape | meaning |
| --- | --- | --- |
| ``attention`` | float32 (N,) | the model's attention per tile (bag order) |
| ``coords`` | int64 (N, 2) | level-0 (x, y) of each tile, same order |

File attributes: ``format`` (``"wsi-mil.attention/1"``), ``slide_id``, ``patient_id``,
``model``, ``source`` (``"fold_<k>"`` or ``"ensemble"``), ``tile_level0`` (tile side in
level-0 px when the bag says it), and the slide file the tiles came from as tiling
recorded it: ``source_size``, ``source_sha256``, ``source_path`` (``wsi-mil heatmap``
refuses to draw the file over a slide with other bytes). Attention of a patient-level
bag sums to 1 over all the patient's tiles, so values are comparable within a slide;
heatmaps rank-normalise them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from wsi_mil.errors import WsiMilError
from wsi_mil.outputs import atomic_path

__all__ = ["ATTENTION_FORMAT", "SlideAttention", "read_attention", "write_attention"]

ATTENTION_FORMAT = "wsi-mil.attention/1"


class SlideAttention(NamedTuple):
    """Attention of one slide.

    Attributes:
        attention: (N,) float32 per-tile attention.
        coords: (N, 2) int64 level-0 (x, y).
        attrs: File attributes.
    """

    attention: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]


def write_attention(
    path: str | os.PathLike[str],
    attention: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: dict[str, Any],
) -> Path:
    """Write one slide's attention atomically.

    Args:
        path: Destination ``.h5``.
        attention: (N,) per-tile attention.
        coords: (N, 2) level-0 tile coordinates.
        attrs: Attributes (``slide_id``, ``patient_id``, ``model``, ``source``, ...);
            ``None`` values are skipped.
    """
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("attention", data=np.asarray(attention, np.float32))
        h5.create_dataset("coords", data=np.asarray(coords, np.int64))
        h5.attrs["format"] = ATTENTION_FORMAT
        for key, value in attrs.items():
            if value is not None:
                h5.attrs[key] = value
    return path


def read_attention(path: str | os.PathLike[str]) -> SlideAttention:
    """Read a file written by :func:`write_attention`.

    Raises:
        WsiMilError: Missing or not an attention file.
    """
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"attention file {path} does not exist; run `wsi-mil train` or `predict`")
    with h5py.File(path, "r") as h5:
        if h5.attrs.get("format") != ATTENTION_FORMAT:
            raise WsiMilError(f"{path} is not a wsi-mil attention file ({ATTENTION_FORMAT})")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        return SlideAttention(h5["attention"][()], h5["coords"][()], attrs)
