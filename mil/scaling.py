"""Feature scaling fitted on a fold's training patients.

Tile features enter the aggregators standardised per dimension (builtin features have
standard deviations from 1e-4 to about 4 and means up to 30; foundation-model features
are milder but uneven too). The statistics are the mean and standard deviation over
*every tile* of the training units, computed one bag at a time (Chan et al.'s pairwise
merge of count / mean / sum of squared deviations, in float64), so memory stays bounded
by one bag whatever the cohort size. They are stored in the model's
:class:`~wsi_mil.mil.models.base.FeatureScaler` buffers, hence in ``model.safetensors``,
and applied by every forward pass: training, validation, ``predict``, ``heatmap`` and the
weight soup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from wsi_mil.mil.data import BagStore, Unit

__all__ = ["MIN_STD", "ScalerStats", "fit_scaler"]

#: Standard deviations below this are treated as a constant dimension (divided by 1):
#: float16 bags cannot resolve smaller spreads at typical feature magnitudes.
MIN_STD = 1e-6


class ScalerStats(NamedTuple):
    """Per-dimension feature statistics.

    Attributes:
        mean: (D,) float64 mean over all tiles.
        std: (D,) float64 standard deviation (population); 1 where a dimension is
            constant (below :data:`MIN_STD`).
        n_tiles: Tiles counted.
    """

    mean: np.ndarray
    std: np.ndarray
    n_tiles: int


def fit_scaler(store: BagStore, units: Sequence[Unit]) -> ScalerStats:
    """Mean and standard deviation of every tile of ``units``, streamed one slide at a time.

    Args:
        store: Bag reader.
        units: The training bags; a slide in several units is counted once.

    Returns:
        :class:`ScalerStats`.

    Raises:
        ValueError: ``units`` hold no tile.
    """
    count, mean, m2 = 0, None, None
    seen: set[str] = set()
    for unit in units:
        for slide_id in unit.slide_ids:
            if slide_id in seen:
                continue
            seen.add(slide_id)
            feats = store.slide(slide_id)[0]
            if not len(feats):
                continue
            x = feats.astype(np.float64)
            n_b, mean_b = len(x), x.mean(axis=0)
            m2_b = ((x - mean_b) ** 2).sum(axis=0)
            if mean is None or m2 is None:
                count, mean, m2 = n_b, mean_b, m2_b
                continue
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta**2 * (count * n_b / total)
            count = total
    if mean is None or m2 is None:
        raise ValueError("no tiles to fit the feature scaler on")
    std = np.sqrt(m2 / count)
    std[std < MIN_STD] = 1.0
    return ScalerStats(mean, std, count)
