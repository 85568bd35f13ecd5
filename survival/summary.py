"""Plain-language text of the survival report.

The "In short" sentences of ``report.json``/``report.html`` and the number formatting
that the summary, the figures and the HTML template share.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_num", "fmt_p", "summarise"]


def fmt_num(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, or ``"n/a"`` when it is None."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value as ``p = 0.012`` / ``p < 0.001``, or ``"n/a"`` when it is None."""
    if p is None:
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def summarise(data: dict[str, Any]) -> list[str]:
    """The plain-language summary of the report data.

    Args:
        data: the report data of :func:`wsi_mil.survival.analysis.analyse_predictions`
            before its ``summary`` is added.

    Returns:
        One sentence per topic: cohort, ranking, risk groups, hazard ratios,
        calibration, notes.
    """
    lines = [_cohort_line(data["cohort"]), _ranking_line(data["concordance"]["pooled"])]
    lines += _group_lines(data["stratification"])
    lines += _hazard_ratio_lines(data)
    lines += _calibration_lines(data["brier"])
    if data["notes"]:
        lines.append(f"{len(data['notes'])} statistic(s) could not be computed; see Notes.")
    return lines


def _cohort_line(c: dict[str, Any]) -> str:
    fu = c["median_follow_up"]
    return (
        f"{c['patients']} patients, {c['events']} events, median follow-up "
        f"{fmt_num(fu, 1) if fu is not None else 'not reached'} (time units of the input), "
        + (
            "external cohort (fold-ensemble predictions)."
            if c["folds"] == ["external"]
            else f"{len(c['folds'])} cross-validation fold(s)."
        )
    )


def _ranking_line(pooled: dict[str, Any]) -> str:
    h = pooled["harrell"]
    if "estimate" in h and h["estimate"] is not None:
        return (
            f"Ranking: for {h['estimate'] * 100:.0f}% of comparable patient pairs the patient "
            f"with the higher predicted risk had the event first (Harrell's C "
            f"{fmt_num(h['estimate'])}, 95% CI {fmt_num(h['lower'])}–{fmt_num(h['upper'])}; "
            "0.5 is chance, 1 is perfect)."
        )
    return f"The C-index could not be computed ({h.get('note', 'undefined')})."


def _median(g: dict[str, Any]) -> str:
    return "not reached" if g["median_survival"] is None else fmt_num(g["median_survival"], 1)


def _group_lines(strat: dict[str, Any]) -> list[str]:
    groups = {g["label"]: g for g in strat.get("groups", [])}
    labels = strat["labels"]
    lo, hi = groups.get(labels[0]), groups.get(labels[-1])
    lr = strat.get("logrank", {})
    if lo and hi:
        test = (
            f"log-rank {fmt_p(lr['p_value'])}."
            if lr.get("p_value") is not None
            else "log-rank test not defined (see Notes)."
        )
        return [
            f"Risk groups (cut-offs from the training predictions): median time to event "
            f"{_median(hi)} in the {labels[-1]}-risk group ({hi['n']} patients) vs "
            f"{_median(lo)} in the {labels[0]}-risk group ({lo['n']}); " + test
        ]
    if "note" in lr:
        return [f"Risk groups could not be compared ({lr['note']})."]
    return []


def _hazard_ratio_lines(data: dict[str, Any]) -> list[str]:
    labels = data["stratification"]["labels"]
    hr = data["hazard_ratios"]
    lines = []
    for model in ("univariate", "multivariable"):
        rows = [
            r
            for r in hr["rows"]
            if r["model"] == model and r["variable"] == f"risk group={labels[-1]}"
        ]
        if not rows:
            continue
        r = rows[0]
        used = [
            c for c in data["parameters"]["covariates"] if f"univariate: {c}" not in hr["notes"]
        ]
        adj = "unadjusted" if model == "univariate" else "adjusted for " + ", ".join(used)
        lines.append(
            f"Hazard ratio {labels[-1]} vs {labels[0]} risk ({adj}): {fmt_num(r['hr'])} "
            f"(95% CI {fmt_num(r['lower'])}–{fmt_num(r['upper'])}, {fmt_p(r['p_value'])})."
        )
    return lines


def _calibration_lines(b: dict[str, Any]) -> list[str]:
    if b.get("ibs") is None or b.get("ibs_km") is None:
        return []
    lo, hi = b.get("ibs_minus_km_lower"), b.get("ibs_minus_km_upper")
    if hi is not None and hi < 0:
        verdict = "better than"
    elif lo is not None and lo > 0:
        verdict = "worse than"
    else:
        verdict = "not distinguishable from"
    return [
        f"Calibration: integrated Brier score {fmt_num(b['ibs'], 3)} vs "
        f"{fmt_num(b['ibs_km'], 3)} for the Kaplan–Meier curve alone (difference "
        f"{fmt_num(b['ibs_minus_km'], 3)}, 95% CI {fmt_num(lo, 3)} to {fmt_num(hi, 3)}): "
        f"the predicted survival probabilities are {verdict} the cohort's average curve."
    ]
