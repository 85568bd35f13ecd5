"""Risk stratification against scikit-survival and hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.survival.stratify import (
    assign_groups,
    group_labels,
    hazard_ratios,
    kaplan_meier,
    learn_cutoffs,
    logrank,
    median_follow_up,
    numbers_at_risk,
    stratify_risk,
)
from wsi_mil.survival.validate import SurvivalDataError, UndefinedStatisticError


def _product_limit(t: np.ndarray, e: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Independent Kaplan–Meier estimate at ``at``."""
    s, out = 1.0, []
    times = np.unique(t[e])
    surv_at = {}
    for u in times:
        s *= 1 - ((t == u) & e).sum() / (t >= u).sum()
        surv_at[u] = s
    for a in at:
        past = times[times <= a]
        out.append(surv_at[past[-1]] if past.size else 1.0)
    return np.array(out)


def test_cutoffs_learnt_on_train_and_applied_to_test():
    train = np.arange(10.0)  # median 4.5
    np.testing.assert_allclose(learn_cutoffs(train), [4.5])
    np.testing.assert_allclose(learn_cutoffs(train, 3), np.quantile(train, [1 / 3, 2 / 3]))
    np.testing.assert_allclose(learn_cutoffs(train, quantiles=[0.25, 0.75]), [2.25, 6.75])
    groups = assign_groups([-5.0, 4.5, 4.6, 100.0], learn_cutoffs(train))
    assert groups.tolist() == [0, 0, 1, 1]  # at the cut-off stays in the lower group
    assert group_labels(2) == ["low", "high"]
    assert group_labels(3) == ["low", "intermediate", "high"]
    with pytest.raises(SurvivalDataError, match="index 1"):
        learn_cutoffs([1.0, np.nan])
    with pytest.raises(SurvivalDataError, match="quantiles"):
        learn_cutoffs(train, quantiles=[0.8, 0.2])


def test_kaplan_meier_and_at_risk(rossi):
    t = rossi["week"].to_numpy(float)
    e = rossi["arrest"].to_numpy(bool)
    g = (rossi["fin"] == 1).to_numpy().astype(int)
    curves = kaplan_meier(t, e, g, ["no aid", "aid"])
    assert [c.label for c in curves] == ["no aid", "aid"]
    at = np.array([0.0, 10.0, 26.0, 40.0, 51.0])
    for k, c in enumerate(curves):
        m = g == k
        got = c.survival[np.searchsorted(c.times, at, side="right") - 1]
        np.testing.assert_allclose(got, _product_limit(t[m], e[m], at), atol=1e-12)
        assert c.n == m.sum() and c.events == e[m].sum()
        assert np.all(c.lower <= c.survival + 1e-12) and np.all(c.survival <= c.upper + 1e-12)
    table = numbers_at_risk(t, g, ["no aid", "aid"], [0.0, 52.0])
    assert table["no aid"][0] == (g == 0).sum()
    assert table["aid"][1] == ((g == 1) & (t >= 52)).sum()


def test_logrank_equals_sksurv(gbsg2):
    from sksurv.compare import compare_survival

    t = gbsg2["time"].to_numpy()
    e = gbsg2["event"].to_numpy().astype(bool)
    y = np.empty(len(t), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = e, t
    for n_groups in (2, 3):
        g = assign_groups(gbsg2["pnodes"], learn_cutoffs(gbsg2["pnodes"].iloc[:300], n_groups))
        chisq, pvalue = compare_survival(y, g)
        res = logrank(t, e, g)
        assert res.statistic == pytest.approx(chisq, rel=1e-8)
        assert res.p_value == pytest.approx(pvalue, rel=1e-6)
        assert res.dof == n_groups - 1
    with pytest.raises(UndefinedStatisticError, match="two non-empty"):
        logrank(t, e, np.zeros(len(t), dtype=int))


def test_median_follow_up_is_reverse_km(rossi):
    t = rossi["week"].to_numpy(float)
    e = rossi["arrest"].to_numpy(bool)
    grid = np.unique(t)
    rev = _product_limit(t, ~e, grid)
    expected = grid[np.flatnonzero(rev <= 0.5)[0]]
    assert median_follow_up(t, e) == expected


def test_hazard_ratios_match_sksurv_cox(rossi):
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    df = rossi.copy()
    df["race"] = np.where(df["race"] == 1, "black", "other")
    df = df.rename(columns={"week": "time", "arrest": "event"})
    rows, notes = hazard_ratios(df, ["fin", "age", "race", "prio"])
    assert notes == {}
    multi = {r.variable: r for r in rows if r.model == "multivariable"}
    assert set(multi) == {"fin", "age", "race=other", "prio"}
    assert multi["race=other"].label == "race: other vs black"
    y = np.empty(len(df), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = df["event"].astype(bool), df["time"]
    x = df[["fin", "age", "prio"]].assign(race=(df["race"] == "other").astype(float))
    ref = CoxPHSurvivalAnalysis(ties="efron").fit(x, y)
    for name, coef in zip(["fin", "age", "prio", "race=other"], ref.coef_, strict=True):
        assert multi[name].hr == pytest.approx(np.exp(coef), rel=1e-4)
        assert multi[name].lower < multi[name].hr < multi[name].upper
        assert multi[name].n == len(df)
    uni = {r.variable: r for r in rows if r.model == "univariate"}
    ref_age = CoxPHSurvivalAnalysis(ties="efron").fit(df[["age"]], y)
    assert uni["age"].hr == pytest.approx(np.exp(ref_age.coef_[0]), rel=1e-4)


def test_hazard_ratios_constant_and_missing(rossi):
    df = rossi.rename(columns={"week": "time", "arrest": "event"}).copy()
    df["site"] = 3.0
    df.loc[df.index[:10], "age"] = np.nan
    rows, notes = hazard_ratios(df, ["fin", "age", "site"])
    assert "constant" in notes["univariate: site"] and "'site'" in notes["univariate: site"]
    assert "site" in notes["multivariable"]
    assert {r.variable for r in rows if r.model == "multivariable"} == {"fin", "age"}
    assert all(r.n == len(df) - 10 for r in rows if r.model == "multivariable")
    with pytest.raises(SurvivalDataError, match="'stage' not found"):
        hazard_ratios(df, ["stage"])


def test_stratify_end_to_end(rossi):
    r = 0.1 * rossi["prio"].to_numpy() - 0.05 * rossi["age"].to_numpy()
    t, e = rossi["week"].to_numpy(float), rossi["arrest"].to_numpy()
    res = stratify_risk(r[:200], t[200:], e[200:], r[200:], n_groups=2)
    np.testing.assert_allclose(res.cutoffs, [np.median(r[:200])])
    assert res.groups.tolist() == (r[200:] > np.median(r[:200])).astype(int).tolist()
    assert res.logrank is not None and res.logrank.p_value < 0.05
    assert sum(c.n for c in res.curves) == len(t) - 200
    # held-out risks all below the training cut-off: one group, log-rank undefined
    low = stratify_risk(r[:200], t[200:], e[200:], np.full(len(t) - 200, -1e3))
    assert low.logrank is None and "log-rank" in low.note
