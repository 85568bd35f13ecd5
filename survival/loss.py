"""Survival losses for training risk models (PyTorch).

All losses take their arguments in one order: the model output first, then ``time``,
then ``event`` (1 = death / progression, 0 = censored), then optional sample weights.
``risk`` is a log relative hazard: higher means an earlier event.

* :func:`cox_ph_loss` — negative Cox partial log-likelihood with Efron or Breslow ties
  and lifelines-style sample weights (weights enter both the event term and the risk
  sets), normalised by the weighted number of events.
* :func:`event_weights` — per-sample weights for imbalanced censoring.
* :func:`discrete_time_nll` — negative log-likelihood of a discrete-time hazard model
  over time bins (works with one bag per step, unlike the Cox loss); bins come from
  :func:`make_time_bins` / :func:`assign_time_bins`, scores from
  :func:`discrete_time_risk`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "NoEventsError",
    "assign_time_bins",
    "cox_ph_loss",
    "discrete_time_nll",
    "discrete_time_risk",
    "event_weights",
    "make_time_bins",
]

Ties = Literal["efron", "breslow"]
Reduction = Literal["mean", "sum"]


class NoEventsError(ValueError):
    """The batch has no (positively weighted) events, so the partial likelihood is empty."""


def _as_vector(x: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    """Return ``x`` as a 1-D tensor, accepting (N,) or (N, 1)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) or (N, 1), got {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but risk has {n}; pass one per sample")
    return x


def _first_bad(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask)[0, 0].item())


