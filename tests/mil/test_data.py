"""Bags: lazy bounded cache, joining encoders, padding, batch samplers, bag checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.bags import BagError, read_bag, write_bag
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.data import (
    BagStore,
    collate_bags,
    event_batches,
    load_batch,
    make_units,
    scan_bags,
)
from wsi_mil.mil.synthetic import make_synthetic_cohort

ATTRS = {"encoder": "e", "weights_sha256": "x", "target_mpp": 0.5, "tile_px": 224}


def _bag(folder: Path, sid: str, n: int, dim: int) -> Path:
    rng = np.random.default_rng(n)
    coords = np.stack([np.arange(n) * 224, np.zeros(n)], axis=1)
    return write_bag(
        folder / f"{sid}.h5",
        rng.standard_normal((n, dim)),
        coords,
        attrs={**ATTRS, "slide_id": sid},
    )


def test_cache_is_bounded_lru_of_fp16(tmp_path: Path) -> None:
    for i in range(4):
        _bag(tmp_path, f"s{i}", 100, 16)  # 3200 bytes each in fp16
    store = BagStore([tmp_path], cache_bytes=7000)
    for i in range(4):
        feats, coords = store.slide(f"s{i}")
        assert feats.dtype == np.float16 and feats.shape == (100, 16) and coords.shape == (100, 2)
        assert store.used_bytes <= 7000
    store.slide("s3")
    store.slide("s0")  # evicted earlier
    assert store.hits == 1 and store.misses == 5


def test_join_encoders_tile_by_tile(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(tmp_path, n_patients=2, n_tiles=(30, 30), dims=(8, 4))
    sid = next(iter(syn.planted))
    joined, coords = BagStore(syn.features_dirs, 1 << 20).slide(sid)
    a, b = (read_bag(d / f"{sid}.h5") for d in syn.features_dirs)
    assert joined.shape == (30, 12)
    np.testing.assert_array_equal(coords, a.coords)
    order = [int(np.flatnonzero((b.coords == c).all(axis=1))[0]) for c in a.coords]
    np.testing.assert_array_equal(joined[:, 8:], b.features[order].astype(np.float16))


def test_patient_level_bags_concatenate_slides(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(
        tmp_path, n_patients=5, slides_per_patient=(2, 3), n_tiles=(5, 9), dims=(4,)
    )
    cohort = load_cohort(syn.cohort_csv, task="classification", features_dirs=syn.features_dirs)
    store = BagStore(syn.features_dirs, 1 << 20)
    patients = make_units(cohort, cohort.patient_ids, "patient", set())
    slides = make_units(cohort, cohort.patient_ids, "slide", set())
    assert len(patients) == 5 and len(slides) == len(cohort.slides)
    unit = patients[0]
    feats, _coords, which = store.unit(unit)
    sizes = [len(store.slide(s)[0]) for s in unit.slide_ids]
    assert len(feats) == sum(sizes) and np.bincount(which).tolist() == sizes


def test_collate_pads_with_masks() -> None:
    feats, mask = collate_bags([np.ones((3, 2)), np.full((5, 2), 2.0, np.float16)])
    assert feats.shape == (2, 5, 2) and mask.sum(1).tolist() == [3, 5]
    assert float(feats[0, 3:].abs().sum()) == 0.0 and float(feats[1].mean()) == 2.0


def test_tile_subsampling_is_seeded(tmp_path: Path) -> None:
    syn = make_synthetic_cohort(tmp_path, n_patients=3, n_tiles=(50, 60), dims=(4,))
    cohort = load_cohort(syn.cohort_csv, task="classification")
    store = BagStore(syn.features_dirs, 1 << 20)
    units = make_units(cohort, cohort.patient_ids, "patient", set())
    a = load_batch(store, units, max_tiles=10, seed=3)
    b = load_batch(store, units, max_tiles=10, seed=3)
    c = load_batch(store, units, max_tiles=10, seed=4)
    assert a.features.shape == (3, 10, 4) and bool(a.mask.all())
    assert all(np.array_equal(x, y) for x, y in zip(a.tiles, b.tiles, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.tiles, c.tiles, strict=True))


@pytest.mark.parametrize("seed", range(20))
def test_every_cox_batch_has_an_event(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    events = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    events[rng.integers(n)] = 1
    batches = event_batches(events, int(rng.integers(2, 16)), rng)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(events[b].any() for b in batches)


def test_scan_names_bag_with_other_dim_and_counts_empty(tmp_path: Path) -> None:
    for sid in ("a", "b", "c"):
        _bag(tmp_path, sid, 10, 16)
    write_bag(
        tmp_path / "e.h5", np.zeros((0, 16)), np.zeros((0, 2)), attrs={**ATTRS, "slide_id": "e"}
    )
    scan = scan_bags(["a", "b", "c", "e"], [tmp_path])
    assert scan.dim == 16 and scan.empty == ["e"] and scan.n_tiles["a"] == 10
    _bag(tmp_path, "d", 10, 8)
    with pytest.raises(BagError) as err:
        scan_bags(["a", "b", "c", "d"], [tmp_path])
    assert str(tmp_path / "d.h5") in str(err.value)
    assert "feature dim 8 differs from dim 16" in str(err.value)
    with pytest.raises(BagError, match="dim 16 differs from dim 32 of the trained model"):
        scan_bags(["a"], [tmp_path], expected_dims=[32])
