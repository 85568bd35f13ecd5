"""Tile store writer/reader round trips for every pixel mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.tiling.store import (
    FORMAT,
    IncompleteStoreError,
    TileWriter,
    create_store,
    open_tile_store,
    source_fingerprint,
)


def _tiles(n: int, px: int = 32) -> np.ndarray:
    """Smooth, JPEG-friendly tiles (n, px, px, 3) that differ from one another."""
    yy, xx = np.mgrid[0:px, 0:px]
    out = np.empty((n, px, px, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (120 + 60 * np.sin(xx / 5 + i)).astype(np.uint8)
        out[i, ..., 1] = (90 + 40 * np.cos(yy / 7 + i)).astype(np.uint8)
        out[i, ..., 2] = 150 + i % 50
    return out


def _write(path: Path, tiles: np.ndarray, pixels: str, chunk: int = 16, complete: bool = True):
    n = len(tiles)
    group = create_store(
        path, attrs={"format": FORMAT, "slide_id": "s1", "tile_px": tiles.shape[1],
                     "target_mpp": 0.5, "pixels": pixels, "source": {"path": "/x/s1.svs"}},
        coords=np.arange(2 * n).reshape(n, 2), tissue=np.linspace(0.5, 1, n),
        mask=np.eye(6, dtype=bool), thumbnail=np.full((6, 6, 3), 7, np.uint8),
        pixels=pixels, tile_px=tiles.shape[1], chunk_tiles=chunk,
    )  # fmt: skip
    writer = TileWriter(group)
    for i in range(0, n, 5):  # uneven batches across chunk boundaries
        writer.add(tiles[i : i + 5])
    if complete:
        writer.close()


@pytest.mark.parametrize("pixels", ["lossless", "jpeg", "none"])
def test_round_trip(tmp_path: Path, pixels: str) -> None:
    tiles = _tiles(37)
    _write(tmp_path / "s1.zarr", tiles, pixels)
    store = open_tile_store(tmp_path / "s1.zarr")
    assert store.complete and store.slide_id == "s1" and store.n_tiles == 37
    assert store.tile_px == 32 and store.target_mpp == 0.5 and store.chunk_tiles == 16
    assert store.source_path == Path("/x/s1.svs")
    assert store.coords.dtype == np.int64 and store.coords.shape == (37, 2)
    assert np.array_equal(store.coords, np.arange(74).reshape(37, 2))
    np.testing.assert_allclose(store.tissue, np.linspace(0.5, 1, 37), rtol=1e-6)
    assert store.tissue.dtype == np.float32
    assert np.array_equal(store.mask, np.eye(6, dtype=bool))
    assert store.thumbnail.shape == (6, 6, 3)
    assert store.has_pixels == (pixels != "none")
    if pixels == "none":
        with pytest.raises(IncompleteStoreError, match="--pixels none"):
            store.read_pixels(0, 4)
        return
    got = store.read_pixels(0, 37)
    assert got.dtype == np.uint8 and got.shape == (37, 32, 32, 3)
    if pixels == "lossless":
        assert np.array_equal(got, tiles)
    else:
        assert np.abs(got.astype(int) - tiles).mean() < 3.0
    assert np.array_equal(store.read_pixels(10, 20), got[10:20])
    assert store.read_pixels(30, 99).shape[0] == 7


def test_zero_tiles(tmp_path: Path) -> None:
    _write(tmp_path / "e.zarr", np.zeros((0, 32, 32, 3), np.uint8), "jpeg")
    store = open_tile_store(tmp_path / "e.zarr")
    assert store.n_tiles == 0 and store.read_pixels().shape == (0, 32, 32, 3)


def test_incomplete_and_foreign_stores_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "half.zarr", _tiles(5), "lossless", complete=False)
    with pytest.raises(IncompleteStoreError, match="not completed"):
        open_tile_store(tmp_path / "half.zarr")
    assert not open_tile_store(tmp_path / "half.zarr", allow_incomplete=True).complete
    with pytest.raises(IncompleteStoreError, match="not a tile store"):
        open_tile_store(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "x"
    with pytest.raises(IncompleteStoreError, match="format"):
        open_tile_store(tmp_path / "other.zarr")


def test_fingerprint_sees_content_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * (3 << 20))
    first = source_fingerprint(path)
    assert first["size"] == 3 << 20
    for where in (-10, 3 << 19):  # inside the last MiB, then in the middle
        data = bytearray(path.read_bytes())
        data[where] = ord("y")
        path.write_bytes(bytes(data))
        changed = source_fingerprint(path)
        assert changed["size"] == first["size"] and changed["sha256"] != first["sha256"]
        first = changed


def test_store_reader_pickles(tmp_path: Path) -> None:
    import pickle

    _write(tmp_path / "p.zarr", _tiles(20), "jpeg")
    store = open_tile_store(tmp_path / "p.zarr")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.n_tiles == 20 and np.array_equal(clone.read_pixels(3, 9), store.read_pixels(3, 9))
