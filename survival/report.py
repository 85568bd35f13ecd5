"""The survival-stratification report: one HTML page, its figures and ``report.json``.

Input is a predictions table (``runs/<name>/predictions.csv``): one row per fold and
patient with ``patient_id``, ``fold``, ``split`` (``train`` or ``test``), ``time``,
``event``, ``risk`` (higher = earlier event) and optional clinical columns.
Out-of-fold statistics use the **test** rows; risk-group cut-offs and the Breslow
baseline of the Brier score are learnt on each fold's **train** rows.

Outputs (in the run folder, or ``out_dir``), each written atomically:
``report.html`` (self-contained: figures embedded as base64 PNG, no network, template
autoescaping on), ``report.json`` (every number), ``report_figures/*.png|svg`` and
``report_config.yaml`` (the resolved parameters). An existing report made from a
different input is not overwritten unless ``force=True``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.errors import OutputExistsError
from wsi_mil.io import atomic_path
from wsi_mil.survival.validate import (
    SurvivalDataError,
    UndefinedStatisticError,
    validate_survival,
)

__all__ = [
    "REPORT_FORMAT",
    "REQUIRED_COLUMNS",
    "ReportResult",
    "analyse_predictions",
    "load_predictions",
    "make_report",
    "resolve_report_paths",
]

REPORT_FORMAT = "wsi-mil.survival-report/1"
REQUIRED_COLUMNS = ("patient_id", "fold", "split", "time", "event", "risk")
FIGURES_DIR = "report_figures"
_ALPHA = 0.05


class ReportResult(NamedTuple):
    """Paths written by :func:`make_report` and the report data.

    Attributes:
        html: ``report.html``.
        json: ``report.json``.
        figures: PNG and SVG files.
        data: the content of ``report.json``.
    """

    html: Path
    json: Path
    figures: list[Path]
    data: dict[str, Any]


# ---- input ----------------------------------------------------------------------------


def resolve_report_paths(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Find the predictions table and the output folder.

    Args:
        source: a run folder holding ``predictions.csv``, or a predictions CSV.
        out_dir: where to write; default the folder of the predictions table.

    Returns:
        (predictions csv, output folder).
    """
    src = Path(source)
    if src.is_dir():
        csv = src / "predictions.csv"
        if not csv.is_file():
            raise SurvivalDataError(
                f"{src} is a folder without predictions.csv; pass a run folder made by "
                "`wsi-mil train` or the path of a predictions CSV"
            )
    elif src.is_file():
        csv = src
    else:
        raise SurvivalDataError(f"{src} does not exist; pass a run folder or a predictions CSV")
    return csv, Path(out_dir) if out_dir is not None else csv.parent


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _line(df: pd.DataFrame, name: str) -> list[str]:
    """Row labels for messages: the CSV line number and the patient id."""
    ids = df["patient_id"].tolist() if "patient_id" in df.columns else [None] * len(df)
    return [
        f"line {int(i) + 2} of {name}" + (f" (patient_id {p!r})" if p is not None else "")
        for i, p in zip(df.index, ids, strict=True)
    ]


