"""QuPath GeoJSON of the scored tiles, streamed in chunks of features.

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

_CHUNK = 4096  # features formatted per write

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


def _numbers(values: np.ndarray) -> list[str]:
    """JSON texts of (n,) floats, as ``json.dumps`` writes them (``NaN`` included)."""
    floats = values.tolist()
    if np.isfinite(values).all():
        return [repr(v) for v in floats]
    return [json.dumps(v) for v in floats]


def _feature(
    xy: list[int],
    side: int,
    normalised: float,
    colour: list[int],
    band: str,
    keys: list[str],
    measurements: tuple[str, ...],
) -> str:
    """One tile as the text ``json.dumps`` gives its Feature (formatted directly: fast)."""
    x, y = xy
    x1, y1 = x + side, y + side
    m = ", ".join(f"{k}: {v}" for k, v in zip(keys, measurements, strict=True))
    return (
        '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
        f"[[[{x}, {y}], [{x1}, {y}], [{x1}, {y1}], [{x}, {y1}], [{x}, {y}]]]}}, "
        f'"properties": {{"objectType": "tile", "name": "score {normalised:.3f}", '
        f'"color": [{colour[0]}, {colour[1]}, {colour[2]}], "classification": {band}, '
        f'"measurements": {{{m}}}}}}}'
    )


def write_geojson(
    path: Path,
    scores: SlideScores,
    raw: np.ndarray,
    normalised: np.ndarray,
    scale: ColourScale,
) -> Path:
    """Write a FeatureCollection of the N tiles, streamed in chunks of
    features (memory independent of N beyond the (N,) inputs).

    Args:
        path: Output ``.geojson`` (atomic).
        scores: The slide's tiles.
        raw: (N,) the drawn score.
        normalised: (N,) its normalised value (what is coloured).
        scale: Colours and bands.
    """
    normalised = np.asarray(normalised, np.float64)
    rgba = scale.rgba(normalised)
    bands, classes = score_bands(normalised, scale)
    band_json = [json.dumps(c) for c in classes]
    columns = {
        "score": np.asarray(raw, np.float64),
        "score_normalised": normalised,
        "attention": np.asarray(scores.attention, np.float64),
        "attention_percentile": rank_normalise(scores.attention, signed=False),
    }
    if scores.contribution is not None:
        columns["contribution"] = np.asarray(scores.contribution, np.float64)
    keys = [json.dumps(k) for k in columns]
    side = int(scores.side)
    n = len(scores.coords)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for start in range(0, n, _CHUNK):
            part = slice(start, start + _CHUNK)
            values = zip(*(_numbers(c[part]) for c in columns.values()), strict=True)
            rows = zip(
                np.asarray(scores.coords[part]).tolist(),
                normalised[part].tolist(),
                rgba[part, :3].tolist(),
                bands[part].tolist(),
                values,
                strict=True,
            )
            text = ",\n".join(
                _feature(xy, side, v, c, band_json[b], keys, m) for xy, v, c, b, m in rows
            )
            fh.write(("" if start == 0 else ",\n") + text)
        fh.write("\n]}\n")
    return path