def _check_targets(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and convert inputs; return (risk, time, event, weights) as 1-D tensors."""
    risk = _as_vector(risk, "risk")
    n = risk.shape[0]
    if not risk.is_floating_point():
        raise TypeError(f"risk must be a floating-point tensor, got {risk.dtype}")
    time = _as_vector(torch.as_tensor(time), "time", n).to(risk.device)
    event = _as_vector(torch.as_tensor(event), "event", n).to(risk.device)
    bad = ~torch.isfinite(time.double()) | (time < 0)
    if bool(bad.any()):
        i = _first_bad(bad)
        raise ValueError(
            f"time must be finite and >= 0; sample {i} has {time[i].item()!r}; "
            "drop or fix that sample"
        )
    bad = (event != 0) & (event != 1)
    if bool(bad.any()):
        i = _first_bad(bad)
        raise ValueError(
            f"event must be 0 (censored) or 1 (event); sample {i} has {event[i].item()!r}"
        )
    if weights is None:
        w = torch.ones(n, dtype=risk.dtype, device=risk.device)
    else:
        w = _as_vector(torch.as_tensor(weights), "weights", n).to(risk.device, risk.dtype)
        bad = ~torch.isfinite(w) | (w < 0)
        if bool(bad.any()):
            i = _first_bad(bad)
            raise ValueError(f"weights must be finite and >= 0; sample {i} has {w[i].item()!r}")
    return risk, time, event.to(torch.bool), w


def cox_ph_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    ties: Ties = "efron",
    reduction: Reduction = "mean",
    allow_no_events: bool = False,
) -> torch.Tensor:
    r"""Negative (weighted) Cox partial log-likelihood.

    Samples are sorted by ``time`` (never by ``risk``). With unique times
    :math:`t_1 < \dots < t_K`, events :math:`H_k` at :math:`t_k` (``m_k`` of them,
    weight :math:`W_k = \sum_{i \in H_k} w_i`), risk-set sums
    :math:`R_k = \sum_{t_j \ge t_k} w_j e^{\eta_j}` and tied sums
    :math:`T_k = \sum_{i \in H_k} w_i e^{\eta_i}`, the log-likelihood is

    .. math::

        \ell = \sum_k \Big[\sum_{i \in H_k} w_i \eta_i
               - \frac{W_k}{m_k} \sum_{r=0}^{m_k - 1} \log\big(R_k - c\,\tfrac{r}{m_k} T_k\big)\Big]

    with :math:`c = 1` for Efron and :math:`c = 0` for Breslow. This is exactly what
    lifelines' ``CoxPHFitter`` maximises with ``weights_col`` (Efron). :math:`\log R_k`
    is a reverse ``logcumsumexp``, and the Efron correction is computed as
    :math:`\log R_k + \operatorname{log1p}(-\tfrac{r}{m_k} T_k / R_k)`, so large risks
    do not overflow.

    Args:
        risk: (N,) or (N, 1) float log relative hazard (higher = earlier event).
        time: (N,) follow-up times, finite and >= 0.
        event: (N,) 1/True for an observed event, 0/False for censored.
        weights: optional (N,) non-negative sample weights (see :func:`event_weights`).
        ties: ``"efron"`` (default, as lifelines) or ``"breslow"``.
        reduction: ``"mean"`` divides by the weighted number of events
            :math:`\sum_i w_i \delta_i`; ``"sum"`` returns :math:`-\ell`.
        allow_no_events: when the batch has no event, return a zero loss that is still
            connected to ``risk`` (zero gradient) instead of raising.

    Returns:
        A scalar tensor (dtype of ``risk``).

    Raises:
        ValueError: bad shapes, negative/NaN times, events not 0/1, negative weights,
            an unknown ``ties``/``reduction``, or no events (``NoEventsError``) unless
            ``allow_no_events``.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    risk, time, event, w = _check_targets(risk, time, event, weights)

    keep = w > 0
    if not bool(keep.all()):  # zero-weight samples contribute nothing anywhere
        risk, time, event, w = risk[keep], time[keep], event[keep], w[keep]
    if not bool(event.any()):
        if allow_no_events:
            return (risk * 0.0).sum()
        raise NoEventsError(
            "cox_ph_loss: the batch has no events (event == 1 with weight > 0), so the "
            "partial likelihood is undefined; use larger or event-stratified batches, "
            "or pass allow_no_events=True to get a zero loss"
        )

    order = torch.argsort(time, stable=True)
    time, event, w, eta = time[order], event[order], w[order], risk[order]
    log_we = eta + torch.log(w)
    # log of the weighted risk-set sum from each sorted position to the end
    log_tail = torch.logcumsumexp(log_we.flip(0), dim=0).flip(0)
    _, group, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # first sorted index of each unique time
    log_r = log_tail[first]  # (K,) log R_k (all with time >= t_k)

    ev = torch.nonzero(event).squeeze(1)  # sorted by time
    k_ev = group[ev]
    n_groups = counts.shape[0]
    m = torch.bincount(k_ev, minlength=n_groups)  # unweighted tied-event counts
    w_ev = w[ev]
    w_k = torch.zeros(n_groups, dtype=w.dtype, device=w.device).index_add_(0, k_ev, w_ev)
    m_ev = m[k_ev].to(eta.dtype)
    denom = log_r[k_ev]
    if ties == "efron":
        # T_k / R_k, each term <= 1 so no overflow
        frac = torch.exp(log_we[ev] - log_r[k_ev])
        ratio = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add_(0, k_ev, frac)
        start = torch.cumsum(m, 0) - m
        rank = (torch.arange(ev.shape[0], device=eta.device) - start[k_ev]).to(eta.dtype)
        denom = denom + torch.log1p(-(rank / m_ev) * ratio[k_ev])
    loglik = (w_ev * eta[ev]).sum() - (w_k[k_ev] / m_ev * denom).sum()
    if reduction == "sum":
        return -loglik
    return -loglik / w_ev.sum()


def event_weights(
    event: torch.Tensor | np.ndarray,
    policy: str | float = "none",
) -> torch.Tensor | np.ndarray:
    """Per-sample weights for imbalanced censoring, to pass to :func:`cox_ph_loss`.

    Args:
        event: (N,) event indicators (0/1 or bool), a tensor or an array.
        policy: ``"none"`` (all ones); ``"balanced"`` (events weighted by
            n_censored / n_events, censored samples 1; all ones when either group is
            empty); or a positive number, the weight of every event (censored 1).

    Returns:
        (N,) float weights of the same kind as ``event`` (tensor or ndarray).

    Raises:
        ValueError: an unknown policy, a non-positive factor, or events not 0/1.
    """
    ev = event.detach().cpu().numpy() if isinstance(event, torch.Tensor) else np.asarray(event)
    ev = ev.reshape(-1)
    bad = (ev != 0) & (ev != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"event must be 0 or 1; sample {i} has {ev[i].item()!r}")
    ev = ev.astype(bool)
    if isinstance(policy, str):
        if policy == "none":
            factor = 1.0
        elif policy == "balanced":
            n_event = int(ev.sum())
            n_cens = ev.size - n_event
            factor = n_cens / n_event if n_event and n_cens else 1.0
        else:
            raise ValueError(
                f"weight policy must be 'none', 'balanced' or a positive number, got {policy!r}"
            )
    else:
        factor = float(policy)
        if not np.isfinite(factor) or factor <= 0:
            raise ValueError(f"event weight factor must be a positive number, got {policy!r}")
    out = np.where(ev, factor, 1.0)
    if isinstance(event, torch.Tensor):
        dtype = event.dtype if event.is_floating_point() else torch.get_default_dtype()
        return torch.as_tensor(out, dtype=dtype, device=event.device)
    return out


def make_time_bins(
    time: np.ndarray | torch.Tensor,
    event: np.ndarray | torch.Tensor,
    n_bins: int = 4,
) -> np.ndarray:
    """Bin edges for :func:`discrete_time_nll`, learnt on **training** times.

    Inner edges are quantiles of the observed event times (so each bin holds about
    the same number of events); the outer edges are 0 and +inf so that any held-out
    time falls in a bin.

    Args:
        time: (N,) training follow-up times.
        event: (N,) training event indicators.
        n_bins: number of bins K (>= 1).

    Returns:
        (K + 1,) increasing float64 edges ``[0, q_1, ..., q_{K-1}, inf]``; duplicate
        quantiles (many tied times) are merged, so fewer bins may come back.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    t = np.asarray(torch.as_tensor(time).detach().cpu(), dtype=np.float64).reshape(-1)
    e = np.asarray(torch.as_tensor(event).detach().cpu()).reshape(-1).astype(bool)
    if t.shape != e.shape:
        raise ValueError(f"time has {t.size} rows but event has {e.size}")
    ref = t[e] if e.any() else t
    if ref.size == 0:
        raise ValueError("make_time_bins needs at least one training time")
    inner = np.quantile(ref, np.linspace(0, 1, n_bins + 1)[1:-1]) if n_bins > 1 else []
    inner = np.unique(np.asarray(inner, dtype=np.float64))
    inner = inner[inner > 0]
    return np.concatenate([[0.0], inner, [np.inf]])


def assign_time_bins(time: np.ndarray | torch.Tensor, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time: bin k covers ``[edges[k], edges[k+1])``.

    Args:
        time: (N,) times (>= 0).
        edges: (K + 1,) edges from :func:`make_time_bins`.

    Returns:
        (N,) int64 bin indices in ``[0, K)``.
    """
    t = np.asarray(torch.as_tensor(time).detach().cpu(), dtype=np.float64).reshape(-1)
    if np.isnan(t).any() or (t < 0).any():
        i = int(np.flatnonzero(np.isnan(t) | (t < 0))[0])
        raise ValueError(f"time must be >= 0 and not NaN; sample {i} has {t[i]!r}")
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), t, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


