"""Per-slide tile stores: ``<out>/<slide_id>.zarr`` (zarr v3), writer and reader.

Layout (see ``DESIGN.md``): arrays ``coords`` int64 (N, 2), ``tissue`` float32 (N,),
optional ``tiles`` uint8 (N, tile_px, tile_px, 3) chunked ``chunk_tiles`` tiles per chunk,
``mask`` uint8 (h, w) and ``thumbnail`` uint8 (h, w, 3) at ``mask_mpp`` (and ``regions``
uint8 (h, w) when tiled within annotations); group attributes
describe the source, the geometry and the detection, and ``complete: true`` is written
last. Stores are written under a temporary name and renamed when complete (see
:func:`wsi_mil.outputs.atomic_path`).

Integrity: before ``complete`` is set, the writer records the CRC-32 of every chunk
file it wrote (the encoded bytes, as stored) in the attribute ``chunk_checksums``
(``{"algorithm": "crc32", "n_chunks": int, "arrays": [...], "files": {key: hex}}``,
keys such as ``tiles/c/3/0/0/0``). Readers refuse a missing chunk (zarr would read it
back as zeros) or one whose bytes changed, naming the store and the chunk
(:class:`DamagedStoreError`); :func:`verify_store` checks a whole store. Stores written
before checksums existed are checked by the presence of their ``tiles`` chunks only.

Pixel modes:

- ``"lossless"``: Blosc/LZ4 — bit-exact tiles, the fastest to write and to read (about
  0.25 ms per 224-px tile each way; Zstandard saves a third of the bytes but is four
  times slower to write), readable by any zarr v3 implementation.
- ``"jpeg"``: each chunk is one baseline JPEG (quality 90) of its tiles stacked
  vertically, codec ``wsi_mil.jpeg`` (registered with zarr when this module is
  imported; reading such a store needs ``wsi_mil`` installed). Tile sides that are
  multiples of 16 (224, 256, 512) keep JPEG blocks inside tiles.
- ``"none"``: no pixels; feature extraction reads from the slide.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec
from zarr.core.common import JSON, parse_named_configuration

from wsi_mil.errors import WsiMilError

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FORMAT",
    "PIXEL_MODES",
    "DamagedStoreError",
    "IncompleteStoreError",
    "JpegCodec",
    "TileStore",
    "TileWriter",
    "create_store",
    "open_tile_store",
    "source_fingerprint",
    "verify_store",
]

FORMAT = "wsi-mil.tiles/1"
PixelMode = Literal["lossless", "jpeg", "none"]
PIXEL_MODES: tuple[str, ...] = ("lossless", "jpeg", "none")
#: Checksum of each chunk file recorded in the ``chunk_checksums`` attribute.
CHECKSUM_ALGORITHM = "crc32"
_READ_BYTES = 8 << 20  # streamed reads of the source fingerprint
_RETILE = "re-run `wsi-mil tile` on its slide (it rebuilds damaged stores)"


class IncompleteStoreError(WsiMilError, OSError):
    """A tile store is missing, unreadable or was never completed."""


class DamagedStoreError(IncompleteStoreError):
    """A complete tile store lost a chunk or an array, or a chunk's bytes changed."""


