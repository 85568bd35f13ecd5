"""The figures of the survival report, drawn from ``report.json`` data with matplotlib.

Every figure is drawn on its own Agg canvas (pyplot's global backend is left alone) and
returned encoded as PNG and SVG bytes; :func:`wsi_mil.survival.report.make_report`
writes them and embeds the PNGs in the HTML. matplotlib is imported only when a figure
is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from io import BytesIO
from typing import Any, NamedTuple

import numpy as np

from wsi_mil.survival.summary import fmt_num, fmt_p

__all__ = ["FIGURES", "FORMATS", "DrawnFigure", "draw_figures", "encode_figure", "new_figure"]

FORMATS = ("png", "svg")
_COLOURS = ["#1b7837", "#e08214", "#b2182b", "#2166ac", "#762a83", "#4d4d4d"]


class DrawnFigure(NamedTuple):
    """One figure of the report.

    Attributes:
        name: file stem, e.g. ``km``.
        title: caption / alt text.
        files: encoded figure per format in :data:`FORMATS` (``{"png": bytes, ...}``).
    """

    name: str
    title: str
    files: dict[str, bytes]


def new_figure(width: float, height: float) -> Any:
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


def _floats(values: Iterable[float | None]) -> np.ndarray:
    """(N,) float array of JSON numbers, None as NaN."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _fig_cindex(data: dict) -> Any | None:
    conc = data["concordance"]
    rows = [(f"fold {f['fold']}", f) for f in conc["per_fold"]] + [("pooled", conc["pooled"])]
    if not any("estimate" in r[kind] for _, r in rows for kind in ("harrell", "uno")):
        return None
    fig = new_figure(6.5, 0.45 * len(rows) + 1.3)
    ax = fig.add_subplot()
    for j, (kind, name, colour) in enumerate(
        [
            ("harrell", "Harrell's C", "#2166ac"),
            ("uno", f"Uno's C (τ={fmt_num(conc['tau'], 1)})", "#b2182b"),
        ]
    ):
        ys, xs, lo, hi = [], [], [], []
        for i, (_, r) in enumerate(rows):
            v = r[kind]
            if v.get("estimate") is None:
                continue
            ys.append(len(rows) - 1 - i + (0.15 if j == 0 else -0.15))
            xs.append(v["estimate"])
            # a percentile bootstrap CI from few resamples may exclude the estimate
            low = v["lower"] if v["lower"] is not None else v["estimate"]
            high = v["upper"] if v["upper"] is not None else v["estimate"]
            lo.append(max(0.0, v["estimate"] - low))
            hi.append(max(0.0, high - v["estimate"]))
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
    fig = new_figure(6.5, 3.2)
    ax = fig.add_subplot()
    t = np.asarray(auc["times"], dtype=float)
    a = np.asarray(auc["auc"], dtype=float)
    lo, hi = _floats(auc["lower"]), _floats(auc["upper"])
    ax.fill_between(t, lo, hi, color="#2166ac", alpha=0.2, label="95% bootstrap CI")
    ax.plot(t, a, "o-", color="#2166ac", label="AUC(t)")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time")
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _draw_km_curves(ax: Any, km: dict, colours: dict[str, str]) -> None:
    """Step curves with CI bands and censoring ticks, one per risk group."""
    for label, c in km.items():
        colour = colours.get(label)
        t = np.asarray(c["times"], dtype=float)
        s = np.asarray(c["survival"], dtype=float)
        ax.step(t, s, where="post", color=colour, label=_text(f"{label} risk"))
        ax.fill_between(
            t, _floats(c["lower"]), _floats(c["upper"]), step="post", color=colour, alpha=0.12
        )
        ct = np.asarray(c["censor_times"], dtype=float)
        if ct.size:  # censoring marks on the curve
            at_ct = s[np.searchsorted(t, ct, side="right") - 1]
            ax.plot(ct, at_ct, "|", color=colour, ms=6, mew=1)


def _draw_at_risk(tab: Any, at: dict, labels: list[str], colours: dict[str, str]) -> None:
    """The number-at-risk table under the Kaplan–Meier axes."""
    tab.set_yticks(range(len(labels)), [_text(lb) for lb in reversed(labels)], fontsize=8)
    for i, lb in enumerate(reversed(labels)):
        for t, n in zip(at["times"], at.get(lb, []), strict=False):
            tab.text(t, i, str(n), ha="center", va="center", fontsize=8, color=colours.get(lb))
    tab.set_ylim(-0.5, len(labels) - 0.5)
    tab.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left", "bottom"):
        tab.spines[side].set_visible(False)
    tab.tick_params(axis="y", length=0, pad=18)
    tab.tick_params(axis="x", bottom=False, labelbottom=False)


