"""Fast region reads for tiling.

:class:`RegionReader` reads level regions as RGB arrays. For slides opened with the
OpenSlide backend it calls ``openslide_read_region`` into a numpy buffer and converts the
premultiplied ARGB pixels to RGB (compositing transparent pixels onto the slide
background) in one numba pass, avoiding the PIL image and the two extra copies of the
generic path; the pixels are identical to ``Slide.read_region``. Other backends (or an
OpenSlide build without the low-level entry point) use ``Slide.read_region``. The reader
is safe to use from several threads (OpenSlide handles are thread-safe and the call
releases the GIL).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = ["RegionReader"]


@njit(cache=True, nogil=True)
def _argb_to_rgb(buf: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Premultiplied ARGB uint32 (h, w) → RGB uint8 (h, w, 3) over background ``bg``."""
    h, w = buf.shape
    out = np.empty((h, w, 3), np.uint8)
    for i in range(h):
        for j in range(w):
            v = np.uint32(buf[i, j])
            a = (v >> 24) & 255
            r = (v >> 16) & 255
            g = (v >> 8) & 255
            b = v & 255
            if a != 255:
                k = 255 - a
                r = r + (bg[0] * k + 127) // 255
                g = g + (bg[1] * k + 127) // 255
                b = b + (bg[2] * k + 127) // 255
            out[i, j, 0] = r if r < 255 else 255
            out[i, j, 1] = g if g < 255 else 255
            out[i, j, 2] = b if b < 255 else 255
    return out


class RegionReader:
    """Reads ``(h, w, 3)`` uint8 regions of one pyramid level of an open slide.

    Args:
        slide: An open :class:`wsi_mil.wsi.Slide`.
    """

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self._osr: Any = None
        self._bg = np.asarray(getattr(slide, "background", (255, 255, 255)), np.uint32)
        if getattr(slide, "backend", "") == "openslide":
            try:
                from openslide import lowlevel

                self._read = lowlevel._read_region
                self._osr = lowlevel.open(str(slide.path))
                self._close = lowlevel.close
            except (ImportError, AttributeError, OSError):
                self._osr = None

    @property
    def fast(self) -> bool:
        """True when the direct OpenSlide path is used."""
        return self._osr is not None

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Like ``Slide.read_region``: level-0 ``location``, ``size`` in level pixels.

        Returns:
            uint8 (height, width, 3) RGB; outside the slide is the slide background.
        """
        width, height = int(size[0]), int(size[1])
        if self._osr is None or width == 0 or height == 0:
            return np.asarray(self.slide.read_region(location, level, (width, height)))[..., :3]
        import ctypes

        buf = np.empty((height, width), np.uint32)
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        self._read(self._osr, ptr, int(location[0]), int(location[1]), level, width, height)
        return _argb_to_rgb(buf, self._bg)

    def close(self) -> None:
        """Release the private OpenSlide handle."""
        if self._osr is not None:
            self._close(self._osr)
            self._osr = None
