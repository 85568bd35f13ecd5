"""Thin adapters over the slide-reading libraries (OpenSlide and tiffslide).

Both adapters expose the same small surface, in *level* pixel coordinates, so that
:class:`wsi_mil.wsi.slide.Slide` does coordinate handling, clipping, background
compositing and resizing once, identically for every backend. The adapters raise the
libraries' own exceptions; :mod:`wsi_mil.wsi.slide` turns them into
:class:`~wsi_mil.errors.SlideOpenError` with the file name and a fix.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ["BACKENDS", "Backend", "OpenSlideBackend", "TiffSlideBackend", "open_backend"]

#: Backend names in the order ``backend="auto"`` tries them.
BACKENDS = ("openslide", "tiffslide")


class Backend(Protocol):
    """What :class:`~wsi_mil.wsi.slide.Slide` needs from a slide library."""

    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    vendor: str
    associated_names: tuple[str, ...]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        """Pixels ``[x, x + width) x [y, y + height)`` of ``level`` (in bounds).

        Returns:
            uint8 (height, width, 3) RGB or (height, width, 4) RGBA (non-premultiplied).
        """
        ...

    def associated(self, name: str) -> NDArray[np.uint8]:
        """An associated image as uint8 (rows, cols, 3 or 4)."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


class OpenSlideBackend:
    """OpenSlide (via openslide-python and openslide-bin)."""

    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = _dims(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {str(k): str(v) for k, v in self._slide.properties.items()}
        self.vendor = self.properties.get("openslide.vendor") or "unknown"
        self.associated_names = tuple(sorted(self._slide.associated_images))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        ds = self.level_downsamples[level]
        # OpenSlide divides the level-0 location by the downsample and resamples any
        # fractional remainder; with an integer downsample round() is exact, otherwise
        # the nearest level-0 pixel keeps the shift below half a level-0 pixel.
        loc = (round(x * ds), round(y * ds))
        region = self._slide.read_region(loc, level, (width, height))
        return np.asarray(region)

    def associated(self, name: str) -> NDArray[np.uint8]:
        return np.asarray(self._slide.associated_images[name])

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    """tiffslide (pure Python: tifffile + zarr + imagecodecs)."""

    name = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        self.level_dimensions = _dims(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {
            str(k): str(v) for k, v in self._slide.properties.items() if v is not None
        }
        self.vendor = self.properties.get("tiffslide.vendor") or "generic-tiff"
        self.associated_names = tuple(sorted(self._slide.associated_images))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        ds = self.level_downsamples[level]
        # tiffslide truncates location / downsample; ceil maps back onto (x, y) exactly.
        loc = (math.ceil(x * ds - 1e-6), math.ceil(y * ds - 1e-6))
        arr = self._slide.read_region(loc, level, (width, height), as_array=True, padding=False)
        arr = np.asarray(arr, dtype=None)
        if arr.dtype != np.uint8:
            raise TypeError(f"unsupported pixel type {arr.dtype}; only 8-bit RGB slides")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return arr.astype(np.uint8, copy=False)

    def associated(self, name: str) -> NDArray[np.uint8]:
        return np.asarray(self._slide.associated_images[name])

    def close(self) -> None:
        self._slide.close()


def _dims(dims: object) -> tuple[tuple[int, int], ...]:
    return tuple((int(w), int(h)) for w, h in dims)  # type: ignore[attr-defined]


def open_backend(path: str, name: str) -> Backend:
    """Open ``path`` with the backend called ``name`` (one of :data:`BACKENDS`).

    Raises:
        Whatever the library raises for an unreadable file.
    """
    if name == "openslide":
        return OpenSlideBackend(path)
    if name == "tiffslide":
        return TiffSlideBackend(path)
    raise ValueError(f"unknown backend {name!r}")
