"""Apply a trained run to new slides (``wsi-mil predict``).

The model for new cohorts is the fold ensemble: every ``fold_<k>`` model predicts each
bag and the outputs are averaged (class probabilities or risks; attention too). A
uniform weight soup (the average of the fold models' weights, which share their
initialisation) is offered where it applies: same architecture and no fold-specific
clinical/omics preprocessing or time bins. With ``--repeats`` the ensemble is repeat 0's
folds (the run folder's own ``fold_<k>/``).

Patients the run was trained on are flagged (``seen_in_training``): every patient in
the run's ``splits.json`` (and its repeats') was in the training set of some fold, so
the ensemble has seen them all. A patient is seen when its id, or the id of one of its
slides, is in the training run. Their predictions are kept but, unless
``allow_in_sample``, they are left out of the metrics; with ``allow_in_sample`` they are
included and the metrics file says ``"in_sample": true``.

Before any compute the new bags are compared with the run's (encoder, weights hash,
``target_mpp``, ``tile_px``; :mod:`wsi_mil.mil.provenance`) and a model trained with
omics or clinical inputs is refused without them (``mask_missing_modalities`` applies it
with those inputs masked, as for a training patient who lacks them). With a cohort, its
other columns (clinical covariates such as ``age``) are joined to the predictions by
``patient_id``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_mil.errors import CohortError, ConfigError, MissingModalityError
from wsi_mil.features.bags import BagError
from wsi_mil.mil.cohort import Cohort, Patient, Slide, load_cohort
from wsi_mil.mil.data import BagStore, Unit, make_units, scan_bags
from wsi_mil.mil.fold import FoldModel
from wsi_mil.mil.heads import SurvivalHead
from wsi_mil.mil.inference import UnitSet, patient_rows, predict_units, resolve_device
from wsi_mil.mil.metrics import classification_metrics, survival_metrics
from wsi_mil.mil.provenance import check_provenance, run_provenance
from wsi_mil.mil.repeats import repeat_dirs
from wsi_mil.mil.run import load_config, write_config
from wsi_mil.mil.unit_attention import write_unit_attention
from wsi_mil.outputs import atomic_path

__all__ = [
    "Ensemble",
    "attention_dir_for",
    "check_modalities",
    "load_ensemble",
    "predict_cohort",
    "training_ids",
    "uniform_soup",
]

log = logging.getLogger(__name__)


def attention_dir_for(out: str | os.PathLike[str]) -> Path:
    """Default attention folder of a predictions CSV: ``preds.csv`` → ``preds_attention/``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_attention")


@dataclass
class Ensemble:
    """The fold models of a run.

    Attributes:
        run_dir: The run folder.
        config: Its ``config.yaml``.
        folds: One :class:`~wsi_mil.mil.train.FoldModel` per finished fold.
    """

    run_dir: Path
    config: dict[str, Any]
    folds: list[FoldModel]


