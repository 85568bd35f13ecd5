"""``report.html``: the report data and figures rendered through ``templates/report.html``.

The page is self-contained (PNG figures embedded as base64, no network) and rendered with
Jinja2 autoescaping on, so patient ids and clinical values cannot inject markup.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_mil.survival.figures import FIGURES, DrawnFigure
from wsi_mil.survival.summary import fmt_num, fmt_p

__all__ = ["render_html", "report_template"]


def report_template(folder: Path, name: str) -> Any:
    """A report template from ``folder``: autoescaped, strict, with the ``num`` and
    ``pval`` filters and the partials of ``survival/templates`` (``_*.html``), shared by
    the survival and classification reports."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([folder, Path(__file__).parent / "templates"]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda x, d=2: fmt_num(x, d)
    env.filters["pval"] = fmt_p
    return env.get_template(name)


def _template() -> Any:
    return report_template(Path(__file__).parent / "templates", "report.html")


def _patient_rows(grouped: pd.DataFrame, df: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per test row of ``df`` with its risk group ("" when it has none)."""
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


def render_html(
    data: dict[str, Any],
    figures: Sequence[DrawnFigure],
    grouped: pd.DataFrame,
    df: pd.DataFrame,
    source_name: str,
    co_attention: dict[str, Any] | None = None,
) -> str:
    """The HTML page of the report.

    Args:
        data: the report data (``report.json`` content).
        figures: the drawn figures; a figure of :data:`~wsi_mil.survival.figures.FIGURES`
            missing here leaves its section without an image.
        grouped: test rows with their ``risk_group`` (from ``analyse_predictions``).
        df: the validated predictions table.
        source_name: file name of the predictions table, shown in the title.
        co_attention: a fusion run's co-attention section
            (:func:`wsi_mil.mil.co_attention.report_section`), or None.

    Returns:
        The page as a string.
    """
    embedded: dict[str, dict[str, str] | None] = dict.fromkeys(FIGURES)
    for f in figures:
        png = base64.b64encode(f.files["png"]).decode("ascii")
        embedded[f.name] = {"name": f.name, "title": f.title, "png": png}
    return _template().render(
        d=data,
        figures=embedded,
        patients=_patient_rows(grouped, df),
        source_name=source_name,
        co_attention=co_attention,
    )