def _fig_km(data: dict) -> Any | None:
    strat = data["stratification"]
    if not strat.get("km"):
        return None
    labels = strat["labels"]
    colours = dict(
        zip(labels, _COLOURS if len(labels) != 2 else ["#2166ac", "#b2182b"], strict=False)
    )
    fig = new_figure(6.5, 4.6)
    gs = fig.add_gridspec(2, 1, height_ratios=[4, 0.35 * len(labels) + 0.4])
    ax = fig.add_subplot(gs[0])
    _draw_km_curves(ax, strat["km"], colours)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("event-free probability")
    lr = strat.get("logrank", {})
    ax.set_title(f"Kaplan–Meier by risk group — log-rank {fmt_p(lr.get('p_value'))}", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    at = strat["at_risk"]
    if at["times"]:
        ax.set_xticks(at["times"])
        ax.set_xlim(left=0)
    ax.set_xlabel("time")
    _draw_at_risk(fig.add_subplot(gs[1], sharex=ax), at, labels, colours)
    return fig


def _fig_forest(data: dict) -> Any | None:
    rows = [r for r in data["hazard_ratios"]["rows"] if r["hr"] is not None]
    if not rows:
        return None
    from matplotlib import ticker

    fig = new_figure(6.5, 0.38 * len(rows) + 1.3)
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
            hr,
            y[idx],
            xerr=[np.maximum(hr - lo, 0), np.maximum(hi - hr, 0)],
            fmt="s",
            color=colour,
            capsize=3,
            label=model,
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
    fig = new_figure(6.5, 2.8)
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


def _fig_calibration(data: dict) -> Any | None:
    cal = data.get("calibration", {})
    if not cal.get("groups"):
        return None
    g = cal["groups"]
    pred = _floats(x["predicted"] for x in g)
    obs = _floats(x["observed"] for x in g)
    lo, hi = _floats(x["lower"] for x in g), _floats(x["upper"] for x in g)
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.errorbar(
        pred,
        obs,
        yerr=[np.clip(obs - lo, 0, None), np.clip(hi - obs, 0, None)],
        fmt="o",
        color="#2166ac",
        capsize=3,
        label="risk group (KM, 95% CI)",
    )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    tau = fmt_num(cal["tau"], 1)
    ax.set_xlabel(f"predicted survival at τ = {tau}")
    ax.set_ylabel(f"observed (Kaplan–Meier) survival at τ = {tau}")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _fig_brier(data: dict) -> Any | None:
    b = data["brier"]
    if "brier" not in b:
        return None
    fig = new_figure(6.5, 3.0)
    ax = fig.add_subplot()
    t = np.asarray(b["times"], dtype=float)
    ax.plot(
        t, _floats(b["brier"]), "o-", color="#b2182b", label=f"model (IBS {fmt_num(b['ibs'], 3)})"
    )
    ax.plot(
        t,
        _floats(b["brier_km"]),
        "s--",
        color="#4d4d4d",
        label=f"Kaplan–Meier only (IBS {fmt_num(b['ibs_km'], 3)})",
    )
    ax.set_xlabel("time")
    ax.set_ylabel("Brier score (lower is better)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    return fig


#: Figure name -> (title, drawing function returning a figure or None when undefined).
FIGURES: dict[str, tuple[str, Callable[[dict], Any | None]]] = {
    "km": ("Kaplan–Meier curves of the risk groups", _fig_km),
    "cindex": ("Concordance per fold and pooled", _fig_cindex),
    "auc": ("Time-dependent AUC", _fig_auc),
    "forest": ("Hazard ratios", _fig_forest),
    "calibration": ("Predicted vs observed survival at τ", _fig_calibration),
    "brier": ("Brier score of the model and of Kaplan–Meier", _fig_brier),
    "risk": ("Distribution of predicted risk", _fig_risk),
}


def encode_figure(fig: Any, fmt: str) -> bytes:
    """``fig`` as ``fmt`` bytes (SVG without a date, so reruns give the same file)."""
    buf = BytesIO()
    fig.savefig(buf, format=fmt, dpi=120, metadata={"Date": None} if fmt == "svg" else {})
    return buf.getvalue()


def draw_figures(data: dict[str, Any]) -> list[DrawnFigure]:
    """Draw every figure that ``data`` (the report data) defines, in :data:`FIGURES` order.

    Args:
        data: the report data (``report.json`` content).

    Returns:
        One :class:`DrawnFigure` per defined figure, encoded in every format of
        :data:`FORMATS`.
    """
    drawn = []
    for name, (title, draw) in FIGURES.items():
        fig = draw(data)
        if fig is not None:
            drawn.append(
                DrawnFigure(name, title, {fmt: encode_figure(fig, fmt) for fmt in FORMATS})
            )
    return drawn
