"""Concurrent runs on one folder: per-slide locks, stale locks reclaimed, manifests merged."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from wsi_mil.outputs import (
    acquire_lock,
    lock_holder,
    read_manifest,
    release_lock,
    remove_temporaries,
    write_manifest,
)
from wsi_mil.workflows.batch import Job, run_batch
from wsi_mil.workflows.cli import main

_TILE = ["--tile-px", "64", "--pixels", "none", "--no-qc", "--mask-mpp", "4", "--workers", "1"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_a_dead_holders_lock_is_reclaimed(tmp_path: Path) -> None:
    lock = tmp_path / ".a.zarr.lock"
    assert acquire_lock(lock) and lock_holder(lock) == f"pid {__import__('os').getpid()}"
    assert not acquire_lock(lock)  # held (by this very process)
    release_lock(lock)
    assert not lock.exists()
    import socket

    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    assert lock_holder(lock) is None and acquire_lock(lock)
    lock.write_text("1 some-other-host\n")
    assert lock_holder(lock) == "pid 1 on host some-other-host" and not acquire_lock(lock)


def test_remove_temporaries_touches_only_that_output(tmp_path: Path) -> None:
    mine, other = tmp_path / ".a.zarr.0123abcd.tmp", tmp_path / ".a.zarr.x.zarr.0123abcd.tmp"
    mine.mkdir()
    other.mkdir()
    assert remove_temporaries(tmp_path, "a.zarr") == [mine]
    assert other.exists()


def test_manifest_rows_merge(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    write_manifest(path, [{"slide_id": "a", "status": "ok"}, {"slide_id": "b", "status": "failed"}])
    write_manifest(path, [{"slide_id": "b", "status": "ok"}, {"slide_id": "c", "status": "ok"}])
    assert [(r["slide_id"], r["status"]) for r in read_manifest(path)] == [
        ("a", "ok"), ("b", "ok"), ("c", "ok")]  # fmt: skip
    write_manifest(path, [{"slide_id": "c", "status": "ok"}], merge=False)
    assert [r["slide_id"] for r in read_manifest(path)] == ["c"]


def test_a_slide_locked_by_another_run_is_waited_for(small_slides, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    assert main(["tile", str(small_slides["small"]), "--out", str(out), *_TILE]) == 0
    lock = out / ".large.zarr.lock"
    assert acquire_lock(lock)  # "another run" is tiling large
    threading.Timer(2.0, release_lock, args=(lock,)).start()
    start = time.monotonic()
    assert main(["tile", *map(str, small_slides.values()), "--out", str(out), *_TILE]) == 0
    assert time.monotonic() - start >= 2.0
    rows = {r["slide_id"]: r["status"] for r in read_manifest(out / "manifest.csv")}
    assert rows == {"small": "skipped", "large": "ok"}


def test_a_lock_held_too_long_gives_a_skipped_row(tmp_path: Path) -> None:
    lock = tmp_path / ".a.lock"
    assert acquire_lock(lock)
    jobs = [Job("a", "a.svs", dict, {"status": "ok"}, lock=str(lock)),
            Job("b", "b.svs", dict, {"status": "ok"}, lock=str(tmp_path / ".b.lock"))]  # fmt: skip
    rows = run_batch(jobs, workers=1, progress=False, lock_wait=0.5)
    assert rows[1]["status"] == "ok" and rows[0]["status"] == "skipped"
    assert f"locked by pid {__import__('os').getpid()}" in rows[0]["error"]
    assert not (tmp_path / ".b.lock").exists()
    release_lock(lock)


def test_manifest_keeps_slides_of_other_runs(small_slides, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    for name in ("small", "large"):
        assert main(["tile", str(small_slides[name]), "--out", str(out), *_TILE]) == 0
    assert {r["slide_id"] for r in read_manifest(out / "manifest.csv")} == {"small", "large"}
