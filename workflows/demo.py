"""Generated demo data: synthetic slides and a cohort table with a planted signal.

Each patient gets one or two synthetic H&E-like slides drawn with a patient-specific
tumour burden. A patient's outcome is driven by the tumour share of their tissue (read
from the generator's ground-truth masks),
so a model that learns to see tumour from the pixels predicts it: survival times
follow an exponential model with ``log hazard ∝ standardised tumour share`` and
administrative censoring, and ``label`` is ``high`` or ``low`` tumour burden.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from wsi_mil.outputs import atomic_path
from wsi_mil.wsi.synthetic import make_synthetic_slide

__all__ = ["DemoData", "make_demo_data"]


class DemoData(NamedTuple):
    """A generated demo cohort.

    Attributes:
        slides: Folder of the synthetic ``.svs`` slides.
        cohort: The cohort CSV (``patient_id, slide_id, label, time, event, age``).
    """

    slides: Path
    cohort: Path


def make_demo_data(
    out: str | os.PathLike[str],
    *,
    n_patients: int = 24,
    slide_px: int = 3072,
    mpp: float = 0.5,
    seed: int = 0,
) -> DemoData:
    """Write synthetic slides and a cohort CSV under ``out``.

    Args:
        out: Folder; ``slides/`` and ``cohort.csv`` are written inside (existing
            slides are reused, so a re-run is quick).
        n_patients: Number of patients; every third patient has two slides.
        slide_px: Level-0 side of each square slide, in pixels.
        mpp: µm per level-0 pixel.
        seed: Seed of slides and outcomes.

    Returns:
        The slides folder and the cohort CSV path.
    """
    out = Path(out)
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for p in range(n_patients):
        patient = f"P{p:03d}"
        burden = float(rng.uniform(0.05, 0.6))  # the patient's tumour share of tissue
        shares = []
        for s in range(1 + (p % 3 == 0)):
            slide_id = f"{patient}-S{s}"
            path = slides_dir / f"{slide_id}.svs"
            synth = make_synthetic_slide(
                path,
                slide_px,
                slide_px,
                mpp=mpp,
                seed=seed * 1000 + p * 10 + s,
                tumour_fraction=float(np.clip(burden + rng.normal(0, 0.03), 0.0, 1.0)),
            )
            tissue = max(int(synth.tissue_mask.sum()), 1)
            shares.append(float(synth.tumour_mask.sum()) / tissue)
            rows.append({"patient_id": patient, "slide_id": slide_id})
        for row in rows[-len(shares) :]:
            row["tumour_share"] = float(np.mean(shares))
    _add_outcomes(rows, rng)
    cohort = out / "cohort.csv"
    with atomic_path(cohort) as tmp, open(tmp, "w", newline="") as fh:
        fields = ["patient_id", "slide_id", "label", "time", "event", "age"]
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return DemoData(slides_dir, cohort)


def _add_outcomes(rows: list[dict[str, object]], rng: np.random.Generator) -> None:
    """Add label, time, event and age per patient (same values on each of its slides)."""
    patients = list(dict.fromkeys(str(r["patient_id"]) for r in rows))
    share = {str(r["patient_id"]): float(r["tumour_share"]) for r in rows}  # type: ignore[arg-type]
    values = np.array([share[p] for p in patients])
    z = (values - values.mean()) / (values.std() + 1e-9)
    times = rng.exponential(36.0 * np.exp(-1.5 * z))
    censor = rng.uniform(12.0, 96.0, size=len(patients))
    median = float(np.median(values))
    outcome = {
        p: {
            "label": "high" if share[p] > median else "low",
            "time": round(float(min(t, c)), 2),
            "event": int(t <= c),
            "age": int(rng.integers(40, 85)),
        }
        for p, t, c in zip(patients, times, censor, strict=True)
    }
    for row in rows:
        row.update(outcome[str(row["patient_id"])])
