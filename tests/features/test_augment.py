"""Stain augmentation: HED jitter, jittered views in bags, views sampled in training only."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from wsi_mil.features import augment as A
from wsi_mil.features.bags import bag_info, read_bag, read_bag_views, verify_bag, write_bag


def _he_tiles(n: int = 4, side: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.array([170, 90, 160], np.float64)  # pinkish-purple H&E
    return np.clip(base + rng.normal(0, 25, (n, side, side, 3)), 0, 255).astype(np.uint8)


def test_hed_jitter_identity_and_change():
    tiles = _he_tiles()
    same = A.hed_jitter(tiles, np.ones(3), np.zeros(3)).numpy()
    np.testing.assert_allclose(same, tiles, atol=1e-2)
    more_h = A.hed_jitter(tiles, [1.3, 1.0, 1.0], np.zeros(3)).numpy()
    assert np.abs(more_h - tiles).mean() > 1.0
    # more haematoxylin darkens (raises OD) on average
    assert more_h.mean() < tiles.mean()


def test_draws_are_seeded_per_slide_and_in_range():
    a1, b1 = A.draw_jitter(3, 0.1, 7, "s1")
    a2, b2 = A.draw_jitter(3, 0.1, 7, "s1")
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert a1.shape == b1.shape == (3, 3)
    assert not np.allclose(a1, A.draw_jitter(3, 0.1, 7, "s2")[0])
    assert not np.allclose(a1, A.draw_jitter(3, 0.1, 8, "s1")[0])
    assert (np.abs(a1 - 1) <= 0.1).all() and (np.abs(b1) <= 0.1).all()
    with pytest.raises(ValueError, match="--augment"):
        A.AugmentSpec(0)
    with pytest.raises(ValueError, match="--augment-sigma"):
        A.AugmentSpec(2, sigma=1.5)


def test_bag_views_are_checked_and_verified(tmp_path):
    attrs = {"encoder": "e", "weights_sha256": "x", "target_mpp": 1.0, "tile_px": 8,
             "slide_id": "s"}  # fmt: skip
    feats, xy = np.ones((5, 3), np.float32), np.zeros((5, 2), np.int64)
    with pytest.raises(ValueError, match=r"must be \(K, 5, 3\)"):
        write_bag(tmp_path / "s.h5", feats, xy, attrs=attrs, augmented=np.ones((2, 4, 3)))
    bad = np.ones((2, 5, 3))
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="augmented views"):
        write_bag(tmp_path / "s.h5", feats, xy, attrs=attrs, augmented=bad)
    assert not (tmp_path / "s.h5").exists()
    write_bag(tmp_path / "s.h5", feats, xy, attrs=attrs, augmented=2 * np.ones((2, 5, 3)))
    assert bag_info(tmp_path / "s.h5")["n_views"] == 2 and verify_bag(tmp_path / "s.h5") == []
    assert read_bag_views(tmp_path / "s.h5").shape == (2, 5, 3)
    np.testing.assert_array_equal(read_bag(tmp_path / "s.h5").features, feats)


def _extract(tiles: Path, out: Path, *extra: str) -> None:
    from wsi_mil.workflows.cli import main

    assert main(["extract", str(tiles), "--out", str(out), "--devices", "cpu", "--workers",
                 "0", "--no-progress", "--batch-size", "32", *extra]) == 0  # fmt: skip


def test_extract_augment_writes_reproducible_distinct_views(tiles, tmp_path, monkeypatch):
    from wsi_mil.features import pool

    reads = []
    real = pool._ChunkDataset.__getitem__

    def counting(self, item):
        reads.append(item)
        return real(self, item)

    monkeypatch.setattr(pool._ChunkDataset, "__getitem__", counting)
    _extract(tiles, tmp_path / "plain")
    n_plain = len(reads)
    _extract(tiles, tmp_path / "aug", "--augment", "2", "--augment-seed", "3")
    assert len(reads) == 2 * n_plain  # the views come from the same decoded batches
    _extract(tiles, tmp_path / "again", "--augment", "2", "--augment-seed", "3")
    for sid in ("slide_a", "slide_b"):
        path = tmp_path / "aug" / "builtin" / f"{sid}.h5"
        plain = read_bag(tmp_path / "plain" / "builtin" / f"{sid}.h5").features
        bag, views = read_bag(path), read_bag_views(path)
        assert views is not None and views.shape == (2, *plain.shape)
        np.testing.assert_array_equal(bag.features, plain)  # the original is untouched
        for v in views:
            assert np.abs(v.astype(np.float32) - plain).mean() > 1e-3
        assert np.abs(views[0].astype(np.float32) - views[1]).mean() > 1e-3
        np.testing.assert_array_equal(
            views, read_bag_views(tmp_path / "again" / "builtin" / f"{sid}.h5")
        )
        rec = bag.attrs["augment"]
        assert rec["method"] == "hed" and rec["k"] == 2 and rec["seed"] == 3
        alpha, _ = A.draw_jitter(2, A.DEFAULT_SIGMA, 3, sid)
        np.testing.assert_allclose(rec["alpha"], alpha, atol=1e-6)
        assert read_bag(tmp_path / "plain" / "builtin" / f"{sid}.h5").attrs["augment"] == {
            "method": "none"
        }
    before = len(reads)
    _extract(tiles, tmp_path / "aug", "--augment", "2", "--augment-seed", "3")
    assert len(reads) == before  # up to date
    _extract(tiles, tmp_path / "aug", "--augment", "2", "--augment-seed", "4")
    assert len(reads) > before  # another setting: re-extracted


def _augmented_cohort(root: Path):
    from wsi_mil.mil.synthetic import make_synthetic_cohort

    syn = make_synthetic_cohort(root, n_patients=8, n_tiles=(10, 20), dims=(8,))
    for path in syn.features_dirs[0].glob("*.h5"):
        bag = read_bag(path)
        rng = np.random.default_rng(len(bag.features))
        views = bag.features[None] + rng.normal(0, 1, (3, *bag.features.shape))
        attrs = {k: v for k, v in bag.attrs.items() if k not in ("coords_attrs", "format")}
        write_bag(path, bag.features, bag.coords, attrs=attrs, augmented=views)
    return syn


def test_load_batch_draws_views_only_when_asked(tmp_path):
    from wsi_mil.mil.data import BagStore, Unit, load_batch

    syn = _augmented_cohort(tmp_path)
    sid = sorted(syn.patients)[0]
    store = BagStore(syn.features_dirs, 1 << 24)
    unit = Unit(sid, syn.patients[sid], (sid,))
    views = read_bag_views(syn.features_dirs[0] / f"{sid}.h5")
    plain = read_bag(syn.features_dirs[0] / f"{sid}.h5").features
    seen = set()
    for seed in range(40):
        batch = load_batch(store, [unit], seed=seed, views=True)
        (v,) = batch.views[0]
        seen.add(v)
        want = plain if v == 0 else views[v - 1]
        n = len(plain)
        np.testing.assert_array_equal(batch.features[0, :n].numpy(), want.astype(np.float16))
    assert seen == {0, 1, 2, 3}
    again = [load_batch(store, [unit], seed=s, views=True).views for s in range(5)]
    assert again == [load_batch(store, [unit], seed=s, views=True).views for s in range(5)]
    batch = load_batch(store, [unit], seed=1)
    assert batch.views == []
    np.testing.assert_array_equal(batch.features[0].numpy(), plain.astype(np.float16))


def test_training_samples_views_and_predict_ignores_them(tmp_path, monkeypatch):
    from wsi_mil.mil import data, inference, train
    from wsi_mil.workflows.cli import main

    syn = _augmented_cohort(tmp_path / "data")
    drawn, eval_calls = [], []
    real = data.load_batch

    def train_load(*args, **kwargs):
        batch = real(*args, **kwargs)
        drawn.extend(batch.views)
        return batch

    def eval_load(*args, **kwargs):
        eval_calls.append(kwargs.get("views", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "load_batch", train_load)
    monkeypatch.setattr(inference, "load_batch", eval_load)
    run = tmp_path / "run"
    args = ["train", str(syn.cohort_csv), "--features", str(syn.features_dirs[0]), "--task",
            "classification", "--model", "abmil", "--folds", "2", "--steps", "8",
            "--batch-size", "2", "--max-tiles", "16", "--n-boot", "5", "--model-kwargs",
            '{"hidden_dim": 8, "attn_dim": 4}', "--device", "cpu", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert {v for (v,) in drawn} == {0, 1, 2, 3}  # every view, the original included
    assert eval_calls and not any(eval_calls)  # validation and test: plain features
    # predict: the same predictions with the views removed from every bag
    stripped = tmp_path / "stripped"
    shutil.copytree(syn.features_dirs[0], stripped)
    for path in stripped.glob("*.h5"):
        with h5py.File(path, "a") as h5:
            del h5["features_augmented"]
    outs = []
    for feats, name in ((syn.features_dirs[0], "a.csv"), (stripped, "b.csv")):
        out = str(tmp_path / name)
        assert main(["predict", str(run), "--features", str(feats), "--out", out,
                     "--device", "cpu", "--allow-in-sample"]) == 0  # fmt: skip
        outs.append(pd.read_csv(tmp_path / name))
    cols = [c for c in outs[0] if c.startswith("prob_")]
    assert cols
    np.testing.assert_allclose(outs[0][cols].to_numpy(), outs[1][cols].to_numpy())
