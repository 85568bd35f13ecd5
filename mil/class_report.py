"""The classification report: the counterpart of the survival report for a
classification run (ROC, precision–recall, confusion matrix, calibration).

Input is a predictions table (``runs/<name>/predictions.csv``): ``patient_id``,
``fold``, ``split`` (``train``/``test``), ``label`` and one ``prob_<class>`` per class,
calibrated to the training prevalence. Statistics use the pooled **test** rows; the
training prevalence of each fold (from its train rows) gives the balanced decision of the
confusion matrix and balanced accuracy, and the prevalence-only reference of the Brier
score. Outputs, each written atomically beside the predictions (or in ``out_dir``):
``report.html`` (self-contained), ``report.json``, ``report_figures/*.png|svg`` and
``report_config.yaml``. Figures are in :mod:`wsi_mil.mil.class_figures`.

A table without ``fold`` / ``split`` is an external cohort's (``wsi-mil predict`` /
``validate``): every row is held out (rows flagged ``seen_in_training`` are left out),
and the training prevalence comes from the training run (``run=``) or, without it, from
the cohort itself (said in ``report.json`` ``external``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_mil.errors import CohortError
from wsi_mil.mil.calibration import balanced_decision, brier_score
from wsi_mil.mil.metrics import classification_metrics
from wsi_mil.survival.external import EXTERNAL_FOLD, is_external
from wsi_mil.survival.report import (
    ReportResult,
    check_overwrite,
    file_sha256,
    resolve_report_paths,
    write_atomic,
)

__all__ = [
    "REPORT_FORMAT",
    "analyse_classification",
    "is_classification_predictions",
    "load_class_predictions",
    "make_classification_report",
]

REPORT_FORMAT = "wsi-mil.classification-report/1"
FIGURES_DIR = "report_figures"
_REQUIRED = ("patient_id", "fold", "split", "label")


def is_classification_predictions(csv: str | os.PathLike[str]) -> bool:
    """Whether a predictions CSV holds class probabilities (``label`` + ``prob_*``) and
    no survival ``risk``."""
    try:
        cols = pd.read_csv(csv, nrows=0).columns
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return False
    return "label" in cols and any(c.startswith("prob_") for c in cols) and "risk" not in cols


def load_class_predictions(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate a classification predictions table.

    Returns:
        (table with string ``patient_id``/``label`` and lower-case ``split``, classes in
        the order of the ``prob_`` columns).

    Raises:
        CohortError: a missing column, no test row, a probability outside [0, 1], rows
            not summing to 1, or a label without a ``prob_`` column (naming the line).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "label": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CohortError(f"cannot read predictions table {path}: {exc}") from exc
    classes = [c[len("prob_") :] for c in df.columns if c.startswith("prob_")]
    if is_external(df.columns) and not {"fold", "split"} & set(df.columns):
        df = df.assign(fold=EXTERNAL_FOLD, split="test")
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing or len(classes) < 2:
        raise CohortError(
            f"{path.name}: a classification predictions table needs columns "
            f"{', '.join(_REQUIRED)} and prob_<class> for two or more classes; it has "
            f"{', '.join(map(repr, df.columns))}"
        )
    df["split"] = df["split"].astype(str).str.strip().str.lower()
    if not (df["split"] == "test").any():
        raise CohortError(f"{path.name}: no row has split 'test'")
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    checks = [
        (
            ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (probs > 1).any(1),
            "a probability outside [0, 1]",
        ),
        (np.abs(probs.sum(1) - 1) > 1e-4, "probabilities that do not sum to 1"),
        (~df["label"].isin(classes).to_numpy(), "a label without a prob_<label> column"),
    ]
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CohortError(f"{path.name}: line {i + 2} has {what}")
    return df, classes


def _num(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _prior(df: pd.DataFrame, rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(P, C) training prevalence of each row's fold (all rows when a fold has none)."""
    out = np.empty((len(rows), len(classes)))
    for k in rows["fold"].unique():
        train = df[(df["fold"] == k) & (df["split"] == "train")]
        labels = (train if not train.empty else df)["label"]
        counts = np.array([(labels == c).sum() for c in classes], float)
        out[(rows["fold"] == k).to_numpy()] = counts / counts.sum()
    return out


