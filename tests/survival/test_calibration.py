"""Survival calibration: the Brier score beside Kaplan–Meier, calibration by group, τ.

References are independent implementations: scikit-survival's ``BreslowEstimator`` and
``integrated_brier_score``, lifelines' ``KaplanMeierFitter``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsi_mil.survival.analysis import analyse_predictions
from wsi_mil.survival.calibration import (
    LP_COLUMN,
    brier_vs_km,
    calibration_by_group,
    choose_tau,
    ibs_grid,
    out_of_fold_brier,
    run_tau,
)
from wsi_mil.survival.validate import SurvivalDataError, UndefinedStatisticError


def _structured(time, event) -> np.ndarray:
    out = np.empty(len(time), dtype=[("event", bool), ("time", float)])
    out["event"], out["time"] = np.asarray(event, bool), np.asarray(time, float)
    return out


def _with_lp(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A linear predictor on its own scale; ``risk`` is its per-fold z-score, as training
    writes it."""
    out = df.copy()
    out[LP_COLUMN] = 0.7 * out["risk"] + 0.3
    for _, rows in out.groupby("fold"):
        train = rows[rows["split"] == "train"][LP_COLUMN]
        out.loc[rows.index, "risk"] = (rows[LP_COLUMN] - train.mean()) / train.std(ddof=0)
    return out


def _reference_ibs(df: pd.DataFrame, grid: np.ndarray) -> tuple[float, float]:
    """IBS of per-fold Breslow curves and Kaplan–Meier curves, by scikit-survival and
    lifelines, over the test rows in fold order."""
    from lifelines import KaplanMeierFitter
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.metrics import integrated_brier_score

    surv, km, times, events = [], [], [], []
    for fold in sorted(df["fold"].unique()):
        tr = df[(df["fold"] == fold) & (df["split"] == "train")]
        te = df[(df["fold"] == fold) & (df["split"] == "test")]
        est = BreslowEstimator().fit(
            tr[LP_COLUMN].to_numpy(), tr["event"].to_numpy(bool), tr["time"].to_numpy()
        )
        surv += [fn(grid) for fn in est.get_survival_function(te[LP_COLUMN].to_numpy())]
        kmf = KaplanMeierFitter().fit(tr["time"], tr["event"])
        curve = kmf.survival_function_at_times(grid).to_numpy()
        km += [curve] * len(te)
        times.append(te["time"].to_numpy())
        events.append(te["event"].to_numpy())
    y = _structured(np.concatenate(times), np.concatenate(events))
    return (
        float(integrated_brier_score(y, y, np.array(surv), grid)),
        float(integrated_brier_score(y, y, np.array(km), grid)),
    )


def test_ibs_and_km_ibs_match_scikit_survival(make_preds) -> None:
    df = _with_lp(make_preds(n_patients=120, clinical=False))
    tau = run_tau(df)
    res, fs = out_of_fold_brier(df, tau, n_bootstrap=30, seed=1)
    assert fs.lp_column == LP_COLUMN
    ibs, ibs_km = _reference_ibs(df, res.times)
    assert res.ibs == pytest.approx(ibs, rel=1e-9)
    assert res.ibs_km == pytest.approx(ibs_km, rel=1e-9)
    assert res.difference == pytest.approx(ibs - ibs_km, rel=1e-9)
    assert res.times[-1] <= tau and res.times.size == 20
    for (lo, hi), value in zip(res.ci, (res.ibs, res.ibs_km, res.difference), strict=True):
        assert lo <= value <= hi
    assert res.n_bootstrap == 30
    assert res.ibs < res.ibs_km  # a real signal beats the Kaplan–Meier curve


def test_out_of_fold_brier_reuses_its_last_result(make_preds, tmp_path, monkeypatch) -> None:
    """The same table (also read back from its CSV) and settings: one computation; any
    other value or setting: a new one."""
    import wsi_mil.survival.calibration as C

    calls = []
    monkeypatch.setattr(C, "brier_vs_km", lambda *a, **k: calls.append(1) or brier_vs_km(*a, **k))
    df = _with_lp(make_preds(n_patients=60, clinical=False))
    tau = run_tau(df)
    first = out_of_fold_brier(df, tau, n_bootstrap=20, seed=1)
    df.to_csv(tmp_path / "p.csv", index=False)
    again = out_of_fold_brier(pd.read_csv(tmp_path / "p.csv"), tau, n_bootstrap=20, seed=1)
    assert again[0] is first[0] and len(calls) == 1
    changed = df.assign(time=df["time"] * 1.01)
    out_of_fold_brier(changed, tau, n_bootstrap=20, seed=1)
    out_of_fold_brier(changed, tau, n_bootstrap=20, seed=2)
    assert len(calls) == 3


