"""Faults during `wsi-mil extract`: native decode crashes, signals, concurrent runs, locks."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_mil.outputs import read_manifest
from wsi_mil.processes import CRASH_ENV
from wsi_mil.workflows.cli import main


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny tile stores ``s0``, ``s1``, ``s2`` (640 x 480 slides, 32-px tiles)."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("extract_faults")
    for i in range(3):
        make_synthetic_slide(root / "slides" / f"s{i}.svs", 640, 480, seed=i, levels=1)
    out = root / "tiles"
    tile = ["tile", str(root / "slides"), "--out", str(out), "--tile-px", "32", "--no-qc"]
    assert main([*tile, "--workers", "2"]) == 0
    return out


def _extract(tiles: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", str(tiles), "--out", str(out), "--no-progress", *extra]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["slide_id"]: r for r in read_manifest(out / "builtin" / "manifest.csv")}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "builtin").glob(".*"))


@pytest.mark.parametrize("extra", [
    ("--workers", "1"),
    ("--workers", "2"),
    # decoding in spawned device processes: the one that dies is replaced (spawns: slow)
    pytest.param(("--workers", "0", "--devices", "cpu,cpu"), marks=pytest.mark.slow),
])  # fmt: skip
def test_decode_segfault_fails_that_slide_only(
    tiles: Path, tmp_path: Path, monkeypatch, capsys, extra: tuple[str, ...]
) -> None:
    out = tmp_path / "features"
    monkeypatch.setenv(CRASH_ENV, "s1")
    assert main(_extract(tiles, out, *extra)) == 1
    rows = _rows(out)
    assert rows["s0"]["status"] == "ok" and rows["s2"]["status"] == "ok"
    assert rows["s1"]["status"] == "failed"
    assert "died with SIGSEGV while" in rows["s1"]["error"]
    assert "s1.zarr" in rows["s1"]["error"]
    assert sorted(p.name for p in (out / "builtin").glob("*.h5")) == ["s0.h5", "s2.h5"]
    assert _leftovers(out) == []  # no temporaries, no locks
    assert "s1: failed: " in capsys.readouterr().out
    monkeypatch.delenv(CRASH_ENV)
    assert main(_extract(tiles, out, *extra)) == 0  # the re-run retries the failed slide only
    rows = _rows(out)
    assert rows["s1"]["status"] == "ok"
    assert rows["s0"]["status"] == rows["s2"]["status"] == "skipped"


def _start(tiles: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wsi_mil.workflows.cli", *_extract(tiles, out, "--workers", "1")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_extract_and_writes_manifest(
    tiles: Path, tmp_path: Path, signum: int, status: int
) -> None:
    out = tmp_path / "features"
    proc = _start(tiles, out)
    deadline = time.monotonic() + 60
    while not list((out / "builtin").glob(".s*.h5.lock")):  # slides claimed: embedding starts
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "extraction never started"
        time.sleep(0.02)
    proc.send_signal(signum)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == status, text
    assert "interrupted" in text and "re-run to resume" in text
    rows = read_manifest(out / "builtin" / "manifest.csv")
    stopped = [r for r in rows if r["status"] == "interrupted"]
    assert stopped and all(signal.Signals(signum).name in r["error"] for r in stopped)
    assert _leftovers(out) == []  # no temporaries, no locks
    for row in stopped:
        assert not Path(row["path"]).exists()
    assert _children(proc.pid) == []


def test_two_concurrent_extracts_share_one_folder(tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    procs = [_start(tiles, out) for _ in range(2)]
    texts = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], texts
    assert sorted(p.name for p in (out / "builtin").glob("*.h5")) == ["s0.h5", "s1.h5", "s2.h5"]
    assert {r["status"] for r in _rows(out).values()} <= {"ok", "skipped"}
    assert _leftovers(out) == []


def test_a_live_lock_is_waited_for_and_a_stale_one_reclaimed(tiles: Path, tmp_path: Path) -> None:
    from wsi_mil.features import extract_features

    out = tmp_path / "features"
    bags = out / "builtin"
    bags.mkdir(parents=True)
    (bags / ".s0.h5.lock").write_text("999999999 " + __import__("socket").gethostname())
    (bags / ".s0.h5.0badf00d.tmp").write_bytes(b"half")  # left by the dead holder
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (bags / ".s1.h5.lock").write_text(f"{sleeper.pid} {__import__('socket').gethostname()}")
        rows = extract_features(tiles, "builtin", out, workers=0, progress=False, lock_wait=0.5)
    finally:
        sleeper.kill()
        sleeper.wait()
    status = {r["slide_id"]: (r["status"], r["error"]) for r in rows}
    assert status["s0"] == ("ok", "") and status["s2"] == ("ok", "")
    assert status["s1"][0] == "skipped" and f"locked by pid {sleeper.pid}" in status["s1"][1]
    assert not (bags / "s1.h5").exists()
    assert _leftovers(out) == [".s1.h5.lock"]  # the other holder's lock is left alone


def test_verify_ignores_lock_files(tiles: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "tiles"
    shutil.copytree(tiles, copy)
    out = tmp_path / "features"
    assert main(_extract(copy, out, "--workers", "0")) == 0
    for folder, name in ((copy, ".s0.zarr.lock"), (copy, ".manifest.csv.lock"),
                         (out / "builtin", ".s1.h5.lock"),
                         (out / "builtin", ".manifest.csv.lock")):  # fmt: skip
        (folder / name).write_text("123 host\n")
    assert main(["verify", str(tmp_path), "--no-progress"]) == 0
    assert "3 tile stores, 3 feature bags checked; all intact" in capsys.readouterr().out
