"""Patient-level splits: no leakage, stratification, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import CohortError, ConfigError
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.splits import load_splits, make_splits, save_splits


def _cohort(path: Path, rng: np.random.Generator, n_patients: int, task: str = "classification"):
    lines = ["patient_id,slide_id,label,time,event"]
    rows = []
    for p in range(n_patients):
        label = str(rng.integers(0, 2)) if p >= 10 else str(p % 2)
        time, event = f"{rng.uniform(1, 10):.2f}", str(int(p % 3 == 0))
        for s in range(int(rng.integers(1, 6))):  # 1-5 slides per patient
            rows.append(f"P{p},P{p}_s{s},{label},{time},{event}")
    lines += [rows[i] for i in rng.permutation(len(rows))]  # slides of a patient scattered
    path.write_text("\n".join(lines) + "\n")
    return load_cohort(path, task=task)


@pytest.mark.parametrize("seed", range(12))
def test_patients_disjoint_across_folds(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    task = "classification" if seed % 2 else "survival"
    cohort = _cohort(tmp_path / "c.csv", rng, int(rng.integers(15, 60)), task)
    k = int(rng.integers(2, 6))
    splits = make_splits(cohort, cohort.patient_ids, n_folds=k, seed=seed)
    tests = [set(f["test"]) for f in splits["folds"]]
    assert len(tests) == k
    assert set().union(*tests) == set(cohort.patient_ids)
    assert sum(len(t) for t in tests) == len(cohort.patient_ids)  # each patient tested once
    for fold in splits["folds"]:
        train, val, test = set(fold["train"]), set(fold["val"]), set(fold["test"])
        assert not (train & test) and not (val & test) and not (train & val)
        assert train | val | test == set(cohort.patient_ids)
        assert val  # inner validation exists
        test_slides = {s for p in test for s in cohort.patients[p].slide_ids}
        train_slides = {s for p in train | val for s in cohort.patients[p].slide_ids}
        assert not test_slides & train_slides


def test_stratified_by_label(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "c.csv", np.random.default_rng(0), 50)
    splits = make_splits(cohort, cohort.patient_ids, n_folds=5, seed=0)
    for fold in splits["folds"]:
        labels = {cohort.patients[p].label for p in fold["test"]}
        assert labels == {"0", "1"}


def test_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cohort = _cohort(tmp_path / "c.csv", rng, 4)
    with pytest.raises(CohortError, match="4 patient\\(s\\) with usable bags but --folds 5"):
        make_splits(cohort, cohort.patient_ids, n_folds=5)
    with pytest.raises(ConfigError, match="at least 2"):
        make_splits(cohort, cohort.patient_ids, n_folds=1)
    csv = tmp_path / "imb.csv"
    csv.write_text(
        "patient_id,slide_id,label\n"
        + "".join(f"P{i},s{i},{'rare' if i < 2 else 'common'}\n" for i in range(20))
    )
    imbalanced = load_cohort(csv, task="classification")
    with pytest.raises(CohortError, match="'rare' has 2"):
        make_splits(imbalanced, imbalanced.patient_ids, n_folds=3)
    csv = tmp_path / "noevents.csv"
    csv.write_text(
        "patient_id,slide_id,time,event\n" + "".join(f"P{i},s{i},{i + 1},0\n" for i in range(10))
    )
    censored = load_cohort(csv, task="survival")
    with pytest.raises(CohortError, match="no events"):
        make_splits(censored, censored.patient_ids, n_folds=3)


def test_saved_splits_must_match_cohort(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "c.csv", np.random.default_rng(1), 20)
    splits = make_splits(cohort, cohort.patient_ids, n_folds=3)
    path = save_splits(tmp_path / "splits.json", splits)
    assert load_splits(path, cohort.patient_ids) == splits
    with pytest.raises(ConfigError, match="do not match the cohort"):
        load_splits(path, cohort.patient_ids[:-1])
