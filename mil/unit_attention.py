"""Writing a model's attention over bags as per-slide attention files.

A bag (unit) may hold several slides of a patient; its attention is split by slide and
written with :func:`wsi_mil.mil.attention.write_attention` (file format there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.mil.attention import write_attention
from wsi_mil.mil.data import BagStore, Unit
from wsi_mil.outputs import contained_path

__all__ = ["write_unit_attention"]


def write_unit_attention(
    att_dir: Path,
    store: BagStore,
    units: Sequence[Unit],
    attention: Sequence[np.ndarray | None],
    *,
    source: str,
    model_name: str,
) -> None:
    """Split each unit's attention by slide into ``<att_dir>/<slide_id>.h5``.

    Args:
        att_dir: Output folder.
        store: The bags (gives each unit's tile coordinates and slide of each tile).
        units: The bags, aligned with ``attention``.
        attention: Per unit, (N_u,) attention over all its tiles, or None (skipped).
        source: ``fold_<k>``, ``ensemble`` or ``soup`` (the ``source`` attribute; the
            slide file's fingerprint from the bag goes to ``source_size``,
            ``source_sha256`` and ``source_path``).
        model_name: The aggregator's name.

    Raises:
        UnsafePathError: A slide id would place its file outside ``att_dir``.
    """
    for unit, att in zip(units, attention, strict=True):
        if att is None:
            continue
        _, coords, which = store.unit(unit)
        for j, slide_id in enumerate(unit.slide_ids):
            sel = which == j
            fingerprint = _source(store, slide_id)
            write_attention(
                contained_path(att_dir, f"{slide_id}.h5"),
                att[sel],
                coords[sel],
                attrs={
                    "tile_level0": store.tile_level0.get(slide_id),
                    "slide_id": slide_id,
                    "patient_id": unit.patient_id,
                    "model": model_name,
                    "source": source,
                    # the slide file the tiles came from, so heatmaps refuse another slide
                    "source_size": fingerprint.get("size"),
                    "source_sha256": fingerprint.get("sha256"),
                    "source_path": fingerprint.get("path"),
                },
            )


def _source(store: BagStore, slide_id: str) -> dict[str, Any]:
    """The slide fingerprint recorded in the slide's (first) bag, or ``{}``."""
    from wsi_mil.features.bags import BagError, bag_info

    try:
        source = bag_info(store.features_dirs[0] / f"{slide_id}.h5").get("source")
    except BagError:
        return {}
    return dict(source) if isinstance(source, dict) else {}
