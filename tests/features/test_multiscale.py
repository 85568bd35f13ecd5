"""Multi-scale bags: the spatial join of bags tiled at different µm/px, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_mil.features.bags import Bag, BagError, write_bag
from wsi_mil.features.multiscale import cover_index, join_multiscale
from wsi_mil.mil.data import BagStore, scan_bags


def _bag(xy, side, mpp, feats, name="enc") -> Bag:
    xy = np.asarray(xy, np.int64)
    attrs = {"encoder": name, "target_mpp": mpp, "slide_id": "s", "weights_sha256": name,
             "coords_attrs": {"patch_size_level0": side}}  # fmt: skip
    return Bag(np.asarray(feats, np.float32), xy, attrs)


def test_cover_index_covering_tile_else_nearest():
    fine = np.array([[0, 0], [10, 0], [20, 0], [30, 10], [100, 0], [40, 0]])
    coarse = np.array([[0, 0], [20, 0], [40, 0]])  # side 20: [0,20) [20,40) [40,60)
    idx, covered = cover_index(fine, 10, coarse, 20)
    # centres 5, 15, 25, 35(y=15), far away, 45 (a centre on an edge: 20 -> tile at 20)
    assert idx.tolist() == [0, 0, 1, 1, 2, 2]
    assert covered.tolist() == [True, True, True, True, False, True]
    # a centre exactly on a coarse edge belongs to the tile starting there (half-open)
    idx, covered = cover_index(np.array([[15, 0]]), 10, coarse, 20)
    assert idx.tolist() == [1] and covered.all()


def test_join_multiscale_rows_follow_the_fine_bag_columns_follow_the_order():
    fine = _bag([[0, 0], [10, 0], [20, 0], [100, 100]], 10, 0.5, np.arange(8).reshape(4, 2))
    coarse = _bag([[20, 0], [0, 0]], 20, 1.0, [[100.0], [200.0]], "coarse")
    joined = join_multiscale([coarse, fine], names=["c", "f"])
    np.testing.assert_array_equal(joined.coords, fine.coords)
    # coarse column first (as given), fine tile 3 is uncovered and takes the nearest
    np.testing.assert_array_equal(joined.features[:, 0], [200, 200, 100, 100])
    np.testing.assert_array_equal(joined.features[:, 1:], fine.features)
    assert joined.attrs["dims"] == [1, 2] and joined.attrs["uncovered"] == [1, 0]
    assert joined.attrs["scales"] == [1.0, 0.5]


def test_same_resolution_different_tiles_is_refused():
    a = _bag([[0, 0], [10, 0]], 10, 0.5, np.zeros((2, 2)))
    b = _bag([[0, 0]], 10, 0.5, np.zeros((1, 3)))
    with pytest.raises(BagError, match=r"same resolution, 0\.5 µm/px"):
        join_multiscale([a, b, _bag([[0, 0]], 20, 1.0, np.zeros((1, 1)))])


def _write(path: Path, bag: Bag, mpp: float) -> None:
    attrs = {"encoder": "e", "weights_sha256": "x", "target_mpp": mpp, "tile_px": 10,
             "slide_id": path.stem, "mpp": mpp}  # fmt: skip
    write_bag(path, bag.features, bag.coords, attrs=attrs, dtype="float32")


def test_scan_bags_counts_the_finest_and_names_same_scale_mismatch(tmp_path):
    fine = _bag([[0, 0], [10, 0], [20, 0]], 10, 0.5, np.ones((3, 2)))
    coarse = _bag([[0, 0]], 20, 1.0, np.ones((1, 3)))
    for d, bag, mpp in (("f", fine, 0.5), ("c", coarse, 1.0), ("f2", coarse, 0.5)):
        (tmp_path / d).mkdir()
        _write(tmp_path / d / "s.h5", bag, mpp)
    scan = scan_bags(["s"], [tmp_path / "c", tmp_path / "f"])
    assert scan.n_tiles == {"s": 3} and scan.dims == [3, 2]
    with pytest.raises(BagError, match=r"1 tiles but 3 in .*both at 0.5 µm/px"):
        scan_bags(["s"], [tmp_path / "f", tmp_path / "f2"])


@pytest.fixture(scope="module")
def two_scales(tmp_path_factory):
    """Four generated slides tiled at 0.5 and 1.0 µm/px and extracted, via the CLI."""
    from wsi_mil.workflows.cli import main
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("multiscale")
    for i in range(4):
        make_synthetic_slide(root / "slides" / f"s{i}.svs", 1280, 1024, seed=10 + i)
    feats = {}
    for mpp in ("0.5", "1.0"):
        tiles = root / f"tiles_{mpp}"
        assert main(["tile", str(root / "slides"), "--out", str(tiles), "--target-mpp", mpp,
                     "--tile-px", "64", "--min-tissue", "0.3", "--workers", "0",
                     "--no-qc"]) == 0  # fmt: skip
        out = root / f"features_{mpp}"
        assert main(["extract", str(tiles), "--out", str(out), "--devices", "cpu",
                     "--workers", "0", "--no-progress", "--batch-size", "64"]) == 0  # fmt: skip
        feats[mpp] = out / "builtin"
    rows = [{"patient_id": f"p{i}", "slide_id": f"s{i}", "label": "ab"[i % 2]} for i in range(4)]
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root, feats


def test_multiscale_join_then_train_and_predict(two_scales, tmp_path):
    from wsi_mil.features import read_bag
    from wsi_mil.workflows.cli import main

    root, feats = two_scales
    fine, coarse = read_bag(feats["0.5"] / "s0.h5"), read_bag(feats["1.0"] / "s0.h5")
    assert len(fine.coords) > len(coarse.coords) > 0
    store = BagStore([feats["0.5"], feats["1.0"]], 0)
    x, xy = store.slide("s0")
    d = fine.features.shape[1]
    assert x.shape == (len(fine.coords), d + coarse.features.shape[1])
    np.testing.assert_array_equal(xy, fine.coords)
    np.testing.assert_array_equal(x[:, :d], fine.features.astype(np.float16))
    # each fine tile's coarse part is the coarse tile covering its centre (else nearest)
    side_f = fine.attrs["coords_attrs"]["patch_size_level0"]
    side_c = coarse.attrs["coords_attrs"]["patch_size_level0"]
    assert side_c == 2 * side_f
    centre = fine.coords + side_f / 2
    n_uncovered = 0
    for row, c in zip(x[:, d:], centre, strict=True):
        inside = ((coarse.coords <= c) & (c < coarse.coords + side_c)).all(axis=1)
        if inside.any():
            want = coarse.features[np.flatnonzero(inside)[0]]
        else:
            n_uncovered += 1
            dist = np.hypot(*(coarse.coords + side_c / 2 - c).T)
            want = coarse.features[np.argmin(dist)]
        np.testing.assert_array_equal(row, want.astype(np.float16))
    assert n_uncovered < len(centre)
    run = tmp_path / "run"
    args = ["train", str(root / "cohort.csv"), "--features", str(feats["0.5"]), "--features",
            str(feats["1.0"]), "--task", "classification", "--model", "abmil", "--folds", "2",
            "--steps", "4", "--batch-size", "2", "--max-tiles", "32", "--n-boot", "5",
            "--model-kwargs", '{"hidden_dim": 8, "attn_dim": 4}', "--device", "cpu",
            "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    pred = pd.read_csv(run / "predictions.csv")
    assert set(pred["patient_id"]) == {f"p{i}" for i in range(4)}
    dest = tmp_path / "pred.csv"
    assert main(["predict", str(run), "--features", str(feats["0.5"]), "--features",
                 str(feats["1.0"]), "--out", str(dest), "--device", "cpu",
                 "--allow-in-sample"]) == 0  # fmt: skip
