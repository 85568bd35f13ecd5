"""Atomic outputs and manifests."""

from __future__ import annotations

import pytest

from wsi_mil.outputs import atomic_path, read_manifest, write_manifest


def test_atomic_file_appears_only_on_success(tmp_path):
    final = tmp_path / "out.txt"
    with atomic_path(final) as tmp:
        tmp.write_text("hello")
        assert not final.exists()
    assert final.read_text() == "hello"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_failure_leaves_nothing(tmp_path):
    final = tmp_path / "store.zarr"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "chunk").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_replaces_directory(tmp_path):
    final = tmp_path / "store.zarr"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]


def test_atomic_refuses_overwrite(tmp_path):
    final = tmp_path / "a.txt"
    final.write_text("keep")
    with (
        pytest.raises(FileExistsError, match="refusing"),
        atomic_path(final, overwrite=False) as tmp,
    ):
        tmp.write_text("new")
    assert final.read_text() == "keep"
    assert list(tmp_path.iterdir()) == [final]


def test_manifest_round_trip_keeps_extra_columns(tmp_path):
    rows = [
        {"slide_id": "a", "path": "a.svs", "status": "ok", "n_tiles": 3, "seconds": 1.5},
        {"slide_id": "b", "path": "b.svs", "status": "failed", "error": "bad", "warning": "w"},
    ]
    path = write_manifest(tmp_path / "manifest.csv", rows)
    back = read_manifest(path)
    assert [r["slide_id"] for r in back] == ["a", "b"]
    assert back[0]["n_tiles"] == "3" and back[0]["error"] == ""
    assert back[1]["warning"] == "w"
    assert read_manifest(tmp_path / "missing.csv") == []
