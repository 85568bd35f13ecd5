"""Feature scaling: fitted on each fold's training tiles only, stored with the weights,
applied by every forward pass, and absent from runs trained before it existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from wsi_mil.errors import ConfigError
from wsi_mil.features.bags import read_bag
from wsi_mil.mil.data import BagStore, Unit
from wsi_mil.mil.fold import FoldModel
from wsi_mil.mil.models import create_aggregator, list_aggregators
from wsi_mil.mil.predict import load_ensemble, predict_cohort, uniform_soup
from wsi_mil.mil.scaling import fit_scaler
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.train import train_cv


def _tiles_of(syn: Any, patient_ids: set[str]) -> np.ndarray:
    """Every tile of the patients' slides, read independently of the trainer."""
    table = pd.read_csv(syn.cohort_csv, dtype={"patient_id": str})
    slides = table.loc[table["patient_id"].isin(patient_ids), "slide_id"]
    return np.concatenate(
        [read_bag(syn.features_dirs[0] / f"{s}.h5").features.astype(np.float64) for s in slides]
    )


def test_fit_scaler_matches_numpy_over_all_tiles(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(
        tmp_path, n_patients=6, slides_per_patient=(1, 3), n_tiles=(5, 40), dims=(6,),
        empty_slides=1,
    )  # fmt: skip
    table = pd.read_csv(syn.cohort_csv, dtype={"patient_id": str})
    units = [Unit(p, p, tuple(g["slide_id"])) for p, g in table.groupby("patient_id", sort=True)]
    stats = fit_scaler(BagStore(syn.features_dirs, 0), units)
    ref = _tiles_of(syn, set(table["patient_id"]))
    assert stats.n_tiles == len(ref)
    np.testing.assert_allclose(stats.mean, ref.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.std, ref.std(0), rtol=1e-9)


ATTRS = {"encoder": "x", "weights_sha256": "x", "target_mpp": 0.5, "tile_px": 224, "slide_id": "S"}


def test_constant_dimension_is_not_amplified(tmp_path: Path) -> None:
    from wsi_mil.features.bags import write_bag

    feats = np.random.default_rng(0).standard_normal((30, 3)).astype(np.float32)
    feats[:, 1] = 30.0  # constant: std 0
    write_bag(tmp_path / "S.h5", feats, np.zeros((30, 2), np.int64), attrs=ATTRS)
    stats = fit_scaler(BagStore([tmp_path], 0), [Unit("P", "P", ("S",))])
    assert stats.std[1] == 1.0 and stats.mean[1] == pytest.approx(30.0)


@pytest.mark.parametrize("name", list_aggregators())
def test_every_aggregator_standardises_its_input(name: str) -> None:
    torch.manual_seed(0)
    tables = {"n_clinical": 1} if name == "dual_xattn" else {}  # needs a second modality
    model = create_aggregator(name, 5, 2, **tables).eval()
    x = torch.randn(2, 7, 5) * 3 + 10
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    extra = {"clinical": torch.randn(2, 1)} if tables else {}
    mean, std = torch.full((5,), 10.0), torch.full((5,), 3.0)
    with torch.no_grad():
        raw = model(((x - mean) / std).masked_fill(~mask[..., None], 0), mask, **extra).logits
        model.scaler.set(mean, std)
        scaled = model(x, mask, **extra).logits
    torch.testing.assert_close(scaled, raw)
    assert {"scaler.mean", "scaler.std"} <= set(model.state_dict())


def test_scaler_is_fitted_on_training_patients_only(
    classification_run: Any,
) -> None:
    run, syn = classification_run.result.out, classification_run.syn
    splits = json.loads((run / "splits.json").read_text())
    events = {i["fold"]: i for i in classification_run.log.of("scale")}
    for fold in splits["folds"]:
        k = fold["fold"]
        assert set(events[k]["patient_ids"]) == set(fold["train"])  # not val, never test
        ref = _tiles_of(syn, set(fold["train"]))
        state = load_file(run / f"fold_{k}" / "model.safetensors")
        np.testing.assert_allclose(state["scaler.mean"].numpy(), ref.mean(0), rtol=1e-5)
        np.testing.assert_allclose(state["scaler.std"].numpy(), ref.std(0), rtol=1e-5)


def test_no_scale_keeps_the_identity(tiny_cohort: Any, make_config: Any, tmp_path: Path) -> None:
    config = make_config(tiny_cohort, "classification", folds=2, steps=4, n_boot=0, scale=False)
    log: list[str] = []
    train_cv(config, tmp_path / "r", callback=lambda e, i: log.append(e))
    state = load_file(tmp_path / "r" / "fold_0" / "model.safetensors")
    assert torch.equal(state["scaler.mean"], torch.zeros(8))
    assert torch.equal(state["scaler.std"], torch.ones(8))
    assert "scale" not in log


def test_soup_averages_the_fold_scalers(classification_run: Any) -> None:
    ens = load_ensemble(classification_run.result.out)
    soup = uniform_soup(ens.folds)
    means = torch.stack([fm.model.scaler.mean for fm in ens.folds])
    torch.testing.assert_close(soup.model.scaler.mean, means.mean(0))


def test_run_trained_before_scaling_still_predicts(classification_run: Any, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(classification_run.result.out, old)
    for fold in old.glob("fold_*"):
        state = load_file(fold / "model.safetensors")
        save_file({k: v for k, v in state.items() if not k.startswith("scaler.")},
                  str(fold / "model.safetensors"))  # fmt: skip
    fm = FoldModel.load(old / "fold_0")
    assert torch.equal(fm.model.scaler.std, torch.ones_like(fm.model.scaler.std))
    syn = classification_run.syn
    table = predict_cohort(old, syn.features_dirs, out=tmp_path / "p.csv", n_boot=0)
    assert len(table) == 30 and table["prob_1"].notna().all()


def test_damaged_weights_are_refused(classification_run: Any, tmp_path: Path) -> None:
    fold = tmp_path / "fold_0"
    shutil.copytree(classification_run.result.out / "fold_0", fold)
    state = load_file(fold / "model.safetensors")
    state.pop(next(k for k in state if not k.startswith("scaler.")))
    save_file(state, str(fold / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit the aggregator.*retrain the fold"):
        FoldModel.load(fold)