def _check_predictions(df: pd.DataFrame, name: str, covariates: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in (*REQUIRED_COLUMNS, *covariates) if c not in df.columns]
    if missing:
        which = "covariate" if set(missing) <= set(covariates) else "required"
        raise SurvivalDataError(
            f"{name}: {which} column(s) {', '.join(map(repr, missing))} missing; the table "
            f"has {', '.join(map(repr, df.columns))}"
        )
    if df.empty:
        raise SurvivalDataError(f"{name} has no rows")
    rows = _line(df, name)
    for col in ("patient_id", "fold", "split"):
        bad = df[col].isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurvivalDataError(f"{name}: column {col!r} is empty on {rows[i]}")
    split = df["split"].astype(str).str.strip().str.lower()
    bad = ~split.isin(["train", "test"]).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SurvivalDataError(
            f"{name}: column 'split' must be 'train' or 'test'; {rows[i]} has "
            f"{df['split'].iloc[i]!r}"
        )
    data = validate_survival(
        df["time"],
        df["event"],
        df["risk"],
        names=("column 'time'", "column 'event'", "column 'risk'"),
        rows=rows,
        min_samples=1,
        require_events=False,
    )
    out = df.copy()
    out["split"] = split
    out["time"], out["event"], out["risk"] = data.time, data.event.astype(int), data.risk
    dup = out.duplicated(["fold", "split", "patient_id"]).to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise SurvivalDataError(
            f"{name}: {rows[i]} repeats fold {_plain(out['fold'].iloc[i])!r} / split "
            f"{out['split'].iloc[i]!r} for the same patient; keep one row per fold and patient"
        )
    for col in ("time", "event"):
        first = out.groupby("patient_id", sort=False)[col].transform("first")
        bad = (out[col] != first).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurvivalDataError(
                f"{name}: column {col!r} differs between rows of the same patient; {rows[i]} "
                f"has {_plain(out[col].iloc[i])!r} but an earlier row has {_plain(first.iloc[i])!r}"
            )
    return out


def load_predictions(
    path: str | os.PathLike[str],
    covariates: Sequence[str] = (),
) -> pd.DataFrame:
    """Read and validate a predictions table.

    Args:
        path: CSV with ``patient_id, fold, split, time, event, risk`` and optional
            clinical columns.
        covariates: clinical columns that must be present.

    Returns:
        The table with ``patient_id`` as string, ``split`` lower-case, float ``time`` and
        ``risk`` and int ``event``.

    Raises:
        SurvivalDataError: a missing column, or a bad value, naming the column and the
            first offending line (negative/NaN time, event not 0/1, NaN risk, ...).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patient_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SurvivalDataError(f"cannot read predictions table {path}: {exc}") from exc
    return _check_predictions(df, path.name, covariates)


# ---- statistics -----------------------------------------------------------------------


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


def _attempt(fn: Callable[[], dict[str, Any]], what: str, notes: list[str]) -> dict[str, Any]:
    """Run a statistic; when it is undefined return ``{"note": why}`` and record it."""
    try:
        return fn()
    except UndefinedStatisticError as exc:
        msg = f"{what}: not defined — {exc}"
        notes.append(msg)
        return {"note": msg}


def _ci(res: Any) -> dict[str, Any]:
    return {
        "estimate": _num(res.estimate),
        "lower": _num(res.lower),
        "upper": _num(res.upper),
        "n_bootstrap": int(res.n_bootstrap),
    }


class _Params(NamedTuple):
    covariates: list[str]
    n_groups: int
    times: list[float] | None
    tau: float | None
    n_bootstrap: int
    seed: int


def _patients(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("patient_id", keep="first")


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
            f"all follow-up times are equal ({_fmt(pts['time'].iloc[0], 2)}): there is no "
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


def _folds(df: pd.DataFrame) -> list[Any]:
    return sorted(df["fold"].unique().tolist(), key=lambda f: (str(type(f)), f))


def _fold_concordance(
    df: pd.DataFrame, fold: Any, tau: float, p: _Params, notes: list[str]
) -> dict[str, Any]:
    from wsi_mil.survival.metrics import harrell_c, uno_c

    te = df[(df["fold"] == fold) & (df["split"] == "test")]
    tr = df[(df["fold"] == fold) & (df["split"] == "train")]
    entry: dict[str, Any] = {
        "fold": _jsonable(fold),
        "n_test": len(te),
        "events_test": int(te["event"].sum()),
        "n_train": len(tr),
    }
    boot = {"n_bootstrap": p.n_bootstrap, "seed": p.seed}
    entry["harrell"] = _attempt(
        lambda: _ci(harrell_c(te["time"], te["event"], te["risk"], **boot)),
        f"Harrell's C, fold {fold}",
        notes,
    )
    ref = {"train_time": tr["time"], "train_event": tr["event"]} if tr["event"].any() else {}
    entry["uno"] = _attempt(
        lambda: _ci(uno_c(te["time"], te["event"], te["risk"], tau=tau, **ref, **boot)),
        f"Uno's C, fold {fold}",
        notes,
    )
    return entry


def _pooled_concordance(test: pd.DataFrame, tau: float, p: _Params, notes: list[str]) -> dict:
    from wsi_mil.survival.metrics import harrell_c, uno_c

    boot = {"n_bootstrap": p.n_bootstrap, "seed": p.seed}
    args = (test["time"], test["event"], test["risk"])
    return {
        "n_test": len(test),
        "events_test": int(test["event"].sum()),
        "harrell": _attempt(lambda: _ci(harrell_c(*args, **boot)), "Harrell's C, pooled", notes),
        "uno": _attempt(lambda: _ci(uno_c(*args, tau=tau, **boot)), "Uno's C, pooled", notes),
    }


def _default_tau(df: pd.DataFrame) -> float:
    return float(np.percentile(_patients(df)["time"], 80))


def _time_auc(test: pd.DataFrame, p: _Params, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.metrics import time_dependent_auc

    def run() -> dict[str, Any]:
        res = time_dependent_auc(
            test["time"],
            test["event"],
            test["risk"],
            p.times,
            n_bootstrap=p.n_bootstrap,
            seed=p.seed,
        )
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


def _curves(base: Any, risk: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Survival curves of ``risk`` under a fold's Breslow baseline, as a function of times."""

    def at(grid: np.ndarray) -> np.ndarray:
        return np.asarray(base.survival(risk, grid))

    return at


