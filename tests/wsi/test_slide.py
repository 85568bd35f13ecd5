"""Slide access against every slide of the ``slide_case`` fixture."""

from __future__ import annotations

import math
import pickle
from typing import TYPE_CHECKING

import numpy as np
import pytest

from wsi_mil.errors import MissingMPPError
from wsi_mil.wsi import SyntheticSlide, open_slide

if TYPE_CHECKING:
    from conftest import SlideCase

BACKENDS = ("openslide", "tiffslide")


def tissue_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Crude tissue detector for checking geometry: saturated (pink/purple) pixels."""
    rgb = rgb.astype(np.int16)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata(slide_case: SlideCase, backend: str) -> None:
    if not slide_case.metadata_mpp:
        with pytest.raises(MissingMPPError, match=slide_case.path.name):
            open_slide(slide_case.path, backend=backend)
    with slide_case.open(backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == (slide_case.width, slide_case.height)
        assert slide.slide_id == slide_case.path.stem
        assert slide.level_count == slide_case.levels == len(slide.level_dimensions)
        assert slide.level_downsamples[0] == 1.0
        assert list(slide.level_downsamples) == sorted(slide.level_downsamples)
        assert slide.mpp == pytest.approx(slide_case.mpp, abs=1e-4)
        expected_source = "explicit" if not slide_case.metadata_mpp else "mpp"
        assert expected_source in slide.mpp_source
        if backend == "openslide" or slide_case.vendor == "aperio":
            assert slide.vendor == slide_case.vendor
        assert all(isinstance(v, str) for v in slide.properties.values())


def test_backends_agree_on_every_level(slide_case: SlideCase) -> None:
    with slide_case.open("openslide") as a, slide_case.open("tiffslide") as b:
        assert a.level_dimensions == b.level_dimensions
        assert a.level_downsamples == pytest.approx(b.level_downsamples)
        for level, (w, h) in enumerate(a.level_dimensions):
            pa = a.read_region((0, 0), level, (w, h))
            pb = b.read_region((0, 0), level, (w, h))
            assert pa.shape == (h, w, 3) and pa.dtype == np.uint8
            np.testing.assert_array_equal(pa, pb, err_msg=f"level {level}")
            assert pa.std() > 5, f"level {level} looks blank"
        # Physical reads and thumbnails agree too (same resampling code path).
        for target in (a.mpp, 1.0, 2.0):
            np.testing.assert_array_equal(
                a.read_tile(300, 200, 96, target), b.read_tile(300, 200, 96, target)
            )
        np.testing.assert_array_equal(a.get_thumbnail(mpp=8.0), b.get_thumbnail(mpp=8.0))


def test_read_tile_at_native_mpp_is_the_level_pixels(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        for level in range(slide.level_count):
            ds = int(slide.level_downsamples[level])
            x, y = 64 * ds, 96 * ds
            tile = slide.read_tile(x, y, 128, slide.level_mpp(level))
            assert slide.best_level_for_mpp(slide.level_mpp(level)) == level
            np.testing.assert_array_equal(tile, slide.read_region((x, y), level, (128, 128)))


def test_read_tile_scale(slide_case: SlideCase) -> None:
    """A tile at 2x the level-0 mpp is the 2x2 average of level-0 pixels."""
    with slide_case.open() as slide:
        x, y, n = 400, 300, 64
        tile = slide.read_tile(x, y, n, 2 * slide.mpp)
        assert tile.shape == (n, n, 3) and tile.dtype == np.uint8
        full = slide.read_region((x, y), 0, (2 * n, 2 * n)).astype(np.float64)
        expected = full.reshape(n, 2, n, 2, 3).mean(axis=(1, 3))
        diff = np.abs(tile - expected)
        if slide.best_level_for_mpp(2 * slide.mpp) == 0:
            assert diff.max() <= 1.0  # pure box averaging, rounding only
        else:
            assert diff.mean() < 3.0  # read from the stored level-1 JPEG


def test_read_tile_non_integer_scale(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        target = slide.mpp * 1.37
        tile = slide.read_tile(250, 250, 100, target)
        assert tile.shape == (100, 100, 3)
        # Covers 137 level-0 px: its mean colour matches the region it came from.
        region = slide.read_region((250, 250), 0, (137, 137))
        assert np.abs(tile.mean(axis=(0, 1)) - region.mean(axis=(0, 1))).max() < 3.0


def test_edge_tiles_are_padded_with_background(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        w, h = slide.dimensions
        n = 64
        target = 2 * slide.mpp
        tile = slide.read_tile(w - n, h - n, n, target)  # covers 128 px, half outside
        assert tile.shape == (n, n, 3)
        assert (tile[n // 2 + 2 :, :] == slide.background).all()
        assert (tile[:, n // 2 + 2 :] == slide.background).all()
        outside = slide.read_region((w + 10, h + 10), 0, (20, 20))
        assert (outside == slide.background).all()
        partial = slide.read_region((-5, -7), 0, (10, 10))
        assert (partial[:7] == slide.background).all()
        np.testing.assert_array_equal(partial[7:, 5:], slide.read_region((0, 0), 0, (5, 3)))


def test_thumbnail_shapes(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        w, h = slide.dimensions
        for mpp in (4.0, 8.0, 16.0):
            thumb = slide.get_thumbnail(mpp=mpp)
            s = mpp / slide.mpp
            assert thumb.shape == (math.ceil(h / s), math.ceil(w / s), 3)
        thumb = slide.get_thumbnail(size=(200, 150))
        assert thumb.shape[1] <= 200 and thumb.shape[0] <= 150
        assert 200 in thumb.shape[:2][::-1] or 150 in thumb.shape[:2]
        assert slide.get_thumbnail().shape[:2] <= (1024, 1024)


def test_thumbnail_matches_ground_truth_masks(slide_case: SlideCase) -> None:
    """Physical scale end to end: thumbnail tissue at mask_mpp overlaps the true mask."""
    truth = slide_case.synthetic
    if truth is None:  # the real slide: a tissue section filling most of the region
        with slide_case.open() as slide:
            assert 0.3 < tissue_from_rgb(slide.get_thumbnail(mpp=8.0)).mean() < 1.0
        return
    with slide_case.open() as slide:
        thumb = slide.get_thumbnail(mpp=truth.mask_mpp)
    assert thumb.shape[:2] == truth.tissue_mask.shape
    found = tissue_from_rgb(thumb)
    inter = (found & truth.tissue_mask).sum()
    union = (found | truth.tissue_mask).sum()
    assert inter / union > 0.9
    # Tumour is darker (denser nuclei) than the rest of the tissue.
    gray = thumb.mean(axis=-1)
    other = truth.tissue_mask & ~truth.tumour_mask
    if truth.tumour_mask.sum() > 20 and other.sum() > 20:
        assert gray[truth.tumour_mask].mean() < gray[other].mean() - 5


def test_thumbnail_is_area_average(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        thumb = slide.get_thumbnail(mpp=4 * slide.mpp).astype(np.float64)
        rows, cols = thumb.shape[:2]
        full = slide.read_region((0, 0), 0, (cols * 4, rows * 4)).astype(np.float64)
        expected = full.reshape(rows, 4, cols, 4, 3).mean(axis=(1, 3))
        diff = np.abs(thumb - expected)
        if slide.best_level_for_mpp(4 * slide.mpp) == 0:
            assert diff.max() <= 1.0
        else:
            assert diff.mean() < 3.0


def test_best_level_for_mpp(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        assert slide.best_level_for_mpp(slide.mpp / 4) == 0
        assert slide.best_level_for_mpp(slide.mpp) == 0
        top = slide.level_count - 1
        assert slide.best_level_for_mpp(slide.level_mpp(top) * 10) == top
        for level in range(1, slide.level_count):
            just_finer = slide.level_mpp(level) * 0.99
            assert slide.best_level_for_mpp(just_finer) == level - 1


def test_read_tiles_batch(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        coords = np.array([[0, 0], [200, 100], [500, 400]])
        batch = slide.read_tiles(coords, 48, 1.0)
        assert batch.shape == (3, 48, 48, 3)
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(batch[i], slide.read_tile(int(x), int(y), 48, 1.0))


def test_pickle_reopens_by_path(slide_case: SlideCase) -> None:
    with slide_case.open("tiffslide") as slide:
        clone = pickle.loads(pickle.dumps(slide))
        try:
            assert clone.backend == "tiffslide"
            assert clone.mpp == slide.mpp
            np.testing.assert_array_equal(
                clone.read_tile(100, 100, 32, 1.0), slide.read_tile(100, 100, 32, 1.0)
            )
        finally:
            clone.close()


def test_associated_images_only_on_request(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        names = slide.associated_image_names
        if slide_case.vendor == "aperio":
            assert {"label", "macro"} <= set(names)
            label = slide.associated_image("label")
            assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8
        with pytest.raises(KeyError, match="no associated image"):
            slide.associated_image("no-such-image")


def test_explicit_mpp_overrides_metadata(small_slide: SyntheticSlide) -> None:
    with open_slide(small_slide.path, mpp=0.3) as slide:
        assert slide.mpp == 0.3 and slide.mpp_source == "explicit"
        assert slide.read_tile(0, 0, 30, 0.6).shape == (30, 30, 3)


def test_invalid_requests(small_slide: SyntheticSlide) -> None:
    from wsi_mil.errors import ConfigError

    with open_slide(small_slide.path) as slide:
        with pytest.raises(ValueError, match="level 5 out of range"):
            slide.read_region((0, 0), 5, (10, 10))
        with pytest.raises(ValueError, match="target_mpp"):
            slide.read_tile(0, 0, 16, 0.0)
        with pytest.raises(ValueError, match="tile_px"):
            slide.read_tile(0, 0, 0, 1.0)
        with pytest.raises(ConfigError, match="not both"):
            slide.get_thumbnail(mpp=8.0, size=(10, 10))
    with pytest.raises(ConfigError, match="--backend"):
        open_slide(small_slide.path, backend="pyvips")
    with pytest.raises(ConfigError, match="--mpp"):
        open_slide(small_slide.path, mpp=-1)


def test_alpha_is_composited_onto_background() -> None:
    from wsi_mil.wsi.slide import _to_rgb

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (100, 50, 0, 255)  # opaque
    rgba[0, 1] = (100, 50, 0, 0)  # transparent -> background
    rgba[1, 0] = (0, 0, 0, 128)  # half
    out = _to_rgb(rgba, (250, 240, 230))
    assert out[0, 0].tolist() == [100, 50, 0]
    assert out[0, 1].tolist() == [250, 240, 230]
    assert out[1, 0].tolist() == [round(250 * 127 / 255), round(240 * 127 / 255), 115]


def test_background_colour_property() -> None:
    from wsi_mil.wsi.slide import _background

    assert _background({"openslide.background-color": "F0E0D0"}) == (240, 224, 208)
    assert _background({}) == (255, 255, 255)
    assert _background({"openslide.background-color": "zzzzzz"}) == (255, 255, 255)


def test_numpy_scalars_and_ome_slide_id(small_slide: SyntheticSlide, tmp_path) -> None:
    import shutil

    ome = tmp_path / "case-7.ome.tiff"
    shutil.copy(small_slide.path, ome)
    with open_slide(ome) as slide:
        assert slide.slide_id == "case-7"
        tile = slide.read_tile(np.int64(10), np.int64(20), np.int64(16), np.float32(1.0))
        assert tile.shape == (16, 16, 3)
        assert slide.get_thumbnail(size=(np.int64(64), np.int64(64))).shape[1] == 64


def test_non_integer_downsample(tmp_path) -> None:
    """Odd sizes give non-integer downsamples: level 0 agrees exactly, others closely."""
    from wsi_mil.wsi import make_synthetic_slide

    path = make_synthetic_slide(tmp_path / "odd.svs", 1031, 777, levels=2, level_factor=2).path
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        assert a.level_dimensions == ((1031, 777), (515, 388))
        assert a.level_downsamples[1] != 2.0
        for level in (0, 1):
            w, h = a.level_dimensions[level]
            np.testing.assert_array_equal(  # from the origin: no sub-pixel offset
                a.read_region((0, 0), level, (w, h)), b.read_region((0, 0), level, (w, h))
            )
        np.testing.assert_array_equal(
            a.read_tile(301, 203, 64, 0.5), b.read_tile(301, 203, 64, 0.5)
        )
        ta, tb = a.read_tile(301, 203, 64, 1.0), b.read_tile(301, 203, 64, 1.0)
        assert np.abs(ta.astype(int) - tb).mean() < 4.0


def test_slide_id_from_path() -> None:
    from wsi_mil.wsi import slide_id_from_path

    assert slide_id_from_path("/data/TCGA-01.svs") == "TCGA-01"
    assert slide_id_from_path("/data/case.7.OME.TIFF") == "case.7"
    assert slide_id_from_path("/data/case.ome.tif") == "case"
    assert slide_id_from_path("/data/case.tiff") == "case"
    assert slide_id_from_path("/dicom/case-12/1.2.840.10008.5.dcm") == "case-12"


def test_read_resampled_and_thumbnail_from_a_coarser_level(slide_case: SlideCase) -> None:
    with slide_case.open() as slide:
        # a square is read_tile; at the slide's own mpp it is the level-0 pixels
        np.testing.assert_array_equal(
            slide.read_resampled(300, 200, 96, 96, 1.0), slide.read_tile(300, 200, 96, 1.0)
        )
        np.testing.assert_array_equal(
            slide.read_resampled(16, 8, 120, 50, slide.mpp),
            slide.read_region((16, 8), 0, (120, 50)),
        )
        with pytest.raises(ValueError, match="must be positive"):
            slide.read_resampled(0, 0, 0, 10, 1.0)
        if slide.level_count < 2:
            return
        target = slide.level_mpp(1) / 1.2  # level 1 is 1.2x coarser than the thumbnail
        plain = slide.get_thumbnail(mpp=target)
        np.testing.assert_array_equal(slide.get_thumbnail(mpp=target, max_upsample=1.0), plain)
        enlarged = slide.get_thumbnail(mpp=target, max_upsample=1.5)
        assert enlarged.shape == plain.shape
        diff = np.abs(enlarged.astype(int) - plain.astype(int))
        assert 0 < diff.mean() < 6  # read from level 1 (not identical), the same picture
        with pytest.raises(ValueError, match="max_upsample"):
            slide.get_thumbnail(mpp=target, max_upsample=0.5)
