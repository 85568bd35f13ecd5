"""The survival-stratification report: one HTML page, its figures and ``report.json``.

Input is a predictions table (``runs/<name>/predictions.csv``): one row per fold and
patient with ``patient_id``, ``fold``, ``split`` (``train`` or ``test``), ``time``,
``event``, ``risk`` (higher = earlier event) and optional clinical columns. A table
without ``fold`` / ``split`` is an *external* cohort's (``wsi-mil predict`` /
``validate``): one row per patient, all held out; its cut-offs, τ and Brier baselines
come from the training run (``run=``; :mod:`~wsi_mil.survival.external`), without
which only the statistics of the cohort alone are computed. Rows flagged
``seen_in_training`` are left out of an external report.
Out-of-fold statistics use the **test** rows; risk-group cut-offs, the Breslow
baseline of the Brier score (on the optional ``linear_predictor`` column, the model's
own log relative hazard, else on ``risk``) and its Kaplan–Meier reference are learnt on
each fold's **train** rows.

Outputs (in the run folder, or ``out_dir``), each written atomically:
``report.html`` (self-contained: figures embedded as base64 PNG, no network, template
autoescaping on), ``report.json`` (every number), ``report_figures/*.png|svg`` and
``report_config.yaml`` (the resolved parameters). An existing report made from a
different input is not overwritten unless ``force=True``.

This module reads the input and writes the outputs; the rest lives in
:mod:`~wsi_mil.survival.analysis` (the numbers), :mod:`~wsi_mil.survival.summary`
(plain-language text), :mod:`~wsi_mil.survival.figures` (matplotlib) and
:mod:`~wsi_mil.survival.render` (the HTML page).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsi_mil.errors import OutputExistsError
from wsi_mil.outputs import atomic_path
from wsi_mil.survival.analysis import analyse_predictions
from wsi_mil.survival.external import EXTERNAL_FOLD, is_external, training_reference
from wsi_mil.survival.validate import SurvivalDataError, _plain, validate_survival

__all__ = [
    "REPORT_FORMAT",
    "REQUIRED_COLUMNS",
    "ReportResult",
    "analyse_predictions",
    "check_overwrite",
    "file_sha256",
    "load_predictions",
    "make_report",
    "resolve_report_paths",
    "write_atomic",
]

REPORT_FORMAT = "wsi-mil.survival-report/1"
REQUIRED_COLUMNS = ("patient_id", "fold", "split", "time", "event", "risk")
FIGURES_DIR = "report_figures"


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


def _line(df: pd.DataFrame, name: str) -> list[str]:
    """Row labels for messages: the CSV line number and the patient id."""
    ids = df["patient_id"].tolist() if "patient_id" in df.columns else [None] * len(df)
    return [
        f"line {int(i) + 2} of {name}" + (f" (patient_id {p!r})" if p is not None else "")
        for i, p in zip(df.index, ids, strict=True)
    ]


def _check_predictions(df: pd.DataFrame, name: str, covariates: Sequence[str]) -> pd.DataFrame:
    if is_external(df.columns) and {"fold", "split"} & set(df.columns):
        raise SurvivalDataError(
            f"{name}: has {'fold' if 'fold' in df.columns else 'split'} but not "
            f"{'split' if 'fold' in df.columns else 'fold'}; a run's predictions need both, "
            "an external cohort's neither"
        )
    if is_external(df.columns):
        df = df.assign(fold=EXTERNAL_FOLD, split="test")
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
    if not (split == "test").any():
        raise SurvivalDataError(
            f"{name}: no row has split 'test'; the report evaluates held-out predictions, "
            "so give the test rows of each fold (as `wsi-mil train` writes them)"
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
            clinical columns; without ``fold`` and ``split`` (an external cohort) every
            row gets ``fold`` = ``"external"`` and ``split`` = ``"test"``.
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
    df = _join_run_covariates(df, path, [c for c in covariates if c not in df.columns])
    return _check_predictions(df, path.name, covariates)


def _join_run_covariates(df: pd.DataFrame, path: Path, missing: list[str]) -> pd.DataFrame:
    """Add covariates that a training run's ``predictions.csv`` lacks from the run's
    cohort table (named in the ``config.yaml`` beside it), one value per patient."""
    config = path.parent / "config.yaml"
    if not missing or "patient_id" not in df.columns or not config.is_file():
        return df
    import yaml

    cohort_path = (yaml.safe_load(config.read_text()) or {}).get("cohort")
    if not cohort_path or not Path(cohort_path).is_file():
        return df
    cohort = pd.read_csv(cohort_path, dtype={"patient_id": str}, encoding="utf-8-sig")
    key = "patient_id" if "patient_id" in cohort.columns else "case_id"
    absent = [c for c in missing if c not in cohort.columns]
    if absent or key not in cohort.columns:
        return df  # the missing-column error names them
    values = cohort[[key, *missing]].drop_duplicates()
    clash = values[key][values[key].duplicated()]
    if len(clash):
        raise SurvivalDataError(
            f"{cohort_path}: patient {clash.iloc[0]!r} has different values of "
            f"{', '.join(map(repr, missing))} on its slides; a covariate must be one "
            "value per patient"
        )
    values = values.rename(columns={key: "patient_id"}).astype({"patient_id": str})
    return df.merge(values, on="patient_id", how="left")


def _drop_seen(df: pd.DataFrame, name: str) -> tuple[pd.DataFrame, int]:
    """Leave out external rows flagged ``seen_in_training`` (the run trained on them)."""
    if "seen_in_training" not in df.columns:
        return df, 0
    seen = df["seen_in_training"].astype(str).str.strip().str.lower().isin(["true", "1"])
    if seen.all():
        raise SurvivalDataError(
            f"{name}: every patient is flagged seen_in_training (the run was trained on "
            "them), so there is nothing external to validate; the run's own out-of-fold "
            "report is `wsi-mil report RUN`"
        )
    return df[~seen.to_numpy()].copy(), int(seen.sum())


# ---- writing --------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary name."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def check_overwrite(out: Path, csv: Path, digest: str, force: bool) -> None:
    """Refuse to replace ``report.html``/``report.json`` in ``out`` made from another input.

    Raises:
        OutputExistsError: a report from a different input exists and not ``force``.
    """
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
    run: str | os.PathLike[str] | None = None,
) -> ReportResult:
    """Write the survival report of a run folder or predictions CSV.

    Args:
        source: run folder (with ``predictions.csv``) or a predictions CSV.
        out_dir: output folder; default beside the predictions table.
        covariates: clinical columns to adjust the hazard ratios for.
        n_groups: number of risk groups (2 = median split of train risks).
        times: evaluation times of the time-dependent AUC.
        tau: the run's horizon (Uno's C, Brier-score grid, calibration table); default
            the 80th percentile of the follow-up of the patients in the training rows
            (:func:`~wsi_mil.survival.calibration.run_tau`), which is also the τ of the
            run's ``metrics.json``.
        n_bootstrap: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        force: replace a report made from a different input.
        run: for external predictions (no ``fold`` / ``split``), the training run
            folder whose risk-group cut-offs, τ and Brier baselines are carried over
            (:func:`~wsi_mil.survival.external.training_reference`).

    Returns:
        A :class:`ReportResult`.

    Raises:
        SurvivalDataError: invalid predictions (naming column and line).
        OutputExistsError: a report from a different input exists and not ``force``.
    """
    import yaml

    from wsi_mil import __version__
    from wsi_mil.survival.figures import draw_figures
    from wsi_mil.survival.render import render_html

    csv, out = resolve_report_paths(source, out_dir)
    covariates = [c.strip() for c in covariates if c.strip()]
    digest = file_sha256(csv)
    check_overwrite(out, csv, digest, force)
    df = load_predictions(csv, covariates)
    external = bool((df["fold"] == EXTERNAL_FOLD).all())
    if run is not None and not external:
        raise SurvivalDataError(
            f"--run applies to external predictions (a table without fold/split); {csv} "
            "holds a run's own cross-validation predictions, whose cut-offs come from its "
            "train rows"
        )
    df, seen = _drop_seen(df, csv.name) if external else (df, 0)
    reference = training_reference(run, n_groups) if run is not None else None
    data, grouped = analyse_predictions(
        df,
        covariates=covariates,
        n_groups=n_groups,
        times=times,
        tau=tau,
        n_bootstrap=n_bootstrap,
        seed=seed,
        external=external,
        reference=reference,
    )
    if external:
        data["external"]["excluded_seen_in_training"] = seen
        data["parameters"]["run"] = None if run is None else str(Path(run).resolve())
    data = {
        "format": REPORT_FORMAT,
        "wsi_mil_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": {"path": str(csv.resolve()), "sha256": digest, "rows": len(df)},
        **data,
    }
    drawn = draw_figures(data)
    data["figures"] = {
        f.name: {fmt: f"{FIGURES_DIR}/{f.name}.{fmt}" for fmt in f.files} for f in drawn
    }
    from wsi_mil.mil.co_attention import report_section

    html = render_html(data, drawn, grouped, df, csv.name, report_section(csv.parent))
    figures: list[Path] = []
    for f in drawn:
        for fmt, payload in f.files.items():
            figures.append(out / data["figures"][f.name][fmt])
            write_atomic(figures[-1], payload)
    config = {
        "report": {"source": str(csv.resolve()), "out": str(out.resolve()), **data["parameters"]}
    }
    write_atomic(out / "report_config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    write_atomic(out / "report.html", html.encode("utf-8"))
    write_atomic(out / "report.json", json.dumps(data, indent=2, allow_nan=False).encode())
    return ReportResult(out / "report.html", out / "report.json", figures, data)