def _curves(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """ROC and precision–recall curves: the positive class (binary) or one-vs-rest."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    which = [1] if len(classes) == 2 else list(range(len(classes)))
    roc, pr = [], []
    for c in which:
        hit = (y == c).astype(int)
        if hit.min() == hit.max():
            continue  # one outcome only: undefined
        fpr, tpr, _ = roc_curve(hit, probs[:, c])
        prec, rec, _ = precision_recall_curve(hit, probs[:, c])
        roc.append({"class": classes[c], "fpr": fpr.tolist(), "tpr": tpr.tolist()})
        pr.append(
            {
                "class": classes[c],
                "precision": prec.tolist(),
                "recall": rec.tolist(),
                "average_precision": _num(average_precision_score(hit, probs[:, c])),
                "prevalence": _num(hit.mean()),
            }
        )
    return {"roc": roc, "pr": pr}


def analyse_classification(
    df: pd.DataFrame,
    classes: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    prior: Any = None,
) -> dict[str, Any]:
    """Every number of the classification report, without writing anything.

    Args:
        df: A validated predictions table.
        classes: Its classes.
        n_bootstrap: Bootstrap resamples.
        seed: Bootstrap seed.
        prior: (C,) training prevalence for every row (external cohorts); default each
            fold's from its train rows.
    """
    test = df[df["split"] == "test"]
    index = {c: i for i, c in enumerate(classes)}
    y = test["label"].map(index).to_numpy(int)
    probs = test[[f"prob_{c}" for c in classes]].to_numpy(float)
    if prior is None:
        prior = _prior(df, test, classes)
    else:
        prior = np.tile(np.asarray(prior, dtype=float), (len(test), 1))
    pts = df.drop_duplicates("patient_id")
    folds = sorted(df["fold"].unique().tolist(), key=lambda f: (str(type(f)), f))
    pooled = classification_metrics(y, probs, prior=prior, n_boot=n_bootstrap, seed=seed)
    per_fold = []
    for k in folds:
        m = (test["fold"] == k).to_numpy()
        if m.any():
            res = classification_metrics(y[m], probs[m], prior=prior[m], n_boot=0)
            per_fold.append({"fold": k, "n_test": int(m.sum()), **res})
    decision = balanced_decision(probs, prior)
    confusion = np.zeros((len(classes), len(classes)), int)
    np.add.at(confusion, (y, decision), 1)
    data: dict[str, Any] = {
        "classes": classes,
        "cohort": {
            "patients": len(pts),
            "counts": {c: int((pts["label"] == c).sum()) for c in classes},
            "folds": folds,
            "test_rows": len(test),
            "train_rows": int((df["split"] == "train").sum()),
        },
        "pooled": pooled,
        "per_fold": per_fold,
        **_curves(y, probs, classes),
        "confusion": {
            "matrix": confusion.tolist(),
            "rows": "true class",
            "columns": "predicted class (argmax of prob / training prevalence)",
        },
        "calibration": {
            "brier": pooled["brier"],
            "brier_prevalence": _num(brier_score(y, prior)) if len(y) else None,
            "ece": pooled["ece"],
            "mean_predicted": {c: _num(probs[:, i].mean()) for i, c in enumerate(classes)},
            "observed": {c: _num((y == i).mean()) for i, c in enumerate(classes)},
        },
        "parameters": {"n_bootstrap": n_bootstrap, "seed": seed, "confidence_level": 0.95},
    }
    data["summary"] = _summary(data)
    return data


def _fmt(x: float | None, d: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def _summary(data: dict[str, Any]) -> list[str]:
    p, cal, c = data["pooled"], data["calibration"], data["cohort"]
    counts = ", ".join(f"{k} {v}" for k, v in c["counts"].items())
    auc, bacc = p["auc"], p["balanced_accuracy"]
    lines = [
        f"{c['patients']} patients ({counts}), {len(c['folds'])} cross-validation fold(s).",
        f"Discrimination: AUC {_fmt(auc['value'])} (95% CI {_fmt(auc['ci_low'])}–"
        f"{_fmt(auc['ci_high'])}; 0.5 is chance), balanced accuracy {_fmt(bacc['value'])}.",
    ]
    b, ref = cal["brier"]["value"], cal["brier_prevalence"]
    if b is not None and ref is not None:
        verdict = "better than" if b < ref else "not better than"
        lines.append(
            f"Calibration: Brier score {_fmt(b, 3)} vs {_fmt(ref, 3)} for predicting the "
            f"training prevalence ({verdict} it), ECE {_fmt(cal['ece']['value'], 3)}."
        )
    return lines


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return _num(obj)
    return obj


def make_classification_report(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    force: bool = False,
    run: str | os.PathLike[str] | None = None,
) -> ReportResult:
    """Write the classification report of a run folder or predictions CSV.

    Args:
        source: run folder (with ``predictions.csv``) or a predictions CSV.
        out_dir: output folder; default beside the predictions table.
        n_bootstrap: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        force: replace a report made from a different input.
        run: for external predictions (no ``fold`` / ``split``), the training run whose
            training prevalence sets the balanced decision and the Brier reference.

    Raises:
        CohortError: invalid predictions.
        OutputExistsError: a report from a different input exists and not ``force``.
    """
    import yaml

    from wsi_mil import __version__
    from wsi_mil.mil.class_figures import draw_class_figures, render_class_html

    csv, out = resolve_report_paths(source, out_dir)
    digest = file_sha256(csv)
    check_overwrite(out, csv, digest, force)
    df, classes = load_class_predictions(csv)
    external = bool((df["fold"] == EXTERNAL_FOLD).all())
    prior, ext = None, None
    if external:
        df, ext, prior = _external(df, classes, run, csv.name)
    elif run is not None:
        raise CohortError(
            f"--run applies to external predictions (a table without fold/split); {csv} "
            "holds a run's own cross-validation predictions"
        )
    data = {
        "format": REPORT_FORMAT,
        "task": "classification",
        "wsi_mil_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": {"path": str(csv.resolve()), "sha256": digest, "rows": len(df)},
        **analyse_classification(df, classes, n_bootstrap=n_bootstrap, seed=seed, prior=prior),
    }
    if ext is not None:
        data["external"] = ext
    data = _jsonable(data)
    drawn = draw_class_figures(data)
    data["figures"] = {
        f.name: {fmt: f"{FIGURES_DIR}/{f.name}.{fmt}" for fmt in f.files} for f in drawn
    }
    figures: list[Path] = []
    for f in drawn:
        for fmt, payload in f.files.items():
            figures.append(out / data["figures"][f.name][fmt])
            write_atomic(figures[-1], payload)
    config = {
        "report": {"source": str(csv.resolve()), "out": str(out.resolve()), **data["parameters"]}
    }
    write_atomic(out / "report_config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    from wsi_mil.mil.co_attention import report_section

    html = render_class_html(data, drawn, csv.name, report_section(csv.parent))
    write_atomic(out / "report.html", html.encode("utf-8"))
    write_atomic(out / "report.json", json.dumps(data, indent=2, allow_nan=False).encode())
    return ReportResult(out / "report.html", out / "report.json", figures, data)


def _external(
    df: pd.DataFrame, classes: list[str], run: str | os.PathLike[str] | None, name: str
) -> tuple[pd.DataFrame, dict[str, Any], np.ndarray | None]:
    """External rows without those seen in training, the ``external`` block and the
    training prevalence of the run (None without ``run``: the cohort's own is used)."""
    seen = pd.Series(False, index=df.index)
    if "seen_in_training" in df.columns:
        seen = df["seen_in_training"].astype(str).str.strip().str.lower().isin(["true", "1"])
    if seen.all():
        raise CohortError(
            f"{name}: every patient is flagged seen_in_training, so there is nothing "
            "external to report; the run's own report is `wsi-mil report RUN`"
        )
    df = df[~seen.to_numpy()].copy()
    ext: dict[str, Any] = {"run": None, "excluded_seen_in_training": int(seen.sum())}
    if run is None:
        ext["prior"] = (
            "the external cohort's own prevalence (no training run given; pass --run RUN "
            "for the training prevalence)"
        )
        return df, ext, None
    train, _ = load_class_predictions(Path(run) / "predictions.csv")
    rows = train[train["split"] == "train"].drop_duplicates("patient_id")
    counts = np.array([(rows["label"] == c).sum() for c in classes], float)
    if (train["fold"] == EXTERNAL_FOLD).all() or counts.sum() == 0:
        raise CohortError(f"--run {run}: its predictions.csv has no labelled train rows")
    ext.update(run=str(Path(run).resolve()), prior="the training run's prevalence")
    ext["training_prevalence"] = {
        c: float(v) for c, v in zip(classes, counts / counts.sum(), strict=True)
    }
    return df, ext, counts / counts.sum()
