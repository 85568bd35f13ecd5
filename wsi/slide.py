"""Open a whole-slide image and read it at a physical resolution.

:func:`open_slide` returns a :class:`Slide`: one object whatever the file format or the
library behind it (OpenSlide or tiffslide). It does coordinate handling, clipping at the
slide edge, compositing of transparent pixels onto the slide background and resampling
itself, so both backends return the same pixels for the same request. (One exception:
on a level whose downsample is not an integer, OpenSlide resamples sub-pixel offsets
of a level-0 location itself, so reads there can differ from tiffslide's by a fraction
of a pixel; level 0 and integer-downsample levels agree exactly.)

Conventions: ``(x, y)`` locations are level-0 pixels, sizes are ``(width, height)``,
arrays are ``(rows, cols, 3)`` RGB uint8.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_mil.errors import ConfigError, SlideOpenError
from wsi_mil.wsi.backends import BACKENDS, Backend, open_backend
from wsi_mil.wsi.mpp import resolve_mpp
from wsi_mil.wsi.tiff import inspect_tiff

__all__ = ["OPENSLIDE_ONLY", "Slide", "open_slide", "slide_id_from_path"]

#: Formats that only OpenSlide reads (file suffix -> format name). ``backend="auto"``
#: opens them with OpenSlide alone, and ``backend="tiffslide"`` refuses them.
OPENSLIDE_ONLY = {
    ".ndpi": "Hamamatsu NDPI",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".mrxs": "3DHISTECH MRXS",
    ".dcm": "DICOM WSI",
}

#: Relative tolerance when comparing a level's µm/px with a target.
MPP_RTOL = 1e-3
#: Extra level pixels read around a resampled region so that the result does not
#: depend on how a larger read is split.
_MARGIN = 3
#: Level pixels per band when building a thumbnail (bounds memory on huge levels).
_BAND_PIXELS = 1 << 24


def open_slide(
    path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None
) -> Slide:
    """Open a whole-slide image.

    Args:
        path: The slide file (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...).
        backend: ``"openslide"``, ``"tiffslide"`` or ``"auto"`` (OpenSlide, then
            tiffslide if OpenSlide cannot read the file).
        mpp: Level-0 µm/px; overrides whatever the metadata says.

    Returns:
        The open slide; close it (or use it as a context manager) when done.

    Raises:
        SlideOpenError: Missing, empty, truncated, or unreadable file.
        MissingMPPError: No plausible µm/px in the metadata and ``mpp`` not given.
        ConfigError: Unknown ``backend`` or invalid ``mpp``.
    """
    return Slide(path, backend=backend, mpp=mpp)


class Slide:
    """An open whole-slide image (see :func:`open_slide`).

    Attributes:
        path: The slide file.
        slide_id: The file name without its extension (see :func:`slide_id_from_path`).
        backend: ``"openslide"`` or ``"tiffslide"``.
        dimensions: Level-0 ``(width, height)``.
        level_count: Number of pyramid levels.
        level_dimensions: ``(width, height)`` of each level.
        level_downsamples: Level-0 pixels per level pixel, per level.
        mpp: Level-0 µm/px.
        mpp_source: Where ``mpp`` came from (``"explicit"``, ``"openslide.mpp-x"``, ...).
        vendor: Format vendor reported by the backend (``"aperio"``, ``"generic-tiff"``...).
        objective_power: Scanner objective magnification, if recorded.
        properties: Backend metadata, ``str -> str``.
        background: RGB colour that transparent and out-of-slide pixels become.
    """

    def __init__(
        self, path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None
    ) -> None:
        self.path = Path(path)
        self._mpp_arg = mpp
        _check_file(self.path)
        names = _backend_names(backend, self.path)
        tiff = inspect_tiff(self.path)
        self._b: Backend = _open_any(self.path, names, tiff.problem)
        try:
            props = dict(self._b.properties)
            for key, value in tiff.tags.items():
                props.setdefault(key, value)
            found = resolve_mpp(self.path, props, mpp)
        except BaseException:
            self._b.close()
            raise
        self.mpp = float(found.value)
        self.mpp_source = found.source
        self.properties: dict[str, str] = dict(self._b.properties)
        self.background = _background(self.properties)
        self.objective_power = _objective_power(self.properties)

    # ----------------------------------------------------------------- metadata

    @property
    def slide_id(self) -> str:
        return slide_id_from_path(self.path)

    @property
    def backend(self) -> str:
        return self._b.name

    @property
    def vendor(self) -> str:
        return self._b.vendor

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._b.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._b.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._b.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._b.level_downsamples

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        """Names of the associated images (``label``, ``macro``...); never their pixels."""
        return self._b.associated_names

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.mpp * self.level_downsamples[self._check_level(level)]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose µm/px is at or finer than ``target_mpp``.

        A level within :data:`MPP_RTOL` of the target counts as at the target. Level 0
        when the target is finer than level 0.
        """
        _check_positive("target_mpp", target_mpp)
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if self.mpp * ds <= target_mpp * (1 + MPP_RTOL):
                best = level if ds >= self.level_downsamples[best] else best
        return best

    # ------------------------------------------------------------------- pixels

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """Pixels of one pyramid level, as stored (no resampling).

        Args:
            location: Level-0 ``(x, y)`` of the top-left corner; snapped to the
                nearest pixel of ``level``.
            level: Pyramid level.
            size: ``(width, height)`` in pixels of ``level``.

        Returns:
            uint8 (height, width, 3) RGB; pixels outside the slide or transparent are
            the slide background.
        """
        level = self._check_level(level)
        width, height = (int(v) for v in size)
        if width < 0 or height < 0:
            raise ValueError(f"read_region size {size} must be non-negative")
        ds = self.level_downsamples[level]
        x, y = (round(v / ds) for v in location)
        return self._read_level(level, x, y, width, height)

    def read_tile(self, x: int, y: int, tile_px: int, target_mpp: float) -> NDArray[np.uint8]:
        """A square tile at a physical resolution.

        Reads the best level at or finer than ``target_mpp`` and resamples (area
        averaging when shrinking, bicubic when enlarging). Parts outside the slide are
        the slide background.

        Args:
            x: Level-0 x of the tile's top-left corner.
            y: Level-0 y of the tile's top-left corner.
            tile_px: Output side in pixels.
            target_mpp: µm/px of the output; the tile covers
                ``tile_px * target_mpp / mpp`` level-0 pixels.

        Returns:
            uint8 (tile_px, tile_px, 3) RGB.
        """
        tile_px = int(tile_px)
        if tile_px <= 0:
            raise ValueError(f"tile_px must be positive, got {tile_px}")
        level = self.best_level_for_mpp(target_mpp)
        ds = self.level_downsamples[level]
        span = tile_px * target_mpp / self.mpp / ds  # tile side in level pixels
        return self._resampled(level, x / ds, y / ds, span, span, tile_px, tile_px)

    def read_resampled(
        self, x: float, y: float, width: int, height: int, mpp: float
    ) -> NDArray[np.uint8]:
        """A rectangle at a physical resolution (see :meth:`read_tile`).

        Output pixel ``(r, c)`` covers level-0 ``[x + c * s, x + (c + 1) * s) x
        [y + r * s, y + (r + 1) * s)`` with ``s = mpp / self.mpp``; the best level at or
        finer than ``mpp`` is read once and resampled.

        Returns:
            uint8 (height, width, 3) RGB.
        """
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"read_resampled size {width}x{height} must be positive")
        level = self.best_level_for_mpp(mpp)
        step = mpp / self.mpp / self.level_downsamples[level]  # level px per output px
        ds = self.level_downsamples[level]
        return self._resampled(level, x / ds, y / ds, width * step, height * step, width, height)

    def read_tiles(
        self, coords: Sequence[tuple[int, int]] | NDArray[np.integer], tile_px: int,
        target_mpp: float,
    ) -> NDArray[np.uint8]:  # fmt: skip
        """Several tiles (see :meth:`read_tile`).

        Args:
            coords: (n, 2) level-0 ``(x, y)`` top-left corners.

        Returns:
            uint8 (n, tile_px, tile_px, 3).
        """
        xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(xy), tile_px, tile_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(xy):
            out[i] = self.read_tile(int(x), int(y), tile_px, target_mpp)
        return out

    def get_thumbnail(
        self,
        mpp: float | None = None,
        size: tuple[int, int] | None = None,
        *,
        max_upsample: float = 1.0,
    ) -> NDArray[np.uint8]:
        """The whole slide at low resolution.

        Output pixel ``(r, c)`` covers level-0 ``[c * s, (c + 1) * s) x [r * s, (r + 1) * s)``
        with ``s = mpp / self.mpp`` (the last row/column may extend past the slide into
        background).

        Args:
            mpp: µm/px of the thumbnail; its shape is
                ``(ceil(height / s), ceil(width / s))``.
            size: Instead of ``mpp``: fit within this ``(width, height)``, keeping the
                aspect ratio. Default when neither is given: 1024 x 1024.
            max_upsample: Read a pyramid level up to this factor coarser than the
                thumbnail and enlarge it (bicubic) when that level is coarser than the
                best level at or finer than it: fewer pixels to decode, slightly less
                detail. 1 (the default) never enlarges.

        Returns:
            uint8 (rows, cols, 3) RGB.
        """
        width, height = self.dimensions
        if mpp is not None and size is not None:
            raise ConfigError("get_thumbnail: pass mpp or size, not both")
        if mpp is not None:
            _check_positive("mpp", mpp)
            scale = mpp / self.mpp
            out_w, out_h = _ceil(width / scale), _ceil(height / scale)
        else:
            max_w, max_h = size if size is not None else (1024, 1024)
            _check_positive("size", min(max_w, max_h))
            scale = max(width / max_w, height / max_h)
            out_w = min(int(max_w), _ceil(width / scale))
            out_h = min(int(max_h), _ceil(height / scale))
        if max_upsample < 1:
            raise ValueError(f"max_upsample must be >= 1, got {max_upsample}")
        level = self.best_level_for_mpp(scale * self.mpp * max_upsample)
        step = scale / self.level_downsamples[level]  # level pixels per output pixel
        band = max(1, int(_BAND_PIXELS / max(1.0, out_w * step * step)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for r0 in range(0, out_h, band):
            rows = min(band, out_h - r0)
            out[r0 : r0 + rows] = self._resampled(
                level, 0.0, r0 * step, out_w * step, rows * step, out_w, rows
            )
        return out

    def associated_image(self, name: str) -> NDArray[np.uint8]:
        """An associated image (``label``, ``macro``, ``thumbnail``...) by explicit name.

        Labels and macros can show patient names: they are never read implicitly.

        Returns:
            uint8 (rows, cols, 3) RGB, transparency composited onto white.
        """
        if name not in self.associated_image_names:
            raise KeyError(
                f"{self.path}: no associated image {name!r}; "
                f"available: {', '.join(self.associated_image_names) or 'none'}"
            )
        try:
            arr = self._b.associated(name)
        except Exception as exc:
            raise self._read_error(f"associated image {name!r}", exc) from exc
        return _to_rgb(arr, (255, 255, 255))

    # ---------------------------------------------------------------- internals

    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (0-{self.level_count - 1})")
        return level

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> NDArray:
        """Level pixels ``[x, x + width) x [y, y + height)``; outside is background."""
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        out = None
        if not inside:
            out = np.empty((height, width, 3), dtype=np.uint8)
            out[:] = self.background
            if x1 <= x0 or y1 <= y0:
                return out
        try:
            arr = self._b.read(level, x0, y0, x1 - x0, y1 - y0)
        except Exception as exc:
            where = f"level {level} region ({x0}, {y0}) {x1 - x0}x{y1 - y0}"
            raise self._read_error(where, exc) from exc
        rgb = _to_rgb(arr, self.background)
        if out is None:  # wholly inside the level: no background to fill
            rgb = np.ascontiguousarray(rgb)
            return rgb if rgb.flags.writeable and rgb.base is None else rgb.copy()
        out[y0 - y : y1 - y, x0 - x : x1 - x] = rgb
        return out

    def _resampled(
        self, level: int, fx: float, fy: float, fw: float, fh: float, out_w: int, out_h: int
    ) -> NDArray[np.uint8]:
        """Level region ``[fx, fx + fw) x [fy, fy + fh)`` (fractional) at ``out_w x out_h``."""
        ix, iy = round(fx), round(fy)
        exact = abs(fw - out_w) < 1e-6 and abs(fh - out_h) < 1e-6
        if exact and abs(fx - ix) < 1e-6 and abs(fy - iy) < 1e-6:
            return self._read_level(level, ix, iy, out_w, out_h)
        from PIL import Image

        x0, y0 = math.floor(fx) - _MARGIN, math.floor(fy) - _MARGIN
        x1, y1 = math.ceil(fx + fw) + _MARGIN, math.ceil(fy + fh) + _MARGIN
        region = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        shrink = fw > out_w or fh > out_h
        resample = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
        box = (fx - x0, fy - y0, fx - x0 + fw, fy - y0 + fh)
        img = Image.fromarray(region).resize((out_w, out_h), resample, box=box)
        return np.asarray(img)

    def _read_error(self, what: str, exc: BaseException) -> SlideOpenError:
        other = "openslide" if self.backend == "tiffslide" else "tiffslide"
        hint = "" if self.path.suffix.lower() in OPENSLIDE_ONLY else f", or try --backend {other}"
        return SlideOpenError(
            f"{self.path}: cannot read {what} with {self.backend} "
            f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt: "
            f"copy it again{hint}"
        )

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the file. Safe to call more than once."""
        if getattr(self, "_b", None) is not None:
            self._b.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "backend": self.backend, "mpp": self._mpp_arg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], backend=state["backend"], mpp=state["mpp"])  # type: ignore[misc]

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, {w}x{h}, "
            f"levels={self.level_count}, mpp={self.mpp:g})"
        )


# ------------------------------------------------------------------- helpers


def _ceil(value: float) -> int:
    return max(1, math.ceil(value - 1e-9))


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file; check the path (or the slide_path column)")
    if path.is_dir():
        raise SlideOpenError(
            f"{path}: is a directory, not a slide file; pass the slide file itself "
            "(for MRXS the .mrxs file, for DICOM one .dcm file of the slide)"
        )
    if path.stat().st_size == 0:
        raise SlideOpenError(
            f"{path}: file is empty (0 bytes); the copy or download is incomplete: "
            "copy the slide again from its source"
        )


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """Slide identifier of a file: its name without the extension (``.ome.tif(f)`` counts
    as one extension); for a DICOM file, the name of its folder (a DICOM slide is a folder
    of ``.dcm`` files named by UIDs, one per pyramid level)."""
    if Path(path).suffix.lower() == ".dcm" and Path(path).parent.name:
        return Path(path).parent.name
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _backend_names(backend: str, path: Path) -> tuple[str, ...]:
    """Backends to try for ``path``, in order."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"--backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}")
    only = OPENSLIDE_ONLY.get(path.suffix.lower())
    if only is None:
        return BACKENDS if backend == "auto" else (backend,)
    if backend == "tiffslide":
        raise SlideOpenError(
            f"{path}: {only} slides are read only by OpenSlide, not tiffslide; "
            "use --backend openslide (or auto)"
        )
    return ("openslide",)


def _open_any(path: Path, names: tuple[str, ...], tiff_problem: str | None) -> Backend:
    """Open with the first backend in ``names`` that can read the file."""
    failures = [f"tifffile: {tiff_problem}"] if tiff_problem else []
    only = OPENSLIDE_ONLY.get(path.suffix.lower())
    for name in names:
        try:
            opened = open_backend(str(path), name)
        except ImportError as exc:
            if only:
                raise SlideOpenError(
                    f"{path}: {only} slides need OpenSlide, which is not installed ({exc}); "
                    "install it with: pip install openslide-python openslide-bin"
                ) from exc
            failures.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}".strip())
            continue
        if opened.level_dimensions and min(opened.level_dimensions[0]) > 0:
            return opened
        opened.close()
        failures.append(f"{name}: no image levels")
    if only:
        raise SlideOpenError(
            f"{path}: OpenSlide cannot read this {only} file ({'; '.join(failures)}); "
            f"{_OPENSLIDE_ONLY_HINT.get(path.suffix.lower(), '')}check that the copy is "
            "complete and copy it again if needed"
        )
    raise SlideOpenError(
        f"{path}: not a readable whole-slide image ({'; '.join(failures)}); check that it "
        "is a complete SVS/NDPI/MRXS/SCN/tiled-TIFF/DICOM file (a partial copy also "
        "gives this error) and copy it again if needed"
    )


_OPENSLIDE_ONLY_HINT = {
    ".mrxs": "an MRXS slide is the .mrxs file plus a folder of the same name (Slidedat.ini, "
    "Data*.dat) beside it: copy both; ",
    ".dcm": "a DICOM slide is a folder of .dcm files (one per pyramid level and associated "
    "image): keep them together and pass any one of them; ",
    ".vms": "a VMS slide needs the image files it lists beside it; ",
    ".vmu": "a VMU slide needs the image files it lists beside it; ",
}


def _to_rgb(arr: NDArray[np.uint8], background: tuple[int, int, int]) -> NDArray[np.uint8]:
    """RGB from RGB or non-premultiplied RGBA, compositing alpha onto ``background``."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 3:
        return arr
    rgb, alpha = arr[..., :3], arr[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32)
    mixed = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return mixed.astype(np.uint8)


def _background(props: dict[str, str]) -> tuple[int, int, int]:
    text = props.get("openslide.background-color") or props.get("tiffslide.background-color")
    if text and len(text.strip()) == 6:
        try:
            value = int(text.strip(), 16)
        except ValueError:
            return (255, 255, 255)
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    return (255, 255, 255)


def _objective_power(props: dict[str, str]) -> float | None:
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None