def test_brier_depends_on_the_linear_predictor_not_on_the_z_scored_risk(make_preds) -> None:
    df = _with_lp(make_preds(n_patients=90, clinical=False))
    other = df.copy()
    other["risk"] = 25.0 * other["risk"] - 3.0  # another arbitrary scale of the same ranks
    a = analyse_predictions(df, n_bootstrap=0)[0]["brier"]
    b = analyse_predictions(other, n_bootstrap=0)[0]["brier"]
    assert a["ibs"] == b["ibs"] and a["ibs_km"] == b["ibs_km"]
    # without the column the z-scored risk is used, and the report says so
    data = analyse_predictions(df.drop(columns=[LP_COLUMN]), n_bootstrap=0)[0]
    assert any("'linear_predictor'" in n for n in data["notes"])


def test_no_signal_does_not_beat_kaplan_meier() -> None:
    """Weak true signal (log-HR 0.3) on the model's own scale: the model's IBS is close
    to Kaplan–Meier's, not reported as calibrated against a fixed 0.25."""
    rng = np.random.default_rng(4)
    n, folds = 300, 3
    x = rng.normal(size=n)
    t_ev = rng.exponential(10 * np.exp(-0.3 * x))
    t_c = rng.uniform(2, 30, n)
    time, event = np.minimum(t_ev, t_c), (t_ev <= t_c).astype(int)
    fold_of = np.arange(n) % folds
    rows = [
        {
            "patient_id": f"P{i}",
            "fold": k,
            "split": "test" if fold_of[i] == k else "train",
            "time": time[i],
            "event": event[i],
            "risk": 0.3 * x[i],
            LP_COLUMN: 0.3 * x[i],
        }
        for k in range(folds)
        for i in range(n)
    ]
    res, _ = out_of_fold_brier(pd.DataFrame(rows), run_tau(pd.DataFrame(rows)), n_bootstrap=50)
    assert abs(res.difference) < 0.01
    assert res.ci[2, 0] < 0  # not significantly worse than Kaplan–Meier


def test_calibration_by_group_matches_lifelines_km() -> None:
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(2)
    n = 200
    pred = rng.uniform(0.2, 0.9, n)
    time = rng.exponential(20, n).round(1) + 0.1  # ties
    event = (rng.random(n) < 0.7).astype(int)
    tau = 15.0
    cal = calibration_by_group(time, event, pred, tau, n_groups=5)
    order = np.argsort(pred, kind="mergesort")
    assert cal.n.tolist() == [40] * 5
    for g, idx in enumerate(np.array_split(order, 5)):
        kmf = KaplanMeierFitter().fit(time[idx], event[idx])
        s = float(kmf.survival_function_at_times(tau).iloc[0])
        ci = kmf.confidence_interval_survival_function_
        row = ci[ci.index <= tau].iloc[-1]
        assert cal.observed[g] == pytest.approx(s, rel=1e-9)
        assert cal.lower[g] == pytest.approx(row.iloc[0], abs=1e-6)
        assert cal.upper[g] == pytest.approx(row.iloc[1], abs=1e-6)
        assert cal.predicted[g] == pytest.approx(pred[idx].mean())
        assert cal.events[g] == event[idx].sum()
    with pytest.raises(SurvivalDataError, match="predicted"):
        calibration_by_group(time, event, pred + 1, tau)
    with pytest.raises(UndefinedStatisticError, match="too few"):
        calibration_by_group(time[:5], event[:5], pred[:5], tau, n_groups=5)


def test_tau_is_chosen_on_training_patients_once(make_preds) -> None:
    df = make_preds(n_patients=60, clinical=False)
    patients = df.drop_duplicates("patient_id")
    assert run_tau(df) == pytest.approx(np.percentile(patients["time"], 80))
    assert choose_tau([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(4.2)
    with pytest.raises(SurvivalDataError, match="quantile"):
        choose_tau([1.0], quantile=0)
    with pytest.raises(SurvivalDataError, match="train_time"):
        choose_tau([])


def test_brier_vs_km_validates_shapes() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 0, 1, 1])
    grid = ibs_grid(t, e, tau=3.5, n=3)
    with pytest.raises(SurvivalDataError, match="km_survival"):
        brier_vs_km(t, e, np.ones((4, grid.size)), np.ones((3, grid.size)), grid)
