"""Metrics against scikit-survival, lifelines and hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from wsi_mil.survival.metrics import (
    BrierScore,
    CIndex,
    breslow_survival,
    brier_from_survival,
    harrell_c,
    integrated_brier,
    time_dependent_auc,
    to_risk,
    uno_c,
)
from wsi_mil.survival.validate import SurvivalDataError, UndefinedStatisticError


@pytest.fixture(scope="module")
def gbsg_split():
    from sksurv.datasets import load_gbsg2

    x, y = load_gbsg2()
    risk = (
        0.04 * x["pnodes"].to_numpy()
        + 0.01 * x["tsize"].to_numpy()
        - 0.001 * x["progrec"].to_numpy()
    )
    t, e = y["time"].astype(float), y["cens"].astype(bool)
    return {"train": (t[:400], e[:400], risk[:400]), "test": (t[400:], e[400:], risk[400:])}


def _struct(t, e):
    out = np.empty(len(t), dtype=[("event", bool), ("time", float)])
    out["event"], out["time"] = e, t
    return out


def test_harrell_equals_sksurv(gbsg2, rossi):
    from sksurv.metrics import concordance_index_censored

    for t, e, r in (
        (gbsg2["time"], gbsg2["event"], gbsg2["pnodes"] + 0.1 * gbsg2["tsize"]),
        (rossi["week"], rossi["arrest"], rossi["prio"] - 0.1 * rossi["age"]),
    ):
        ref = concordance_index_censored(e.astype(bool).to_numpy(), t.to_numpy(), r.to_numpy())[0]
        res = harrell_c(t, e, r, n_bootstrap=50, seed=1)
        assert isinstance(res, CIndex)
        assert res.estimate == pytest.approx(ref, abs=1e-12)
        assert res.lower < res.estimate < res.upper
        assert res.n_bootstrap == 50


def test_harrell_matches_lifelines_without_tied_times():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(0)
    t = rng.permutation(200).astype(float) + 1
    e = rng.random(200) < 0.6
    r = -t / 50 + rng.normal(0, 1, 200)
    # lifelines scores survival (higher = longer), so it takes minus the risk
    assert harrell_c(t, e, r, n_bootstrap=0).estimate == pytest.approx(
        concordance_index(t, -r, e), abs=1e-12
    )


def test_sign_convention():
    rng = np.random.default_rng(1)
    t = rng.permutation(60).astype(float) + 1
    e = rng.random(60) < 0.7
    predicted_time = t + rng.normal(0, 10, 60)
    as_risk = harrell_c(t, e, to_risk(predicted_time, "survival"), n_bootstrap=0).estimate
    wrong = harrell_c(t, e, predicted_time, n_bootstrap=0).estimate
    assert as_risk > 0.7
    assert as_risk == pytest.approx(1 - wrong, abs=1e-12)
    np.testing.assert_array_equal(to_risk([1.0, 2.0]), [1.0, 2.0])
    with pytest.raises(SurvivalDataError, match="higher_means"):
        to_risk([1.0], "lower")


def test_bootstrap_is_seeded(gbsg_split):
    t, e, r = gbsg_split["test"]
    a = harrell_c(t, e, r, n_bootstrap=30, seed=7)
    b = harrell_c(t, e, r, n_bootstrap=30, seed=7)
    c = harrell_c(t, e, r, n_bootstrap=30, seed=8)
    assert a == b
    assert (a.lower, a.upper) != (c.lower, c.upper)
    none = harrell_c(t, e, r, n_bootstrap=0)
    assert none.n_bootstrap == 0 and np.isnan(none.lower) and np.isnan(none.upper)


def test_uno_equals_sksurv_with_training_censoring(gbsg_split):
    from sksurv.metrics import concordance_index_ipcw

    tt, te_, _ = gbsg_split["train"]
    t, e, r = gbsg_split["test"]
    ref = concordance_index_ipcw(_struct(tt, te_), _struct(t, e), r, tau=1500.0)[0]
    res = uno_c(t, e, r, tau=1500.0, train_time=tt, train_event=te_, n_bootstrap=20)
    assert res.estimate == pytest.approx(ref, abs=1e-12)
    assert res.lower <= res.estimate <= res.upper


def test_bootstrap_resamples_equal_sksurv_per_resample(rossi, gbsg_split):
    """The all-at-once pair bootstrap gives, resample by resample, sksurv's own C
    (tied times in Rossi's weeks, tied risks from rounding, repeated patients)."""
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw

    from wsi_mil.survival.metrics import _bootstrap, _pair_bootstrap, _uno_weights

    t = rossi["week"].to_numpy(float)[:150]
    e = rossi["arrest"].to_numpy(bool)[:150]
    r = np.round(rossi["prio"].to_numpy(float)[:150] - 0.1 * rossi["age"].to_numpy()[:150])
    ref = _bootstrap(lambda i: concordance_index_censored(e[i], t[i], r[i])[0], len(t), 40, seed=3)
    ours = _pair_bootstrap(t, e, r, np.ones_like(t), 1e-8, 40, seed=3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert harrell_c(t, e, r, n_bootstrap=40, seed=3).lower == np.percentile(ours, 2.5)

    tt, te_, _ = gbsg_split["train"]
    t, e, r = gbsg_split["test"]
    r = np.round(r, 1)

    def uno(i):
        return concordance_index_ipcw(_struct(tt, te_), _struct(t[i], e[i]), r[i], tau=1500.0)[0]

    ref = _bootstrap(uno, len(t), 40, seed=4)
    w = _uno_weights((tt, te_), t, e, 1500.0)
    np.testing.assert_allclose(_pair_bootstrap(t, e, r, w, 1e-8, 40, 4), ref, rtol=0, atol=1e-12)
    res = uno_c(t, e, r, tau=1500.0, train_time=tt, train_event=te_, n_bootstrap=40, seed=4)
    assert res.n_bootstrap == 40
    assert (res.lower, res.upper) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])))


