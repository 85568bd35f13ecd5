"""Figures and HTML page of the classification report (:mod:`wsi_mil.mil.class_report`).

Drawn with the survival report's figure helpers (own Agg canvas per figure, PNG + SVG)
and rendered through ``templates/classification_report.html`` with autoescaping on.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.survival.figures import FORMATS, DrawnFigure, encode_figure, new_figure

__all__ = ["CLASS_FIGURES", "draw_class_figures", "render_class_html"]

_COLOURS = ["#2166ac", "#b2182b", "#1b7837", "#e08214", "#762a83", "#4d4d4d"]


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _fig_roc(data: dict) -> Any | None:
    if not data["roc"]:
        return None
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot()
    for c, colour in zip(data["roc"], _COLOURS, strict=False):
        ax.plot(c["fpr"], c["tpr"], color=colour, label=f"{c['class']}".replace("$", r"\$"))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    auc = data["pooled"]["auc"]["value"]
    ax.set_title(f"ROC (pooled test rows), AUC {auc:.2f}" if auc is not None else "ROC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _fig_pr(data: dict) -> Any | None:
    if not data["pr"]:
        return None
    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot()
    for c, colour in zip(data["pr"], _COLOURS, strict=False):
        label = f"{c['class']} (AP {c['average_precision']:.2f})".replace("$", r"\$")
        ax.step(c["recall"], c["precision"], where="post", color=colour, label=label)
        ax.axhline(c["prevalence"], color=colour, ls=":", lw=1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def _fig_confusion(data: dict) -> Any | None:
    m = np.asarray(data["confusion"]["matrix"], dtype=float)
    if m.sum() == 0:
        return None
    classes = [str(c).replace("$", r"\$") for c in data["classes"]]
    fig = new_figure(1.2 * len(classes) + 2.4, 1.0 * len(classes) + 1.6)
    ax = fig.add_subplot()
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color=colour,
                fontsize=8,
            )
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return fig


def _fig_reliability(data: dict) -> Any | None:
    rel = data["pooled"].get("reliability")
    if not rel:
        return None
    pred, obs = _floats(rel["predicted"]), _floats(rel["observed"])
    lo, hi = _floats(rel["lower"]), _floats(rel["upper"])
    used = np.asarray(rel["count"]) > 0
    fig = new_figure(4.6, 4.6)
    gs = fig.add_gridspec(2, 1, height_ratios=[4, 1])
    ax = fig.add_subplot(gs[0])
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.errorbar(
        pred[used],
        obs[used],
        yerr=np.clip([obs[used] - lo[used], hi[used] - obs[used]], 0, None),
        fmt="o-",
        color="#b2182b",
        capsize=3,
        label="bins (Wilson 95% CI)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("observed frequency")
    ax.legend(loc="upper left", fontsize=8)
    hist = fig.add_subplot(gs[1], sharex=ax)
    edges = np.asarray(rel["edges"])
    hist.bar(edges[:-1], rel["count"], width=np.diff(edges), align="edge", color="#92c5de")
    hist.set_xlabel(f"predicted probability ({rel['kind']})")
    hist.set_ylabel("patients")
    return fig


#: Figure name -> (title, drawing function returning a figure or None when undefined).
CLASS_FIGURES: dict[str, tuple[str, Callable[[dict], Any | None]]] = {
    "roc": ("ROC curve", _fig_roc),
    "pr": ("Precision–recall curve", _fig_pr),
    "confusion": ("Confusion matrix", _fig_confusion),
    "reliability": ("Reliability diagram", _fig_reliability),
}


def draw_class_figures(data: dict[str, Any]) -> list[DrawnFigure]:
    """Every figure of :data:`CLASS_FIGURES` that ``data`` (``report.json``) defines."""
    drawn = []
    for name, (title, draw) in CLASS_FIGURES.items():
        fig = draw(data)
        if fig is not None:
            drawn.append(DrawnFigure(name, title, {f: encode_figure(fig, f) for f in FORMATS}))
    return drawn


def render_class_html(
    data: dict[str, Any],
    figures: Sequence[DrawnFigure],
    source: str,
    co_attention: dict[str, Any] | None = None,
) -> str:
    """The self-contained HTML page (PNG figures embedded as base64), with a fusion
    run's co-attention section (:func:`wsi_mil.mil.co_attention.report_section`)."""
    from wsi_mil.survival.render import report_template

    embedded: dict[str, dict[str, str] | None] = dict.fromkeys(CLASS_FIGURES)
    for f in figures:
        png = base64.b64encode(f.files["png"]).decode("ascii")
        embedded[f.name] = {"title": f.title, "png": png}
    template = report_template(Path(__file__).parent / "templates", "classification_report.html")
    return template.render(d=data, figures=embedded, source_name=source, co_attention=co_attention)
