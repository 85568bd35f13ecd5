"""The numbers of the survival report: every statistic of ``report.json``.

Out-of-fold statistics use the **test** rows of a validated predictions table; risk-group
cut-offs and the Breslow baseline of the Brier score are learnt on each fold's **train**
rows. A statistic that is not defined for the data becomes ``{"note": why}`` and the
reason is listed in ``notes``, so one undefined number never stops the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.survival.calibration import LP_COLUMN, TAU_RULE, run_tau
from wsi_mil.survival.summary import fmt_num, summarise
from wsi_mil.survival.validate import SurvivalDataError, UndefinedStatisticError

__all__ = ["analyse_predictions", "brier_json", "calibration_json"]

_ALPHA = 0.05


# ---- JSON-safe values -----------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _num(obj)
    return obj


def _ci(res: Any) -> dict[str, Any]:
    return {
        "estimate": _num(res.estimate),
        "lower": _num(res.lower),
        "upper": _num(res.upper),
        "n_bootstrap": int(res.n_bootstrap),
    }


# ---- undefined statistics -------------------------------------------------------------


def _undefined(what: str, why: Any, notes: list[str]) -> str:
    """Record in ``notes`` that ``what`` is not defined because ``why``; return the note."""
    msg = f"{what}: not defined — {why}"
    notes.append(msg)
    return msg


def _attempt(fn: Callable[[], dict[str, Any]], what: str, notes: list[str]) -> dict[str, Any]:
    """Run a statistic; when it is undefined return ``{"note": why}`` and record it."""
    try:
        return fn()
    except UndefinedStatisticError as exc:
        return {"note": _undefined(what, exc, notes)}


# ---- table helpers --------------------------------------------------------------------


class _Params(NamedTuple):
    covariates: list[str]
    n_groups: int
    times: list[float] | None
    tau: float | None
    n_bootstrap: int
    seed: int
    external: bool = False
    reference: Any = None  # survival.external.TrainingReference

    @property
    def boot(self) -> dict[str, int]:
        """Bootstrap keyword arguments of the metrics."""
        return {"n_bootstrap": self.n_bootstrap, "seed": self.seed}


def _patients(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("patient_id", keep="first")


def _folds(df: pd.DataFrame) -> list[Any]:
    return sorted(df["fold"].unique().tolist(), key=lambda f: (str(type(f)), f))


def _fold_rows(df: pd.DataFrame, fold: Any, split: str) -> pd.DataFrame:
    """The ``split`` (``train``/``test``) rows of one fold."""
    return df[(df["fold"] == fold) & (df["split"] == split)]


# ---- cohort ---------------------------------------------------------------------------


def _cohort(df: pd.DataFrame, p: _Params, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.stratify import median_follow_up

    pts = _patients(df)
    test = df[df["split"] == "test"]
    out: dict[str, Any] = {
        "patients": len(pts),
        "events": int(pts["event"].sum()),
        "censored": int(len(pts) - pts["event"].sum()),
        "folds": [_jsonable(f) for f in _folds(df)],
        "test_rows": len(test),
        "train_rows": int((df["split"] == "train").sum()),
        "time_min": _num(pts["time"].min()),
        "time_max": _num(pts["time"].max()),
        "median_follow_up": _num(median_follow_up(pts["time"], pts["event"])),
        "median_follow_up_method": "reverse Kaplan–Meier",
    }
    if out["median_follow_up"] is None:
        notes.append("median follow-up: not reached by the reverse Kaplan–Meier curve")
    if len(pts) > 1 and pts["time"].nunique() == 1:
        notes.append(
            f"all follow-up times are equal ({fmt_num(pts['time'].iloc[0], 2)}): there is no "
            "ordering in time, so time-to-event statistics only compare event status; "
            "interpret them with care"
        )
    repeats = test["patient_id"].duplicated().sum()
    out["patients_tested_more_than_once"] = int(repeats)
    if repeats:
        notes.append(
            f"{repeats} test rows repeat a patient already tested in another fold; pooled "
            "statistics count every test row"
        )
    untested = len(pts) - test["patient_id"].nunique()
    out["patients_never_tested"] = int(untested)
    out["covariates"] = {c: _describe(pts[c]) for c in p.covariates}
    return out


def _describe(s: pd.Series) -> dict[str, Any]:
    missing = int(s.isna().sum())
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        q = s.dropna().quantile([0.25, 0.5, 0.75]).to_numpy() if s.notna().any() else [np.nan] * 3
        return {
            "kind": "numeric",
            "median": _num(q[1]),
            "q1": _num(q[0]),
            "q3": _num(q[2]),
            "missing": missing,
        }
    counts = s.dropna().astype(str).value_counts().sort_index()
    return {
        "kind": "categorical",
        "counts": {str(k): int(v) for k, v in counts.items()},
        "missing": missing,
    }


# ---- discrimination and calibration --------------------------------------------------


def _fold_concordance(
    df: pd.DataFrame, fold: Any, tau: float, p: _Params, notes: list[str]
) -> dict[str, Any]:
    from wsi_mil.survival.metrics import harrell_c, uno_c

    te = _fold_rows(df, fold, "test")
    tr = _fold_rows(df, fold, "train")
    entry: dict[str, Any] = {
        "fold": _jsonable(fold),
        "n_test": len(te),
        "events_test": int(te["event"].sum()),
        "n_train": len(tr),
    }
    entry["harrell"] = _attempt(
        lambda: _ci(harrell_c(te["time"], te["event"], te["risk"], **p.boot)),
        f"Harrell's C, fold {fold}",
        notes,
    )
    ref = {"train_time": tr["time"], "train_event": tr["event"]} if tr["event"].any() else {}
    entry["uno"] = _attempt(
        lambda: _ci(uno_c(te["time"], te["event"], te["risk"], tau=tau, **ref, **p.boot)),
        f"Uno's C, fold {fold}",
        notes,
    )
    return entry


def _pooled_concordance(
    df: pd.DataFrame, test: pd.DataFrame, tau: float, p: _Params, notes: list[str]
) -> dict:
    from wsi_mil.survival.metrics import harrell_c, uno_c

    args = (test["time"], test["event"], test["risk"])
    ref = _train_patients(df)
    has_ref = bool(ref["event"].any())

    def uno() -> dict[str, Any]:
        return _ci(
            uno_c(
                *args,
                tau=tau,
                train_time=ref["time"] if has_ref else None,
                train_event=ref["event"] if has_ref else None,
                n_bootstrap=p.n_bootstrap,
                seed=p.seed,
            )
        )

    return {
        "n_test": len(test),
        "events_test": int(test["event"].sum()),
        "harrell": _attempt(lambda: _ci(harrell_c(*args, **p.boot)), "Harrell's C, pooled", notes),
        "uno": _attempt(uno, "Uno's C, pooled", notes),
    }


def _train_patients(df: pd.DataFrame) -> pd.DataFrame:
    """The patients of the training rows, each once (the censoring reference of the
    pooled Uno's C; every patient when there is no training row)."""
    train = df[df["split"] == "train"]
    return _patients(train if not train.empty else df)


def _time_auc(test: pd.DataFrame, p: _Params, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.metrics import time_dependent_auc

    def run() -> dict[str, Any]:
        res = time_dependent_auc(test["time"], test["event"], test["risk"], p.times, **p.boot)
        return {
            "times": _jsonable(res.times),
            "auc": _jsonable(res.auc),
            "lower": _jsonable(res.lower),
            "upper": _jsonable(res.upper),
            "mean_auc": _num(res.mean_auc),
            "mean_lower": _num(res.mean_lower),
            "mean_upper": _num(res.mean_upper),
            "n_bootstrap": res.n_bootstrap,
        }

    return _attempt(run, "time-dependent AUC (pooled test rows)", notes)


def _external_brier(df: pd.DataFrame, tau: float, p: _Params) -> tuple[Any, Any]:
    """:func:`out_of_fold_brier` of external rows, with the training run's baselines."""
    from wsi_mil.survival.calibration import brier_vs_km, ibs_grid
    from wsi_mil.survival.external import external_survival

    if p.reference is None:
        raise UndefinedStatisticError(
            "an external cohort needs the training run's baseline hazard; pass --run RUN"
        )
    fs = external_survival(df, p.reference)
    grid = ibs_grid(fs.time, fs.event, tau)
    return brier_vs_km(fs.time, fs.event, fs.model(grid), fs.km(grid), grid, **p.boot), fs


def _brier(df: pd.DataFrame, tau: float, p: _Params, notes: list[str]) -> tuple[dict, dict]:
    """The Brier score beside its Kaplan–Meier reference, and the calibration table at τ."""
    from wsi_mil.survival.calibration import calibration_by_group, out_of_fold_brier

    try:
        if p.external:
            res, fs = _external_brier(df, tau, p)
        else:
            res, fs = out_of_fold_brier(df, tau, **p.boot)
    except UndefinedStatisticError as exc:
        note = {"note": _undefined("integrated Brier score (pooled test rows)", exc, notes)}
        return note, {"note": note["note"]}
    if fs.lp_column != LP_COLUMN:
        notes.append(
            f"predictions have no {LP_COLUMN!r} column: the Breslow baseline of the Brier "
            "score and the calibration table treats 'risk' as the log relative hazard"
        )
    brier = brier_json(res)
    brier["baseline"] = (
        f"Breslow baseline on column {fs.lp_column!r} of each fold's training rows; "
        "Kaplan–Meier reference fitted on the same training rows"
    )
    if p.external:
        brier["baseline"] = (
            f"Breslow baseline of each fold of the training run on its train rows (column "
            f"{fs.lp_column!r}), applied to that fold model's prediction of each external "
            "patient, survival averaged over the folds; Kaplan–Meier reference of the "
            "training patients"
        )

    def table() -> dict[str, Any]:
        cal = calibration_by_group(fs.time, fs.event, fs.model(np.array([tau]))[:, 0], tau)
        return calibration_json(cal)

    return brier, _attempt(table, "calibration at tau (pooled test rows)", notes)


def brier_json(res: Any) -> dict[str, Any]:
    """A :class:`~wsi_mil.survival.calibration.BrierComparison` as JSON-safe values."""
    ci = np.asarray(res.ci)
    return {
        "times": _jsonable(res.times),
        "brier": _jsonable(res.brier),
        "brier_km": _jsonable(res.brier_km),
        "ibs": _num(res.ibs),
        "lower": _num(ci[0, 0]),
        "upper": _num(ci[0, 1]),
        "ibs_km": _num(res.ibs_km),
        "ibs_km_lower": _num(ci[1, 0]),
        "ibs_km_upper": _num(ci[1, 1]),
        "ibs_minus_km": _num(res.difference),
        "ibs_minus_km_lower": _num(ci[2, 0]),
        "ibs_minus_km_upper": _num(ci[2, 1]),
        "n_bootstrap": res.n_bootstrap,
    }


def calibration_json(cal: Any) -> dict[str, Any]:
    """A :class:`~wsi_mil.survival.calibration.CalibrationTable` as JSON-safe values."""
    return {
        "tau": _num(cal.tau),
        "method": (
            f"{len(cal.n)} quantile groups of predicted survival at tau (group 1 = highest "
            "risk); observed = Kaplan–Meier at tau with log-log 95% CI"
        ),
        "groups": [
            {
                "group": i + 1,
                "n": int(cal.n[i]),
                "events": int(cal.events[i]),
                "predicted": _num(cal.predicted[i]),
                "observed": _num(cal.observed[i]),
                "lower": _num(cal.lower[i]),
                "upper": _num(cal.upper[i]),
            }
            for i in range(len(cal.n))
        ],
    }


# ---- risk groups ----------------------------------------------------------------------


def _external_groups(df: pd.DataFrame, p: _Params, notes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Risk groups of external rows with the training run's (ensemble) cut-offs."""
    from wsi_mil.survival.stratify import assign_groups, group_labels

    labels = group_labels(p.n_groups)
    test = df.copy()
    ref = p.reference
    info: dict[str, Any] = {"labels": labels, "method": _group_method(p.n_groups)}
    if ref is None:
        _undefined(
            "risk groups",
            "an external cohort has no training rows to learn cut-offs from; pass --run "
            "RUN (the training run) to use its cut-offs",
            notes,
        )
        info.update(cutoffs={}, cutoffs_learnt_on="not available (no training run given)")
        return test.iloc[:0].assign(risk_group=pd.Categorical([], categories=labels)), info
    test["risk_group"] = pd.Categorical(
        [labels[g] for g in assign_groups(test["risk"], ref.cutoffs)], categories=labels
    )
    info.update(
        cutoffs={"ensemble": _jsonable(ref.cutoffs), **ref.fold_cutoffs},
        cutoffs_learnt_on=(
            f"train rows of each fold of the training run {ref.run_dir}; the ensemble's "
            "cut-off (applied to every external patient) is the mean of the folds'"
        ),
    )
    return test, info


def _group_method(n_groups: int) -> str:
    q = np.linspace(0, 100, n_groups + 1)[1:-1]
    return "median" if n_groups == 2 else "percentiles " + ", ".join(f"{v:.0f}" for v in q)


def _risk_groups(df: pd.DataFrame, p: _Params, notes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Assign held-out risk groups with per-fold training cut-offs."""
    from wsi_mil.survival.stratify import assign_groups, group_labels, learn_cutoffs

    if p.external:
        return _external_groups(df, p, notes)
    labels = group_labels(p.n_groups)
    test = df[df["split"] == "test"].copy()
    test["risk_group"] = pd.Series(pd.NA, index=test.index, dtype="object")
    cutoffs: dict[str, Any] = {}
    for fold in _folds(df):
        tr = _fold_rows(df, fold, "train")
        m = test["fold"] == fold
        if not m.any():
            continue
        if tr.empty:
            _undefined(f"risk groups, fold {fold}", "no train rows to learn cut-offs", notes)
            cutoffs[str(fold)] = None
            continue
        cut = learn_cutoffs(tr["risk"], p.n_groups)
        cutoffs[str(fold)] = _jsonable(cut)
        test.loc[m, "risk_group"] = [labels[g] for g in assign_groups(test.loc[m, "risk"], cut)]
    grouped = test[test["risk_group"].notna()].copy()
    grouped["risk_group"] = pd.Categorical(grouped["risk_group"], categories=labels)
    info = {
        "labels": labels,
        "cutoffs": cutoffs,
        "method": _group_method(p.n_groups),
        "cutoffs_learnt_on": "train rows of each fold, applied to its test rows",
    }
    return grouped, info


def _at_risk_times(tmax: float) -> np.ndarray:
    from matplotlib.ticker import MaxNLocator

    ticks = np.asarray(MaxNLocator(nbins=6).tick_values(0, tmax), dtype=np.float64)
    return ticks[(ticks >= 0) & (ticks <= tmax)]


def _km_curves(
    grouped: pd.DataFrame, codes: np.ndarray, labels: Sequence[str], curves: list
) -> dict[str, Any]:
    """Kaplan–Meier curves by group label, with the censoring times of each group."""
    censored = (grouped["event"] == 0).to_numpy()
    cens = {
        lb: grouped.loc[(codes == k) & censored, "time"].to_numpy() for k, lb in enumerate(labels)
    }
    return {
        c.label: {
            "censor_times": _jsonable(np.unique(cens[c.label])),
            "times": _jsonable(c.times),
            "survival": _jsonable(c.survival),
            "lower": _jsonable(c.lower),
            "upper": _jsonable(c.upper),
        }
        for c in curves
    }


def _stratification(grouped: pd.DataFrame, info: dict, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.stratify import kaplan_meier, logrank, numbers_at_risk

    labels = info["labels"]
    out = dict(info)
    if grouped.empty:
        msg = _undefined("risk groups", "no test row could be assigned to a group", notes)
        out.update(groups=[], km={}, logrank={"note": msg}, at_risk={"times": []})
        return out
    codes = grouped["risk_group"].cat.codes.to_numpy()
    curves = kaplan_meier(grouped["time"], grouped["event"], codes, labels)
    out["groups"] = [
        {"label": c.label, "n": c.n, "events": c.events, "median_survival": _num(c.median)}
        for c in curves
    ]
    out["km"] = _km_curves(grouped, codes, labels, curves)

    def run_logrank() -> dict[str, Any]:
        res = logrank(grouped["time"], grouped["event"], codes)
        return {
            "statistic": _num(res.statistic),
            "p_value": _num(res.p_value),
            "dof": res.dof,
            "n_groups": res.n_groups,
        }

    out["logrank"] = _attempt(run_logrank, "log-rank test", notes)
    at = _at_risk_times(float(grouped["time"].max()))
    table = numbers_at_risk(grouped["time"], codes, labels, at)
    out["at_risk"] = {"times": _jsonable(at), **table}
    return out


def _hazard_ratios(grouped: pd.DataFrame, p: _Params, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.stratify import hazard_ratios

    def undefined(why: Any) -> dict[str, Any]:
        return {"rows": [], "notes": {"all": _undefined("hazard ratios", why, notes)}}

    if grouped.empty:
        return undefined("no risk groups")
    data = grouped.rename(columns={"risk_group": "risk group"})
    try:
        rows, hr_notes = hazard_ratios(
            data, ["risk group", *p.covariates], multivariable=bool(p.covariates)
        )
    except UndefinedStatisticError as exc:
        return undefined(exc)
    for key, msg in hr_notes.items():
        notes.append(f"hazard ratio ({key}): {msg}")
    return {"rows": [_jsonable(r._asdict()) for r in rows], "notes": hr_notes}


def _risk_distribution(test: pd.DataFrame) -> dict[str, Any]:
    r = test["risk"].to_numpy()
    if r.size == 0:
        return {"note": "no test rows"}
    edges = np.histogram_bin_edges(r, bins=min(30, max(5, r.size // 5)))
    ev = test["event"].to_numpy().astype(bool)
    levels = (0, 0.25, 0.5, 0.75, 1)
    return {
        "quantiles": {str(q): _num(v) for q, v in zip(levels, np.quantile(r, levels), strict=True)},
        "edges": _jsonable(edges),
        "counts_event": _jsonable(np.histogram(r[ev], edges)[0]),
        "counts_censored": _jsonable(np.histogram(r[~ev], edges)[0]),
    }


# ---- the report data ------------------------------------------------------------------


def _tau(df: pd.DataFrame, tau: float | None, p: _Params, notes: list[str]) -> tuple[float, str]:
    """τ and how it was chosen: given, the training run's (external), or the table's."""
    if tau is not None:
        same = not p.external and float(tau) == run_tau(df)
        return float(tau), TAU_RULE if same else "given (tau / --tau)"
    if p.reference is not None:
        return float(p.reference.tau), p.reference.tau_source
    if p.external:
        notes.append(
            "tau: no training run given, so tau is the 80th percentile of the external "
            "cohort's own follow-up, not the run's; pass --run RUN to use the run's"
        )
        return run_tau(df), f"{TAU_RULE} — of the external cohort (no training run given)"
    return run_tau(df), TAU_RULE


def analyse_predictions(
    df: pd.DataFrame,
    *,
    covariates: Sequence[str] = (),
    n_groups: int = 2,
    times: Sequence[float] | None = None,
    tau: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    external: bool = False,
    reference: Any = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every statistic of the report, without writing anything.

    Args:
        df: a validated predictions table (:func:`wsi_mil.survival.report.load_predictions`).
        covariates: clinical columns for the adjusted hazard ratios.
        n_groups: risk groups (2 = median split of the train risks, 3 = tertiles).
        times: evaluation times of the time-dependent AUC (default: 5 percentiles of the
            event times).
        tau: the run's horizon: truncation time of Uno's C, end of the Brier-score
            grid and time of the calibration table (default
            :func:`~wsi_mil.survival.calibration.run_tau`: 80th percentile of the
            follow-up of the patients in the training rows).
        n_bootstrap: bootstrap resamples of every confidence interval.
        seed: bootstrap seed.
        external: every row is an external patient (``fold`` = ``external``, ``split`` =
            ``test``): cut-offs, τ and the Brier baselines come from ``reference``.
        reference: the training run's
            :class:`~wsi_mil.survival.external.TrainingReference` (external only); without
            it risk groups, hazard ratios, Brier score and calibration are not computed.

    Returns:
        (report data, test rows with their ``risk_group``).
    """
    if int(n_groups) < 2:
        raise SurvivalDataError(f"groups must be 2 or more, got {n_groups}")
    p = _Params(
        list(covariates),
        int(n_groups),
        None if times is None else [float(t) for t in times],
        tau,
        int(n_bootstrap),
        int(seed),
        bool(external),
        reference if external else None,
    )
    notes: list[str] = []
    test = df[df["split"] == "test"]
    tau_used, tau_rule = _tau(df, tau, p, notes)
    data: dict[str, Any] = {
        "tau": _num(tau_used),
        "tau_rule": tau_rule,
        "cohort": _cohort(df, p, notes),
    }
    if external:
        from wsi_mil.survival.external import describe

        data["external"] = describe(p.reference)
    if test.empty:
        notes.append("no test rows: out-of-fold statistics are not defined")
    data["concordance"] = {
        "tau": _num(tau_used),
        "per_fold": [_fold_concordance(df, f, tau_used, p, notes) for f in _folds(df)],
        "pooled": _pooled_concordance(df, test, tau_used, p, notes),
    }
    data["time_auc"] = _time_auc(test, p, notes)
    data["brier"], data["calibration"] = _brier(df, tau_used, p, notes)
    grouped, info = _risk_groups(df, p, notes)
    data["stratification"] = _stratification(grouped, info, notes)
    data["hazard_ratios"] = _hazard_ratios(grouped, p, notes)
    data["risk_distribution"] = _risk_distribution(test)
    data["notes"] = notes
    data["parameters"] = {
        "covariates": p.covariates,
        "groups": p.n_groups,
        "times": p.times,
        "tau": _num(tau_used),
        "n_bootstrap": p.n_bootstrap,
        "seed": p.seed,
        "confidence_level": 1 - _ALPHA,
    }
    data["summary"] = summarise(data)
    return _jsonable(data), grouped
