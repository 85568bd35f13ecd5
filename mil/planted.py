"""Planted-signal cohorts of generated *slides*, for learning tests and benchmarks.

Unlike :mod:`wsi_mil.mil.synthetic`, which writes feature bags directly, these cohorts
are whole-slide images that go through the real ``tile`` and ``extract`` stages. Every
patient has one synthetic H&E-like slide (:func:`wsi_mil.wsi.synthetic.make_synthetic_slide`).
Half the patients (*positives*) carry one contiguous region of dense, dark "tumour"
tissue covering about ``fraction`` of their tissue (0.7–1.3 × ``fraction``); the others
carry none. Every slide also carries small scattered specks of the same tissue kind on
0–``specks`` of its tissue, a distractor: at small fractions the total amount of dense
tissue no longer tells the classes apart, only its arrangement does. The region decides
the label (``pos`` / ``neg``) and drives the hazard: ``log hazard = effect × share /
fraction`` (0 for negatives), with exponential event times and uniform censoring. The
ground truth of every slide (its region mask, specks excluded) is saved so the planted
tiles can be scored against a model's attention (:func:`planted_tiles`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from wsi_mil.errors import ConfigError
from wsi_mil.outputs import atomic_path

__all__ = [
    "MultimodalCohort",
    "PlantedCohort",
    "make_multimodal_cohort",
    "make_planted_cohort",
    "planted_tiles",
]


class PlantedCohort(NamedTuple):
    """A generated planted-signal cohort.

    Attributes:
        slides: Folder of the ``.svs`` slides (``<slide_id>.svs``).
        cohort: Cohort CSV: ``patient_id, slide_id, label, time, event, planted_share,
            age`` (``planted_share`` is the truth, for reference values, never a model
            input; ``age`` is noise, for models that need a clinical input).
        truth: Folder of ``<slide_id>.npz`` region masks (see :func:`planted_tiles`).
        fraction: The signal fraction the cohort was made with.
    """

    slides: Path
    cohort: Path
    truth: Path
    fraction: float


def make_planted_cohort(
    out: str | os.PathLike[str],
    fraction: float,
    *,
    n_patients: int = 40,
    slide_px: int = 4096,
    mpp: float = 1.0,
    effect: float = 2.5,
    specks: float = 0.02,
    seed: int = 0,
) -> PlantedCohort:
    """Write slides, truth masks and a cohort table with a planted region.

    Slides already present are reused (the content depends only on the arguments), so
    a re-run is quick.

    Args:
        out: Folder; ``slides/``, ``truth/`` and ``cohort.csv`` are written inside.
        fraction: Typical share of a positive slide's tissue covered by the region (0–0.5).
        n_patients: Patients, one slide each; half are positive.
        slide_px: Level-0 side of each square slide.
        mpp: µm per level-0 pixel.
        effect: Log hazard ratio of a region of size ``fraction`` against none.
        specks: Largest share of a slide's tissue drawn as scattered specks.
        seed: Seed of slides and outcomes.

    Returns:
        :class:`PlantedCohort`.

    Raises:
        ConfigError: ``fraction`` outside (0, 0.5] or fewer than 4 patients.
    """
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    if not 0 < fraction <= 0.5:
        raise ConfigError(f"fraction={fraction}: the planted share must lie in (0, 0.5]")
    if n_patients < 4:
        raise ConfigError(f"n_patients={n_patients}: need at least 4")
    root = Path(out)
    slides, truth = root / "slides", root / "truth"
    slides.mkdir(parents=True, exist_ok=True)
    truth.mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, round(fraction * 1e6)])
    positive = rng.permutation(np.arange(n_patients) % 2 == 0)
    rows = []
    for i, pos in enumerate(positive):
        slide_id = f"PL{i:03d}"
        drawn = float(fraction * rng.uniform(0.7, 1.3)) if pos else 0.0
        speck_share = float(rng.uniform(0.0, specks))
        path = slides / f"{slide_id}.svs"
        truth_file = truth / f"{slide_id}.npz"
        if not (path.is_file() and truth_file.is_file()):
            synth = make_synthetic_slide(
                path, slide_px, slide_px, mpp=mpp, seed=seed * 100_003 + i,
                tumour_fraction=drawn, tumour_layout="region", speck_fraction=speck_share,
                associated=False,
            )  # fmt: skip
            region = (
                _largest_component(synth.tumour_mask) if pos else np.zeros_like(synth.tumour_mask)
            )
            with atomic_path(truth_file) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, region=region, tissue=synth.tissue_mask, mask_mpp=synth.mask_mpp, mpp=mpp
                )
        with np.load(truth_file) as saved:
            share = float(saved["region"].sum() / max(1, saved["tissue"].sum()))
        t = rng.exponential(24.0 * np.exp(-effect * share / fraction))
        c = rng.uniform(6.0, 60.0)
        rows.append(
            {
                "patient_id": f"P{i:03d}",
                "slide_id": slide_id,
                "label": "pos" if pos else "neg",
                "time": round(float(min(t, c)), 3),
                "event": int(t <= c),
                "planted_share": round(share, 5),
                "age": int(rng.integers(40, 85)),  # uninformative clinical covariate
            }
        )
    cohort = root / "cohort.csv"
    with atomic_path(cohort) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return PlantedCohort(slides, cohort, truth, float(fraction))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (the planted region)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if not n:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def planted_tiles(
    truth_file: str | os.PathLike[str], coords: np.ndarray, tile_level0: int
) -> np.ndarray:
    """Which tiles lie mostly (≥ 50 % of their area) inside a slide's planted region.

    Args:
        truth_file: ``truth/<slide_id>.npz`` of :func:`make_planted_cohort`.
        coords: (N, 2) int level-0 ``(x, y)`` of each tile's top-left corner.
        tile_level0: Tile side in level-0 pixels.

    Returns:
        (N,) bool.
    """
    with np.load(truth_file) as data:
        region = data["region"].astype(np.float64)
        step = float(data["mask_mpp"]) / float(data["mpp"])  # level-0 px per mask px
    integral = np.zeros((region.shape[0] + 1, region.shape[1] + 1))
    integral[1:, 1:] = region.cumsum(0).cumsum(1)
    xy = np.asarray(coords, dtype=np.float64)
    c0 = np.clip(np.round(xy[:, 0] / step).astype(int), 0, region.shape[1])
    r0 = np.clip(np.round(xy[:, 1] / step).astype(int), 0, region.shape[0])
    c1 = np.clip(np.round((xy[:, 0] + tile_level0) / step).astype(int), 0, region.shape[1])
    r1 = np.clip(np.round((xy[:, 1] + tile_level0) / step).astype(int), 0, region.shape[0])
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return inside / area >= 0.5


class MultimodalCohort(NamedTuple):
    """A planted-signal cohort whose outcome depends on histology *and* omics.

    Attributes:
        cohort: Cohort CSV: ``patient_id, slide_id, label, time, event, planted_share,
            omics_signal, risk, age`` (``planted_share``, ``omics_signal`` and ``risk``
            (the true log hazard) are truth, never model inputs).
        omics: Omics CSV keyed by ``patient_id`` (patients without omics have no row).
        groups: Gene-group JSON ``{group: [column, ...]}``; group ``G00`` carries the signal.
        base: The histology cohort (slides and truth masks).
    """

    cohort: Path
    omics: Path
    groups: Path
    base: PlantedCohort


def make_multimodal_cohort(
    base: PlantedCohort,
    out: str | os.PathLike[str],
    *,
    histology_effect: float = 1.6,
    omics_effect: float = 0.8,
    interaction: float = 0.0,
    n_groups: int = 20,
    group_size: int = 10,
    missing: float = 0.0,
    seed: int = 0,
) -> MultimodalCohort:
    """Give a planted cohort an omics table and an outcome driven by both modalities.

    The histology score is the planted share over the cohort's fraction (0 for
    negatives, about 0.7–1.3 for positives); the omics signal ``z ~ N(0, 1)`` per patient
    is carried by every gene of group ``G00`` (``gene = 0.8 z + 0.6 noise``); the other
    ``n_groups - 1`` groups are pure noise. The log hazard is
    ``histology_effect · h + omics_effect · z + interaction · h · z`` (exponential event
    times, uniform censoring), and the label is ``pos`` where the log hazard plus
    logistic noise exceeds its median. With the defaults each modality carries about
    half of the variance of the log hazard. A share ``missing`` of the patients, drawn at
    random, has no omics row.

    Args:
        base: A cohort of :func:`make_planted_cohort` (its slides are used as they are).
        out: Folder for ``cohort.csv``, ``omics.csv`` and ``groups.json``.
        histology_effect: Log hazard ratio of a planted region of typical size.
        omics_effect: Log hazard ratio per standard deviation of the omics signal.
        interaction: Coefficient of ``h · z``.
        n_groups: Gene groups (one informative).
        group_size: Genes per group.
        missing: Share of patients without omics, in [0, 1).
        seed: Seed of omics and outcomes.

    Returns:
        :class:`MultimodalCohort`.

    Raises:
        ConfigError: ``missing`` outside [0, 1) or fewer than 2 groups.
    """
    if not 0 <= missing < 1:
        raise ConfigError(
            f"missing={missing}: the share of patients without omics must be in [0, 1)"
        )
    if n_groups < 2 or group_size < 1:
        raise ConfigError(f"n_groups={n_groups}, group_size={group_size}: need >= 2 groups of >= 1")
    import pandas as pd

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(base.cohort, dtype={"patient_id": str, "slide_id": str})
    rng = np.random.default_rng([seed, 17, round(base.fraction * 1e6)])
    n = len(table)
    h = table["planted_share"].to_numpy(float) / base.fraction
    z = rng.standard_normal(n)
    genes = rng.standard_normal((n, n_groups * group_size))
    genes[:, :group_size] = 0.8 * z[:, None] + 0.6 * genes[:, :group_size]
    risk = histology_effect * h + omics_effect * z + interaction * h * z
    t = rng.exponential(24.0 * np.exp(-(risk - risk.mean())))
    c = rng.uniform(6.0, 60.0, n)
    noisy = risk + rng.logistic(0.0, 0.5, n)
    table["label"] = np.where(noisy > np.median(noisy), "pos", "neg")
    table["time"] = np.round(np.minimum(t, c), 3)
    table["event"] = (t <= c).astype(int)
    table["omics_signal"] = np.round(z, 5)
    table["risk"] = np.round(risk, 5)
    table = table[[c for c in table.columns if c != "age"] + ["age"]]
    names = [f"G{g:02d}_{j:02d}" for g in range(n_groups) for j in range(group_size)]
    omics = pd.DataFrame(np.round(genes, 4), columns=names)
    omics.insert(0, "patient_id", table["patient_id"])
    keep = rng.permutation(n) >= round(missing * n)
    groups = {f"G{g:02d}": names[g * group_size : (g + 1) * group_size] for g in range(n_groups)}
    paths = MultimodalCohort(root / "cohort.csv", root / "omics.csv", root / "groups.json", base)
    for path, write in (
        (paths.cohort, lambda f: table.to_csv(f, index=False)),
        (paths.omics, lambda f: omics[keep].to_csv(f, index=False)),
        (paths.groups, lambda f: f.write(json.dumps(groups, indent=1))),
    ):
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            write(fh)
    return paths
