"""Zoomable outputs: a pyramidal tiled TIFF of the overlay and Deep Zoom (DZI) images.

* ``<slide_id>_overlay.tif`` — the colour-mapped scores (white where there is none) as a
  tiled, JPEG-compressed pyramid whose level 0 has the slide's level-0 size, so pixel
  ``(x, y)`` of the overlay is pixel ``(x, y)`` of the slide at every level (each level
  halves the previous one, sizes rounded up). The µm/px of each level is in the
  resolution tags. OpenSlide (generic tiled TIFF), tiffslide and QuPath open it. Every
  tile is sampled from the score raster (the overlay holds no more than the raster), a
  tile lying within one raster colour is encoded once per colour and reused, and tiles
  are encoded in a few threads, so memory stays small and time follows the number of
  distinct tiles, not the slide's area alone.
* Deep Zoom: ``<name>.dzi`` (XML) and ``<name>_files/<level>/<col>_<row>.<ext>`` with
  256 px tiles and no overlap; level ``L`` is the image downsampled ``2**(max - L)``.
  The full-size level is read once, in strips of 256 rows; each coarser level is the
  previous one halved (2 x 2 box, sizes rounded up) as the strips stream through, so
  nothing is read twice and memory holds a few strips per level.
"""

from __future__ import annotations

import io
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.outputs import atomic_path

__all__ = ["TILE", "dzi_levels", "encode_threads", "write_dzi", "write_overlay_tiff"]

TILE = 256
_JPEG_TIFF = 90  # the TIFF's JPEG quality
_JPEG_DZI = 85  # the Deep Zoom tiles' JPEG quality


