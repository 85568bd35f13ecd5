"""QC outputs: the tissue GeoJSON is what QuPath imports and matches the mask exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from wsi_mil.tiling.qc import qc_overlay, save_tissue_geojson, tissue_geojson


def _rasterize(geo: dict, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Mask pixels whose centre lies inside the polygons (holes excluded: even-odd)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.column_stack([(cols.ravel() + 0.5) * scale[0], (rows.ravel() + 0.5) * scale[1]])
    inside = np.zeros(len(centres), bool)
    for feature in geo["features"]:
        for ring in feature["geometry"]["coordinates"]:
            inside ^= MplPath(np.asarray(ring)).contains_points(centres)
    return inside.reshape(shape)


def _check_qupath_feature(feature: dict) -> None:
    assert feature["type"] == "Feature"
    geometry = feature["geometry"]
    assert geometry["type"] in ("Polygon", "MultiPolygon")
    for ring in geometry["coordinates"]:
        assert len(ring) >= 4 and ring[0] == ring[-1]  # closed linear ring
        assert all(len(p) == 2 and all(isinstance(v, float | int) for v in p) for p in ring)
    props = feature["properties"]
    assert props["objectType"] == "annotation"
    assert isinstance(props["classification"]["name"], str)
    color = props["classification"]["color"]
    assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)


@pytest.mark.parametrize("seed", range(4))
def test_geojson_reproduces_the_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 50), bool)
    for _ in range(6):  # blobs, some touching diagonally, some with holes
        r, c, h, w = rng.integers(0, 35), rng.integers(0, 45), *rng.integers(3, 15, 2)
        mask[r : r + h, c : c + w] = True
    mask[rng.random(mask.shape) < 0.05] ^= True
    scale = (16.0, 12.5)
    geo = tissue_geojson(mask, scale)
    assert geo["type"] == "FeatureCollection"
    for feature in geo["features"]:
        _check_qupath_feature(feature)
    assert np.array_equal(_rasterize(geo, mask.shape, scale), mask)


@pytest.mark.real_slide
def test_real_slide_geojson_is_valid_and_matches(real_slide: Path, tmp_path: Path) -> None:
    from wsi_mil.tiling import detect_tissue
    from wsi_mil.wsi import open_slide

    with open_slide(real_slide) as slide:
        thumb = slide.get_thumbnail(mpp=8.0)
        s = 8.0 / slide.mpp
    mask = detect_tissue(thumb, 8.0)
    path = save_tissue_geojson(tmp_path / "t.geojson", mask, (s, s))
    geo = json.loads(path.read_text())
    assert geo["features"]
    for feature in geo["features"]:
        _check_qupath_feature(feature)
    xy = np.concatenate(
        [np.asarray(r) for f in geo["features"] for r in f["geometry"]["coordinates"]]
    )
    assert xy.min() >= 0 and xy[:, 0].max() <= 2220 + s and xy[:, 1].max() <= 2967 + s  # level 0
    assert np.array_equal(_rasterize(geo, mask.shape, (s, s)), mask)


def test_qc_overlay_draws_outline_and_tiles() -> None:
    thumb = np.full((50, 60, 3), 240, np.uint8)
    mask = np.zeros((50, 60), bool)
    mask[10:40, 10:50] = True
    img = qc_overlay(thumb, mask, np.array([[160, 160]]), 64.0, (8.0, 8.0), min_side=180)
    assert img.shape == (150, 180, 3)  # enlarged 3x
    k = 3
    assert tuple(img[10 * k, 20 * k]) == (0, 120, 255)  # outline on the tissue border
    assert tuple(img[20 * k, 20 * k]) == (255, 200, 0)  # tile box corner at level-0 (160, 160)
    assert tuple(img[25 * k, 25 * k]) == (240, 240, 240)  # inside untouched
