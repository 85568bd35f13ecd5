"""The synthetic slide generator: content, ground truth, pyramid, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.wsi import make_synthetic_slide, open_slide
from wsi_mil.wsi import synthetic as synth


def test_masks_match_geometry(tmp_path: Path) -> None:
    s = make_synthetic_slide(tmp_path / "a.svs", 1600, 900, mpp=0.5, mask_mpp=8.0)
    assert s.path.exists() and s.mask_mpp == 8.0
    assert s.tissue_mask.shape == (57, 100)  # ceil(900 * 0.5 / 8), ceil(1600 * 0.5 / 8)
    assert s.tissue_mask.dtype == bool and s.tumour_mask.dtype == bool
    assert not (s.tumour_mask & ~s.tissue_mask).any()
    assert 0.1 < s.tissue_mask.mean() < 0.9
    assert s.tumour_mask.any() and (s.tissue_mask & ~s.tumour_mask).any()


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_synthetic_slide(tmp_path / "a.svs", 512, 512, seed=3)
    b = make_synthetic_slide(tmp_path / "b.svs", 512, 512, seed=3)
    c = make_synthetic_slide(tmp_path / "c.svs", 512, 512, seed=4)
    np.testing.assert_array_equal(a.tissue_mask, b.tissue_mask)
    with open_slide(a.path) as sa, open_slide(b.path) as sb, open_slide(c.path) as sc:
        pa = sa.read_region((0, 0), 0, (512, 512))
        np.testing.assert_array_equal(pa, sb.read_region((0, 0), 0, (512, 512)))
        assert not np.array_equal(pa, sc.read_region((0, 0), 0, (512, 512)))


def test_any_region_renders_independently() -> None:
    scene = synth._make_scene(3000, 2000, 0.5, 7, 8.0)
    big = synth.render_region(scene, 1000, 600, 700, 500, 0.5)
    for x, y, w, h in [(1000, 600, 100, 100), (1333, 777, 211, 97), (1600, 1000, 100, 100)]:
        part = synth.render_region(scene, x, y, w, h, 0.5)
        np.testing.assert_array_equal(part, big[y - 600 : y - 600 + h, x - 1000 : x - 1000 + w])


def test_background_colour_is_shared_with_the_kernel() -> None:
    from wsi_mil.wsi import _render

    assert _render._BG == synth.BACKGROUND_RGB
    scene = synth._make_scene(512, 512, 0.5, 0, 8.0)
    corner = synth.render_region(scene, 0, 0, 4, 4, 0.5)  # tissue never reaches corners
    assert (corner == synth.BACKGROUND_RGB).all()


def test_content_looks_like_h_and_e(tmp_path: Path) -> None:
    s = make_synthetic_slide(tmp_path / "he.svs", 2048, 2048, mpp=0.5, seed=1)
    with open_slide(s.path) as slide:
        thumb = slide.get_thumbnail(mpp=s.mask_mpp).astype(int)
        full = slide.read_region((0, 0), 0, (2048, 2048)).astype(int)
    bg = thumb[~s.tissue_mask]
    tissue = thumb[s.tissue_mask & ~s.tumour_mask]
    assert bg.mean() > 225 and np.ptp(bg.mean(axis=0)) < 15  # near-white, neutral
    r, g, b = tissue.mean(axis=0)
    assert r > g and b > g  # pink / purple: red and blue over green
    # Level-0 detail: some pixels are dark purple nuclei.
    dark = full.mean(axis=-1) < 120
    assert 0.001 < dark.mean() < 0.2
    assert (full[dark][:, 2] > full[dark][:, 1]).mean() > 0.9


@pytest.mark.parametrize(("factor", "levels"), [(2, 4), (4, 2)])
def test_pyramid(tmp_path: Path, factor: int, levels: int) -> None:
    s = make_synthetic_slide(
        tmp_path / "p.svs", 1000, 700, mpp=0.25, levels=levels, level_factor=factor
    )
    with open_slide(s.path) as slide:
        assert slide.level_count == levels
        for k, (w, h) in enumerate(slide.level_dimensions):
            assert (w, h) == (1000 // factor**k, 700 // factor**k)
        assert slide.objective_power == 40
        assert slide.vendor == "aperio"


def test_auto_levels(tmp_path: Path) -> None:
    s = make_synthetic_slide(tmp_path / "auto.svs", 4096, 2048, mpp=1.0)
    with open_slide(s.path) as slide:
        assert slide.level_dimensions[-1][0] <= 1024 < slide.level_dimensions[-2][0]


def test_generic_flavour_has_no_vendor_metadata(tmp_path: Path) -> None:
    s = make_synthetic_slide(tmp_path / "g.tif", 600, 400, mpp=0.5, flavour="generic")
    with open_slide(s.path, backend="openslide") as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.associated_image_names == ()
        assert slide.mpp == pytest.approx(0.5)


def _peak_bytes(path: Path, width: int, height: int) -> int:
    tracemalloc.start()
    try:
        make_synthetic_slide(path, width, height, mpp=0.5, levels=3)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded(tmp_path: Path) -> None:
    """Writing streams tiles: peak memory does not grow with the slide's height."""
    short = _peak_bytes(tmp_path / "short.svs", 2048, 3072)
    tall = _peak_bytes(tmp_path / "tall.svs", 2048, 8192)
    assert tall < 1.25 * short
    assert tall < 2048 * 8192 * 3 / 2  # well under one copy of level 0 (48 MiB)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 8},
        {"mpp": 100.0},
        {"levels": 0},
        {"level_factor": 3},
        {"tile_px": 100},
        {"mask_mpp": 0},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"width": 512, "height": 512, **kwargs}
    with pytest.raises(ConfigError):
        make_synthetic_slide(tmp_path / "x.svs", **args)
    assert not (tmp_path / "x.svs").exists()


def test_no_partial_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_associated", boom)
    with pytest.raises(RuntimeError):
        make_synthetic_slide(tmp_path / "x.svs", 512, 512)
    assert list(tmp_path.iterdir()) == []
