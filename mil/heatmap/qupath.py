"""QuPath GeoJSON of the scored tiles, written one feature at a time.

Each tile is a QuPath tile object (``objectType: "tile"``) with a square polygon in
level-0 px and ``measurements``:

* ``score`` — the drawn score's raw value (attention, or signed contribution);
* ``score_normalised`` — what the heatmap colours (rank within the slide, or raw);
* ``attention`` and ``attention_percentile`` (rank of the attention within the slide);
* ``contribution`` when the model has one.

``classification`` is a score band of ``score_normalised``: for unsigned scores ``low``
(< 1/3 of the range), ``medium`` and ``high`` (≥ 2/3); for signed scores ``against``,
``neutral`` and ``towards`` (the prediction). ``color`` is the heatmap's colour, so the
tiles show the heatmap on import (File → Import objects).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wsi_mil.mil.heatmap.raster import ColourScale
from wsi_mil.mil.heatmap.scores import SlideScores, rank_normalise
from wsi_mil.outputs import atomic_path

__all__ = ["score_bands", "write_geojson"]

_BANDS = {False: ("low", "medium", "high"), True: ("against", "neutral", "towards")}


def score_bands(normalised: np.ndarray, scale: ColourScale) -> tuple[np.ndarray, list[dict]]:
    """Band of each normalised score: lower, middle or upper third of the scale.

    Returns:
        ``(band index (N,) in 0-2, [{"name": ..., "color": [r, g, b]}] per band)``; a
        band's colour is the scale's colour at its middle.
    """
    signed = scale.vmin < 0 < scale.vmax
    span = scale.vmax - scale.vmin or 1.0
    t = (np.asarray(normalised, np.float64) - scale.vmin) / span
    centres = scale.rgba(scale.vmin + span * np.array([1 / 6, 1 / 2, 5 / 6]))[:, :3]
    classes = [
        {"name": f"heatmap: {name}", "color": rgb}
        for name, rgb in zip(_BANDS[signed], centres.tolist(), strict=True)
    ]
    return np.digitize(t, [1 / 3, 2 / 3]), classes


def write_geojson(
    path: Path,
    scores: SlideScores,
    raw: np.ndarray,
    normalised: np.ndarray,
    scale: ColourScale,
) -> Path:
    """Write a FeatureCollection of the N tiles, streamed (memory independent of N).

    Args:
        path: Output ``.geojson`` (atomic).
        scores: The slide's tiles.
        raw: (N,) the drawn score.
        normalised: (N,) its normalised value (what is coloured).
        scale: Colours and bands.
    """
    rgba = scale.rgba(np.asarray(normalised, np.float64))
    att_pct = rank_normalise(scores.attention, signed=False)
    bands, classes = score_bands(normalised, scale)
    side = int(scores.side)
    contrib = scores.contribution
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for i, (x, y) in enumerate(scores.coords.tolist()):
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            measurements = {
                "score": float(raw[i]),
                "score_normalised": float(normalised[i]),
                "attention": float(scores.attention[i]),
                "attention_percentile": float(att_pct[i]),
            }
            if contrib is not None:
                measurements["contribution"] = float(contrib[i])
            colour = rgba[i, :3].tolist()
            feature = {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"score {float(normalised[i]):.3f}",
                    "color": colour,
                    "classification": classes[int(bands[i])],
                    "measurements": measurements,
                },
            }
            fh.write(("" if i == 0 else ",\n") + json.dumps(feature))
        fh.write("\n]}\n")
    return path
