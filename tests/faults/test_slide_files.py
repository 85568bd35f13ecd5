"""Fault matrix, damaged slide files: a truncated header and an unreadable tile inside an
otherwise complete slide fail that slide alone, named, with nothing at a final path.
(Empty, non-slide and truncated-body files: tests/workflows/test_tile.py.)"""

from __future__ import annotations

from pathlib import Path

import tifffile

from wsi_mil.outputs import read_manifest
from wsi_mil.workflows.cli import main
from wsi_mil.wsi.synthetic import make_synthetic_slide


def _damaged_slides(root: Path) -> None:
    good = make_synthetic_slide(root / "good.svs", 1024, 768, seed=1, levels=1).path
    data = bytearray(good.read_bytes())
    (root / "header.svs").write_bytes(bytes(data[:64]))  # the first IFD is cut off
    with tifffile.TiffFile(good) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    i = len(offsets) // 2
    data[offsets[i] + 20 : offsets[i] + counts[i] - 2] = bytes(counts[i] - 22)  # bad JPEG
    (root / "badtile.svs").write_bytes(bytes(data))


def test_truncated_header_and_unreadable_tile_fail_alone(tmp_path: Path) -> None:
    slides, out = tmp_path / "slides", tmp_path / "tiles"
    slides.mkdir()
    _damaged_slides(slides)
    assert main(["tile", str(slides), "--out", str(out), "--workers", "1"]) == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["good"]["status"] == "ok" and int(rows["good"]["n_tiles"]) > 0
    for sid, phrase in (("header", "not a readable whole-slide image"),
                        ("badtile", "truncated or corrupt")):  # fmt: skip
        assert rows[sid]["status"] == "failed"
        assert str(slides / f"{sid}.svs") in rows[sid]["error"]
        assert phrase in rows[sid]["error"] and "copy it again" in rows[sid]["error"]
        assert not (out / f"{sid}.zarr").exists()
    assert not list(out.glob(".*.tmp"))