def _brier(df: pd.DataFrame, test: pd.DataFrame, p: _Params, notes: list[str]) -> dict:
    from wsi_mil.survival.metrics import breslow_survival, brier_from_survival

    def run() -> dict[str, Any]:
        parts: list[Callable[[np.ndarray], np.ndarray]] = []
        order = []
        for fold in _folds(df):
            tr = df[(df["fold"] == fold) & (df["split"] == "train")]
            te_idx = np.flatnonzero((test["fold"] == fold).to_numpy())
            if te_idx.size == 0:
                continue
            if tr.empty:
                raise UndefinedStatisticError(
                    f"fold {fold} has no train rows to fit the Breslow baseline on"
                )
            base = breslow_survival(tr["time"], tr["event"], tr["risk"])
            risk = test["risk"].to_numpy()[te_idx]
            parts.append(_curves(base, risk))
            order.append(te_idx)
        idx = np.concatenate(order)
        t, e = test["time"].to_numpy()[idx], test["event"].to_numpy()[idx]
        res = brier_from_survival(
            t,
            e,
            lambda grid: np.vstack([f(grid) for f in parts]),
            n_bootstrap=p.n_bootstrap,
            seed=p.seed,
        )
        return {
            "times": _jsonable(res.times),
            "brier": _jsonable(res.brier),
            "ibs": _num(res.ibs),
            "lower": _num(res.lower),
            "upper": _num(res.upper),
            "n_bootstrap": res.n_bootstrap,
        }

    return _attempt(run, "integrated Brier score (pooled test rows)", notes)


