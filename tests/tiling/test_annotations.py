"""QuPath GeoJSON annotations: parsing, rasterising, and tiling within or outside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import AnnotationError
from wsi_mil.tiling import open_tile_store, tile_slide
from wsi_mil.tiling.annotations import load_annotations, rasterise_polygons

T = 128  # tile side in level-0 px (128 px at 0.5 µm/px on a 0.5 µm/px slide)


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


# Grid-aligned regions (multiples of the tile side and of the 16-px mask pixel), so a
# tile is either wholly inside a region or wholly outside it.
OUTER = _rect(256, 640, 1664, 1792)
HOLE = _rect(640, 896, 1152, 1408)
SECOND = _rect(1792, 512, 2688, 1280)


def _feature(geometry: dict, cls: str | None = None, kind: str = "annotation") -> dict:
    props: dict = {"objectType": kind, "isLocked": False}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "3f1c", "geometry": geometry, "properties": props}


def _qupath_export(path: Path, features: list[dict], collection: bool = True) -> Path:
    data = {"type": "FeatureCollection", "features": features} if collection else features
    path.write_text(json.dumps(data, indent=2))
    return path


def _multipolygon(cls: str | None = "Tumor") -> dict:
    return _feature({"type": "MultiPolygon", "coordinates": [[OUTER, HOLE], [SECOND]]}, cls)


def _inside(coords: np.ndarray) -> np.ndarray:
    """Tile boxes (level-0 top-left, side T) wholly inside OUTER minus HOLE, or SECOND."""

    def box_in(r: list[list[float]]) -> np.ndarray:
        (x0, y0), (x1, y1) = r[0], r[2]
        x, y = coords[:, 0], coords[:, 1]
        return (x >= x0) & (y >= y0) & (x + T <= x1) & (y + T <= y1)

    def box_out(r: list[list[float]]) -> np.ndarray:
        (x0, y0), (x1, y1) = r[0], r[2]
        x, y = coords[:, 0], coords[:, 1]
        return (x + T <= x0) | (y + T <= y0) | (x >= x1) | (y >= y1)

    return (box_in(OUTER) & box_out(HOLE)) | box_in(SECOND)


@pytest.fixture(scope="module")
def baseline(slide_050, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Tile coordinates of slide_050 without annotations."""
    out = tmp_path_factory.mktemp("plain")
    row = tile_slide(slide_050.path, out, tile_px=128, pixels="none", qc=False)
    assert row["status"] == "ok", row
    return open_tile_store(out / "syn050.zarr").coords


def _coord_set(coords: np.ndarray) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in coords}


# ------------------------------------------------------------------ parsing


def test_rasterise_holes_and_multipolygon() -> None:
    outer = np.array(_rect(0, 0, 20, 20), float)
    hole = np.array(_rect(6, 6, 14, 14), float)[::-1]  # orientation does not matter
    far = np.array(_rect(24, 0, 32, 8), float)
    mask = rasterise_polygons([[outer, hole], [far]], (12, 18), (2.0, 2.0))
    expected = np.zeros((12, 18), bool)
    expected[0:10, 0:10] = True
    expected[3:7, 3:7] = False
    expected[0:4, 12:16] = True
    np.testing.assert_array_equal(mask, expected)
    # overlapping polygons: union, a hole of one does not cut the other
    cover = np.array(_rect(0, 0, 20, 20), float)
    both = rasterise_polygons([[outer, hole], [cover]], (12, 18), (2.0, 2.0))
    assert both[0:10, 0:10].all()
    # a triangle: pixel centres with x + y < 24 (pixel units of 2 level-0 px)
    tri = np.array([[0, 0], [24, 0], [0, 24]], float)
    r, c = np.mgrid[0:12, 0:12]
    got = rasterise_polygons([[tri]], (12, 12), (2.0, 2.0))
    np.testing.assert_array_equal(got, (2 * c + 1) + (2 * r + 1) < 24)


def test_qupath_export_classes_and_ignored_objects(tmp_path: Path) -> None:
    features = [
        _multipolygon("Tumor"),
        _feature({"type": "Polygon", "coordinates": [_rect(0, 0, 100, 100)]}, "Stroma"),
        _feature({"type": "Polygon", "coordinates": [_rect(0, 0, 50, 50)]}, None),
        _feature({"type": "Polygon", "coordinates": [_rect(0, 0, 9, 9)]}, "Tumor", "detection"),
        _feature({"type": "Point", "coordinates": [5, 5]}, "Tumor"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Tumor"),
    ]
    path = _qupath_export(tmp_path / "a.geojson", features)
    every = load_annotations(path)
    assert len(every.polygons) == 4 and every.n_ignored == 3
    assert every.classes_found == {"Tumor": 1, "Stroma": 1, "Unclassified": 1}
    tumour = load_annotations(path, ["Tumor"])
    assert len(tumour.polygons) == 2 and [len(p) for p in tumour.polygons] == [2, 1]
    bare = _qupath_export(tmp_path / "b.geojson", features, collection=False)
    assert len(load_annotations(bare, ["Stroma"]).polygons) == 1


_POLY = '[{{"type": "Feature", "geometry": {{"type": "Polygon", "coordinates": {}}}}}]'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"type": "FeatureCollection", "features": [', "not valid JSON (line 1"),
        ('{"type": "Topology"}', "expected a GeoJSON FeatureCollection"),
        ('[{"type": "Feature"}]', "feature 0 is not a GeoJSON Feature"),
        (_POLY.format("[[[0, 0], [1]]]"), "feature 0: ring 0 must be a list of [x, y] numbers"),
        (_POLY.format("[[[0, 0], [1, 1]]]"), "fewer than 3 distinct points"),
        ('[{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}]',
         "unknown geometry type 'Circle'"),
    ],
)  # fmt: skip
def test_bad_geojson_names_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    assert str(path) in str(info.value) and problem in str(info.value)


