"""Penalised (elastic-net) linear models fitted with a head's own loss, the penalty
chosen by cross-validation inside the training patients.

The trainer fits a model's *penalised stages* (``dual_xattn``'s context linear path)
with :func:`fit_penalised` instead of stochastic gradient steps: a handful of covariates
and a few dozen patients are a convex problem that is solved exactly (L-BFGS for a pure
ridge penalty, accelerated proximal gradient with an L1 part), and the penalty is chosen
on every training patient held out in turn instead of by early stopping on a small inner
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

__all__ = ["DEFAULT_PENALTIES", "PenalisedFit", "fit_penalised"]

#: Candidate penalties on the standardised covariates (the loss is a mean over samples
#: or events), largest first; ``inf`` is the model without covariates.
DEFAULT_PENALTIES: tuple[float, ...] = (math.inf, *np.logspace(1, -3, 13).tolist())

#: ``loss(logits (n, K), idx (n,) long)``: the mean loss of the samples ``idx``.
LossFn = Callable[[Tensor, Tensor], Tensor]

#: Iteration limit of the proximal-gradient solver (penalties with an L1 part).
_MAX_PROXIMAL_STEPS = 1000


class PenalisedFit(NamedTuple):
    """The result of :func:`fit_penalised`.

    Attributes:
        weight: (P, K) coefficients on the covariates as given (not standardised).
        bias: (K,) unpenalised intercept of the fit (for scoring; a caller whose model
            has its own intercept may drop it).
        penalty: the chosen penalty (``inf``: no covariate kept).
        l1_ratio: the share of the penalty on ``|w|_1`` (0: ridge, 1: lasso).
        penalties: the candidates, in the order of ``cv_loss``.
        cv_loss: mean cross-validated loss per candidate.
        cv_se: its standard error (over the held-out folds of every repeat).
    """

    weight: Tensor
    bias: Tensor
    penalty: float
    l1_ratio: float
    penalties: tuple[float, ...]
    cv_loss: tuple[float, ...]
    cv_se: tuple[float, ...]


def _soft(w: Tensor, threshold: float) -> Tensor:
    """Soft thresholding, the proximal map of ``threshold * |w|_1``."""
    return torch.sign(w) * (w.abs() - threshold).clamp_min(0.0)


def _lbfgs(xs: Tensor, loss: LossFn, idx: Tensor, l2: float, w: Tensor, b: Tensor) -> None:
    """Minimise ``loss(xs w + b, idx) + l2 / 2 |w|^2`` in place by L-BFGS (``w`` is
    left alone when it does not require a gradient)."""
    params = [w, b] if w.requires_grad else [b]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=200, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        objective = loss(xs @ w + b, idx) + 0.5 * l2 * w.pow(2).sum()
        objective.backward()
        return objective

    opt.step(closure)


def _fista(
    xs: Tensor, loss: LossFn, idx: Tensor, l1: float, l2: float, w: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """Minimise ``loss(xs w + b, idx) + l2 / 2 |w|^2 + l1 |w|_1`` from ``(w, b)`` by
    accelerated proximal gradient (FISTA) with a backtracking step and restarts."""

    def smooth(w_: Tensor, b_: Tensor) -> Tensor:
        return loss(xs @ w_ + b_, idx) + 0.5 * l2 * w_.pow(2).sum()

    yw, yb, t, step = w, b, 1.0, 1.0
    for _ in range(_MAX_PROXIMAL_STEPS):
        pw, pb = yw.clone().requires_grad_(), yb.clone().requires_grad_()
        f = smooth(pw, pb)
        gw, gb = torch.autograd.grad(f, (pw, pb))
        with torch.no_grad():
            while True:
                nw, nb = _soft(yw - step * gw, step * l1), yb - step * gb
                dw, db = nw - yw, nb - yb
                bound = f + (gw * dw).sum() + (gb * db).sum()
                bound = bound + (dw.pow(2).sum() + db.pow(2).sum()) / (2 * step)
                if smooth(nw, nb) <= bound + 1e-9 or step < 1e-8:
                    break
                step /= 2
            moved = max(float((nw - w).abs().max()), float((nb - b).abs().max()))
            if float(((yw - nw) * (nw - w)).sum() + ((yb - nb) * (nb - b)).sum()) > 0:
                t = 1.0  # the momentum points uphill: restart it
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            yw = nw + (t - 1) / t_next * (nw - w)
            yb = nb + (t - 1) / t_next * (nb - b)
            w, b, t = nw, nb, t_next
        if moved < 1e-6:
            break
    return w, b


def _solve(
    x: Tensor,
    loss: LossFn,
    idx: Tensor,
    penalty: float,
    l1_ratio: float,
    start: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Minimise ``loss(x[idx] w + b, idx) + penalty * ((1 - l1_ratio) / 2 |w|^2 +
    l1_ratio |w|_1)`` from ``start``; ``(w (P, K), b (K,))``, ``w = 0`` when
    ``penalty`` is infinite."""
    xs = x[idx]
    if not math.isfinite(penalty):
        w = torch.zeros_like(start[0])
        b = start[1].clone().requires_grad_()
        _lbfgs(xs, loss, idx, 0.0, w, b)
        return w, b.detach()
    l1, l2 = penalty * l1_ratio, penalty * (1 - l1_ratio)
    if l1 > 0:
        return _fista(xs, loss, idx, l1, l2, start[0].clone(), start[1].clone())
    w, b = start[0].clone().requires_grad_(), start[1].clone().requires_grad_()
    _lbfgs(xs, loss, idx, l2, w, b)
    return w.detach(), b.detach()


