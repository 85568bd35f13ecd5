"""RegionReader: the direct OpenSlide path gives exactly Slide.read_region's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.tiling.reader import RegionReader


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_same_pixels_as_slide_read_region(slide_025, backend: str) -> None:
    from wsi_mil.wsi import open_slide

    with open_slide(slide_025.path, backend=backend) as slide:
        reader = RegionReader(slide)
        assert reader.fast == (backend == "openslide")
        try:
            w, h = slide.dimensions
            cases = [
                ((512, 768), 0, (300, 200)),
                ((w - 100, h - 50), 0, (300, 200)),  # runs past the slide: background
                ((1024, 1024), 1, (128, 96)),
                ((-40, -40), 0, (64, 64)),
            ]
            for location, level, size in cases:
                got = reader.read(location, level, size)
                ref = slide.read_region(location, level, size)
                assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
                assert np.array_equal(got, ref)
        finally:
            reader.close()
            reader.close()  # idempotent


def test_transparent_pixels_composite_onto_background() -> None:
    from wsi_mil.tiling.reader import _argb_to_rgb

    bg = np.array([240, 230, 220], np.uint32)
    buf = np.array([[0x00000000, 0xFF102030, 0x80402010]], np.uint32)  # premultiplied
    out = _argb_to_rgb(buf, bg)
    assert out[0, 0].tolist() == [240, 230, 220]
    assert out[0, 1].tolist() == [16, 32, 48]
    k = 255 - 0x80
    expect = [0x40 + (240 * k + 127) // 255, 0x20 + (230 * k + 127) // 255]
    assert out[0, 2, :2].tolist() == expect
