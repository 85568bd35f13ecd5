"""Cox / discrete-time losses against torchsurv and lifelines on real data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_mil.survival.loss import (
    NoEventsError,
    assign_time_bins,
    cox_ph_loss,
    discrete_time_nll,
    discrete_time_risk,
    event_weights,
    make_time_bins,
)

F64 = torch.float64


def _tensors(df: pd.DataFrame, time: str, event: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(df[time].to_numpy(), dtype=F64),
        torch.tensor(df[event].to_numpy(), dtype=torch.long),
    )


@pytest.fixture
def torchsurv_f64(monkeypatch: pytest.MonkeyPatch):
    """torchsurv's public loss, made to compute in float64.

    torchsurv coerces inputs to float32 and allocates float32 buffers with the default
    dtype; we keep its validation but return float64 tensors and make float64 the
    default while the test runs, so the comparison can be done to 1e-6.
    """
    with warnings.catch_warnings():
        # torchsurv scripts a helper at import time; torch deprecates torch.jit.script
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        import torchsurv.tools.validators as validators
        from torchsurv.loss.cox import neg_partial_log_likelihood

    original = validators._to_float_tensor

    def to_f64(name, v, *, allow_inf=False):
        original(name, v, allow_inf=allow_inf)  # keep torchsurv's checks
        return v.to(F64)

    monkeypatch.setattr(validators, "_to_float_tensor", to_f64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield neg_partial_log_likelihood
    torch.set_default_dtype(previous)


# torchsurv warns on every call with tied times, which both data sets have
TIES_WARNING = "ignore:Ties in `time` detected:UserWarning"


@pytest.mark.filterwarnings(TIES_WARNING)
@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("dataset", ["rossi", "gbsg2"])
def test_matches_torchsurv(torchsurv_f64, request, dataset, ties):
    df = request.getfixturevalue(dataset)
    time, event = _tensors(
        df, "week" if dataset == "rossi" else "time", "arrest" if dataset == "rossi" else "event"
    )
    gen = torch.Generator().manual_seed(1)
    for scale in (0.0, 1.0, 3.0):
        risk = scale * torch.randn(len(time), generator=gen, dtype=F64)
        ours_sum = cox_ph_loss(risk, time, event, ties=ties, reduction="sum")
        ref_sum = torchsurv_f64(risk, event.bool(), time, ties_method=ties, reduction="sum")
        assert ours_sum.dtype == F64
        assert ours_sum.item() == pytest.approx(ref_sum.item(), abs=1e-6, rel=0)
        # torchsurv's "mean" averages over *unique event times* when there are ties; ours
        # averages over (weighted) events, i.e. sum / number of events.
        ours_mean = cox_ph_loss(risk, time, event, ties=ties)
        assert ours_mean.item() == pytest.approx(ref_sum.item() / int(event.sum()), abs=1e-6)


def test_matches_torchsurv_without_ties(torchsurv_f64):
    # distinct times: torchsurv's plain Cox path; (N, 1) risks accepted as well
    gen = torch.Generator().manual_seed(2)
    time = torch.randperm(50, generator=gen).to(F64) + 1.0
    event = (torch.rand(50, generator=gen) < 0.6).long()
    risk = torch.randn(50, 1, generator=gen, dtype=F64)
    ours = cox_ph_loss(risk, time, event, reduction="sum")
    ref = torchsurv_f64(risk, event.bool(), time, reduction="sum")
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert cox_ph_loss(risk, time, event, ties="breslow").item() == pytest.approx(
        cox_ph_loss(risk, time, event, ties="efron").item(), abs=1e-12
    )


def _fit_linear_cox(x: torch.Tensor, time, event, weights=None, ties="efron") -> np.ndarray:
    beta = torch.zeros(x.shape[1], dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(x @ beta, time, event, weights, ties=ties)
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy()


def _standardised(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    out = df.copy()
    out[cols] = (df[cols] - df[cols].mean()) / df[cols].std()
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dataset", ["rossi", "gbsg2"])
def test_linear_cox_reproduces_lifelines(request, dataset, weighted):
    from lifelines import CoxPHFitter

    df = request.getfixturevalue(dataset)
    tcol, ecol = ("week", "arrest") if dataset == "rossi" else ("time", "event")
    cols = [c for c in df.columns if c not in (tcol, ecol)]
    df = _standardised(df, cols)
    kwargs = {}
    weights = None
    if weighted:
        rng = np.random.default_rng(3)
        df["w"] = rng.uniform(0.2, 3.0, len(df))
        kwargs = {"weights_col": "w", "robust": True}  # robust: no warning on non-integer
        weights = torch.tensor(df["w"].to_numpy(), dtype=F64)
    cph = CoxPHFitter(penalizer=0.0).fit(df, tcol, ecol, **kwargs)
    time, event = _tensors(df, tcol, ecol)
    x = torch.tensor(df[cols].to_numpy(), dtype=F64)
    beta = _fit_linear_cox(x, time, event, weights)
    np.testing.assert_allclose(beta, cph.params_[cols].to_numpy(), atol=1e-3, rtol=0)
    # and the maximised (weighted) log partial likelihood is lifelines' too
    ll = -cox_ph_loss(x @ torch.tensor(beta), time, event, weights, reduction="sum").item()
    assert ll == pytest.approx(cph.log_likelihood_, abs=1e-4)


def test_breslow_integer_weights_equal_duplicated_rows(rossi):
    time, event = _tensors(rossi, "week", "arrest")
    gen = torch.Generator().manual_seed(4)
    risk = torch.randn(len(time), generator=gen, dtype=F64)
    w = torch.randint(1, 4, (len(time),), generator=gen)
    rep = torch.repeat_interleave(torch.arange(len(time)), w)
    weighted = cox_ph_loss(risk, time, event, w.to(F64), ties="breslow")
    duplicated = cox_ph_loss(risk[rep], time[rep], event[rep], ties="breslow")
    assert weighted.item() == pytest.approx(duplicated.item(), abs=1e-10)


def test_zero_weight_equals_dropping_the_sample(rossi):
    time, event = _tensors(rossi, "week", "arrest")
    risk = torch.linspace(-2, 2, len(time), dtype=F64)
    w = torch.ones(len(time), dtype=F64)
    w[::7] = 0.0
    keep = w > 0
    a = cox_ph_loss(risk, time, event, w)
    b = cox_ph_loss(risk[keep], time[keep], event[keep])
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_sorted_by_time_not_by_risk():
    # hand-computed: times 1 < 2 < 3, events at 1 and 3
    risk = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    time = torch.tensor([3.0, 1.0, 2.0], dtype=F64)  # sample 1 first, then 2, then 0
    event = torch.tensor([1, 1, 0])
    expected = -((1.0 - math.log(math.e + math.e**2 + 1)) + (0.0 - 0.0)) / 2
    assert cox_ph_loss(risk, time, event).item() == pytest.approx(expected, abs=1e-12)


def test_efron_by_hand():
    # two tied events at t=1 with a third sample at risk
    risk = torch.tensor([0.5, -0.3, 0.2], dtype=F64)
    time = torch.tensor([1.0, 1.0, 2.0], dtype=F64)
    event = torch.tensor([1, 1, 0])
    e = np.exp(risk.numpy())
    r, t = e.sum(), e[:2].sum()
    efron = (0.5 - 0.3) - (math.log(r) + math.log(r - 0.5 * t))
    breslow = (0.5 - 0.3) - 2 * math.log(r)
    assert cox_ph_loss(risk, time, event).item() == pytest.approx(-efron / 2, abs=1e-12)
    got = cox_ph_loss(risk, time, event, ties="breslow").item()
    assert got == pytest.approx(-breslow / 2, abs=1e-12)


def test_stable_for_huge_risks():
    risk = torch.tensor([800.0, -800.0, 790.0, 5.0], dtype=torch.float32, requires_grad=True)
    time = torch.tensor([1.0, 1.0, 2.0, 3.0])
    event = torch.tensor([1, 1, 1, 0])
    loss = cox_ph_loss(risk, time, event)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(risk.grad).all()


def test_no_events():
    risk = torch.randn(4, requires_grad=True)
    time, event = torch.arange(4.0), torch.zeros(4)
    with pytest.raises(NoEventsError, match="no events"):
        cox_ph_loss(risk, time, event)
    loss = cox_ph_loss(risk, time, event, allow_no_events=True)
    loss.backward()
    assert loss.item() == 0.0
    assert risk.grad is not None and torch.equal(risk.grad, torch.zeros(4))
    # events that all carry zero weight count as no events
    with pytest.raises(NoEventsError):
        cox_ph_loss(risk, time, torch.tensor([1, 0, 0, 0]), torch.tensor([0.0, 1, 1, 1]))


@pytest.mark.parametrize(
    ("time", "event", "weights", "match"),
    [
        ([1.0, -2.0, 3.0], [1, 0, 1], None, "time must be finite and >= 0; sample 1"),
        ([1.0, 2.0, float("nan")], [1, 0, 1], None, "sample 2"),
        ([1.0, 2.0, 3.0], [1, 2, 1], None, "event must be 0 .* sample 1 has 2"),
        ([1.0, 2.0, 3.0], [1, 0, 1], [1.0, -1.0, 1.0], "weights must be finite and >= 0"),
        ([1.0, 2.0], [1, 0], None, "time has 2 rows but risk has 3"),
    ],
)
def test_bad_inputs(time, event, weights, match):
    w = None if weights is None else torch.tensor(weights)
    with pytest.raises(ValueError, match=match):
        cox_ph_loss(torch.zeros(3), torch.tensor(time), torch.tensor(event), w)


def test_bad_arguments():
    args = (torch.zeros(3), torch.arange(3.0), torch.ones(3))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(*args, ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        cox_ph_loss(*args, reduction="none")
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, 1\)"):
        cox_ph_loss(torch.zeros(3, 2), *args[1:])


# ---- hypothesis property tests -------------------------------------------------------

_n = st.integers(min_value=1, max_value=25)
_ties = st.sampled_from(["efron", "breslow"])


@st.composite
def survival_batches(draw):
    n = draw(_n)
    times = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))  # many ties
    events = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    events[draw(st.integers(0, n - 1))] = 1  # at least one event
    risks = draw(
        st.lists(st.floats(-30, 30, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)
    )
    weights = draw(st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n))
    return (
        torch.tensor(risks, dtype=F64),
        torch.tensor(times, dtype=F64),
        torch.tensor(events),
        torch.tensor(weights, dtype=F64),
    )


@settings(max_examples=60, deadline=None)
@given(
    batch=survival_batches(), ties=st.sampled_from(["efron", "breslow"]), seed=st.integers(0, 99)
)
def test_property_order_invariance(batch, ties, seed):
    risk, time, event, w = batch
    perm = torch.randperm(len(risk), generator=torch.Generator().manual_seed(seed))
    a = cox_ph_loss(risk, time, event, w, ties=ties)
    b = cox_ph_loss(risk[perm], time[perm], event[perm], w[perm], ties=ties)
    assert a.item() == pytest.approx(b.item(), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    batch=survival_batches(), shift=st.floats(-50, 50), ties=st.sampled_from(["efron", "breslow"])
)
def test_property_shift_invariance(batch, shift, ties):
    risk, time, event, w = batch
    a = cox_ph_loss(risk, time, event, w, ties=ties)
    b = cox_ph_loss(risk + shift, time, event, w, ties=ties)
    assert a.item() == pytest.approx(b.item(), rel=1e-8, abs=1e-8)


@settings(max_examples=60, deadline=None)
@given(batch=survival_batches(), ties=_ties)
def test_property_finite_with_an_event(batch, ties):
    risk, time, event, w = batch
    risk = risk.clone().requires_grad_(True)
    loss = cox_ph_loss(risk, time, event, w, ties=ties)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(risk.grad).all()
    # with unit weights it is minus the log of a product of probabilities
    assert cox_ph_loss(risk, time, event, ties=ties).item() >= -1e-9


# ---- weight policies -----------------------------------------------------------------


def test_event_weights():
    ev = np.array([1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(event_weights(ev), np.ones(6))
    np.testing.assert_array_equal(event_weights(ev, "balanced"), [2, 1, 1, 1, 2, 1])
    np.testing.assert_array_equal(event_weights(ev, 3.0), [3, 1, 1, 1, 3, 1])
    t = event_weights(torch.tensor(ev), "balanced")
    assert isinstance(t, torch.Tensor)
    assert torch.equal(t, torch.tensor([2.0, 1, 1, 1, 2, 1]))
    np.testing.assert_array_equal(event_weights(np.ones(3), "balanced"), np.ones(3))
    with pytest.raises(ValueError, match="weight policy"):
        event_weights(ev, "inverse")
    with pytest.raises(ValueError, match="positive"):
        event_weights(ev, -1.0)
    with pytest.raises(ValueError, match="sample 2 has 3"):
        event_weights(np.array([0, 1, 3]))


# ---- discrete-time model -------------------------------------------------------------


def _person_period_bce(logits, bins, events):
    """Independent form: one Bernoulli row per patient and bin survived / reached."""
    total = torch.zeros((), dtype=logits.dtype)
    for i in range(len(bins)):
        for k in range(int(bins[i]) + 1):
            target = float(events[i]) if k == bins[i] else 0.0
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(
                logits[i, k], torch.tensor(target, dtype=logits.dtype)
            )
    return total


def test_discrete_time_nll_matches_person_period_bce():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 4, generator=gen, dtype=F64)
    bins = torch.randint(0, 4, (12,), generator=gen)
    events = torch.randint(0, 2, (12,), generator=gen)
    got = discrete_time_nll(logits, bins, events, reduction="sum")
    assert got.item() == pytest.approx(_person_period_bce(logits, bins, events).item(), abs=1e-10)
    assert discrete_time_nll(logits, bins, events).item() == pytest.approx(got.item() / 12)
    # a single bag per step is fine (no risk set needed), weights scale contributions
    one = discrete_time_nll(logits[:1], bins[:1], events[:1])
    assert torch.isfinite(one)
    w = torch.full((12,), 2.0, dtype=F64)
    weighted = discrete_time_nll(logits, bins, events, w, reduction="sum")
    assert weighted.item() == pytest.approx(2 * got.item())


def test_discrete_time_bad_inputs():
    logits = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="bin_index must be in"):
        discrete_time_nll(logits, torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="event must be 0 or 1"):
        discrete_time_nll(logits, torch.tensor([0, 1, 1]), torch.tensor([1, 5, 1]))


def test_time_bins(gbsg2):
    edges = make_time_bins(gbsg2["time"], gbsg2["event"], n_bins=4)
    assert edges[0] == 0 and np.isinf(edges[-1]) and len(edges) == 5
    assert np.all(np.diff(edges) > 0)
    idx = assign_time_bins(gbsg2["time"].to_numpy(), edges)
    # quantiles of event times: about a quarter of the events per bin
    counts = np.bincount(idx[gbsg2["event"].to_numpy() == 1], minlength=4)
    assert counts.min() >= 0.2 * counts.sum()
    assert assign_time_bins(np.array([0.0, 1e9]), edges).tolist() == [0, 3]
    tied = make_time_bins(np.ones(10), np.ones(10), n_bins=4)
    assert tied.tolist() == [0.0, 1.0, np.inf]
    with pytest.raises(ValueError, match="sample 1"):
        assign_time_bins(np.array([1.0, -1.0]), edges)


def test_discrete_time_risk_orders_by_hazard():
    logits = torch.tensor([[-3.0, -3.0], [0.0, 0.0], [3.0, 3.0]])
    risk = discrete_time_risk(logits)
    assert risk[0] < risk[1] < risk[2]
