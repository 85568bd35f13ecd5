"""Shared fixtures for the survival tests: real data shipped with lifelines / sksurv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="session")
def rossi() -> pd.DataFrame:
    """Rossi recidivism data (432 rows, weekly times with many ties)."""
    from lifelines.datasets import load_rossi

    return load_rossi()


@pytest.fixture(scope="session")
def gbsg2() -> pd.DataFrame:
    """GBSG2 breast-cancer data (686 rows, continuous times) with numeric covariates."""
    from sksurv.datasets import load_gbsg2

    x, y = load_gbsg2()
    df = pd.DataFrame(
        {
            "time": y["time"].astype(float),
            "event": y["cens"].astype(int),
            "age": x["age"].astype(float),
            "tsize": x["tsize"].astype(float),
            "pnodes": x["pnodes"].astype(float),
            "progrec": x["progrec"].astype(float),
            "estrec": x["estrec"].astype(float),
            "horTh": (x["horTh"] == "yes").astype(float),
        }
    )
    return df


def make_predictions(
    n_patients: int = 90,
    n_folds: int = 3,
    *,
    seed: int = 0,
    clinical: bool = True,
) -> pd.DataFrame:
    """A predictions table like ``runs/<name>/predictions.csv`` with a real signal.

    Every patient is in the test split of exactly one fold and in the train split of the
    others; the risk is a noisy copy of the true log hazard.
    """
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 10, n_patients).round(1)
    grade = rng.integers(1, 4, n_patients)
    true = 0.8 * rng.normal(size=n_patients) + 0.03 * (age - 60) + 0.3 * (grade - 2)
    t_event = rng.exponential(36 * np.exp(-true))
    t_cens = rng.uniform(6, 80, n_patients)
    time = np.minimum(t_event, t_cens).round(2) + 0.01
    event = (t_event <= t_cens).astype(int)
    folds = rng.permutation(np.arange(n_patients) % n_folds)
    rows = []
    for k in range(n_folds):
        for i in range(n_patients):
            row = {
                "patient_id": f"P{i:03d}",
                "fold": k,
                "split": "test" if folds[i] == k else "train",
                "time": time[i],
                "event": event[i],
                "risk": true[i] + rng.normal(0, 0.5),
            }
            if clinical:
                row["age"] = age[i]
                row["grade"] = int(grade[i])
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def make_preds():
    """The :func:`make_predictions` factory, for tests that need variants."""
    return make_predictions


@pytest.fixture
def predictions() -> pd.DataFrame:
    return make_predictions()