def test_uno_without_censoring_is_truncated_harrell():
    rng = np.random.default_rng(2)
    t = rng.permutation(80).astype(float) + 1
    e = np.ones(80, dtype=bool)
    r = -t / 20 + rng.normal(0, 1, 80)
    uno = uno_c(t, e, r, tau=t.max() + 1, n_bootstrap=0).estimate
    assert uno == pytest.approx(harrell_c(t, e, r, n_bootstrap=0).estimate, abs=1e-12)


def test_time_auc_without_censoring_is_roc_auc():
    rng = np.random.default_rng(3)
    t = rng.exponential(10, 150) + 0.01
    e = np.ones(150, dtype=bool)
    r = -np.log(t) + rng.normal(0, 0.7, 150)
    times = np.percentile(t, [25, 50, 75])
    res = time_dependent_auc(t, e, r, times, n_bootstrap=20)
    for s, auc in zip(res.times, res.auc, strict=True):
        assert auc == pytest.approx(roc_auc_score(t <= s, r), abs=1e-10)
    assert np.all(res.lower <= res.auc + 1e-12) and np.all(res.auc <= res.upper + 1e-12)
    assert res.lower.shape == res.times.shape


def test_time_auc_equals_sksurv(gbsg_split):
    from sksurv.metrics import cumulative_dynamic_auc

    tt, te_, _ = gbsg_split["train"]
    t, e, r = gbsg_split["test"]
    times = [365.0, 730.0, 1095.0]
    ref, ref_mean = cumulative_dynamic_auc(_struct(tt, te_), _struct(t, e), r, times)
    res = time_dependent_auc(t, e, r, times, train_time=tt, train_event=te_, n_bootstrap=0)
    np.testing.assert_allclose(res.auc, ref, atol=1e-12)
    assert res.mean_auc == pytest.approx(ref_mean, abs=1e-12)
    with pytest.raises(SurvivalDataError, match="within the follow-up"):
        time_dependent_auc(t, e, r, [1e6], n_bootstrap=0)


