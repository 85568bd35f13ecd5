"""Does ``dual_xattn`` fuse? Histology alone, omics alone, late fusion and dual cross-attention.

A planted-signal cohort of generated *slides* (:func:`wsi_mil.mil.planted.make_planted_cohort`,
one contiguous region of dense tissue on about ``--fraction`` of a positive slide's
tissue) goes through the real ``wsi-mil tile`` and ``wsi-mil extract --encoder builtin``.
:func:`wsi_mil.mil.planted.make_multimodal_cohort` then gives it an omics table (20
gene groups of 10 genes; one group carries a per-patient signal, the rest is noise) and
an outcome whose log hazard is ``1.6 h + 0.8 z`` (histology score ``h``, omics signal
``z``; each carries about half of its variance) — or only one of the two with
``--omics-effect 0`` / ``--histology-effect 0``. The label is the log hazard plus
logistic noise above its median. A share of the patients (``--missing``) has no omics.

On the same outer folds (``splits.json`` of the first run; every run uses the same seed
and cohort), for each task:

* ``abmil`` — histology only, ``train`` defaults;
* ``omics linear`` — logistic regression / ridge Cox (scikit-learn / scikit-survival) on
  the standardised omics (missing rows imputed with the training mean), regularisation
  chosen by 3-fold CV inside the outer training set;
* ``late fusion`` — the mean of the two models' outputs, each standardised with the
  outputs of the fold's training patients;
* ``main effects`` — ``abmil``'s logits plus a lasso on the gene-group scores with
  those logits as offset (``fit_penalised``, as ``dual_xattn``'s context stage): the
  two main effects ``dual_xattn``'s warm start starts from, without its
  cross-attention stage;
* ``dual_xattn`` — the fusion aggregator with the omics groups (and with ``age``, an
  uninformative clinical column, as ``+clinical``), ``train`` defaults.

Prints out-of-fold AUC or Harrell's C with bootstrap CIs and the oracle (the true log
hazard). With several ``--seeds`` (new omics and outcomes for the same slides) it adds
the mean ± SD over seeds and each fusion model's paired difference from the better
single modality of the same seed: one draw of 100 patients moves C by several hundredths.
Finished runs in ``--data`` are reused. Usage::

    python benchmarks/fusion.py [--data DIR] [--patients 100] [--missing 0 0.25 0.5]
        [--tasks survival classification] [--omics-effect 0.8] [--histology-effect 1.6]
        [--seeds 0 1 2] [--dual-json '{"context_linear": false}']
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from learning import _fmt, fit_linear, prepare

from wsi_mil.mil.heads import ClassificationHead, CoxHead, Head
from wsi_mil.mil.metrics import classification_metrics, survival_metrics
from wsi_mil.mil.penalised import fit_penalised
from wsi_mil.mil.planted import MultimodalCohort, make_multimodal_cohort
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.train import train_cv


def train(
    mm: MultimodalCohort,
    bags: Path,
    task: str,
    variant: str,
    out: Path,
    model_kwargs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Train one MIL variant with the defaults (reused when finished); its predictions
    with a ``score`` column (:func:`score`). ``model_kwargs`` go to ``dual_xattn``."""
    extra: dict[str, Any] = {}
    if variant.startswith("dual_xattn"):
        extra = {"omics": str(mm.omics), "omics_groups": str(mm.groups),
                 "model_kwargs": model_kwargs or {}}  # fmt: skip
        if variant.endswith("+clinical"):
            extra["clinical"] = ["age"]
    config = TrainConfig(
        task=task, cohort=str(mm.cohort), features=[str(bags)], n_boot=0,
        model=variant.split("+")[0], **extra,
    )  # fmt: skip
    train_cv(config, out)
    predictions = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    return predictions.assign(score=score(predictions, task))


