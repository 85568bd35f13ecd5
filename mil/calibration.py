"""Calibration of class probabilities: Brier score, expected calibration error (ECE),
reliability bins, and the balanced decision rule.

Binary tasks are judged on the probability of the positive class (``classes[1]``);
multiclass tasks on the top-label confidence (the largest probability, correct when its
class is the true one). Bins are ``n_bins`` equal-width intervals of [0, 1], closed on
the right (scikit-learn's ``calibration_curve`` with ``strategy="uniform"``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Reliability",
    "balanced_decision",
    "brier_score",
    "expected_calibration_error",
    "reliability_bins",
]


class Reliability(NamedTuple):
    """Reliability diagram data.

    Attributes:
        edges: (B + 1,) bin edges on [0, 1].
        counts: (B,) rows per bin.
        predicted: (B,) mean predicted probability per bin (NaN when empty).
        observed: (B,) observed frequency per bin (NaN when empty).
        lower: (B,) Wilson 95% lower bound of ``observed``.
        upper: (B,) Wilson 95% upper bound.
        kind: ``positive class`` (binary) or ``top label`` (multiclass).
    """

    edges: np.ndarray
    counts: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    kind: str


def _check(y: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y).astype(int).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != truth.size or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C >= 2) with N = {truth.size}, got {p.shape}")
    if ((truth < 0) | (truth >= p.shape[1])).any():
        raise ValueError(f"y must hold class indices in [0, {p.shape[1]})")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be probabilities in [0, 1]")
    return truth, p


def _confidence(truth: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(N,) predicted probability and (N,) 0/1 outcome that the calibration judges."""
    if p.shape[1] == 2:
        return p[:, 1], (truth == 1).astype(float), "positive class"
    top = p.argmax(axis=1)
    return p.max(axis=1), (top == truth).astype(float), "top label"


def brier_score(y: Any, probs: Any) -> float:
    """Brier score (lower is better).

    Binary: ``mean((p_1 - y)^2)`` (scikit-learn's ``brier_score_loss``); multiclass:
    ``mean(sum_c (p_c - [y = c])^2)``, the original multi-category score.

    Args:
        y: (N,) class indices.
        probs: (N, C) probabilities.
    """
    truth, p = _check(y, probs)
    onehot = np.eye(p.shape[1])[truth]
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - onehot[:, 1]) ** 2))
    return float(np.mean(((p - onehot) ** 2).sum(axis=1)))


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.959963984540054) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        phat = k / n
        centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(np.stack([centre - half, centre + half]), 0.0, 1.0)


def reliability_bins(y: Any, probs: Any, n_bins: int = 10) -> Reliability:
    """Mean prediction and observed frequency per equal-width probability bin.

    Args:
        y: (N,) class indices.
        probs: (N, C) probabilities.
        n_bins: bins on [0, 1].
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    truth, p = _check(y, probs)
    conf, hit, kind = _confidence(truth, p)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    ids = np.searchsorted(edges[1:-1], conf)  # (lo, hi]; 0 in the first bin
    count = np.bincount(ids, minlength=n_bins).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        pred = np.bincount(ids, weights=conf, minlength=n_bins) / count
        obs = np.bincount(ids, weights=hit, minlength=n_bins) / count
    lo, hi = _wilson(np.bincount(ids, weights=hit, minlength=n_bins), count)
    return Reliability(edges, count.astype(int), pred, obs, lo, hi, kind)


def expected_calibration_error(y: Any, probs: Any, n_bins: int = 10) -> float:
    """ECE: ``sum_b (n_b / N) |observed_b - predicted_b|`` over :func:`reliability_bins`."""
    rel = reliability_bins(y, probs, n_bins)
    used = rel.counts > 0
    gap = np.abs(rel.observed[used] - rel.predicted[used])
    return float(np.sum(rel.counts[used] / rel.counts.sum() * gap))


def balanced_decision(probs: Any, prior: Any | None = None) -> np.ndarray:
    """(N,) class decisions ``argmax_c p_c / pi_c``: calibrated probabilities divided by
    the training prevalence ``pi`` (``(C,)`` or per row ``(N, C)``), which is the decision
    of the class-weighted model and the one balanced accuracy rewards. Without ``prior``,
    the most probable class."""
    p = np.asarray(probs, dtype=np.float64)
    if prior is None:
        return p.argmax(axis=1)
    pi = np.broadcast_to(np.asarray(prior, dtype=np.float64), p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(pi > 0, p / pi, -np.inf)
    return score.argmax(axis=1)