def discrete_time_nll(
    logits: torch.Tensor,
    bin_index: torch.Tensor,
    event: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    r"""Negative log-likelihood of a discrete-time hazard model.

    ``sigmoid(logits[i, k])`` is the hazard :math:`h_k` of sample ``i`` in bin ``k``
    (the probability of the event in bin ``k`` given survival to it). A sample with an
    event in bin ``j`` contributes :math:`-\sum_{k<j}\log(1-h_k) - \log h_j`; a sample
    censored in bin ``j`` survived it: :math:`-\sum_{k \le j}\log(1-h_k)`. Computed with
    ``logsigmoid``, so it is finite for any logits and defined for a single sample.

    Args:
        logits: (N, K) hazard logits.
        bin_index: (N,) int bin of each time (see :func:`assign_time_bins`).
        event: (N,) 1 = event, 0 = censored.
        weights: optional (N,) non-negative sample weights.
        reduction: ``"mean"`` (weighted mean over samples) or ``"sum"``.

    Returns:
        A scalar tensor.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    n, k = logits.shape
    idx = _as_vector(torch.as_tensor(bin_index, device=logits.device), "bin_index", n).long()
    ev = _as_vector(torch.as_tensor(event, device=logits.device), "event", n)
    if bool(((ev != 0) & (ev != 1)).any()):
        i = _first_bad((ev != 0) & (ev != 1))
        raise ValueError(f"event must be 0 or 1; sample {i} has {ev[i].item()!r}")
    if bool(((idx < 0) | (idx >= k)).any()):
        i = _first_bad((idx < 0) | (idx >= k))
        raise ValueError(f"bin_index must be in [0, {k}); sample {i} has {idx[i].item()}")
    ev_f = ev.to(logits.dtype)
    log_surv = F.logsigmoid(-logits)  # log(1 - h)
    log_haz = F.logsigmoid(logits)
    cum = torch.cumsum(log_surv, dim=1)  # log S(k) = sum_{j<=k} log(1-h_j)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    rows = torch.arange(n, device=logits.device)
    ll_event = before[rows, idx] + log_haz[rows, idx]
    ll_cens = cum[rows, idx]
    nll = -(ev_f * ll_event + (1 - ev_f) * ll_cens)
    if weights is None:
        return nll.sum() if reduction == "sum" else nll.mean()
    w = _as_vector(torch.as_tensor(weights), "weights", n).to(logits.device, logits.dtype)
    if reduction == "sum":
        return (w * nll).sum()
    return (w * nll).sum() / w.sum().clamp_min(torch.finfo(logits.dtype).tiny)


def discrete_time_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score from discrete-time hazard logits (higher = earlier event).

    The negative sum over bins of the survival function, i.e. minus the expected number
    of bins survived, so it ranks like a Cox risk in the C-index and the report.

    Args:
        logits: (N, K) hazard logits.

    Returns:
        (N,) risk scores.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    return -torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1)).sum(dim=1)