def score(predictions: pd.DataFrame, task: str) -> pd.Series:
    """One number per row that orders patients (risk, or the logit of ``pos``)."""
    if task == "survival":
        return predictions["risk"]
    p = predictions["prob_pos"].clip(1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def omics_linear(mm: MultimodalCohort, task: str, splits: dict[str, Any]) -> pd.DataFrame:
    """The omics-only linear model per outer fold (:func:`learning.fit_linear`; missing
    rows imputed with the training mean): ``patient_id, fold, split, score``."""
    table = pd.read_csv(mm.cohort, dtype={"patient_id": str}).set_index("patient_id")
    omics = pd.read_csv(mm.omics, dtype={"patient_id": str}).set_index("patient_id")
    x_all = omics.reindex(table.index)
    rows = []
    for fold in splits["folds"]:
        train_ids = fold["train"] + fold["val"]
        fill = x_all.loc[train_ids].mean()
        predict = fit_linear(task, x_all.loc[train_ids].fillna(fill).to_numpy(),
                             table.loc[train_ids])  # fmt: skip
        for split, ids in (("train", train_ids), ("test", fold["test"])):
            values = predict(x_all.loc[ids].fillna(fill).to_numpy())
            rows += [(p, fold["fold"], split, float(v)) for p, v in zip(ids, values, strict=True)]
    return pd.DataFrame(rows, columns=["patient_id", "fold", "split", "score"])


def _standardised(frame: pd.DataFrame) -> pd.Series:
    """A model's scores standardised on each fold's training patients, indexed by
    ``patient_id, fold, split``."""
    f = frame[["patient_id", "fold", "split", "score"]].copy()
    train = f[f["split"] == "train"].groupby("fold")["score"].agg(["mean", "std"])
    f["score"] = (f["score"] - f["fold"].map(train["mean"])) / f["fold"].map(train["std"])
    return f.set_index(["patient_id", "fold", "split"])["score"]


def late_fusion(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Mean of two models' scores, each standardised on the fold's training patients."""
    return (_standardised(a) + _standardised(b)).div(2).rename("score").reset_index()


def main_effects(
    mm: MultimodalCohort, task: str, hist: pd.DataFrame, hist_run: Path, splits: dict[str, Any]
) -> pd.DataFrame:
    """``abmil``'s logits plus a lasso on the gene-group scores (:func:`fit_penalised`,
    the 1-SE rule, the logits as offset, as ``dual_xattn``'s context stage) fitted on
    each outer fold's training patients: the sum ``dual_xattn``'s warm start starts its
    cross-attention stage from, without that stage (and with ``abmil``'s own run as
    histology path)."""
    table = pd.read_csv(mm.cohort, dtype={"patient_id": str}).set_index("patient_id")
    omics = pd.read_csv(mm.omics, dtype={"patient_id": str}).set_index("patient_id")
    omics = omics.reindex(table.index)
    groups = json.loads(mm.groups.read_text())
    rows = []
    for fold in splits["folds"]:
        k, train_ids = fold["fold"], fold["train"] + fold["val"]
        genes = omics.loc[train_ids]
        z = (omics - genes.mean()) / genes.std(ddof=0)
        x = pd.DataFrame({g: z[cols].mean(axis=1) for g, cols in groups.items()}).fillna(0.0)
        logits = hist[hist["fold"] == k].set_index(["patient_id", "split"])["score"]
        if task == "survival":  # standardised risks back to log relative hazards
            head = json.loads((hist_run / f"fold_{k}" / "fold.json").read_text())["head"]
            logits = logits * head["scale"] + head["center"]
        offset = logits.loc[[(p, "train") for p in train_ids]].to_numpy()
        w = _lasso(task, x.loc[train_ids].to_numpy(), table.loc[train_ids], offset)
        for split, ids in (("train", train_ids), ("test", fold["test"])):
            values = logits.loc[[(p, split) for p in ids]].to_numpy() + x.loc[ids].to_numpy() @ w
            rows += [(p, k, split, float(v)) for p, v in zip(ids, values, strict=True)]
    frame = pd.DataFrame(rows, columns=["patient_id", "fold", "split", "score"])
    return _standardised(frame).reset_index()  # pooled over folds, as the trainer's risks


def _lasso(task: str, x: np.ndarray, table: pd.DataFrame, offset: np.ndarray) -> np.ndarray:
    """(P,) lasso coefficients of the task's head loss on ``x`` with the (n,) logit
    ``offset`` (the logit of ``pos`` for classification)."""
    if task == "survival":
        head: Head = CoxHead()
        targets = {"time": torch.tensor(table["time"].to_numpy(float)),
                   "event": torch.tensor(table["event"].to_numpy(int))}  # fmt: skip
        strata = targets["event"]
    else:
        head = ClassificationHead(["neg", "pos"])
        targets = {"label": torch.tensor((table["label"] == "pos").to_numpy(int))}
        strata = targets["label"]
    off = torch.zeros(len(x), head.n_outputs)
    off[:, -1] = torch.tensor(offset, dtype=torch.float32)  # on the logit of pos
    fit = fit_penalised(
        torch.tensor(x, dtype=torch.float32),
        lambda logits, idx: head.loss(logits + off[idx], {k: v[idx] for k, v in targets.items()}),
        list(table.index),
        n_outputs=head.n_outputs,
        strata=strata.tolist(),
    )
    w = fit.weight.numpy()
    return w[:, 0] if task == "survival" else w[:, 1] - w[:, 0]


def metric(mm: MultimodalCohort, task: str, oof: pd.DataFrame) -> dict[str, Any]:
    """Pooled out-of-fold AUC or Harrell's C of ``oof`` (``patient_id, split, score``)."""
    test = oof[oof["split"] == "test"]
    table = pd.read_csv(mm.cohort, dtype={"patient_id": str}).set_index("patient_id")
    rows = table.loc[test["patient_id"]]
    s = test["score"].to_numpy(float)
    if task == "classification":
        y = (rows["label"] == "pos").to_numpy(int)
        prob = 1 / (1 + np.exp(-s))
        return classification_metrics(y, np.stack([1 - prob, prob], 1), n_boot=500)["auc"]
    return survival_metrics(rows["time"], rows["event"], s, n_boot=500)["harrell_c"]


def oracle(mm: MultimodalCohort, task: str) -> dict[str, Any]:
    """The metric of the true log hazard on all patients."""
    table = pd.read_csv(mm.cohort, dtype={"patient_id": str})
    oof = pd.DataFrame({"patient_id": table["patient_id"], "split": "test", "score": table["risk"]})
    return metric(mm, task, oof)


def summary(values: pd.DataFrame) -> str:
    """Mean ± SD over seeds per task, missing share and model, and each fusion model's
    paired difference from the better single modality of the same seed."""
    out = [f"{'task':<14} {'missing':>7} {'model':<22} {'mean ± SD over seeds':<22} "
           f"{'vs best single (paired, mean ± SD; wins)'}"]  # fmt: skip
    for (task, missing), g in values.groupby(["task", "missing"], sort=False):
        wide = g.pivot(index="seed", columns="model", values="value")
        best = wide[["abmil (histology)", "omics linear"]].max(axis=1)
        for name in wide.columns:
            line = (f"{task:<14} {missing:>7.0%} {name:<22} "
                    f"{wide[name].mean():.3f} ± {wide[name].std():.3f}{'':<8}")  # fmt: skip
            if name not in ("abmil (histology)", "omics linear"):
                d = wide[name] - best
                line += f" {d.mean():+.3f} ± {d.std():.3f}; {(d > 0).sum()}/{len(d)}"
            out.append(line)
    return "\n".join(out)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="reuse generated data here")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--missing", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--tasks", nargs="+", default=["survival", "classification"])
    parser.add_argument("--histology-effect", type=float, default=1.6)
    parser.add_argument("--omics-effect", type=float, default=0.8)
    parser.add_argument("--variants", nargs="+", default=["dual_xattn", "dual_xattn+clinical"])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="omics and outcome seeds (the slides stay); more than one adds a summary over seeds",
    )  # fmt: skip
    parser.add_argument(
        "--dual-json", default="{}",
        help="dual_xattn options (model_kwargs), e.g. '{\"context_linear\": false}'; "
        "their runs get a folder of their own",
    )  # fmt: skip
    args = parser.parse_args()
    dual_kwargs = json.loads(args.dual_json)
    tag = "".join(f"-{k}={v}" for k, v in sorted(dual_kwargs.items()))
    root = args.data or Path(tempfile.mkdtemp(prefix="wsi-mil-fusion-"))
    t_all = time.perf_counter()
    base, bags = prepare(root / f"slides-{args.fraction:g}-{args.patients}", args.fraction,
                         args.patients, 2560)  # fmt: skip
    effects = f"h{args.histology_effect:g}-o{args.omics_effect:g}"
    lines, values = [], []
    for seed in args.seeds:
        suffix = f"-seed{seed}" if seed else ""  # seed 0 keeps the folders of earlier runs

        def cohort(missing: float, suffix: str = suffix, seed: int = seed) -> MultimodalCohort:
            return make_multimodal_cohort(base, root / f"{effects}-missing{missing:g}{suffix}",
                                          missing=missing, seed=seed,
                                          histology_effect=args.histology_effect,
                                          omics_effect=args.omics_effect)  # fmt: skip

        for task in args.tasks:
            lines.append(f"# seed {seed}, oracle (true log hazard): {task} "
                         f"{_fmt(oracle(cohort(0.0), task))}")  # fmt: skip
            # histology alone does not depend on the omics (the outcomes are the same at
            # every missing share): train it once per task and seed, on the complete cohort
            complete = cohort(0.0)
            hist_run = complete.cohort.parent / "runs" / f"abmil-{task}"
            t0 = time.perf_counter()
            hist = train(complete, bags, task, "abmil", hist_run)
            t_hist = time.perf_counter() - t0
            splits = json.loads((hist_run / "splits.json").read_text())
            for missing in args.missing:
                mm = cohort(missing)
                omics = omics_linear(mm, task, splits)
                results = {
                    "abmil (histology)": (hist, t_hist),
                    "omics linear": (omics, 0.0),
                    "late fusion": (late_fusion(hist, omics), 0.0),
                    "main effects": (main_effects(mm, task, hist, hist_run, splits), 0.0),
                }
                for variant in args.variants:
                    t0 = time.perf_counter()
                    data_run = mm.cohort.parent / "runs" / f"{variant}-{task}{tag}"
                    pred = train(mm, bags, task, variant, data_run, dual_kwargs)
                    results[variant] = (pred, time.perf_counter() - t0)
                for name, (oof, seconds) in results.items():
                    m = metric(mm, task, oof)
                    values.append((task, missing, name, seed, m["value"]))
                    line = (f"{task:<14} {missing:>7.0%} {name:<22} {seed:>4} "
                            f"{_fmt(m):<22} {seconds:>7.0f}")  # fmt: skip
                    lines.append(line)
                    print(line, flush=True)
    print()
    print(
        f"fusion benchmark: {args.patients} patients, planted fraction {args.fraction:g}, "
        f"log hazard {args.histology_effect:g} h + {args.omics_effect:g} z; data in {root}"
    )
    print(f"{'task':<14} {'missing':>7} {'model':<22} {'seed':>4} {'metric (95% CI)':<22} "
          f"{'wall s':>7}")  # fmt: skip
    print("\n".join(lines))
    if len(args.seeds) > 1:
        print()
        print(summary(pd.DataFrame(values, columns=["task", "missing", "model", "seed", "value"])))
    print(f"total wall time: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
