"""SIGTERM / SIGINT / kill -9 during `wsi-mil tile`: workers stop, nothing half-written stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_mil.outputs import read_manifest


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096² slide whose tiling takes a few seconds (time to send a signal)."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("signal_slides")
    return make_synthetic_slide(root / "big.svs", 4096, 4096, seed=3, levels=1).path


def _start(slide: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wsi_mil.workflows.cli", "tile", str(slide), "--out", str(out),
           "--workers", "1", "--tile-px", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".big.zarr.*.tmp")):  # the worker is writing the store
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "tiling never started"
        time.sleep(0.05)
    return proc


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _all_gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*"))


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_workers_cleans_and_writes_manifest(
    big_slide: Path, tmp_path: Path, signum: int, status: int
) -> None:
    out = tmp_path / "tiles"
    proc = _start(big_slide, out)
    workers = _children(proc.pid)
    proc.send_signal(signum)
    text = proc.communicate(timeout=30)[0]
    assert proc.returncode == status, text
    assert "1 interrupted" in text and "re-run to resume" in text
    row = read_manifest(out / "manifest.csv")[0]
    assert row["slide_id"] == "big" and row["status"] == "interrupted"
    assert signal.Signals(signum).name in row["error"]
    assert not (out / "big.zarr").exists() and _leftovers(out) == []
    assert _all_gone(workers), [Path(f"/proc/{p}/cmdline").read_bytes() for p in workers]


def test_kill_9_stops_workers_and_rerun_reclaims(big_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    proc = _start(big_slide, out)
    workers = _children(proc.pid)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert _all_gone(workers), "workers outlived their parent"
    assert (out / ".big.zarr.lock").exists()  # stale: its pid is dead
    rerun = subprocess.run(
        [sys.executable, "-m", "wsi_mil.workflows.cli", "tile", str(big_slide), "--out",
         str(out), "--workers", "1", "--tile-px", "64"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    row = read_manifest(out / "manifest.csv")[0]
    # "skipped" when the store was complete before the kill (a fast, idle machine); never
    # for want of the dead process's lock, which must have been reclaimed
    assert row["status"] in ("ok", "skipped") and "locked" not in row["message"], row
    assert (out / "big.zarr").is_dir() and not (out / ".big.zarr.lock").exists()
    assert _leftovers(out) == []