def _path(
    x: Tensor,
    loss: LossFn,
    idx: Tensor,
    penalties: Sequence[float],
    l1_ratio: float,
    n_outputs: int,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`_solve` at each of ``penalties``, largest first, each warm-started from the
    last; returned in the order of ``penalties``."""
    start = (torch.zeros(x.shape[1], n_outputs), torch.zeros(n_outputs))
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for j in np.argsort(-np.asarray(penalties, float), kind="stable"):
        out[int(j)] = start = _solve(x, loss, idx, penalties[j], l1_ratio, start)
    return [out[j] for j in range(len(penalties))]


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


def fit_penalised(
    x: Tensor,
    loss: LossFn,
    groups: Sequence[str],
    *,
    n_outputs: int = 1,
    l1_ratio: float = 1.0,
    strata: Sequence[int] | None = None,
    penalties: Sequence[float] = DEFAULT_PENALTIES,
    n_folds: int = 5,
    n_repeats: int = 3,
    rule: str = "1se",
    seed: int = 0,
) -> PenalisedFit:
    """Elastic-net fit of ``loss`` on ``x``, the penalty chosen by repeated grouped
    K-fold cross-validation.

    Minimises ``loss(x w + b) + penalty * ((1 - l1_ratio) / 2 |w|^2 + l1_ratio |w|_1)``
    (glmnet's parametrisation) on covariates scaled to unit standard deviation (not
    centred: a row of zeros, a missing modality, keeps a zero linear predictor); the
    returned weights are on the original scale.

    Args:
        x: (n, P) covariates.
        loss: ``loss(logits (m, K), idx (m,))``, the mean loss of samples ``idx``.
        groups: (n,) group (patient) of each sample; a group is never split by a fold.
        n_outputs: ``K``, the number of logits.
        l1_ratio: share of the L1 penalty in [0, 1] (1: lasso, the default; 0: ridge).
        strata: (n,) integer stratum (event, class) folds are balanced on; None: one.
        penalties: candidate penalties (``inf``: no covariates).
        n_folds: folds per repeat (at most the number of groups).
        n_repeats: CV repeats with different fold assignments; losses are averaged.
        rule: ``"1se"`` (default): the largest penalty whose CV loss is within one
            standard error of the smallest (glmnet's ``lambda.1se``; the standard error
            from the held-out folds' own losses); ``"min"``: the smallest CV loss.
        seed: seed of the fold assignments.

    Returns:
        The :class:`PenalisedFit` refitted on all samples at the chosen penalty.

    Raises:
        ConfigError: ``x`` is not 2-D, ``groups``/``strata`` do not match its rows,
            fewer than 2 groups, ``l1_ratio`` outside [0, 1], an unknown ``rule`` or no
            candidate penalty.
    """
    if rule not in ("1se", "min"):
        raise ConfigError(f"fit_penalised: rule={rule!r}; choose '1se' or 'min'")
    if not 0 <= l1_ratio <= 1:
        raise ConfigError(f"fit_penalised: l1_ratio={l1_ratio} must be in [0, 1]")
    if x.ndim != 2:
        raise ConfigError(f"fit_penalised: x must be (n, P), got {tuple(x.shape)}")
    n = x.shape[0]
    group_arr = np.asarray(groups, dtype=object)
    strata_arr = np.zeros(n, int) if strata is None else np.asarray(strata, int)
    if group_arr.shape != (n,) or strata_arr.shape != (n,):
        raise ConfigError(
            f"fit_penalised: groups and strata must have one entry per row of x ({n})"
        )
    n_groups = len(set(group_arr.tolist()))
    if n_groups < 2:
        raise ConfigError(f"fit_penalised: needs at least 2 groups (patients), got {n_groups}")
    if not penalties:
        raise ConfigError("fit_penalised: penalties is empty")
    x = x.detach().float()
    sd = x.std(dim=0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = x / sd
    everyone = torch.arange(n)
    cv, per_fold = np.zeros(len(penalties)), []
    for r in range(n_repeats):
        fold = _folds(group_arr, strata_arr, min(n_folds, n_groups), seed + r)
        oof = torch.zeros(len(penalties), n, n_outputs)
        for f in np.unique(fold):
            test = torch.from_numpy(np.flatnonzero(fold == f))
            train = torch.from_numpy(np.flatnonzero(fold != f))
            for j, (w, b) in enumerate(_path(z, loss, train, penalties, l1_ratio, n_outputs)):
                oof[j, test] = z[test] @ w + b
            with torch.no_grad():
                per_fold.append([float(loss(o[test], test)) for o in oof])
        with torch.no_grad():
            cv += np.array([float(loss(o, everyone)) for o in oof]) / n_repeats
    se = np.std(per_fold, axis=0, ddof=1) / math.sqrt(len(per_fold))
    best = _choose(np.asarray(penalties, float), cv, se if rule == "1se" else np.zeros_like(se))
    down_to_best = [p for p in penalties if p >= penalties[best]]  # the warm-start path
    w, b = _path(z, loss, everyone, down_to_best, l1_ratio, n_outputs)[
        down_to_best.index(penalties[best])
    ]
    return PenalisedFit(w / sd[:, None], b, float(penalties[best]), l1_ratio,
                        tuple(map(float, penalties)), tuple(cv.tolist()),
                        tuple(se.tolist()))  # fmt: skip


def _choose(penalties: np.ndarray, cv: np.ndarray, se: np.ndarray) -> int:
    """Index of the largest penalty whose CV loss is within ``se`` of the minimum's
    (the largest of the minima when ``se`` is 0)."""
    order = np.argsort(-penalties, kind="stable")  # largest first
    best = int(order[np.argmin(cv[order])])
    return int(next(j for j in order if cv[j] <= cv[best] + se[best]))