def test_breslow_equals_sksurv(gbsg_split):
    from sksurv.linear_model.coxph import BreslowEstimator

    tt, te_, tr = gbsg_split["train"]
    _, _, r = gbsg_split["test"]
    ref = BreslowEstimator().fit(tr, te_, tt)
    ours = breslow_survival(tt, te_, tr)
    grid = np.array([50.0, 365.0, 1000.0, 2000.0])
    expected = np.vstack([f(grid) for f in ref.get_survival_function(r)])
    np.testing.assert_allclose(ours.survival(r, grid), expected, atol=1e-10)
    # before the first time there is no hazard yet; after the last it stays flat
    assert np.all(ours.survival(r, [0.0]) == 1.0)
    np.testing.assert_allclose(ours.survival(r, [1e9]), ours.survival(r, [tt.max()]))


def test_brier_without_censoring_is_mean_squared_error():
    rng = np.random.default_rng(4)
    t = rng.exponential(10, 120) + 0.01
    e = np.ones(120, dtype=bool)
    times = np.percentile(t, [20, 40, 60, 80])
    surv = np.exp(-np.outer(rng.uniform(0.05, 0.2, 120), times))
    res = brier_from_survival(t, e, surv, times, n_bootstrap=10)
    expected = ((t[:, None] > times[None, :]).astype(float) - surv) ** 2
    np.testing.assert_allclose(res.brier, expected.mean(axis=0), atol=1e-12)
    ibs = np.trapezoid(expected.mean(axis=0), times) / (times[-1] - times[0])
    assert res.ibs == pytest.approx(ibs, abs=1e-12)


def test_integrated_brier_equals_sksurv(gbsg_split):
    from sksurv.metrics import integrated_brier_score

    tt, te_, tr = gbsg_split["train"]
    t, e, r = gbsg_split["test"]
    times = np.linspace(200, 1500, 12)
    res = integrated_brier(
        t, e, r, train_time=tt, train_event=te_, train_risk=tr, times=times, n_bootstrap=20
    )
    assert isinstance(res, BrierScore)
    surv = breslow_survival(tt, te_, tr).survival(r, times)
    ref = integrated_brier_score(_struct(tt, te_), _struct(t, e), surv, times)
    assert res.ibs == pytest.approx(ref, abs=1e-12)
    assert res.lower <= res.ibs <= res.upper
    # an informative model beats the uninformative constant-risk model
    flat = integrated_brier(
        t,
        e,
        np.zeros_like(r),
        train_time=tt,
        train_event=te_,
        train_risk=np.zeros_like(tr),
        times=times,
        n_bootstrap=0,
    )
    assert res.ibs < flat.ibs


@pytest.mark.parametrize(
    ("time", "event", "risk", "match"),
    [
        ([1.0, -1.0, 2.0], [1, 0, 1], [0.1, 0.2, 0.3], r"time must be finite and >= 0; index 1"),
        ([1.0, np.nan, 2.0], [1, 0, 1], [0.1, 0.2, 0.3], "index 1 has nan"),
        ([1.0, 3.0, 2.0], [1, 0, 2], [0.1, 0.2, 0.3], "event must be 0 .*index 2 has 2"),
        ([1.0, 3.0, 2.0], [1, 0, 1], [0.1, np.nan, 0.3], "risk must be finite; index 1"),
        ([1.0, 3.0], [1, 0, 1], [0.1, 0.2, 0.3], "event has 3 values but time has 2"),
    ],
)
def test_invalid_input_names_argument_and_index(time, event, risk, match):
    with pytest.raises(SurvivalDataError, match=match):
        harrell_c(time, event, risk, n_bootstrap=0)


def test_undefined_statistics():
    with pytest.raises(UndefinedStatisticError, match="no events"):
        harrell_c([1.0, 2.0, 3.0], [0, 0, 0], [1.0, 2.0, 3.0])
    with pytest.raises(UndefinedStatisticError, match="single patient"):
        harrell_c([1.0], [1], [1.0])
    with pytest.raises(UndefinedStatisticError, match="comparable pairs"):
        harrell_c([2.0, 2.0, 2.0], [1, 1, 1], [1.0, 2.0, 3.0], n_bootstrap=0)
    # undefined resamples are skipped, not fatal
    res = harrell_c([1.0, 2.0, 3.0, 4.0], [1, 0, 0, 0], [4.0, 3.0, 2.0, 1.0], n_bootstrap=40)
    assert res.estimate == 1.0 and 0 < res.n_bootstrap < 40