def _risk_groups(df: pd.DataFrame, p: _Params, notes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Assign held-out risk groups with per-fold training cut-offs."""
    from wsi_mil.survival.stratify import assign_groups, group_labels, learn_cutoffs

    labels = group_labels(p.n_groups)
    test = df[df["split"] == "test"].copy()
    test["risk_group"] = pd.Series(pd.NA, index=test.index, dtype="object")
    cutoffs: dict[str, Any] = {}
    for fold in _folds(df):
        tr = df[(df["fold"] == fold) & (df["split"] == "train")]
        m = test["fold"] == fold
        if not m.any():
            continue
        if tr.empty:
            msg = f"risk groups, fold {fold}: not defined — no train rows to learn cut-offs"
            notes.append(msg)
            cutoffs[str(fold)] = None
            continue
        cut = learn_cutoffs(tr["risk"], p.n_groups)
        cutoffs[str(fold)] = _jsonable(cut)
        test.loc[m, "risk_group"] = [labels[g] for g in assign_groups(test.loc[m, "risk"], cut)]
    grouped = test[test["risk_group"].notna()].copy()
    grouped["risk_group"] = pd.Categorical(grouped["risk_group"], categories=labels)
    q = np.linspace(0, 100, p.n_groups + 1)[1:-1]
    method = "median" if p.n_groups == 2 else "percentiles " + ", ".join(f"{v:.0f}" for v in q)
    info = {
        "labels": labels,
        "cutoffs": cutoffs,
        "method": method,
        "cutoffs_learnt_on": "train rows of each fold, applied to its test rows",
    }
    return grouped, info


def _at_risk_times(tmax: float) -> np.ndarray:
    from matplotlib.ticker import MaxNLocator

    ticks = np.asarray(MaxNLocator(nbins=6).tick_values(0, tmax), dtype=np.float64)
    return ticks[(ticks >= 0) & (ticks <= tmax)]


def _stratification(grouped: pd.DataFrame, info: dict, notes: list[str]) -> dict[str, Any]:
    from wsi_mil.survival.stratify import kaplan_meier, logrank, numbers_at_risk

    labels = info["labels"]
    out = dict(info)
    if grouped.empty:
        msg = "risk groups: not defined — no test row could be assigned to a group"
        notes.append(msg)
        out.update(groups=[], km={}, logrank={"note": msg}, at_risk={"times": []})
        return out
    codes = grouped["risk_group"].cat.codes.to_numpy()
    curves = kaplan_meier(grouped["time"], grouped["event"], codes, labels)
    out["groups"] = [
        {"label": c.label, "n": c.n, "events": c.events, "median_survival": _num(c.median)}
        for c in curves
    ]
    cens = {
        lb: grouped.loc[(codes == k) & (grouped["event"] == 0).to_numpy(), "time"].to_numpy()
        for k, lb in enumerate(labels)
    }
    out["km"] = {
        c.label: {
            "censor_times": _jsonable(np.unique(cens[c.label])),
            "times": _jsonable(c.times),
            "survival": _jsonable(c.survival),
            "lower": _jsonable(c.lower),
            "upper": _jsonable(c.upper),
        }
        for c in curves
    }

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

    if grouped.empty:
        msg = "hazard ratios: not defined — no risk groups"
        notes.append(msg)
        return {"rows": [], "notes": {"all": msg}}
    data = grouped.rename(columns={"risk_group": "risk group"})
    try:
        rows, hr_notes = hazard_ratios(
            data, ["risk group", *p.covariates], multivariable=bool(p.covariates)
        )
    except UndefinedStatisticError as exc:
        msg = f"hazard ratios: not defined — {exc}"
        notes.append(msg)
        return {"rows": [], "notes": {"all": msg}}
    for key, msg in hr_notes.items():
        notes.append(f"hazard ratio ({key}): {msg}")
    return {"rows": [_jsonable(r._asdict()) for r in rows], "notes": hr_notes}


def _risk_distribution(test: pd.DataFrame) -> dict[str, Any]:
    r = test["risk"].to_numpy()
    if r.size == 0:
        return {"note": "no test rows"}
    edges = np.histogram_bin_edges(r, bins=min(30, max(5, r.size // 5)))
    ev = test["event"].to_numpy().astype(bool)
    return {
        "quantiles": {
            str(q): _num(v)
            for q, v in zip(
                (0, 0.25, 0.5, 0.75, 1), np.quantile(r, [0, 0.25, 0.5, 0.75, 1]), strict=True
            )
        },
        "edges": _jsonable(edges),
        "counts_event": _jsonable(np.histogram(r[ev], edges)[0]),
        "counts_censored": _jsonable(np.histogram(r[~ev], edges)[0]),
    }


def analyse_predictions(
    df: pd.DataFrame,
    *,
    covariates: Sequence[str] = (),
    n_groups: int = 2,
    times: Sequence[float] | None = None,
    tau: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every statistic of the report, without writing anything.

    Args:
        df: a validated predictions table (:func:`load_predictions`).
        covariates: clinical columns for the adjusted hazard ratios.
        n_groups: risk groups (2 = median split of the train risks, 3 = tertiles).
        times: evaluation times of the time-dependent AUC (default: 5 percentiles of the
            event times).
        tau: truncation time of Uno's C (default: 80th percentile of follow-up).
        n_bootstrap: bootstrap resamples of every confidence interval.
        seed: bootstrap seed.

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
    )
    notes: list[str] = []
    test = df[df["split"] == "test"]
    tau_used = float(tau) if tau is not None else _default_tau(df)
    data: dict[str, Any] = {"cohort": _cohort(df, p, notes)}
    if test.empty:
        notes.append("no test rows: out-of-fold statistics are not defined")
    data["concordance"] = {
        "tau": _num(tau_used),
        "per_fold": [_fold_concordance(df, f, tau_used, p, notes) for f in _folds(df)],
        "pooled": _pooled_concordance(test, tau_used, p, notes),
    }
    data["time_auc"] = _time_auc(test, p, notes)
    data["brier"] = _brier(df, test, p, notes)
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
    data["summary"] = _summary(data)
    return _jsonable(data), grouped


# ---- plain-language summary -----------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _summary(data: dict[str, Any]) -> list[str]:
    c = data["cohort"]
    fu = c["median_follow_up"]
    lines = [
        f"{c['patients']} patients, {c['events']} events, median follow-up "
        f"{_fmt(fu, 1) if fu is not None else 'not reached'} (time units of the input), "
        f"{len(c['folds'])} cross-validation fold(s)."
    ]
    h = data["concordance"]["pooled"]["harrell"]
    if "estimate" in h and h["estimate"] is not None:
        lines.append(
            f"Ranking: for {h['estimate'] * 100:.0f}% of comparable patient pairs the patient "
            f"with the higher predicted risk had the event first (Harrell's C "
            f"{_fmt(h['estimate'])}, 95% CI {_fmt(h['lower'])}–{_fmt(h['upper'])}; 0.5 is "
            "chance, 1 is perfect)."
        )
    else:
        lines.append(f"The C-index could not be computed ({h.get('note', 'undefined')}).")
    strat = data["stratification"]
    groups = {g["label"]: g for g in strat.get("groups", [])}
    labels = strat["labels"]
    lo, hi = groups.get(labels[0]), groups.get(labels[-1])
    lr = strat.get("logrank", {})
    if lo and hi:

        def med(g: dict) -> str:
            return "not reached" if g["median_survival"] is None else _fmt(g["median_survival"], 1)

        lines.append(
            f"Risk groups (cut-offs from the training predictions): median time to event "
            f"{med(hi)} in the {labels[-1]}-risk group ({hi['n']} patients) vs {med(lo)} in "
            f"the {labels[0]}-risk group ({lo['n']}); "
            + (
                f"log-rank {_fmt_p(lr['p_value'])}."
                if lr.get("p_value") is not None
                else "log-rank test not defined (see Notes)."
            )
        )
    elif "note" in lr:
        lines.append(f"Risk groups could not be compared ({lr['note']}).")
    for model in ("univariate", "multivariable"):
        rows = [
            r
            for r in data["hazard_ratios"]["rows"]
            if r["model"] == model and r["variable"] == f"risk group={labels[-1]}"
        ]
        if rows:
            r = rows[0]
            hr_notes = data["hazard_ratios"]["notes"]
            used = [
                c for c in data["parameters"]["covariates"] if f"univariate: {c}" not in hr_notes
            ]
            adj = "unadjusted" if model == "univariate" else "adjusted for " + ", ".join(used)
            lines.append(
                f"Hazard ratio {labels[-1]} vs {labels[0]} risk ({adj}): {_fmt(r['hr'])} "
                f"(95% CI {_fmt(r['lower'])}–{_fmt(r['upper'])}, {_fmt_p(r['p_value'])})."
            )
    if data["notes"]:
        lines.append(f"{len(data['notes'])} statistic(s) could not be computed; see Notes.")
    return lines


# ---- figures --------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    """A figure drawn by the Agg backend, chosen here per figure.

    The figure is bound to ``FigureCanvasAgg`` directly instead of switching pyplot's
    global backend, so a report made from a notebook or a GUI session leaves that
    session's plotting alone, and nothing needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _text(s: str) -> str:
    """Matplotlib-safe label: no mathtext from user strings."""
    return str(s).replace("$", r"\$")


_COLOURS = ["#1b7837", "#e08214", "#b2182b", "#2166ac", "#762a83", "#4d4d4d"]


def _fig_cindex(data: dict) -> Any | None:
    conc = data["concordance"]
    rows = [(f"fold {f['fold']}", f) for f in conc["per_fold"]] + [("pooled", conc["pooled"])]
    if not any("estimate" in r[kind] for _, r in rows for kind in ("harrell", "uno")):
        return None
    fig = _new_figure(6.5, 0.45 * len(rows) + 1.3)
    ax = fig.add_subplot()
    for j, (kind, name, colour) in enumerate(
        [
            ("harrell", "Harrell's C", "#2166ac"),
            ("uno", f"Uno's C (τ={_fmt(conc['tau'], 1)})", "#b2182b"),
        ]
    ):
        ys, xs, lo, hi = [], [], [], []
        for i, (_, r) in enumerate(rows):
            v = r[kind]
            if v.get("estimate") is None:
                continue
            ys.append(len(rows) - 1 - i + (0.15 if j == 0 else -0.15))
            xs.append(v["estimate"])
            lo.append(v["estimate"] - (v["lower"] if v["lower"] is not None else v["estimate"]))
            hi.append((v["upper"] if v["upper"] is not None else v["estimate"]) - v["estimate"])
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=colour, capsize=3, label=name)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [_text(n) for n, _ in reversed(rows)])
    ax.set_xlabel("concordance index (95% bootstrap CI)")
    ax.set_xlim(min(0.3, ax.get_xlim()[0]), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _fig_auc(data: dict) -> Any | None:
    auc = data["time_auc"]
    if "auc" not in auc:
        return None
    fig = _new_figure(6.5, 3.2)
    ax = fig.add_subplot()
    t = np.asarray(auc["times"], dtype=float)
    a = np.asarray(auc["auc"], dtype=float)
    lo = np.asarray([np.nan if v is None else v for v in auc["lower"]], dtype=float)
    hi = np.asarray([np.nan if v is None else v for v in auc["upper"]], dtype=float)
    ax.fill_between(t, lo, hi, color="#2166ac", alpha=0.2, label="95% bootstrap CI")
    ax.plot(t, a, "o-", color="#2166ac", label="AUC(t)")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time")
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _fig_km(data: dict) -> Any | None:
    strat = data["stratification"]
    if not strat.get("km"):
        return None
    labels = strat["labels"]
    colours = dict(
        zip(labels, _COLOURS if len(labels) != 2 else ["#2166ac", "#b2182b"], strict=False)
    )
    fig = _new_figure(6.5, 4.6)
    gs = fig.add_gridspec(2, 1, height_ratios=[4, 0.35 * len(labels) + 0.4])
    ax = fig.add_subplot(gs[0])
    for label, c in strat["km"].items():
        t = np.asarray(c["times"], dtype=float)
        s = np.asarray(c["survival"], dtype=float)
        ax.step(t, s, where="post", color=colours.get(label), label=_text(f"{label} risk"))
        lo = np.asarray([np.nan if v is None else v for v in c["lower"]], dtype=float)
        hi = np.asarray([np.nan if v is None else v for v in c["upper"]], dtype=float)
        ax.fill_between(t, lo, hi, step="post", color=colours.get(label), alpha=0.12)
        ct = np.asarray(c["censor_times"], dtype=float)
        if ct.size:  # censoring marks on the curve
            at_ct = s[np.searchsorted(t, ct, side="right") - 1]
            ax.plot(ct, at_ct, "|", color=colours.get(label), ms=6, mew=1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("event-free probability")
    lr = strat.get("logrank", {})
    ax.set_title(f"Kaplan–Meier by risk group — log-rank {_fmt_p(lr.get('p_value'))}", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    at = strat["at_risk"]
    times = at["times"]
    if times:
        ax.set_xticks(times)
        ax.set_xlim(left=0)
    ax.set_xlabel("time")
    tab = fig.add_subplot(gs[1], sharex=ax)
    tab.set_yticks(range(len(labels)), [_text(lb) for lb in reversed(labels)], fontsize=8)
    for i, lb in enumerate(reversed(labels)):
        for t, n in zip(times, at.get(lb, []), strict=False):
            tab.text(t, i, str(n), ha="center", va="center", fontsize=8, color=colours.get(lb))
    tab.set_ylim(-0.5, len(labels) - 0.5)
    tab.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left", "bottom"):
        tab.spines[side].set_visible(False)
    tab.tick_params(axis="y", length=0, pad=18)
    tab.tick_params(axis="x", bottom=False, labelbottom=False)
    return fig


def _fig_forest(data: dict) -> Any | None:
    rows = [r for r in data["hazard_ratios"]["rows"] if r["hr"] is not None]
    if not rows:
        return None
    from matplotlib import ticker

    fig = _new_figure(6.5, 0.38 * len(rows) + 1.3)
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for model, colour in (("univariate", "#4d4d4d"), ("multivariable", "#b2182b")):
        idx = [i for i, r in enumerate(rows) if r["model"] == model]
        if not idx:
            continue
        hr = np.array([rows[i]["hr"] for i in idx])
        lo = np.array([rows[i]["lower"] or rows[i]["hr"] for i in idx])
        hi = np.array([rows[i]["upper"] or rows[i]["hr"] for i in idx])
        ax.errorbar(
            hr, y[idx], xerr=[hr - lo, hi - hr], fmt="s", color=colour, capsize=3, label=model
        )
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(
        ticker.FixedLocator([0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 10, 20, 100])
    )
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_yticks(y, [_text(f"{r['label']} ({r['model'][:4]}.)") for r in rows], fontsize=8)
    ax.set_xlabel("hazard ratio (95% CI, log scale)")
    ax.legend(loc="best", fontsize=8)
    return fig


def _fig_risk(data: dict) -> Any | None:
    dist = data["risk_distribution"]
    if "edges" not in dist:
        return None
    fig = _new_figure(6.5, 2.8)
    ax = fig.add_subplot()
    edges = np.asarray(dist["edges"], dtype=float)
    width = np.diff(edges)
    ev = np.asarray(dist["counts_event"], dtype=float)
    ce = np.asarray(dist["counts_censored"], dtype=float)
    ax.bar(edges[:-1], ce, width=width, align="edge", color="#92c5de", label="censored")
    ax.bar(edges[:-1], ev, width=width, bottom=ce, align="edge", color="#b2182b", label="event")
    ax.set_xlabel("predicted risk (test rows; higher = earlier event)")
    ax.set_ylabel("patients")
    ax.legend(fontsize=8)
    return fig


_FIGURES: dict[str, tuple[str, Callable[[dict], Any | None]]] = {
    "km": ("Kaplan–Meier curves of the risk groups", _fig_km),
    "cindex": ("Concordance per fold and pooled", _fig_cindex),
    "auc": ("Time-dependent AUC", _fig_auc),
    "forest": ("Hazard ratios", _fig_forest),
    "risk": ("Distribution of predicted risk", _fig_risk),
}


def _save_figure(fig: Any, path: Path, fmt: str) -> bytes:
    """Save ``fig`` atomically at ``path``; return the bytes written."""
    meta = {"Date": None} if fmt == "svg" else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, metadata=meta)
        payload = tmp.read_bytes()
    return payload


# ---- writing --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes(path: Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def _check_overwrite(out: Path, csv: Path, digest: str, force: bool) -> None:
    html, js = out / "report.html", out / "report.json"
    if force or not (html.exists() or js.exists()):
        return
    try:
        previous = json.loads(js.read_text())["input"]
        prev_digest, prev_path = previous["sha256"], previous["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputExistsError(
            f"{html if html.exists() else js} exists but its report.json does not say which "
            "input it was made from; pass --force to replace it or --out to write elsewhere"
        ) from None
    if prev_digest != digest:
        raise OutputExistsError(
            f"{out} already holds a report made from a different input ({prev_path}, "
            f"sha256 {prev_digest[:12]}…), not from {csv} (sha256 {digest[:12]}…); pass "
            "--force to replace it or --out to write elsewhere"
        )


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda x, d=2: _fmt(x, d)
    env.filters["pval"] = _fmt_p
    return env.get_template("report.html")


def _patient_rows(grouped: pd.DataFrame, df: pd.DataFrame) -> list[dict[str, Any]]:
    test = df[df["split"] == "test"]
    groups = grouped["risk_group"].astype(object).reindex(test.index)
    return [
        {
            "patient_id": str(r.patient_id),
            "fold": r.fold,
            "time": r.time,
            "event": int(r.event),
            "risk": r.risk,
            "group": "" if pd.isna(g) else str(g),
        }
        for r, g in zip(test.itertuples(index=False), groups, strict=True)
    ]


def make_report(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    covariates: Sequence[str] = (),
    n_groups: int = 2,
    times: Sequence[float] | None = None,
    tau: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    force: bool = False,
) -> ReportResult:
    """Write the survival report of a run folder or predictions CSV.

    Args:
        source: run folder (with ``predictions.csv``) or a predictions CSV.
        out_dir: output folder; default beside the predictions table.
        covariates: clinical columns to adjust the hazard ratios for.
        n_groups: number of risk groups (2 = median split of train risks).
        times: evaluation times of the time-dependent AUC.
        tau: truncation time of Uno's C (default: 80th percentile of follow-up).
        n_bootstrap: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        force: replace a report made from a different input.

    Returns:
        A :class:`ReportResult`.

    Raises:
        SurvivalDataError: invalid predictions (naming column and line).
        OutputExistsError: a report from a different input exists and not ``force``.
    """
    import yaml

    from wsi_mil import __version__

    csv, out = resolve_report_paths(source, out_dir)
    covariates = [c.strip() for c in covariates if c.strip()]
    digest = _sha256(csv)
    _check_overwrite(out, csv, digest, force)
    df = load_predictions(csv, covariates)
    data, grouped = analyse_predictions(
        df,
        covariates=covariates,
        n_groups=n_groups,
        times=times,
        tau=tau,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    data = {
        "format": REPORT_FORMAT,
        "wsi_mil_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": {"path": str(csv.resolve()), "sha256": digest, "rows": len(df)},
        **data,
    }
    figures: list[Path] = []
    embedded = []
    data["figures"] = {}
    for name, (title, draw) in _FIGURES.items():
        fig = draw(data)
        if fig is None:
            continue
        png = b""
        for ext in ("png", "svg"):
            path = out / FIGURES_DIR / f"{name}.{ext}"
            payload = _save_figure(fig, path, ext)
            png = payload if ext == "png" else png
            figures.append(path)
        data["figures"][name] = {
            "png": f"{FIGURES_DIR}/{name}.png",
            "svg": f"{FIGURES_DIR}/{name}.svg",
        }
        embedded.append(
            {"name": name, "title": title, "png": base64.b64encode(png).decode("ascii")}
        )
    html = _template().render(
        d=data,
        figures={**dict.fromkeys(_FIGURES), **{f["name"]: f for f in embedded}},
        patients=_patient_rows(grouped, df),
        source_name=csv.name,
    )
    config = {
        "report": {"source": str(csv.resolve()), "out": str(out.resolve()), **data["parameters"]}
    }
    _write_bytes(out / "report_config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    _write_bytes(out / "report.html", html.encode("utf-8"))
    _write_bytes(out / "report.json", json.dumps(data, indent=2, allow_nan=False).encode())
    return ReportResult(out / "report.html", out / "report.json", figures, data)