def load_ensemble(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Ensemble:
    """Load every finished fold of a run.

    Raises:
        ConfigError: Not a run folder, or no finished fold.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    dirs = sorted(
        (d for d in run_dir.glob("fold_*") if (d / "fold.json").is_file()),
        key=lambda d: int(d.name.split("_")[1]),
    )
    if not dirs:
        raise ConfigError(f"{run_dir} has no finished fold; finish `wsi-mil train` first")
    return Ensemble(run_dir, config, [FoldModel.load(d, device) for d in dirs])


def uniform_soup(folds: Sequence[FoldModel]) -> FoldModel:
    """Average the fold models' weights into one model (a uniform weight soup).

    Raises:
        ConfigError: The folds differ in architecture, or use fold-specific
            preprocessing (clinical/omics scaling or survival time bins), so averaging
            their weights does not apply.
    """
    ref = folds[0]
    for fm in folds[1:]:
        if fm.meta["aggregator"] != ref.meta["aggregator"]:
            raise ConfigError(
                "weight soup needs the same architecture in every fold; use the ensemble"
            )
    if ref.pre.n_omics or ref.pre.clinical or ref.head.kind == "discrete":
        raise ConfigError(
            "weight soup does not apply: the folds use fold-specific clinical/omics scaling "
            "or time bins; use the fold ensemble (default)"
        )
    states = [fm.model.state_dict() for fm in folds]
    averaged = {
        k: (
            torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            if v.is_floating_point()
            else v
        )
        for k, v in states[0].items()
    }
    model = copy.deepcopy(ref.model)
    model.load_state_dict(averaged)
    meta = {**ref.meta, "fold": -1, "source": "soup"}
    return FoldModel(-1, model.eval(), ref.head, ref.pre, meta)


def _bag_cohort(features_dir: Path, task: str) -> Cohort:
    """A cohort of every bag in ``features_dir``, one patient per slide, unlabelled."""
    ids = sorted(p.stem for p in features_dir.glob("*.h5"))
    if not ids:
        raise ConfigError(f"{features_dir} holds no .h5 bags; give the folder of `wsi-mil extract`")
    patients = {s: Patient(s, [s]) for s in ids}
    slides = {s: Slide(s, s, 0) for s in ids}
    return Cohort(features_dir, task, patients, slides)


def predict_cohort(
    run_dir: str | os.PathLike[str],
    features: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    cohort: str | os.PathLike[str] | None = None,
    omics: str | os.PathLike[str] | None = None,
    attention_dir: str | os.PathLike[str] | None = None,
    soup: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    n_boot: int = 1000,
    allow_in_sample: bool = False,
    allow_mismatch: bool = False,
    mask_missing_modalities: bool = False,
    fold_columns: bool = False,
) -> pd.DataFrame:
    """Predict patients of a new cohort with a run's fold ensemble (or weight soup).

    Args:
        run_dir: A run folder of ``wsi-mil train``.
        features: Bag folders, one per encoder, in the order used for training.
        out: Output CSV: ``patient_id``, ``n_slides``, ``prob_<class>`` + ``pred`` or
            ``risk``, and the targets when the cohort has them. A ``.yaml`` with the
            resolved options and, with targets, a ``.metrics.json`` are written beside.
        cohort: Optional cohort CSV (targets optional); default every bag is a patient.
        omics: Omics table for fusion models trained with one.
        attention_dir: Where ``<slide_id>.h5`` attention goes (default
            :func:`attention_dir_for`: ``<out stem>_attention/`` beside ``out``, so a second
            prediction into the same folder never overwrites the first one's attention).
        soup: Use the uniform weight soup instead of the ensemble.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Bags per forward pass.
        n_boot: Bootstrap resamples for the metrics (labelled cohorts).
        allow_in_sample: Keep patients seen in training in the metrics (which are then
            labelled ``"in_sample": true``); default they are left out, and no metrics
            are written when every labelled patient was seen.
        allow_mismatch: Predict bags whose encoder, weights hash, ``target_mpp`` or
            ``tile_px`` differ from the run's (default refused).
        mask_missing_modalities: Apply a model trained with omics / clinical inputs
            without them (masked); default refused.
        fold_columns: Survival: add each fold model's ``risk_fold_<k>`` and
            ``linear_predictor_fold_<k>`` (its own log relative hazard scale), which the
            external-validation report needs for its Brier score and calibration.

    Returns:
        The predictions table, with ``seen_in_training`` (bool) per patient;
        ``attrs["excluded_empty_slides"]`` lists the slides left out because their
        bags have no tiles, ``attrs["n_seen_in_training"]`` counts the seen patients
        and ``attrs["metrics_note"]`` says what happened to the metrics (None when
        there are no targets).

    Raises:
        ConfigError / CohortError / BagError: Bad run folder, cohort or bags; BagError
            too when no patient can be predicted (every bag has no tiles), so nothing
            is written and the command never succeeds with empty outputs.
        BagMismatchError: Bags made otherwise than the run's (not ``allow_mismatch``).
        MissingModalityError: A fusion input of the model is not given (not
            ``mask_missing_modalities``).
    """
    dev = resolve_device(device)
    ens = load_ensemble(run_dir, dev)
    cfg = ens.config
    feature_dirs = [Path(f) for f in features]
    if len(feature_dirs) != len(cfg["features"]):
        raise ConfigError(
            f"the run was trained on {len(cfg['features'])} feature folder(s) "
            f"({', '.join(Path(f).name for f in cfg['features'])}); give as many --features"
        )
    if cohort is not None:
        table = load_cohort(
            cohort,
            task=cfg["task"],
            features_dirs=feature_dirs,
            clinical=cfg.get("clinical") or (),
            omics=omics,
            label_column=cfg["label_column"],
            time_column=cfg["time_column"],
            event_column=cfg["event_column"],
            require_targets=False,
        )
    else:
        table = _bag_cohort(feature_dirs[0], cfg["task"])
    masked = check_modalities(
        ens.folds[0], cohort=cohort, omics=omics, mask_missing=mask_missing_modalities
    )
    scan = scan_bags(list(table.slides), feature_dirs, expected_dims=ens.folds[0].meta["dims"])
    mismatches = check_provenance(
        run_provenance(cfg, ens.folds[0].meta), scan, allow_mismatch=allow_mismatch
    )
    units = make_units(table, list(table.patients), cfg["level"], set(scan.empty))
    _check_predictable(units, scan.empty, feature_dirs[0])
    members = [uniform_soup(ens.folds)] if soup else ens.folds
    store = BagStore(feature_dirs, int(float(cfg.get("cache_gb", 4.0)) * 2**30))
    outputs, attention, each = _ensemble_outputs(members, table, units, store, dev, batch_size)
    result = pd.DataFrame(patient_rows(table, units, outputs, members[0].head, details=True))
    if fold_columns and table.task == "survival":
        result = _with_fold_columns(result, table, units, members, each)
    if cohort is not None:
        result = _join_clinical(result, Path(cohort), cfg)
    seen_patients, seen_slides = training_ids(ens.run_dir, cfg)
    result.insert(
        2,
        "seen_in_training",
        [_seen(table, p, seen_patients, seen_slides) for p in result["patient_id"]],
    )
    out = Path(out)
    # each prediction keeps its own attention: preds.csv -> preds_attention/
    att_dir = Path(attention_dir) if attention_dir is not None else attention_dir_for(out)
    write_unit_attention(
        att_dir,
        store,
        units,
        attention,
        source="soup" if soup else "ensemble",
        model_name=cfg["model"],
    )
    with atomic_path(out) as tmp:
        result.to_csv(tmp, index=False)
    result.attrs["excluded_empty_slides"] = list(scan.empty)
    n_seen = int(result["seen_in_training"].sum())
    result.attrs["n_seen_in_training"] = n_seen
    options = {
        "run_dir": str(Path(run_dir).resolve()),
        "features": [str(f.resolve()) for f in feature_dirs],
        "cohort": str(Path(cohort).resolve()) if cohort is not None else None,
        "omics": str(Path(omics).resolve()) if omics is not None else None,
        "attention_dir": str(att_dir.resolve()),
        "soup": soup,
        "device": str(dev),
        "batch_size": batch_size,
        "folds": [fm.fold for fm in ens.folds],
        "excluded_empty_slides": scan.empty,
        "allow_in_sample": allow_in_sample,
        "n_seen_in_training": n_seen,
        "allow_mismatch": allow_mismatch,
        "bag_mismatches": mismatches,
        "mask_missing_modalities": mask_missing_modalities,
        "masked_modalities": masked,
    }
    write_config(out.with_suffix(".yaml"), options)
    result.attrs["metrics_note"] = None
    if cohort is not None and table.labelled and len(result):
        result.attrs["metrics_note"] = _write_metrics(
            result, table, n_boot, out.with_suffix(".metrics.json"), allow_in_sample
        )
    return result


def training_ids(run_dir: Path, config: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Patients and slides a run was trained on.

    Patients: every id in ``splits.json`` of the run and of its repeats (train, val and
    test of every fold: each patient is in some fold's training set). Slides: those of
    these patients in the training cohort table (``config["cohort"]``) when it can
    still be read, else none.

    Raises:
        ConfigError: A ``splits.json`` that cannot be read.
    """
    patients: set[str] = set()
    for folder in repeat_dirs(run_dir):
        path = folder / "splits.json"
        if not path.is_file():
            continue
        try:
            splits = json.loads(path.read_text())
            for fold in splits["folds"]:
                for key in ("train", "val", "test"):
                    patients.update(map(str, fold[key]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a readable splits file ({exc})") from exc
    slides: set[str] = set()
    try:
        train = load_cohort(config["cohort"], task=config["task"], require_targets=False)
    except (CohortError, OSError, KeyError) as exc:
        log.warning("training cohort not readable (%s): seen_in_training by patient id only", exc)
    else:
        slides = {s.slide_id for s in train.slides.values() if s.patient_id in patients}
    return patients, slides


def _seen(table: Cohort, patient_id: str, patients: set[str], slides: set[str]) -> bool:
    """Whether a patient of the new cohort, or one of its slides, was in training."""
    if patient_id in patients:
        return True
    return any(s in slides for s in table.patients[patient_id].slide_ids)


def _write_metrics(
    result: pd.DataFrame, table: Cohort, n_boot: int, path: Path, allow_in_sample: bool
) -> str:
    """Write the metrics of the labelled predictions (patients seen in training left out
    unless ``allow_in_sample``); returns a one-line note of what was done.

    A stale metrics file of an earlier call is removed when no metrics are written.
    """
    seen = result["seen_in_training"].to_numpy(bool)
    n_seen, n_all = int(seen.sum()), len(result)
    rows = result if allow_in_sample else result[~seen]
    if not len(rows):
        path.unlink(missing_ok=True)
        note = (
            f"all {n_all} labelled patient(s) were seen in training (seen_in_training), so "
            "no out-of-sample metrics: none written; the run's own out-of-fold metrics are "
            "in its metrics.json, or pass --allow-in-sample for in-sample metrics"
        )
        log.info(note)
        return note
    metrics = _metrics(rows, table, n_boot)
    metrics["in_sample"] = bool(allow_in_sample and n_seen)
    metrics["n_seen_in_training"] = n_seen
    metrics["seen_in_training"] = "included" if allow_in_sample else "excluded"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if not n_seen:
        return f"metrics of {len(rows)} patient(s) -> {path}"
    if allow_in_sample:
        note = (
            f"{n_seen} of {n_all} patient(s) were seen in training and are INCLUDED: the "
            f'metrics are in-sample ("in_sample": true in {path.name})'
        )
    else:
        note = (
            f"{n_seen} of {n_all} patient(s) were seen in training (seen_in_training) and "
            f"are excluded from the metrics ({len(rows)} left); --allow-in-sample "
            "includes them"
        )
    log.info(note)
    return note


def check_modalities(
    fold: FoldModel,
    *,
    cohort: str | os.PathLike[str] | None,
    omics: str | os.PathLike[str] | None,
    mask_missing: bool = False,
) -> list[str]:
    """Refuse to apply a model trained with omics / clinical inputs without them.

    Args:
        fold: A fold model of the run (its preprocessing says which inputs it used).
        cohort: The cohort CSV given (the clinical covariates come from it), or None.
        omics: The omics table given, or None.
        mask_missing: Apply the model anyway with the missing inputs masked.

    Returns:
        The modalities that will be masked (``omics``, ``clinical``).

    Raises:
        MissingModalityError: A modality is missing and not ``mask_missing``.
    """
    missing = []
    if fold.pre.n_omics and omics is None:
        missing.append(("omics", "--omics (the omics table, same columns as in training)"))
    if fold.pre.clinical and cohort is None:
        cols = ", ".join(fold.pre.clinical)
        missing.append(("clinical", f"--cohort with the clinical column(s) {cols}"))
    if missing and not mask_missing:
        name = fold.meta.get("aggregator", {}).get("name", "the model")
        raise MissingModalityError(
            f"the run's model ({name}) was trained with {' and '.join(m for m, _ in missing)} "
            f"inputs, which are not given; pass {' and '.join(h for _, h in missing)}, or "
            "--mask-missing-modalities to predict with them masked (as for a training "
            "patient without them; predictions then rest on the slides alone)"
        )
    for modality, _ in missing:
        log.warning("%s inputs not given: masked (--mask-missing-modalities)", modality)
    return [m for m, _ in missing]


def _join_clinical(result: pd.DataFrame, cohort: Path, cfg: dict[str, Any]) -> pd.DataFrame:
    """Join the cohort's patient-level columns (clinical covariates) to the predictions:
    every column but the slide ids, paths, targets and names already in ``result``; the
    first non-empty value of a patient's slides."""
    table = pd.read_csv(cohort, encoding="utf-8-sig", dtype={"patient_id": str, "case_id": str})
    pid = "patient_id" if "patient_id" in table.columns else "case_id"
    skip = {
        pid,
        "slide_id",
        "slide_path",
        "mpp",
        cfg.get("label_column"),
        cfg.get("time_column"),
        cfg.get("event_column"),
        *result.columns,
    }
    keep = [c for c in table.columns if c not in skip]
    if not keep or pid not in table.columns:
        return result
    first = table.groupby(pid, sort=False)[keep].first()
    first.index = first.index.astype(str)
    return result.join(first, on="patient_id")


def _with_fold_columns(
    result: pd.DataFrame,
    table: Cohort,
    units: list[Unit],
    members: Sequence[FoldModel],
    each: Sequence[np.ndarray],
) -> pd.DataFrame:
    """Add ``risk_fold_<k>`` and ``linear_predictor_fold_<k>`` of every member."""
    out = result.copy()
    for fm, outputs in zip(members, each, strict=True):
        rows = pd.DataFrame(patient_rows(table, units, outputs, fm.head)).set_index("patient_id")
        risk = rows.loc[out["patient_id"], "risk"].to_numpy(float)
        out[f"risk_fold_{fm.fold}"] = risk
        if isinstance(fm.head, SurvivalHead):
            out[f"linear_predictor_fold_{fm.fold}"] = fm.head.linear_predictor(risk)
    return out


def _check_predictable(units: Sequence[Unit], empty: Sequence[str], folder: Path) -> None:
    """Refuse a prediction that would write no patient (every bag empty)."""
    if units:
        return
    shown = ", ".join(list(empty)[:10]) + (" ..." if len(empty) > 10 else "")
    raise BagError(
        f"no patient can be predicted: all {len(empty)} slide(s) have empty bags in "
        f"{folder} ({shown or 'no slides'}); tiling found no tissue in them - check the "
        "slides and their tile stores, then re-run `wsi-mil extract`"
    )


def _ensemble_outputs(
    members: Sequence[FoldModel],
    table: Cohort,
    units: list[Unit],
    store: BagStore,
    device: torch.device,
    batch_size: int,
) -> tuple[np.ndarray, list[np.ndarray | None], list[np.ndarray]]:
    """Mean over members of head outputs (U, ...) and of per-unit attention, and each
    member's outputs."""
    each: list[np.ndarray] = []
    total: np.ndarray | None = None
    attention: list[np.ndarray | None] = [None] * len(units)
    for fm in members:
        data = UnitSet.build(table, units, None, fm.pre)
        preds = predict_units(fm.model, data, store, device, batch_size=batch_size)
        out = fm.head.predict(preds.logits)
        each.append(out)
        total = out if total is None else total + out
        for i, att in enumerate(preds.attention):
            if att is not None:
                prev = attention[i]
                attention[i] = att.copy() if prev is None else prev + att
    n = len(members)
    mean = total / n if total is not None else np.zeros((0,))
    return mean, [None if a is None else a / n for a in attention], each


def _metrics(result: pd.DataFrame, table: Cohort, n_boot: int) -> dict[str, Any]:
    if table.task == "classification":
        index = {c: i for i, c in enumerate(table.classes)}
        known = result["label"].isin(list(index))
        rows = result[known]
        probs = rows[[c for c in result.columns if c.startswith("prob_")]].to_numpy()
        if probs.shape[1] != len(table.classes):
            return {"note": "the cohort's classes differ from the model's; no metrics"}
        return classification_metrics([index[v] for v in rows["label"]], probs, n_boot=n_boot)
    return survival_metrics(
        result["time"].to_numpy(float),
        result["event"].to_numpy(int),
        result["risk"].to_numpy(float),
        n_boot=n_boot,
    )
