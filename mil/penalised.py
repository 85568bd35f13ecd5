"""Ridge-penalised linear models fitted with a head's own loss, the penalty chosen by
cross-validation inside the training patients.

The trainer fits a model's *penalised stages* (``dual_xattn``'s context linear path)
with :func:`fit_ridge` instead of stochastic gradient steps: a handful of covariates and
a few dozen patients are a convex problem that L-BFGS solves exactly, and the penalty is
chosen on many held-out patients instead of by early stopping on a small inner
validation set.

Cross-validation scores a penalty by the loss of the *cross-validated linear predictor*:
the held-out logits of every fold are pooled and the loss is computed once on all
patients (for a Cox loss this keeps full risk sets, where a per-fold partial likelihood
on a few events would be mostly noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from wsi_mil.errors import ConfigError

__all__ = ["DEFAULT_PENALTIES", "RidgeFit", "fit_ridge"]

#: Candidate penalties on the standardised covariates (the loss is a mean over samples
#: or events); ``inf`` is the model without covariates.
DEFAULT_PENALTIES: tuple[float, ...] = (*np.logspace(-3, 1, 9).tolist(), math.inf)

#: ``loss(logits (n, K), idx (n,) long)``: the mean loss of the samples ``idx``.
LossFn = Callable[[Tensor, Tensor], Tensor]


class RidgeFit(NamedTuple):
    """The result of :func:`fit_ridge`.

    Attributes:
        weight: (P, K) coefficients on the covariates as given (not standardised).
        bias: (K,) unpenalised intercept of the fit (for scoring; a caller whose model
            has its own intercept may drop it).
        penalty: the chosen penalty (``inf``: no covariate kept).
        penalties: the candidates, in the order of ``cv_loss``.
        cv_loss: mean cross-validated loss per candidate.
    """

    weight: Tensor
    bias: Tensor
    penalty: float
    penalties: tuple[float, ...]
    cv_loss: tuple[float, ...]


def _solve(
    x: Tensor, loss: LossFn, idx: Tensor, penalty: float, n_outputs: int
) -> tuple[Tensor, Tensor]:
    """Minimise ``loss(x[idx] w + b, idx) + penalty / 2 * |w|^2`` by L-BFGS from zero;
    ``(w (P, K), b (K,))``; ``w = 0`` when ``penalty`` is infinite."""
    w = torch.zeros(x.shape[1], n_outputs, requires_grad=math.isfinite(penalty))
    b = torch.zeros(n_outputs, requires_grad=True)
    params = [w, b] if w.requires_grad else [b]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=200, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )
    xs = x[idx]

    def closure() -> Tensor:
        opt.zero_grad()
        objective = loss(xs @ w + b, idx)
        if w.requires_grad:
            objective = objective + 0.5 * penalty * w.pow(2).sum()
        objective.backward()
        return objective

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(groups: np.ndarray, strata: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each sample: groups (patients) dealt round-robin to folds in a random
    order within each stratum (the stratum of a group: that of its first sample)."""
    rng = np.random.default_rng(seed)
    uniq, first = np.unique(groups, return_index=True)
    fold_of: dict[object, int] = {}
    start = 0
    for s in np.unique(strata[first]):
        members = rng.permutation(uniq[strata[first] == s])
        for i, g in enumerate(members):
            fold_of[g] = (start + i) % n_folds
        start += len(members)
    return np.array([fold_of[g] for g in groups])


def fit_ridge(
    x: Tensor,
    loss: LossFn,
    groups: Sequence[str],
    *,
    n_outputs: int = 1,
    strata: Sequence[int] | None = None,
    penalties: Sequence[float] = DEFAULT_PENALTIES,
    n_folds: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
) -> RidgeFit:
    """Ridge fit of ``loss`` on ``x``, the penalty chosen by repeated grouped K-fold CV.

    Covariates are scaled to unit standard deviation (not centred: a row of zeros, a
    missing modality, keeps a zero linear predictor) before the penalty applies; the
    returned weights are on the original scale.

    Args:
        x: (n, P) covariates.
        loss: ``loss(logits (m, K), idx (m,))``, the mean loss of samples ``idx``.
        groups: (n,) group (patient) of each sample; a group is never split by a fold.
        n_outputs: ``K``, the number of logits.
        strata: (n,) integer stratum (event, class) folds are balanced on; None: one.
        penalties: candidate penalties (``inf``: no covariates).
        n_folds: folds per repeat (at most the number of groups).
        n_repeats: CV repeats with different fold assignments; losses are averaged.
        seed: seed of the fold assignments.

    Returns:
        The :class:`RidgeFit` refitted on all samples at the chosen penalty (the largest
        penalty among equally good ones).

    Raises:
        ConfigError: ``x`` is not 2-D, ``groups``/``strata`` do not match its rows,
            fewer than 2 groups, or no candidate penalty.
    """
    if x.ndim != 2:
        raise ConfigError(f"fit_ridge: x must be (n, P), got {tuple(x.shape)}")
    n = x.shape[0]
    group_arr = np.asarray(groups, dtype=object)
    strata_arr = np.zeros(n, int) if strata is None else np.asarray(strata, int)
    if group_arr.shape != (n,) or strata_arr.shape != (n,):
        raise ConfigError(f"fit_ridge: groups and strata must have one entry per row of x ({n})")
    n_groups = len(set(group_arr.tolist()))
    if n_groups < 2:
        raise ConfigError(f"fit_ridge: needs at least 2 groups (patients), got {n_groups}")
    if not penalties:
        raise ConfigError("fit_ridge: penalties is empty")
    x = x.detach().float()
    sd = x.std(dim=0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = x / sd
    everyone = torch.arange(n)
    cv = np.zeros(len(penalties))
    for r in range(n_repeats):
        fold = _folds(group_arr, strata_arr, min(n_folds, n_groups), seed + r)
        for j, penalty in enumerate(penalties):
            oof = torch.zeros(n, n_outputs)
            for f in np.unique(fold):
                test = torch.from_numpy(np.flatnonzero(fold == f))
                w, b = _solve(z, loss, torch.from_numpy(np.flatnonzero(fold != f)), penalty,
                              n_outputs)  # fmt: skip
                oof[test] = z[test] @ w + b
            with torch.no_grad():
                cv[j] += float(loss(oof, everyone)) / n_repeats
    order = np.argsort(-np.asarray(penalties, float), kind="stable")  # largest first
    best = int(order[np.argmin(cv[order])])
    w, b = _solve(z, loss, everyone, penalties[best], n_outputs)
    return RidgeFit(w / sd[:, None], b, float(penalties[best]), tuple(map(float, penalties)),
                    tuple(cv.tolist()))  # fmt: skip