def encode_threads() -> int:
    """Threads encoding tiles: the CPUs this process may use, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cpus or 1))


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """Level sizes from ``(width, height)`` halving (rounded up) until one tile fits."""
    sizes = [(width, height)]
    while max(sizes[-1]) > TILE:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def _index(length: int, downsample: float, raster_scale: float, n: int) -> np.ndarray:
    """(ceil(length / TILE) * TILE,) raster index under each level pixel ``j``, whose
    centre is level-0 ``(j + 0.5) * downsample`` (clipped to the raster's ``n``)."""
    j = np.arange(-(-length // TILE) * TILE) + 0.5
    return np.clip((j * downsample / raster_scale).astype(np.int64), 0, n - 1)


def _raster_tiles(
    rgb: np.ndarray,
    raster_scale: float,
    size: tuple[int, int],
    downsample: float,
    encode: Callable[[np.ndarray], bytes],
    cache: dict[bytes, bytes],
) -> Iterator[np.ndarray | bytes]:
    """Tiles of one pyramid level, row by row, sampled from ``rgb`` (rows, cols, 3).

    Level pixel ``j`` has its centre at level-0 ``(j + 0.5) * downsample`` and takes the
    raster pixel under that centre. A tile whose raster pixels all have one colour is
    yielded as its encoded bytes (encoded once per colour, kept in ``cache``); any other
    as a (TILE, TILE, 3) array to encode.
    """
    width, height = size
    rows, cols = rgb.shape[:2]
    row_index = _index(height, downsample, raster_scale, rows)
    col_index = _index(width, downsample, raster_scale, cols)
    for y0 in range(0, height, TILE):
        ri = row_index[y0 : y0 + TILE]
        band = rgb[ri[0] : ri[-1] + 1]
        strip = None
        for x0 in range(0, width, TILE):
            ci = col_index[x0 : x0 + TILE]
            block = band[:, ci[0] : ci[-1] + 1]
            first = block[0, 0]
            if (block == first).all():
                key = first.tobytes()
                if key not in cache:
                    cache[key] = encode(np.broadcast_to(first, (TILE, TILE, 3)).copy())
                yield cache[key]
                continue
            if strip is None:
                strip = rgb[ri]  # (TILE, cols, 3): the rows of this band of tiles
            yield np.take(strip, ci, axis=1)


def _in_threads(items: Iterator[Any], work: Callable[[Any], Any], threads: int) -> Iterator[Any]:
    """``work(item)`` for each item in order, ``threads`` at a time; ``bytes`` items pass
    through unchanged. At most ``4 * threads`` items are in flight (bounded memory)."""
    if threads <= 1:
        for item in items:
            yield item if isinstance(item, bytes) else work(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(item if isinstance(item, bytes) else pool.submit(work, item))
            while len(pending) > 4 * threads:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())


def _result(item: Any) -> Any:
    return item.result() if isinstance(item, Future) else item


def _encode_tiff_tile(tile: np.ndarray) -> bytes:
    """A tile as the TIFF's JPEG segment (what tifffile writes: YCbCr 4:2:0)."""
    import imagecodecs

    return bytes(
        imagecodecs.jpeg8_encode(
            tile, level=_JPEG_TIFF, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
    )


def write_overlay_tiff(
    path: Path,
    rgb: np.ndarray,
    raster_scale: float,
    dimensions: tuple[int, int],
    slide_mpp: float,
    description: str,
    *,
    threads: int | None = None,
) -> Path:
    """Write the overlay as a pyramidal tiled TIFF aligned with the slide's level 0.

    Args:
        path: Output ``.tif`` (written atomically).
        rgb: (rows, cols, 3) uint8 colours of the score raster (white where no score).
        raster_scale: Level-0 px per raster px.
        dimensions: Slide level-0 ``(width, height)``.
        slide_mpp: Level-0 µm/px (resolution tags).
        description: ImageDescription of level 0.
        threads: Tile-encoding threads (default :func:`encode_threads`); the file does
            not depend on it.
    """
    import tifffile

    width, height = dimensions
    sizes = _level_sizes(width, height)
    big = width * height * 3 > 2**31
    threads = threads or encode_threads()
    cache: dict[bytes, bytes] = {}
    rgb = np.ascontiguousarray(rgb)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        for level, (w, h) in enumerate(sizes):
            downsample = 2.0**level
            per_cm = 1e4 / (slide_mpp * downsample)
            tiles = _raster_tiles(rgb, raster_scale, (w, h), downsample, _encode_tiff_tile, cache)
            tw.write(
                _in_threads(tiles, _encode_tiff_tile, threads),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": _JPEG_TIFF},
                subsampling=(2, 2),
                subfiletype=0 if level == 0 else 1,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                description=description if level == 0 else None,
                metadata=None,
            )
    return path


def dzi_levels(width: int, height: int) -> int:
    """Index of the full-size Deep Zoom level, ``ceil(log2(max(width, height)))``."""
    return max(0, math.ceil(math.log2(max(width, height, 1))))


def _half(rows: np.ndarray) -> np.ndarray:
    """(h, w, C) uint8 halved by 2 x 2 box averaging to (ceil(h/2), ceil(w/2), C).

    RGBA is averaged with premultiplied alpha (transparent pixels lend no colour).
    """
    from PIL import Image

    return np.asarray(Image.fromarray(rows).reduce(2))


def _uniform(tile: np.ndarray) -> bool:
    """Whether every pixel of ``tile`` (h, w, C) is the same (a sparse look first).

    Each row is compared as one run of ``w * C`` bytes (fast), which needs the pixels of
    a row to be contiguous, as in a column slice of a C-contiguous band.
    """
    first = tile[0, 0]
    if not (tile[::16, ::16] == first).all():
        return False
    h, w, c = tile.shape
    if tile.strides[1:] != (c, 1):
        tile = np.ascontiguousarray(tile)
    rows = np.lib.stride_tricks.as_strided(tile, (h, w * c), (tile.strides[0], 1))
    return bool((rows == np.tile(first, w)).all())


class _TileWriter:
    """Encodes and writes Deep Zoom tiles, a band of tiles per task in a few threads;
    a uniform tile is encoded once per colour and size and its bytes reused."""

    def __init__(self, fmt: str, threads: int) -> None:
        self.fmt = fmt
        self.ext = "jpeg" if fmt == "jpeg" else "png"
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.pending: deque[Future[None]] = deque()
        self.limit = 2 * threads
        self.cache: dict[tuple[Any, ...], bytes] = {}

    def encode(self, tile: np.ndarray) -> bytes:
        """JPEG (quality 85, YCbCr 4:2:0, as browsers expect) or PNG bytes of a tile."""
        if self.fmt == "jpeg":
            import imagecodecs

            return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(tile), level=_JPEG_DZI))
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(tile)).save(buf, format="PNG")
        return buf.getvalue()

    def put(self, band: np.ndarray, folder: Path, row: int) -> None:
        """Write tile row ``row`` of ``band`` (h, width, C), which is not changed after."""
        width = band.shape[1]
        if self.pool is None:
            self._write(band, folder, row, 0, width)
            return
        step = max(TILE, -(-width // (2 * self.limit * TILE)) * TILE)  # a few tasks a band
        for x in range(0, width, step):
            self.pending.append(self.pool.submit(self._write, band, folder, row, x, step))
        while len(self.pending) > 2 * self.limit:
            self.pending.popleft().result()

    def _write(self, band: np.ndarray, folder: Path, row: int, x: int, step: int) -> None:
        """Tiles of ``band`` from column ``x`` (px) over ``step`` px."""
        end = min(x + step, band.shape[1])
        for col, x0 in enumerate(range(x, end, TILE), start=x // TILE):
            tile = band[:, x0 : x0 + TILE]
            if _uniform(tile):
                key = (tile.shape, tile[0, 0].tobytes())
                data = self.cache.get(key)
                if data is None:
                    data = self.cache[key] = self.encode(tile)
            else:
                data = self.encode(tile)
            (folder / f"{col}_{row}.{self.ext}").write_bytes(data)

    def close(self) -> None:
        """Wait for every tile; raise the first error of any."""
        error: BaseException | None = None
        while self.pending:
            exc = self.pending.popleft().exception()
            error = error or exc
        if self.pool is not None:
            self.pool.shutdown()
        if error is not None:
            raise error


class _Level:
    """One Deep Zoom level fed rows top to bottom; writes its tiles, feeds the next."""

    def __init__(self, folder: Path, writer: _TileWriter, coarser: _Level | None) -> None:
        folder.mkdir(parents=True)
        self.folder, self.writer, self.below = folder, writer, coarser
        self.band: np.ndarray | None = None  # rows not yet written as tiles
        self.odd: np.ndarray | None = None  # a row waiting for its pair to be halved
        self.row = 0

    def push(self, rows: np.ndarray) -> None:
        self.band = rows if self.band is None else np.concatenate([self.band, rows])
        while len(self.band) >= TILE:
            self._tiles(self.band[:TILE])
            self.band = self.band[TILE:]
        if self.below is not None:
            both = rows if self.odd is None else np.concatenate([self.odd, rows])
            even = len(both) // 2 * 2
            if even:
                self.below.push(_half(both[:even]))
            self.odd = both[even:] if len(both) > even else None

    def finish(self) -> None:
        if self.band is not None and len(self.band):
            self._tiles(self.band)
        if self.below is not None:
            if self.odd is not None:
                self.below.push(_half(self.odd))
            self.below.finish()

    def _tiles(self, band: np.ndarray) -> None:
        self.writer.put(band, self.folder, self.row)
        self.row += 1


def _stream(
    rows: Callable[[int, int], np.ndarray], width: int, height: int, full: _Level, readers: int
) -> None:
    """Push the full-size image into ``full`` strip by strip, ``readers`` strips read
    ahead in as many threads."""
    starts = iter(range(0, height, TILE))
    with ThreadPoolExecutor(readers) as pool:
        ahead: deque[tuple[int, Future[np.ndarray]]] = deque()
        for y in starts:
            ahead.append((y, pool.submit(rows, y, min(TILE, height - y))))
            if len(ahead) < readers:
                continue
            _push(full, width, height, *ahead.popleft())
        while ahead:
            _push(full, width, height, *ahead.popleft())
    full.finish()


def _push(full: _Level, width: int, height: int, y: int, future: Future[np.ndarray]) -> None:
    strip = future.result()
    if strip.shape[:2] != (min(TILE, height - y), width):
        raise ValueError(
            f"write_dzi: rows({y}) gave shape {strip.shape}, "
            f"expected {min(TILE, height - y)} rows of {width} px"
        )
    full.push(np.ascontiguousarray(strip))


def write_dzi(
    path: Path,
    size: tuple[int, int],
    rows: Callable[[int, int], np.ndarray],
    fmt: str,
    *,
    threads: int | None = None,
) -> Path:
    """Write a Deep Zoom image.

    Args:
        path: Output ``<name>.dzi``; tiles go to ``<name>_files/`` (both atomic).
        size: Full-size ``(width, height)`` of the image.
        rows: ``rows(y, h)`` returns (h, width, C) uint8, rows ``[y, y + h)`` of the
            full-size image; called once per strip of at most 256 rows, in order, from
            ``threads`` reader threads at once (so it must be thread-safe).
        fmt: ``"jpeg"`` (RGB) or ``"png"`` (RGBA allowed).
        threads: Reading and tile-encoding threads (default :func:`encode_threads`);
            the files do not depend on it.

    Returns:
        ``path``.
    """
    width, height = size
    top = dzi_levels(width, height)
    files = path.with_name(f"{path.stem}_files")
    threads = threads or encode_threads()
    writer = _TileWriter(fmt, threads)
    with atomic_path(files) as tmp_dir:
        try:
            level: _Level | None = None
            for index in range(top + 1):  # from 1 x 1 px to full size
                level = _Level(tmp_dir / str(index), writer, level)
            assert level is not None
            _stream(rows, width, height, level, threads)
        finally:
            writer.close()
    ext = writer.ext
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{ext}" '
        f'Overlap="0" TileSize="{TILE}"><Size Width="{width}" Height="{height}"/></Image>\n'
    )
    with atomic_path(path) as tmp:
        tmp.write_text(xml)
    return path