# ------------------------------------------------------------------ tiling


def test_include_keeps_tiles_inside_polygons_only(slide_050, baseline, tmp_path: Path) -> None:
    (tmp_path / "ann").mkdir()
    ann = _qupath_export(tmp_path / "ann" / "syn050.geojson", [_multipolygon()])
    row = tile_slide(slide_050.path, tmp_path / "out", tile_px=128, pixels="none",
                     include_geojson=ann.parent)  # fmt: skip
    assert row["status"] == "ok", row
    store = open_tile_store(tmp_path / "out" / "syn050.zarr")
    assert store.n_tiles > 10
    assert _coord_set(store.coords) == _coord_set(baseline[_inside(baseline)])
    hole = np.array(HOLE)
    in_hole = (store.coords >= hole[0]) & (store.coords + T <= hole[2])
    assert not in_hole.all(axis=1).any()  # the hole is respected (it holds tissue tiles)
    assert ((baseline >= hole[0]) & (baseline + T <= hole[2])).all(axis=1).sum() >= 4
    assert store.regions is not None and store.regions.shape == store.mask.shape
    assert not (store.mask & ~store.regions).any()  # the stored mask lies within
    record = store.attrs["annotations"]["include"]
    assert record["n_polygons"] == 2 and len(record["sha256"]) == 64
    assert (tmp_path / "out" / "qc" / "syn050.png").exists()


def test_exclude_drops_tiles_inside_polygons(slide_050, baseline, tmp_path: Path) -> None:
    ann = _qupath_export(tmp_path / "cut.geojson", [_multipolygon()])
    row = tile_slide(slide_050.path, tmp_path, tile_px=128, pixels="none", qc=False,
                     exclude_geojson=ann)  # fmt: skip
    assert row["status"] == "ok", row
    coords = open_tile_store(tmp_path / "syn050.zarr").coords
    assert _inside(baseline).sum() > 10
    assert _coord_set(coords) == _coord_set(baseline[~_inside(baseline)])


def test_class_filter_and_changed_annotation_rebuild(slide_050, baseline, tmp_path: Path) -> None:
    ann = tmp_path / "syn050.geojson"
    other = _feature({"type": "Polygon", "coordinates": [_rect(0, 0, 3200, 2400)]}, "Stroma")
    _qupath_export(ann, [_multipolygon("Tumor"), other])
    kwargs = {"tile_px": 128, "pixels": "none", "qc": False, "include_geojson": ann}
    first = tile_slide(slide_050.path, tmp_path / "out", include_class="Tumor", **kwargs)
    assert first["status"] == "ok", first
    assert first["n_tiles"] == int(_inside(baseline).sum())
    again = tile_slide(slide_050.path, tmp_path / "out", include_class="Tumor", **kwargs)
    assert again["status"] == "skipped"
    # another class filter, then another file: rebuilt, saying why
    classes = tile_slide(slide_050.path, tmp_path / "out", include_class="Stroma", **kwargs)
    assert classes["status"] == "ok" and classes["n_tiles"] == len(baseline)
    assert "annotations changed (include classes" in classes["message"]
    _qupath_export(ann, [_feature({"type": "Polygon", "coordinates": [SECOND]}, "Stroma")])
    changed = tile_slide(slide_050.path, tmp_path / "out", include_class="Stroma", **kwargs)
    assert changed["status"] == "ok" and "include file changed" in changed["message"]
    assert changed["n_tiles"] == int(_in_second(baseline).sum()) > 0
    # a class absent from the file: the slide fails, listing the classes found
    none = tile_slide(slide_050.path, tmp_path / "out", include_class="Necrosis", **kwargs)
    assert none["status"] == "failed"
    assert "AnnotationError" in none["error"] and "Stroma (1)" in none["error"]
    # without annotations the store is rebuilt as a plain one
    plain = tile_slide(slide_050.path, tmp_path / "out", tile_px=128, pixels="none", qc=False)
    assert "include removed" in plain["message"] and plain["n_tiles"] == len(baseline)
    assert open_tile_store(tmp_path / "out" / "syn050.zarr").regions is None


def _in_second(coords: np.ndarray) -> np.ndarray:
    """Tiles wholly inside SECOND."""
    (x0, y0), (x1, y1) = SECOND[0], SECOND[2]
    x, y = coords[:, 0], coords[:, 1]
    return (x >= x0) & (y >= y0) & (x + T <= x1) & (y + T <= y1)


def test_missing_and_bad_files(slide_050, tmp_path: Path) -> None:
    folder = tmp_path / "ann"
    folder.mkdir()
    kwargs = {"tile_px": 128, "pixels": "none", "qc": False}
    missing = tile_slide(slide_050.path, tmp_path / "a", include_geojson=folder, **kwargs)
    assert missing["status"] == "failed"
    assert "no annotation file for slide 'syn050'" in missing["error"]
    assert str(folder / "syn050.geojson") in missing["error"]
    tiled = tile_slide(slide_050.path, tmp_path / "b", exclude_geojson=folder, **kwargs)
    assert tiled["status"] == "ok" and tiled["n_tiles"] > 0
    (folder / "syn050.svs.geojson").write_text('{"type": "FeatureCollection", "features": [}')
    bad = tile_slide(slide_050.path, tmp_path / "c", exclude_geojson=folder, **kwargs)
    assert bad["status"] == "failed"
    assert "syn050.svs.geojson: not valid JSON" in bad["error"]
    assert not (tmp_path / "c" / "syn050.zarr").exists()
