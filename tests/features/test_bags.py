"""Feature bag round-trip, attributes, atomicity and joining."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi_mil.features import (
    Bag,
    BagError,
    NonFiniteFeaturesError,
    bag_info,
    bag_path,
    join_bags,
    read_bag,
    read_slide_bags,
    write_bag,
)


def _attrs(**extra):
    base = dict(
        encoder="builtin",
        weights_sha256="none",
        target_mpp=0.5,
        tile_px=224,
        slide_id="s1",
        mpp=0.25,
    )
    base.update(extra)
    return base


def _data(n=50, d=12, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = np.stack([np.arange(n) * 448, np.arange(n) % 7 * 448], axis=1)
    return feats, coords


def test_round_trip_fp16_default(tmp_path):
    feats, coords = _data()
    path = write_bag(tmp_path / "s1.h5", feats, coords, attrs=_attrs(store={"a": 1}))
    bag = read_bag(path)
    assert isinstance(bag, Bag)
    assert bag.features.dtype == np.float16
    np.testing.assert_allclose(bag.features, feats, atol=1e-2)
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)
    a = bag.attrs
    assert a["format"] == "wsi-mil.bag/1"
    assert a["dim"] == 12 and a["encoder"] == "builtin" and a["slide_id"] == "s1"
    assert a["target_mpp"] == 0.5 and a["tile_px"] == 224 and a["weights_sha256"] == "none"
    assert a["wsi_mil_version"]
    assert a["store"] == {"a": 1}  # JSON attributes round-trip
    ca = a["coords_attrs"]
    assert ca["patch_level"] == 0 and ca["patch_size"] == 448 and ca["patch_size_level0"] == 448
    assert ca["level0_magnification"] == 40 and ca["target_magnification"] == 20


def test_float32_and_chunking(tmp_path):
    feats, coords = _data(n=3000, d=8)
    path = write_bag(tmp_path / "b.h5", feats, coords, attrs=_attrs(), dtype="float32")
    with h5py.File(path) as h5:
        assert h5["features"].dtype == np.float32
        assert h5["features"].chunks[0] > 1000  # many rows per chunk
    np.testing.assert_array_equal(read_bag(path).features, feats)
    info = bag_info(path)
    assert info["n_tiles"] == 3000 and info["dim"] == 8 and info["dtype"] == "float32"


def test_torch_input_and_empty_bag(tmp_path):
    import torch

    feats, coords = _data(n=4)
    write_bag(tmp_path / "t.h5", torch.from_numpy(feats), torch.from_numpy(coords), attrs=_attrs())
    assert read_bag(tmp_path / "t.h5").features.shape == (4, 12)
    write_bag(tmp_path / "e.h5", np.zeros((0, 5), np.float32), np.zeros((0, 2)), attrs=_attrs())
    assert bag_info(tmp_path / "e.h5")["n_tiles"] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_refused_naming_slide(tmp_path, bad):
    feats, coords = _data()
    feats[7, 3] = bad
    with pytest.raises(NonFiniteFeaturesError, match=r"'s1'.*rows \[7\]"):
        write_bag(tmp_path / "s1.h5", feats, coords, attrs=_attrs())
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_bad_shapes_and_attrs(tmp_path):
    feats, coords = _data()
    with pytest.raises(BagError, match="coords"):
        write_bag(tmp_path / "x.h5", feats, coords[:-1], attrs=_attrs())
    with pytest.raises(BagError, match=r"\(N, D\)"):
        write_bag(tmp_path / "x.h5", feats[0], coords, attrs=_attrs())
    with pytest.raises(BagError, match="encoder"):
        write_bag(tmp_path / "x.h5", feats, coords, attrs={"slide_id": "s1"})
    with pytest.raises(BagError, match="float16 or float32"):
        write_bag(tmp_path / "x.h5", feats, coords, attrs=_attrs(), dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        read_bag(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(BagError, match="not a readable HDF5"):
        read_bag(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["features"] = np.zeros((2, 2))
    with pytest.raises(BagError, match="not a wsi-mil feature bag"):
        bag_info(tmp_path / "other.h5")


def test_killed_mid_write_leaves_no_bag(tmp_path, monkeypatch):
    import wsi_mil.features.bags as bags

    feats, coords = _data()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bags, "_write_coords_attrs", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bag(tmp_path / "s1.h5", feats, coords, attrs=_attrs())
    assert list(tmp_path.iterdir()) == []


def test_join_bags_reorders_and_checks(tmp_path):
    feats, coords = _data(n=30, d=4)
    rng = np.random.default_rng(1)
    perm = rng.permutation(30)
    other = rng.normal(size=(30, 3)).astype(np.float32)
    write_bag(bag_path(tmp_path, "a", "s1"), feats, coords, attrs=_attrs(encoder="a"))
    write_bag(
        bag_path(tmp_path, "timm:b/c", "s1"),
        other[perm],
        coords[perm],
        attrs=_attrs(encoder="timm:b/c"),
        dtype="float32",
    )
    joined = read_slide_bags(tmp_path, "s1", ["a", "timm:b/c"])
    assert joined.features.shape == (30, 7)
    np.testing.assert_array_equal(joined.coords, coords)
    np.testing.assert_allclose(joined.features[:, 4:], other)
    np.testing.assert_allclose(joined.features[:, :4], feats, atol=1e-2)
    assert joined.attrs["encoders"] == ["a", "timm:b/c"] and joined.attrs["dim"] == 7
    single = read_slide_bags(tmp_path, "s1", "a", dtype="float32")
    assert single.features.dtype == np.float32

    a = read_bag(bag_path(tmp_path, "a", "s1"))
    shifted = Bag(a.features, a.coords + 1, a.attrs)
    with pytest.raises(BagError, match="different tile coordinates"):
        join_bags([a, shifted], names=["a", "b"])
    with pytest.raises(BagError, match="has 30 tiles, b has 29"):
        join_bags([a, Bag(a.features[:-1], a.coords[:-1], a.attrs)], names=["a", "b"])
    with pytest.raises(BagError):
        join_bags([])
