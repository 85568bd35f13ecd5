"""Generated cohorts with a planted signal, for tests, benchmarks and the demo.

Each slide's bag holds Gaussian tile features on a grid of coordinates. A small
spatially contiguous cluster of *planted* tiles is shifted along a fixed direction:

* classification — patients of class ``c > 0`` carry a cluster shifted along direction
  ``c``; class 0 has none, so the cluster decides the label;
* survival — every patient carries a cluster whose size (a fraction of its tiles) drives
  the hazard: log time = ``-k * fraction`` + noise, with random censoring.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.features.bags import write_bag

__all__ = ["SyntheticCohort", "make_synthetic_cohort"]


@dataclass
class SyntheticCohort:
    """Paths and ground truth of a generated cohort.

    Attributes:
        cohort_csv: The cohort table.
        features_dirs: One bag folder per encoder.
        planted: Per slide, (N,) bool mask of the planted tiles (bag order of the first
            encoder).
        patients: Patient id of each slide.
    """

    cohort_csv: Path
    features_dirs: list[Path]
    planted: dict[str, np.ndarray]
    patients: dict[str, str]


def _grid(n: int, tile: int) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(max(n, 1))))
    idx = np.arange(n)
    return np.stack([(idx % cols) * tile, (idx // cols) * tile], axis=1).astype(np.int64)


def _cluster(coords: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of the ``size`` tiles nearest a random tile (a contiguous cluster)."""
    mask = np.zeros(len(coords), bool)
    if size <= 0 or len(coords) == 0:
        return mask
    centre = coords[rng.integers(len(coords))]
    dist = np.abs(coords - centre).sum(axis=1) + rng.random(len(coords)) * 1e-3
    mask[np.argsort(dist)[:size]] = True
    return mask


def make_synthetic_cohort(
    out_dir: str | os.PathLike[str],
    *,
    task: str = "classification",
    n_patients: int = 40,
    slides_per_patient: tuple[int, int] = (1, 1),
    n_tiles: tuple[int, int] = (150, 250),
    dims: tuple[int, ...] = (32,),
    n_classes: int = 2,
    planted_fraction: tuple[float, float] = (0.05, 0.1),
    shift: float = 2.5,
    empty_slides: int = 0,
    seed: int = 0,
) -> SyntheticCohort:
    """Write bags and a cohort CSV with a planted signal.

    Args:
        out_dir: Output folder (``cohort.csv`` and ``features/enc<k>/<slide_id>.h5``).
        task: ``classification`` or ``survival``.
        n_patients: Patients.
        slides_per_patient: Inclusive range of slides per patient.
        n_tiles: Inclusive range of tiles per slide.
        dims: Feature dim of each encoder folder (several folders = several encoders;
            the second and later store tiles in a shuffled order to exercise joining).
        n_classes: Classes (classification).
        planted_fraction: Range of the planted share of a slide's tiles (classification:
            per positive slide; survival: drawn per patient over the whole range, which
            drives the hazard).
        shift: Size of the planted shift (in units of the noise s.d.).
        empty_slides: Extra slides with no tiles, each added to a random patient.
        seed: Random seed.

    Returns:
        :class:`SyntheticCohort`.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    total_dim = sum(dims)
    directions = rng.standard_normal((max(n_classes, 2), total_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    folders = [out / "features" / f"enc{k}" for k in range(len(dims))]
    rows: list[dict[str, object]] = []
    planted: dict[str, np.ndarray] = {}
    patients: dict[str, str] = {}
    for i in range(n_patients):
        pid = f"P{i:03d}"
        n_slides = int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))
        if task == "classification":
            cls = i % n_classes
            target = {"label": str(cls)}
            frac = float(rng.uniform(*planted_fraction)) if cls > 0 else 0.0
            direction = directions[cls]
        else:
            frac = float(rng.uniform(*planted_fraction))
            direction = directions[1]
            log_t = 3.0 - 12.0 * frac + rng.normal(0, 0.4)
            time_ = float(np.exp(log_t))
            censor = float(np.exp(rng.uniform(1.0, 4.0)))
            target = {"time": f"{min(time_, censor):.4f}", "event": str(int(time_ <= censor))}
        for j in range(n_slides):
            sid = f"{pid}_S{j}"
            n = int(rng.integers(n_tiles[0], n_tiles[1] + 1))
            coords = _grid(n, 448)
            mask = (
                _cluster(coords, round(frac * n), rng)
                if (j == 0 or task == "survival")
                else np.zeros(n, bool)
            )
            feats = rng.standard_normal((n, total_dim)).astype(np.float32)
            feats[mask] += shift * direction.astype(np.float32)
            planted[sid] = mask
            patients[sid] = pid
            _write_encoders(folders, dims, sid, feats, coords, rng)
            rows.append({"patient_id": pid, "slide_id": sid, **target})
    for e in range(empty_slides):
        pid = f"P{int(rng.integers(n_patients)):03d}"
        sid = f"{pid}_E{e}"
        _write_encoders(
            folders,
            dims,
            sid,
            np.zeros((0, total_dim), np.float32),
            np.zeros((0, 2), np.int64),
            rng,
        )
        first = next(r for r in rows if r["patient_id"] == pid)
        rows.append({**first, "slide_id": sid})
        planted[sid] = np.zeros(0, bool)
        patients[sid] = pid
    order = rng.permutation(len(rows))  # patients' slides are not contiguous
    cohort_csv = out / "cohort.csv"
    with open(cohort_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    return SyntheticCohort(cohort_csv, folders, planted, patients)


def _write_encoders(
    folders: list[Path],
    dims: tuple[int, ...],
    slide_id: str,
    feats: np.ndarray,
    coords: np.ndarray,
    rng: np.random.Generator,
) -> None:
    start = 0
    for k, (folder, dim) in enumerate(zip(folders, dims, strict=True)):
        order = np.arange(len(coords)) if k == 0 else rng.permutation(len(coords))
        attrs = {
            "encoder": folder.name,
            "weights_sha256": "synthetic",
            "target_mpp": 0.5,
            "tile_px": 224,
            "slide_id": slide_id,
            "mpp": 0.25,
        }
        write_bag(
            folder / f"{slide_id}.h5", feats[order, start : start + dim], coords[order], attrs=attrs
        )
        start += dim
