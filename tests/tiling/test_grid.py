"""Tile grids: counts, physical sizes, exact tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.tiling.grid import integral_image, tile_grid


@pytest.mark.parametrize(
    ("mpp", "tile_level0", "n_cols", "n_rows"),
    [(0.25, 448, 8, 6), (0.5, 224, 17, 13)],  # 4000 x 3000 px slide, 224 px at 0.5 µm/px
)
def test_counts_and_physical_size(mpp: float, tile_level0: int, n_cols: int, n_rows: int):
    grid = tile_grid(np.ones((30, 40), bool), (4000, 3000), mpp=mpp, target_mpp=0.5)
    assert grid.tile_level0 == pytest.approx(tile_level0)
    assert grid.tile_level0 * mpp == pytest.approx(112.0)  # 224 px × 0.5 µm = 112 µm
    assert grid.grid_shape == (n_rows, n_cols)
    assert grid.n_tiles == n_rows * n_cols
    xs, ys = np.unique(grid.coords[:, 0]), np.unique(grid.coords[:, 1])
    assert np.array_equal(xs, np.arange(n_cols) * tile_level0)
    assert np.array_equal(ys, np.arange(n_rows) * tile_level0)
    assert (grid.coords[:, 0] + grid.tile_level0 <= 4000).all()
    assert (grid.coords[:, 1] + grid.tile_level0 <= 3000).all()
    np.testing.assert_allclose(grid.tissue, 1.0)


def test_stride_overlap_and_non_integer_sizes() -> None:
    grid = tile_grid(
        np.ones((10, 10), bool), (1000, 1000), mpp=0.3, target_mpp=0.5, tile_px=100,
        stride_px=50,
    )  # fmt: skip
    # tile = 166.67 level-0 px, stride 83.33: floor((1000 - 166.67) / 83.33) + 1 = 11
    assert grid.grid_shape == (11, 11)
    assert (grid.coords[:, 0] + grid.tile_level0 <= 1000 + 1e-6).all()
    assert np.all(np.diff(np.unique(grid.coords[:, 0])) >= 83)


def test_fraction_is_exact_area_weighted() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half of a 1000 x 1000 slide
    grid = tile_grid(mask, (1000, 1000), mpp=1.0, target_mpp=1.0, tile_px=300, min_tissue=0.0)
    by_x = {int(x): float(f) for (x, _), f in zip(grid.coords, grid.tissue, strict=True)}
    assert by_x == pytest.approx({0: 1.0, 300: 2 / 3, 600: 0.0})


@pytest.mark.parametrize("seed", range(3))
def test_fraction_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < 0.5
    width, height = 31 * 7, 23 * 7  # 7 level-0 px per mask px
    grid = tile_grid(
        mask, (width, height), mpp=1.0, target_mpp=1.0, tile_px=20, stride_px=9, min_tissue=0.0
    )
    full = np.repeat(np.repeat(mask, 7, axis=0), 7, axis=1)
    for (x, y), frac in zip(grid.coords, grid.tissue, strict=True):
        assert frac == pytest.approx(full[y : y + 20, x : x + 20].mean(), abs=1e-5)


def test_min_tissue_threshold_and_order() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    grid = tile_grid(mask, (2000, 2000), mpp=0.5, target_mpp=0.5, tile_px=100, min_tissue=0.5)
    assert grid.n_tiles > 0 and (grid.tissue >= 0.5).all()
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    assert np.array_equal(order, np.arange(grid.n_tiles))  # row-major
    assert tile_grid(mask, (2000, 2000), mpp=0.5, min_tissue=0.0).n_tiles == 8 * 8


def test_slide_smaller_than_one_tile() -> None:
    grid = tile_grid(np.ones((5, 5), bool), (200, 150), mpp=0.5, target_mpp=0.5)
    assert grid.n_tiles == 0 and grid.coords.shape == (0, 2) and grid.tissue.shape == (0,)


def test_mask_scale_for_padded_thumbnails() -> None:
    # a thumbnail whose last column extends past the slide (get_thumbnail's contract)
    mask = np.zeros((4, 5), bool)
    mask[:, :2] = True  # level-0 x in [0, 200) with 100 level-0 px per mask px
    grid = tile_grid(
        mask, (450, 400), mpp=1.0, target_mpp=1.0, tile_px=200, min_tissue=0.0,
        mask_scale=(100.0, 100.0),
    )  # fmt: skip
    assert dict(zip(grid.coords[:, 0].tolist(), grid.tissue.tolist(), strict=False)) == {
        0: 1.0,
        200: 0.0,
    }


def test_integral_image() -> None:
    mask = np.random.default_rng(0).random((7, 9)) < 0.5
    ii = integral_image(mask)
    assert ii.shape == (8, 10) and ii[-1, -1] == mask.sum() and ii[3, 4] == mask[:3, :4].sum()


@pytest.mark.parametrize(
    "kwargs", [{"tile_px": 0}, {"stride_px": -1}, {"min_tissue": 1.5}, {"target_mpp": 0}]
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        tile_grid(np.ones((4, 4), bool), (100, 100), mpp=0.5, **kwargs)
