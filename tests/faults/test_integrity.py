"""Fault matrix, damaged stores: deleted, truncated and corrupt chunks, stores of an
older version, bit rot in a slide, and ``tile --overwrite``.

Each case goes through the CLI: ``extract`` fails the damaged slide naming the store and
the chunk (no bag at a final path), ``tile`` rebuilds the store and says why, and the
re-extracted bag is whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_mil.features.bags import read_bag
from wsi_mil.outputs import read_manifest
from wsi_mil.tiling import open_tile_store, verify_store
from wsi_mil.workflows.cli import main


def _tile(slide: Path, tiles: Path, *extra: str) -> dict[str, str]:
    """Tile one slide through the CLI (32-px tiles: 110 tiles in two chunks)."""
    argv = ["tile", str(slide), "--out", str(tiles), "--tile-px", "32", "--workers", "1"]
    assert main([*argv, "--no-qc", *extra]) == 0
    return read_manifest(tiles / "manifest.csv")[0]


def _extract(tiles: Path, out: Path) -> tuple[int, dict[str, str]]:
    """Extract with the builtin encoder on the CPU; the exit status and the slide's row."""
    argv = ["extract", str(tiles), "--out", str(out), "--devices", "cpu", "--workers", "0"]
    code = main([*argv, "--no-progress"])
    return code, read_manifest(out / "builtin" / "manifest.csv")[0]


@pytest.fixture
def tiled(small_slides: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the small slide and its tile folder (``small.zarr``)."""
    slide = tmp_path / "slides" / "small.svs"
    slide.parent.mkdir()
    shutil.copyfile(small_slides["small"], slide)
    tiles = tmp_path / "tiles"
    row = _tile(slide, tiles)
    assert row["status"] == "ok" and int(row["n_tiles"]) > 64  # two tiles chunks
    return slide, tiles


def _damage(chunk: Path, how: str) -> None:
    data = chunk.read_bytes()
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:  # same size, 16 bytes in the middle zeroed
        mid = len(data) // 2
        chunk.write_bytes(data[:mid] + bytes(16) + data[mid + 16 :])


CASES = [  # chunk, damage, what verify / tile say, extract fails
    ("tiles/c/1/0/0/0", "delete", "chunk tiles/c/1/0/0/0 is missing", True),
    ("tiles/c/0/0/0/0", "truncate", "chunk tiles/c/0/0/0/0 has", True),
    ("coords/c/0/0", "delete", "chunk coords/c/0/0 is missing", True),
    ("tiles/c/0/0/0/0", "zero16", "chunk tiles/c/0/0/0/0 is corrupt (crc32", False),
]


@pytest.mark.parametrize(("key", "how", "phrase", "extract_fails"), CASES)
def test_damaged_chunk_is_named_and_rebuilt(
    tiled: tuple[Path, Path], tmp_path: Path, capsys, key: str, how: str, phrase: str,
    extract_fails: bool,
) -> None:  # fmt: skip
    slide, tiles = tiled
    store = tiles / "small.zarr"
    _damage(store / key, how)
    assert verify_store(store) and phrase in verify_store(store)[0]
    capsys.readouterr()
    assert main(["verify", str(tiles), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"damaged store {store}: {phrase}" in out and "wsi-mil tile" in out
    assert "1 damaged" in out
    if extract_fails:
        code, row = _extract(tiles, tmp_path / "features")
        assert code == 1 and row["status"] == "failed"
        assert str(store) in row["error"] and key in row["error"] and "wsi-mil tile" in row["error"]
        assert not (tmp_path / "features" / "builtin" / "small.h5").exists()
    row = _tile(slide, tiles)
    assert row["status"] == "ok" and row["message"].startswith(f"rebuilt: damaged store ({phrase}")
    assert verify_store(store) == []
    code, row = _extract(tiles, tmp_path / "features")
    assert code == 0 and row["status"] == "ok"
    bag = read_bag(tmp_path / "features" / "builtin" / "small.h5")
    assert len(bag.features) == int(row["n_tiles"]) == open_tile_store(store).n_tiles


def test_reads_refuse_a_missing_chunk_instead_of_zeros(tiled: tuple[Path, Path]) -> None:
    from wsi_mil.tiling import DamagedStoreError

    store = tiled[1] / "small.zarr"
    (store / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()
    opened = open_tile_store(store)
    assert opened.read_pixels(0, 64).shape[0] == 64  # the first chunk is intact
    with pytest.raises(DamagedStoreError, match=r"small\.zarr: chunk tiles/c/1/0/0/0 is missing"):
        opened.read_pixels(60, 70)
    (store / "thumbnail" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(OSError, match="re-run `wsi-mil tile`"):
        opened.thumbnail  # noqa: B018


def test_old_store_without_checksums(tiled: tuple[Path, Path], tmp_path: Path) -> None:
    """A store of an older version reads and verifies by chunk presence; tile rebuilds it."""
    slide, tiles = tiled
    store = tiles / "small.zarr"
    group = zarr.open_group(str(store), mode="r+")
    source = dict(group.attrs["source"])
    source["sha256_head_tail"] = source.pop("sha256")
    group.attrs.update({"source": source})
    del group.attrs["chunk_checksums"]
    assert verify_store(store) == [] and not open_tile_store(store).has_checksums
    (store / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()
    assert verify_store(store, content=False) == ["chunk tiles/c/1/0/0/0 is missing"]
    code, row = _extract(tiles, tmp_path / "features")
    assert code == 1 and "tiles/c/1/0/0/0 is missing" in row["error"]
    row = _tile(slide, tiles)
    assert row["status"] == "ok"
    assert row["message"].startswith("rebuilt: store from an older wsi-mil without a full-file")
    assert open_tile_store(store).has_checksums and verify_store(store) == []


def test_bit_rot_in_the_middle_of_the_slide_rebuilds(tiled: tuple[Path, Path]) -> None:
    slide, tiles = tiled
    data = bytearray(slide.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(16)  # 16 zero bytes, far from the first and last MiB
    slide.write_bytes(bytes(data))
    argv = ["tile", str(slide), "--out", str(tiles), "--tile-px", "32", "--workers", "1"]
    main([*argv, "--no-qc"])  # the damaged slide may or may not still decode
    row = read_manifest(tiles / "manifest.csv")[0]
    assert row["status"] != "skipped", row
    if row["status"] == "ok":
        assert row["message"].startswith("rebuilt: source slide changed")


def test_overwrite_rebuilds_a_complete_store(tiled: tuple[Path, Path]) -> None:
    slide, tiles = tiled
    store = tiles / "small.zarr"
    before = open_tile_store(store).read_pixels()
    assert _tile(slide, tiles)["status"] == "skipped"
    row = _tile(slide, tiles, "--overwrite")
    assert row["status"] == "ok" and row["message"].startswith("rebuilt: --overwrite")
    assert np.array_equal(open_tile_store(store).read_pixels(), before)