# --------------------------------------------------------------------- JPEG codec


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """zarr v3 array→bytes codec storing a uint8 (n, h, w, 3) chunk as one JPEG.

    The n tiles are stacked vertically into an (n·h, w, 3) image.

    Attributes:
        quality: JPEG quality (1–100).
    """

    is_fixed_size = False
    quality: int = 90

    def __init__(self, *, quality: int = 90) -> None:
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        """Codec from its zarr metadata."""
        _, config = parse_named_configuration(data, "wsi_mil.jpeg", require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        """zarr metadata of the codec."""
        return {"name": "wsi_mil.jpeg", "configuration": {"quality": self.quality}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        """Only uint8 (n, h, w, 3) arrays can be stored as JPEG."""
        if len(shape) != 4 or shape[-1] != 3 or dtype.to_native_dtype() != np.uint8:
            raise ValueError(f"wsi_mil.jpeg needs uint8 (n, h, w, 3) arrays, got {shape}")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        n, h, w, c = chunk_spec.shape
        img = imagecodecs.jpeg8_decode(chunk_bytes.as_numpy_array().tobytes())
        arr: Any = np.ascontiguousarray(img.reshape(n, h, w, c))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(arr)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        import imagecodecs

        arr = np.ascontiguousarray(chunk_array.as_numpy_array())
        n, h, w, c = arr.shape
        data = imagecodecs.jpeg8_encode(arr.reshape(n * h, w, c), level=self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        """JPEG output varies in size; zarr's codec protocol says to raise here (as its own
        Blosc and Zstd codecs do), and zarr then never relies on a fixed chunk size."""
        raise NotImplementedError("wsi_mil.jpeg output has a variable size")


zarr.registry.register_codec("wsi_mil.jpeg", JpegCodec)


# ---------------------------------------------------------------------- fingerprint


def source_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Content fingerprint of a slide file: its size and the sha256 of all its bytes.

    The file is streamed in 8 MiB reads (about 1 GB/s, a small part of the time that
    decoding the slide takes), so a change anywhere in the file is noticed. For
    multi-file formats (MRXS) only the named index file is fingerprinted.

    Args:
        path: The slide file.

    Returns:
        ``{"path": str, "size": int, "sha256": hex str}``.
    """
    path = Path(path)
    digest = hashlib.sha256()
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"path": str(path.resolve()), "size": size, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- writer


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (typed)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise IncompleteStoreError(f"{group.store_path}: {name!r} is not an array")
    return node


def _crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BYTES):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _store_root(group: zarr.Group) -> Path:
    """The folder of a group in a local store."""
    root = getattr(group.store, "root", None)
    if root is None:
        raise TypeError(f"tile stores are local folders; {group.store} is not one")
    return Path(root) / group.path if group.path else Path(root)


def _chunk_keys_on_disk(root: Path) -> list[str]:
    """Keys (``<array>/c/<i>/<j>...``) of every chunk file in the store at ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/c/**/*") if p.is_file())


def _checksum_record(root: Path, known: dict[str, tuple[int, str]] | None = None) -> dict[str, Any]:
    """The ``chunk_checksums`` attribute of the store at ``root``.

    Args:
        root: The store folder, with every array written.
        known: ``{key: (size, crc)}`` already computed (the writer's tiles chunks).

    Returns:
        ``{"algorithm", "n_chunks", "arrays", "sizes": {key: int}, "crc32": {key: hex}}``.
    """
    known = known or {}
    sizes: dict[str, int] = {}
    crcs: dict[str, str] = {}
    for key in _chunk_keys_on_disk(root):
        sizes[key], crcs[key] = known.get(key) or ((root / key).stat().st_size, _crc32(root / key))
    arrays = sorted(p.parent.name for p in root.glob("*/zarr.json"))
    return {
        "algorithm": CHECKSUM_ALGORITHM, "n_chunks": len(crcs), "arrays": arrays,
        "sizes": sizes, "crc32": crcs,
    }  # fmt: skip


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=1)


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples in attribute values to JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def create_store(
    path: str | os.PathLike[str],
    *,
    attrs: dict[str, Any],
    coords: np.ndarray,
    tissue: np.ndarray,
    mask: np.ndarray,
    thumbnail: np.ndarray,
    pixels: PixelMode,
    tile_px: int,
    chunk_tiles: int = 64,
    jpeg_quality: int = 90,
    regions: np.ndarray | None = None,
) -> zarr.Group:
    """Create a store with its geometry arrays (and an empty ``tiles`` array).

    ``complete`` is set to False; call :meth:`TileWriter.close` (or set the attribute)
    once the pixels are written.

    Args:
        path: The store directory to create (usually a temporary name).
        attrs: Group attributes (JSON-able; numpy scalars are converted).
        coords: int64 (N, 2) level-0 (x, y).
        tissue: float32 (N,).
        mask: bool/uint8 (h, w) tissue mask at ``mask_mpp``.
        thumbnail: uint8 (h, w, 3) at ``mask_mpp``.
        pixels: ``"lossless"``, ``"jpeg"`` or ``"none"``.
        tile_px: Tile side in pixels.
        chunk_tiles: Tiles per chunk of ``tiles`` (and of ``coords``/``tissue``).
        jpeg_quality: Quality of ``"jpeg"`` pixels.
        regions: bool/uint8 (h, w) where annotations allow tiles (``--include-geojson``
            / ``--exclude-geojson``), stored as ``regions``; None when not annotated.

    Returns:
        The open zarr group (mode ``w``).
    """
    if pixels not in PIXEL_MODES:
        raise ValueError(f"pixels must be one of {PIXEL_MODES}, got {pixels!r}")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(_jsonable({**attrs, "chunk_tiles": int(chunk_tiles), "complete": False}))
    n = int(coords.shape[0])
    rows = max(1, chunk_tiles) * 64
    group.create_array(
        "coords", data=np.asarray(coords, np.int64).reshape(n, 2), chunks=(rows, 2),
        compressors=_compressor(),
    )  # fmt: skip
    group.create_array(
        "tissue", data=np.asarray(tissue, np.float32).reshape(n), chunks=(rows,),
        compressors=_compressor(),
    )  # fmt: skip
    group.create_array("mask", data=np.asarray(mask, np.uint8), compressors=_compressor())
    group.create_array(
        "thumbnail", data=np.ascontiguousarray(thumbnail, np.uint8), compressors=_compressor()
    )
    if regions is not None:
        group.create_array("regions", data=np.asarray(regions, np.uint8), compressors=_compressor())
    if pixels != "none":
        shape = (n, tile_px, tile_px, 3)
        chunks = (max(1, chunk_tiles), tile_px, tile_px, 3)
        if pixels == "jpeg":
            group.create_array(
                "tiles", shape=shape, chunks=chunks, dtype="uint8",
                serializer=JpegCodec(quality=jpeg_quality), compressors=None, fill_value=0,
            )  # fmt: skip
        else:
            lz4 = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)
            group.create_array(
                "tiles", shape=shape, chunks=chunks, dtype="uint8",
                compressors=lz4, fill_value=0,
            )  # fmt: skip
    return group


class TileWriter:
    """Appends tile pixels to a store's ``tiles`` array, one full chunk per write.

    Encoding and writing run in a background thread so that reading the slide and
    compressing overlap (both release the GIL).

    Args:
        group: A group made by :func:`create_store`.
    """

    def __init__(self, group: zarr.Group) -> None:
        self._group = group
        tiles = _array(group, "tiles") if "tiles" in group else None
        # whole chunks of real tiles: skip zarr's (slow) all-fill-value check per chunk;
        # this runtime setting is not stored with the array, so set it on our handle
        self._array = tiles.with_config({"write_empty_chunks": True}) if tiles is not None else None
        self._chunk = int(self._array.chunks[0]) if self._array is not None else 1
        self._root = _store_root(group)
        self._sums: dict[str, tuple[int, str]] = {}  # tiles chunks: key -> (size, crc)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._written = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: list[Future[None]] = []

    @property
    def n_written(self) -> int:
        """Tiles handed to the writer so far (written or queued)."""
        return self._written + self._n_pending

    def add(self, tiles: np.ndarray) -> None:
        """Queue uint8 (n, tile_px, tile_px, 3) tiles (next in store order)."""
        if self._array is None or len(tiles) == 0:
            self._written += len(tiles) if self._array is None else 0
            return
        self._pending.append(tiles)
        self._n_pending += len(tiles)
        while self._n_pending >= self._chunk:
            # split the queued pieces at the chunk boundary (views, no copy here)
            need, pieces = self._chunk, []
            while need:
                head = self._pending[0]
                if len(head) <= need:
                    pieces.append(self._pending.pop(0))
                    need -= len(head)
                else:
                    pieces.append(head[:need])
                    self._pending[0] = head[need:]
                    need = 0
            self._n_pending -= self._chunk
            self._submit(pieces)

    def _submit(self, pieces: list[np.ndarray]) -> None:
        start = self._written
        n = sum(len(p) for p in pieces)
        self._written += n
        array = self._array
        if array is None:
            return

        def write() -> None:
            block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            array[start : start + n] = block
            # checksum the chunk file now, while it is in the page cache
            key = "tiles/" + array.metadata.encode_chunk_key((start // self._chunk, 0, 0, 0))
            self._sums[key] = ((self._root / key).stat().st_size, _crc32(self._root / key))

        for fut in [f for f in self._futures if f.done()]:
            fut.result()  # surface a failed write now
        self._futures = [f for f in self._futures if not f.done()]
        if len(self._futures) >= 2:
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(write))

    def close(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Flush, wait for the writes, check the count, record the chunk checksums (see
        :func:`_checksum_record`), then mark the store complete."""
        try:
            if self._pending:
                self._submit(self._pending)
                self._pending, self._n_pending = [], 0
            for fut in self._futures:
                fut.result()
        finally:
            self._pool.shutdown(wait=True)
        if self._array is not None and self._written != self._array.shape[0]:
            raise RuntimeError(f"wrote {self._written} tiles, expected {self._array.shape[0]}")
        sums = _checksum_record(self._root, self._sums)
        self._group.attrs.update(
            _jsonable({**(extra_attrs or {}), "chunk_checksums": sums, "complete": True})
        )


# --------------------------------------------------------------------------- reader


class TileStore:
    """Read access to a tile store (``open_tile_store``).

    Every read checks the chunks it touches against the store's ``chunk_checksums``:
    a missing chunk file or one of another size raises :class:`DamagedStoreError`
    (zarr would read a missing chunk back as zeros); the small arrays (``coords``,
    ``tissue``, ``mask``, ``thumbnail``) are also checked byte for byte.

    Args:
        path: The ``<slide_id>.zarr`` directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise IncompleteStoreError(
                f"{self.path} is not a tile store; run `wsi-mil tile` to create it"
            ) from exc
        except (ValueError, OSError) as exc:  # e.g. a damaged zarr.json
            raise IncompleteStoreError(
                f"{self.path}: unreadable store metadata ({exc}); {_RETILE}"
            ) from exc
        if self.attrs.get("format") != FORMAT:
            raise IncompleteStoreError(
                f"{self.path} is not a {FORMAT} tile store (format "
                f"{self.attrs.get('format')!r}); re-run `wsi-mil tile`"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}  # picklable: worker processes reopen by path

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n_tiles={self.n_tiles}, pixels={self.pixels!r})"

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Group attributes (a plain dict)."""
        return dict(self._group.attrs)

    @property
    def slide_id(self) -> str:
        """Slide identifier (file stem of the source)."""
        return str(self.attrs["slide_id"])

    @property
    def complete(self) -> bool:
        """True when the writer finished."""
        return bool(self.attrs.get("complete", False))

    @property
    def source_path(self) -> Path:
        """Path of the source slide when the store was written."""
        return Path(self.attrs["source"]["path"])

    @property
    def tile_px(self) -> int:
        """Tile side in pixels at ``target_mpp``."""
        return int(self.attrs["tile_px"])

    @property
    def target_mpp(self) -> float:
        """Tile resolution in µm/px."""
        return float(self.attrs["target_mpp"])

    @property
    def pixels(self) -> str:
        """Pixel mode: ``"lossless"``, ``"jpeg"`` or ``"none"``."""
        return str(self.attrs.get("pixels", "none"))

    @property
    def has_checksums(self) -> bool:
        """True when the writer recorded chunk checksums (stores of wsi-mil ≥ 0.2)."""
        return isinstance(self.attrs.get("chunk_checksums"), dict)

    # Arrays are opened per call on purpose: a zarr array is bound to zarr's event-loop
    # thread, which a forked DataLoader worker does not have (a cached array hangs there).

    @property
    def has_pixels(self) -> bool:
        """True when the store holds (or, tiled with pixels, should hold) tile pixels."""
        return "tiles" in self._group or self.pixels in ("lossless", "jpeg")

    def _array(self, name: str) -> zarr.Array:
        """The array ``name``; a missing one means the store is damaged."""
        if name not in self._group:
            raise DamagedStoreError(f"{self.path}: array {name!r} is missing; {_RETILE}")
        return _array(self._group, name)

    def _read_checked(self, name: str) -> np.ndarray:
        """A whole small array, every chunk checked byte for byte first."""
        array = self._array(name)
        self._check(name, array, _all_chunks(array), content=True)
        return np.asarray(array[...])

    def _check(
        self, name: str, array: zarr.Array, chunks: Iterator[tuple[int, ...]], *, content: bool
    ) -> None:
        """Raise :class:`DamagedStoreError` at the first bad chunk of ``chunks``."""
        for index in chunks:
            key = f"{name}/{array.metadata.encode_chunk_key(index)}"
            problem = self.chunk_problem(key, content=content, required=name == "tiles")
            if problem:
                raise DamagedStoreError(f"{self.path}: {problem}; {_RETILE}")

    def chunk_problem(self, key: str, *, content: bool = True, required: bool = False) -> str:
        """What is wrong with one chunk file, or ``""`` when nothing is.

        Args:
            key: Chunk key, e.g. ``tiles/c/3/0/0/0``.
            content: Also compare the CRC-32 of its bytes (reads the file).
            required: The chunk must exist even in a store without checksums (``tiles``
                chunks are always written).

        Returns:
            E.g. ``"chunk tiles/c/3/0/0/0 is missing"``; ``""`` when the chunk is fine.
        """
        file = self.path / key
        record = self.attrs.get("chunk_checksums")
        if not isinstance(record, dict):
            missing = required and not file.is_file()
            return f"chunk {key} is missing" if missing else ""
        size, crc = record["sizes"].get(key), record["crc32"].get(key)
        if size is None:  # never written: the array's fill value
            return f"chunk {key} was not written by `wsi-mil tile`" if file.exists() else ""
        if not file.is_file():
            return f"chunk {key} is missing"
        if file.stat().st_size != size:
            return f"chunk {key} has {file.stat().st_size} bytes, {size} were written"
        if content and _crc32(file) != crc:
            return f"chunk {key} is corrupt (crc32 {_crc32(file)}, {crc} was written)"
        return ""

    @cached_property
    def coords(self) -> np.ndarray:
        """int64 (N, 2) level-0 (x, y) of each tile's top-left corner."""
        return np.asarray(self._read_checked("coords"), dtype=np.int64).reshape(-1, 2)

    @cached_property
    def tissue(self) -> np.ndarray:
        """float32 (N,) tissue fraction of each tile."""
        return np.asarray(self._read_checked("tissue"), dtype=np.float32)

    @property
    def n_tiles(self) -> int:
        """Number of tiles N."""
        return int(self._array("coords").shape[0])

    @property
    def chunk_tiles(self) -> int:
        """Tiles per chunk of ``tiles`` (read in multiples of it for speed)."""
        if self.has_pixels:
            return int(self._array("tiles").chunks[0])
        return int(self.attrs.get("chunk_tiles", 64))

    @property
    def mask(self) -> np.ndarray:
        """bool (h, w) tissue mask at ``mask_mpp``."""
        return self._read_checked("mask") > 0

    @property
    def thumbnail(self) -> np.ndarray:
        """uint8 (h, w, 3) thumbnail at ``mask_mpp``."""
        return self._read_checked("thumbnail")

    @property
    def regions(self) -> np.ndarray | None:
        """bool (h, w) at ``mask_mpp`` where annotations allowed tiles, or None.

        Present when the slide was tiled with ``--include-geojson`` or
        ``--exclude-geojson`` (``mask`` is then the tissue mask within these regions).
        """
        if "regions" not in self._group:
            return None
        return self._read_checked("regions") > 0

    def read_pixels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tiles ``start:stop`` as uint8 (n, tile_px, tile_px, 3).

        The chunks read must exist with the size the writer recorded (their bytes are
        compared by :func:`verify_store`, not on every read).

        Raises:
            IncompleteStoreError: The store holds no pixels (``--pixels none``).
            DamagedStoreError: A chunk is missing or truncated (names it).
        """
        if not self.has_pixels:
            raise IncompleteStoreError(
                f"{self.path} holds no tile pixels (tiled with --pixels none); read the "
                "tiles from the slide at .coords, or re-tile with --pixels lossless|jpeg"
            )
        stop = self.n_tiles if stop is None else min(stop, self.n_tiles)
        start = max(0, min(start, stop))
        array = self._array("tiles")
        if stop > start:
            size = int(array.chunks[0])
            chunks = ((i, 0, 0, 0) for i in range(start // size, (stop - 1) // size + 1))
            self._check("tiles", array, chunks, content=False)
        return np.asarray(array[start:stop], dtype=np.uint8)

    def problems(self, *, content: bool = True) -> list[str]:
        """Everything wrong with this store (see :func:`verify_store`)."""
        if not self.complete:
            return ["incomplete (never finished; interrupted tiling?)"]
        record = self.attrs.get("chunk_checksums")
        expected = ["coords", "mask", "thumbnail", "tissue"]
        if isinstance(record, dict):
            expected = list(record["arrays"])
            if len(record["crc32"]) != record["n_chunks"]:
                return [
                    f"checksum record lists {len(record['crc32'])} of {record['n_chunks']} chunks"
                ]
        elif self.pixels in ("lossless", "jpeg"):
            expected.append("tiles")
        found = [f"array {name!r} is missing" for name in expected if name not in self._group]
        for name in (n for n in expected if n in self._group):
            array = _array(self._group, name)
            required = name == "tiles"
            for index in _all_chunks(array):
                key = f"{name}/{array.metadata.encode_chunk_key(index)}"
                problem = self.chunk_problem(key, content=content, required=required)
                if problem:
                    found.append(problem)
        return found or self._length_problems()

    def _length_problems(self) -> list[str]:
        """Arrays whose tile count differs from ``coords``."""
        n = self.n_tiles
        lengths = {name: int(self._array(name).shape[0]) for name in ("tissue", "tiles")
                   if name in self._group}  # fmt: skip
        return [f"{name} has {m} rows, coords {n}" for name, m in lengths.items() if m != n]


def _all_chunks(array: zarr.Array) -> Iterator[tuple[int, ...]]:
    """Indices of every chunk of ``array`` (C order)."""
    return itertools.product(*(range(n) for n in array.cdata_shape))


def open_tile_store(path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> TileStore:
    """Open ``<slide_id>.zarr`` for reading.

    Arrays are read lazily from the returned :class:`TileStore`:

    - ``.coords``: int64 (N, 2), level-0 (x, y) of each tile's top-left corner;
    - ``.tissue``: float32 (N,), tissue fraction of each tile;
    - ``.read_pixels(start, stop)``: uint8 (stop - start, tile_px, tile_px, 3) RGB at
      ``.target_mpp`` (read in multiples of ``.chunk_tiles`` for speed; raises when
      ``.has_pixels`` is False);
    - ``.mask``: bool (h, w) and ``.thumbnail``: uint8 (h, w, 3) at ``mask_mpp``;
    - ``.attrs``: dict of the group attributes (``mpp``, ``tile_level0``, ...).

    Reads raise :class:`DamagedStoreError` (naming the chunk) on a missing or changed
    chunk; :func:`verify_store` checks every chunk at once.

    Args:
        path: The store directory.
        allow_incomplete: Also open a store whose ``complete`` attribute is not true.

    Returns:
        The reader (picklable: worker processes reopen it by path).

    Raises:
        IncompleteStoreError: Not a tile store, or not complete.
    """
    store = TileStore(path)
    if not allow_incomplete and not store.complete:
        raise IncompleteStoreError(
            f"{store.path} was not completed (interrupted run?); re-run `wsi-mil tile`"
        )
    return store


def verify_store(path: str | os.PathLike[str], *, content: bool = True) -> list[str]:
    """Check a tile store: complete, every array present, every chunk intact.

    With checksums (stores written by this version), every chunk the writer wrote must
    exist with its size and (``content=True``) CRC-32, and no other chunk may exist.
    Stores written before checksums are checked by the presence of their ``tiles``
    chunks, and (``content=True``) by decoding every ``tiles`` chunk.

    Args:
        path: The ``<slide_id>.zarr`` directory.
        content: Read every chunk and compare its bytes (else sizes and presence only,
            which costs one ``stat`` per chunk).

    Returns:
        One short text per problem (e.g. ``"chunk tiles/c/0/0/0/0 is missing"``); an
        empty list when the store is intact.
    """
    try:
        store = TileStore(path)
        found = store.problems(content=content)
        if not found and content and not store.has_checksums and store.has_pixels:
            found = _decode_problems(store)
    except (IncompleteStoreError, KeyError, ValueError, OSError) as exc:
        return [str(exc)]
    return found


def _decode_problems(store: TileStore) -> list[str]:
    """Chunks of ``tiles`` that cannot be decoded (stores without checksums)."""
    step = store.chunk_tiles
    found = []
    for start in range(0, store.n_tiles, step):
        try:
            store.read_pixels(start, start + step)
        except Exception as exc:  # a codec error of any type means a damaged chunk
            found.append(f"tiles {start}:{start + step} cannot be decoded ({exc})")
    return found
