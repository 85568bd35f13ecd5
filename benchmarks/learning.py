"""Does training learn with its defaults? MIL aggregators vs a linear baseline on slides.

For each signal fraction, a planted-signal cohort of generated *slides*
(:func:`wsi_mil.mil.planted.make_planted_cohort`: one contiguous region of dense tissue
covering about that share of a positive slide's tissue decides the label and drives the
hazard) goes through the real ``wsi-mil tile`` and ``wsi-mil extract --encoder builtin``.
Then, for each task and aggregator, :func:`wsi_mil.mil.train.train_cv` runs with the
default options (only task, model and the cohort are given) and the out-of-fold AUC
(classification) or Harrell's C (survival) is reported with its bootstrap CI and the
training time summed over the folds (finished runs in ``--data`` are reused, so a grid
can be completed in several invocations). The baseline, in the same run and on the same
outer folds (``splits.json``), is a linear model on mean-pooled slide features:
logistic regression (scikit-learn) or a ridge Cox model (scikit-survival), standardised
on the training patients, with the regularisation chosen by 3-fold cross-validation
inside the outer training set. For
aggregators with attention, the planted-tile AUROC is the mean over positive slides of
the ROC AUC of the out-of-fold attention against the per-tile truth mask. The oracle
line gives the C of the true planted share (the ceiling of any model). Usage::

    python benchmarks/learning.py [--quick] [--data DIR] [--fractions 0.02 0.05 0.15]
        [--models mean max abmil clam_sb transmil dual_xattn] [--tasks classification survival]
        [--patients 40] [--slide-px 2560] [--train-json '{"steps": 500}']
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_mil.mil.attention import read_attention
from wsi_mil.mil.metrics import classification_metrics, survival_metrics
from wsi_mil.mil.planted import PlantedCohort, make_planted_cohort, planted_tiles
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.train import train_cv
from wsi_mil.workflows.cli import main as cli

MODELS = ("mean", "max", "abmil", "clam_sb", "transmil", "dual_xattn")
METRIC = {"classification": "auc", "survival": "harrell_c"}


def prepare(
    root: Path, fraction: float, n_patients: int, slide_px: int
) -> tuple[PlantedCohort, Path]:
    """Generate the slides and run ``tile`` and ``extract`` (both skip finished work)."""
    cohort = make_planted_cohort(root, fraction, n_patients=n_patients, slide_px=slide_px)
    tiles, feats = root / "tiles", root / "features"
    for argv in (
        ["tile", str(cohort.slides), "--out", str(tiles), "--target-mpp", "1.0",
         "--tile-px", "128", "--workers", "2"],
        ["extract", str(tiles), "--encoder", "builtin", "--out", str(feats)],
    ):  # fmt: skip
        if cli(argv) != 0:
            raise SystemExit(f"wsi-mil {argv[0]} failed on {root}")
    return cohort, feats / "builtin"


def run_model(
    cohort: PlantedCohort, bags: Path, task: str, model: str, out: Path, overrides: dict[str, Any]
) -> tuple[dict[str, Any], float, Path]:
    """Train with the defaults (a finished run in ``out`` is reused); returns the pooled
    metric, the training seconds summed over folds (from ``fold.json``) and the run folder."""
    # dual_xattn needs a second modality: it gets the cohort's uninformative ``age``
    clinical = ["age"] if model == "dual_xattn" else []
    config = TrainConfig(task=task, cohort=str(cohort.cohort), features=[str(bags)], model=model,
                         clinical=clinical, n_boot=500, **overrides)  # fmt: skip
    result = train_cv(config, out)
    seconds = sum(json.loads(f.read_text())["seconds"] for f in out.glob("fold_*/fold.json"))
    return result.metrics["pooled"][METRIC[task]], seconds, out


def attention_auroc(cohort: PlantedCohort, run: Path) -> float | None:
    """Mean over positive slides of the AUROC of out-of-fold attention vs planted tiles."""
    from sklearn.metrics import roc_auc_score

    table = pd.read_csv(cohort.cohort)
    scores = []
    for slide_id in table.loc[table["label"] == "pos", "slide_id"]:
        path = run / "attention" / f"{slide_id}.h5"
        if not path.is_file():
            return None  # an aggregator without attention
        att = read_attention(path)
        tile = int(att.attrs["tile_level0"])
        truth = planted_tiles(cohort.truth / f"{slide_id}.npz", att.coords, tile)
        if np.ptp(att.attention) == 0:
            return None  # no attention (mean pooling weighs every tile alike)
        if truth.any() and not truth.all():
            scores.append(roc_auc_score(truth, att.attention))
    return float(np.mean(scores)) if scores else None


def _slide_means(bags: Path, slide_ids: list[str]) -> np.ndarray:
    from wsi_mil.features.bags import read_bag

    return np.stack(
        [read_bag(bags / f"{s}.h5").features.astype(np.float64).mean(0) for s in slide_ids]
    )


def fit_linear(task: str, x: np.ndarray, rows: pd.DataFrame) -> Any:
    """A linear model on standardised ``x`` (P, F) for the patients ``rows``: logistic
    regression, or a ridge Cox model with its penalty chosen by 3-fold CV. Returns a
    function mapping (M, F) to (M,) scores (log-odds or risk)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    if task == "classification":
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=3, max_iter=5000))
        model.fit(x, (rows["label"] == "pos").to_numpy(int))
        return model.decision_function
    pipe = make_pipeline(StandardScaler(), CoxPHSurvivalAnalysis())
    grid = {"coxphsurvivalanalysis__alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]}
    search = GridSearchCV(pipe, grid, cv=KFold(3, shuffle=True, random_state=0))
    search.fit(x, Surv.from_arrays(rows["event"].astype(bool), rows["time"]))
    return search.predict


def baseline(cohort: PlantedCohort, bags: Path, task: str, splits: Path) -> dict[str, Any]:
    """Linear model on mean-pooled features, same outer folds, inner-CV regularisation."""
    table = pd.read_csv(cohort.cohort, dtype={"patient_id": str}).set_index("patient_id")
    x_all = pd.DataFrame(_slide_means(bags, list(table["slide_id"])), index=table.index)
    truth, outputs = [], []
    for fold in json.loads(splits.read_text())["folds"]:
        train = fold["train"] + fold["val"]
        predict = fit_linear(task, x_all.loc[train].to_numpy(), table.loc[train])
        outputs.append(predict(x_all.loc[fold["test"]].to_numpy()))
        truth.append(table.loc[fold["test"]])
    out, rows = np.concatenate(outputs), pd.concat(truth)
    if task == "classification":
        prob = 1 / (1 + np.exp(-out))
        y = (rows["label"] == "pos").to_numpy(int)
        return classification_metrics(y, np.stack([1 - prob, prob], 1), n_boot=500)["auc"]
    return survival_metrics(rows["time"], rows["event"], out, n_boot=500)["harrell_c"]


def oracle_c(cohort: PlantedCohort) -> float:
    """Harrell's C of the true planted share: the best any model can do."""
    table = pd.read_csv(cohort.cohort)
    return survival_metrics(table["time"], table["event"], table["planted_share"], n_boot=0)[
        "harrell_c"
    ]["value"]


def _fmt(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "undefined"
    ci = (
        f" ({metric['ci_low']:.2f}–{metric['ci_high']:.2f})" if metric["ci_low"] is not None else ""
    )
    return f"{metric['value']:.3f}{ci}"


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fractions 0.02 and 0.15; mean and abmil"
    )
    parser.add_argument("--data", type=Path, default=None, help="reuse generated cohorts here")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.15])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=["classification", "survival"])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--slide-px", type=int, default=2560)
    parser.add_argument("--train-json", default="{}", help="TrainConfig overrides (default: none)")
    args = parser.parse_args()
    if args.quick:
        args.fractions, args.models = [0.02, 0.15], ["mean", "abmil"]
    overrides = json.loads(args.train_json)
    root = args.data or Path(tempfile.mkdtemp(prefix="wsi-mil-learning-"))
    header = (
        f"{'fraction':>8}  {'task':<14} {'model':<22} {'metric (95% CI)':<22} "
        f"{'att AUROC':>9} {'train s':>7}"
    )
    lines = []
    t_all = time.perf_counter()
    for fraction in args.fractions:
        data = root / f"f{fraction:g}"
        t0 = time.perf_counter()
        cohort, bags = prepare(data, fraction, args.patients, args.slide_px)
        lines.append(
            f"# fraction {fraction:g}: slides tiled and embedded in "
            f"{time.perf_counter() - t0:.0f} s; "
            f"oracle C of the true planted share {oracle_c(cohort):.3f}"
        )
        for task in args.tasks:
            splits = None
            for model in args.models:
                tag = json.dumps(overrides, sort_keys=True) if overrides else "defaults"
                out = data / "runs" / f"{model}-{task}-{hashlib.sha1(tag.encode()).hexdigest()[:8]}"
                metric, seconds, run = run_model(cohort, bags, task, model, out, overrides)
                att = attention_auroc(cohort, run)
                splits = run / "splits.json"
                lines.append(
                    f"{fraction:>8g}  {task:<14} {model:<22} {_fmt(metric):<22} "
                    f"{'—' if att is None else f'{att:.3f}':>9} {seconds:>7.0f}"
                )
                print(lines[-1], flush=True)
            if splits is not None:
                t0 = time.perf_counter()
                base = baseline(cohort, bags, task, splits)
                lines.append(
                    f"{fraction:>8g}  {task:<14} {'linear (mean-pooled)':<22} {_fmt(base):<22} "
                    f"{'—':>9} {time.perf_counter() - t0:>7.0f}"
                )
                print(lines[-1], flush=True)
    print()
    print(
        f"learning benchmark, {args.patients} patients per cohort, builtin encoder, "
        f"train defaults{'' if not overrides else ' + ' + json.dumps(overrides)}; data in {root}"
    )
    print(header)
    print("\n".join(lines))
    print(f"total wall time: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
