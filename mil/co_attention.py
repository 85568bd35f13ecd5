"""Per-slide co-attention files of fusion models: ``co_attention/<slide_id>.h5``.

For a fusion aggregator (``dual_xattn``) each context token — one per omics gene group,
one for the clinical covariates — attends over the bag's tiles, and the context pooling
weighs the tokens against each other. Training writes both for every out-of-fold bag,
split by slide like the attention files, so one can ask which tiles a gene group reads
and how much that group counts.

| name | dtype, shape | meaning |
| --- | --- | --- |
| ``co_attention`` | float32 (T, N) | attention of token ``t`` over the slide's tiles |
| ``weights`` | float32 (T,) | context pooling weight of each token in the bag |
| ``coords`` | int64 (N, 2) | level-0 (x, y) of each tile, same order |

A token's attention sums to 1 over all tiles of its bag (all the patient's slides for a
patient-level bag) and is 0 when its modality is missing; the weights sum to 1 over the
present tokens. File attributes: ``format`` (``"wsi-mil.co_attention/1"``),
``slide_id``, ``patient_id``, ``tokens`` (JSON list of T names: gene groups, then
``clinical``), ``model``, ``source`` (``"fold_<k>"``) and, where the bag records them,
``tile_level0`` (tile side in level-0 px) and the slide fingerprint ``source_size`` /
``source_sha256`` / ``source_path``, so that ``wsi-mil heatmap --gene-group`` draws
tiles at their size and refuses another slide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from wsi_mil.errors import WsiMilError
from wsi_mil.mil.data import BagStore, Unit
from wsi_mil.outputs import atomic_path, contained_path

__all__ = [
    "CO_ATTENTION_FORMAT",
    "CoAttention",
    "read_co_attention",
    "summarise_co_attention",
    "write_co_attention_summary",
    "write_unit_co_attention",
]

CO_ATTENTION_FORMAT = "wsi-mil.co_attention/1"


class CoAttention(NamedTuple):
    """Co-attention of one slide.

    Attributes:
        co_attention: (T, N) float32, token × tile.
        weights: (T,) float32 token pooling weights of the slide's bag.
        coords: (N, 2) int64 level-0 (x, y).
        tokens: T token names (gene groups, then ``clinical``).
        attrs: The other file attributes.
    """

    co_attention: np.ndarray
    weights: np.ndarray
    coords: np.ndarray
    tokens: list[str]
    attrs: dict[str, Any]


def write_unit_co_attention(
    out_dir: Path,
    store: BagStore,
    units: Sequence[Unit],
    co_attention: Sequence[np.ndarray | None],
    weights: Sequence[np.ndarray | None],
    *,
    tokens: Sequence[str],
    source: str,
    model_name: str,
) -> None:
    """Write ``<out_dir>/<slide_id>.h5`` for every slide of every unit with a
    co-attention.

    Args:
        out_dir: Output folder.
        store: The bags (tile coordinates and slide of each tile).
        units: The bags, aligned with ``co_attention`` and ``weights``.
        co_attention: Per unit, (T, N_u) or None (skipped).
        weights: Per unit, (T,) or None.
        tokens: T token names.
        source: ``fold_<k>``.
        model_name: The aggregator's name.

    Raises:
        UnsafePathError: A slide id would place its file outside ``out_dir``.
    """
    from wsi_mil.mil.unit_attention import _source

    for unit, co, w in zip(units, co_attention, weights, strict=True):
        if co is None or w is None:
            continue
        _, coords, which = store.unit(unit)
        for j, slide_id in enumerate(unit.slide_ids):
            sel = which == j
            fingerprint = _source(store, slide_id)
            located = {
                "tile_level0": store.tile_level0.get(slide_id),
                **{f"source_{k}": fingerprint.get(k) for k in ("size", "sha256", "path")},
            }
            path = contained_path(out_dir, f"{slide_id}.h5")
            with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
                h5.create_dataset("co_attention", data=np.asarray(co[:, sel], np.float32))
                h5.create_dataset("weights", data=np.asarray(w, np.float32))
                h5.create_dataset("coords", data=np.asarray(coords[sel], np.int64))
                h5.attrs.update(
                    format=CO_ATTENTION_FORMAT,
                    slide_id=slide_id,
                    patient_id=unit.patient_id,
                    tokens=json.dumps(list(tokens)),
                    model=model_name,
                    source=source,
                )
                h5.attrs.update({k: v for k, v in located.items() if v is not None})


def read_co_attention(path: str | os.PathLike[str]) -> CoAttention:
    """Read a file written by :func:`write_unit_co_attention`.

    Raises:
        WsiMilError: Missing or not a co-attention file.
    """
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"co-attention file {path} does not exist; train a fusion model")
    with h5py.File(path, "r") as h5:
        if h5.attrs.get("format") != CO_ATTENTION_FORMAT:
            raise WsiMilError(f"{path} is not a wsi-mil co-attention file ({CO_ATTENTION_FORMAT})")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        tokens = json.loads(attrs.pop("tokens"))
        return CoAttention(
            h5["co_attention"][()], h5["weights"][()], h5["coords"][()], tokens, attrs
        )


def summarise_co_attention(run: str | os.PathLike[str], predictions: Any) -> Any:
    """Per context token: how much it counts and whether that goes with the prediction.

    For every out-of-fold patient, the token's pooling weight (averaged over the
    patient's bags) is paired with the patient's out-of-fold score (``risk``, or the
    probability of the last class); Spearman's ρ between the two across patients tells
    whether patients for whom a gene group counts more are predicted at higher risk.

    Args:
        run: Run folder with ``co_attention/``.
        predictions: The run's predictions table (``patient_id``, ``split``, and ``risk``
            or ``prob_<class>`` columns).

    With the model's context linear path (``dual_xattn``'s ``context_linear``) each
    gene group also gets its coefficient: the change of the logit (the log hazard in
    survival, the last class's logit against the others' mean in classification) per
    unit of the group's score (the mean of its standardised genes), mean and SD over the
    folds; the clinical token gets one when it holds one covariate.

    Returns:
        A DataFrame ``token, n_patients, mean_weight, sd_weight, spearman_rho,
        spearman_p, linear_coef, linear_coef_sd`` (one row per token, in model order;
        the last two NaN without the path), or None without co-attention.
    """
    import pandas as pd
    from scipy.stats import spearmanr

    files = sorted((Path(run) / "co_attention").glob("*.h5"))
    if not files:
        return None
    rows: list[np.ndarray] = []
    patients: list[str] = []
    tokens: list[str] = []
    for path in files:
        co = read_co_attention(path)
        tokens = co.tokens
        rows.append(co.weights)
        patients.append(str(co.attrs["patient_id"]))
    weights = pd.DataFrame(np.stack(rows), index=patients).groupby(level=0).mean()
    test = predictions[predictions["split"] == "test"].astype({"patient_id": str})
    score_column = "risk" if "risk" in test else [c for c in test if c.startswith("prob_")][-1]
    score = test.groupby("patient_id")[score_column].mean().reindex(weights.index)
    out = []
    for t, name in enumerate(tokens):
        w = weights[t].to_numpy(float)
        present = w > 0  # a patient without the modality gives the token no weight
        rho, p = (np.nan, np.nan)
        if present.sum() >= 3 and np.ptp(w[present]) > 0:
            rho, p = spearmanr(w[present], score.to_numpy(float)[present])
        out.append(
            {
                "token": name,
                "n_patients": int(present.sum()),
                "mean_weight": float(w[present].mean()) if present.any() else np.nan,
                "sd_weight": float(w[present].std(ddof=1)) if present.sum() > 1 else np.nan,
                "spearman_rho": float(rho),
                "spearman_p": float(p),
            }
        )
    coef = _linear_coefficients(Path(run), len(tokens))
    frame = pd.DataFrame(out)
    frame["linear_coef"] = coef.mean(axis=0) if coef.size else np.nan
    frame["linear_coef_sd"] = coef.std(axis=0, ddof=1) if len(coef) > 1 else np.nan
    return frame


def _linear_coefficients(run: Path, n_tokens: int) -> np.ndarray:
    """``(n_folds, n_tokens)`` coefficients of the folds' context linear paths (see
    :func:`summarise_co_attention`); ``(0, n_tokens)`` when the folds have none. The
    clinical token's entry is NaN unless it holds exactly one covariate."""
    from safetensors import safe_open

    rows = []
    for path in sorted(run.glob("fold_*/model.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            if "context_linear.weight" not in f.keys():
                continue
            w = f.get_tensor("context_linear.weight").astype(float)  # (n_outputs, G + C)
        c = w[0] if len(w) == 1 else w[-1] - w[:-1].mean(axis=0)
        row = np.full(n_tokens, np.nan)
        meta = json.loads((path.parent / "fold.json").read_text())["aggregator"]
        n_groups = len(meta.get("omics_groups") or [])
        row[:n_groups] = c[:n_groups]
        if n_tokens > n_groups and len(c) == n_groups + 1:  # one clinical covariate
            row[n_groups] = c[n_groups]
        rows.append(row)
    return np.array(rows).reshape(len(rows), n_tokens)


def write_co_attention_summary(run: str | os.PathLike[str], predictions: Any) -> Path | None:
    """Write ``co_attention_summary.csv`` and ``co_attention.png`` into the run folder.

    Returns:
        The CSV path, or None when the run has no co-attention (not a fusion model).
    """
    summary = summarise_co_attention(run, predictions)
    if summary is None:
        return None
    run = Path(run)
    with atomic_path(run / "co_attention_summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(run / "co_attention.png") as tmp:
        _figure(summary).savefig(tmp, format="png", dpi=120)
    return run / "co_attention_summary.csv"


def report_section(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The co-attention section of a run's ``report.html``: ``{"png": base64 of
    co_attention.png, "rows": the summary's rows}``, or None when ``folder`` holds no
    ``co_attention_summary.csv`` / ``co_attention.png`` (not a fusion run)."""
    import base64

    import pandas as pd

    csv, png = Path(folder) / "co_attention_summary.csv", Path(folder) / "co_attention.png"
    if not (csv.is_file() and png.is_file()):
        return None
    rows = pd.read_csv(csv).astype(object).where(lambda f: f.notna(), None)
    return {
        "png": base64.b64encode(png.read_bytes()).decode("ascii"),
        "rows": rows.to_dict("records"),
    }


def _figure(summary: Any) -> Any:
    """Per token: mean pooling weight (± SD), Spearman ρ with the score and, with a
    context linear path, its coefficient (± SD over folds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    linear = "linear_coef" in summary and summary["linear_coef"].notna().any()
    fig = Figure(figsize=(12.0 if linear else 8.0, 0.3 * len(summary) + 1.5),
                 layout="constrained")  # fmt: skip
    FigureCanvasAgg(fig)
    left, right, *third = fig.subplots(1, 3 if linear else 2, sharey=True)
    y = np.arange(len(summary))
    left.barh(y, summary["mean_weight"], xerr=summary["sd_weight"], color="#4575b4")
    left.set_yticks(y, [str(t).replace("$", r"\$") for t in summary["token"]])
    left.invert_yaxis()
    left.set_xlabel("context pooling weight (mean ± SD over patients)")
    colours = ["#d73027" if r > 0 else "#4575b4" for r in summary["spearman_rho"].fillna(0)]
    right.barh(y, summary["spearman_rho"].fillna(0), color=colours)
    right.axvline(0, color="black", lw=0.8)
    right.set_xlim(-1, 1)
    right.set_xlabel("Spearman ρ of the weight with the out-of-fold score")
    for ax in third:
        coef = summary["linear_coef"].fillna(0)
        ax.barh(y, coef, xerr=summary["linear_coef_sd"].fillna(0),
                color=["#d73027" if c > 0 else "#4575b4" for c in coef])  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("linear path: logit per unit of group score (mean ± SD over folds)")
    fig.suptitle("Which context tokens count, and with which prediction")
    return fig
