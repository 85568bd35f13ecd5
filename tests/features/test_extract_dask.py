"""Extraction on a Dask cluster: a worker killed mid-chunk, identical bags, written once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features import extract_features
from wsi_mil.features.bags import read_bag
from wsi_mil.processes import CRASH_ENV
from wsi_mil.workflows.cli import main

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")


def _set_env(name: str, value: str) -> None:
    os.environ[name] = value


# the workers cannot import this test module (pytest's importlib mode): ship the
# function's code itself, not a reference to it
_set_env.__module__ = "__main__"


class _InodeWatch:
    """Records every inode seen at each final bag path while the run goes on."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            for bag in self.folder.glob("*.h5") if self.folder.is_dir() else ():
                try:
                    self.seen.setdefault(bag.name, set()).add(bag.stat().st_ino)
                except FileNotFoundError:
                    continue
            time.sleep(0.02)

    def stop(self) -> dict[str, set[int]]:
        self.done.set()
        self.thread.join()
        return self.seen


def test_killed_worker_mid_chunk_gives_complete_identical_bags_written_once(
    tiles: Path, tmp_path: Path
) -> None:
    local = extract_features(tiles, "builtin", tmp_path / "local", devices="cpu", workers=0,
                             progress=False)  # fmt: skip
    assert {r["status"] for r in local} == {"ok"} and len(local) == 2
    second = sorted(local, key=lambda r: r["n_tiles"])[0]["slide_id"]  # embedded second
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, memory_limit="2GiB",
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(2, timeout=60)
        before = set(client.run(os.getpid).values())
        client.run(_set_env, CRASH_ENV, second)  # the worker that reads it dies (SIGSEGV)
        watch = _InodeWatch(tmp_path / "dask" / "builtin")
        rows = extract_features(tiles, "builtin", tmp_path / "dask", devices="cpu",
                                progress=False, scheduler=cluster.scheduler_address,
                                dask_chunk=2)  # fmt: skip
        seen = watch.stop()
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(os.getpid).values())
    assert before - after, "no worker was killed"
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for row in local:
        ours, ref = (
            read_bag(tmp_path / "dask" / "builtin" / f"{row['slide_id']}.h5"),
            read_bag(row["path"]),
        )
        np.testing.assert_array_equal(np.asarray(ours.features), np.asarray(ref.features))
        np.testing.assert_array_equal(np.asarray(ours.coords), np.asarray(ref.coords))
    assert all(len(inodes) == 1 for inodes in seen.values()), seen  # each bag renamed once
    assert not list((tmp_path / "dask" / "builtin").glob(".*.tmp"))
    assert not list((tmp_path / "dask" / "builtin").glob(".*.lock"))


def test_relative_out_on_dask_lands_in_the_callers_folder(tiles, tmp_path, monkeypatch) -> None:
    (tmp_path / "here").mkdir()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, memory_limit="2GiB",
    ) as cluster:  # fmt: skip
        monkeypatch.chdir(tmp_path / "here")
        code = main(["extract", str(tiles), "--out", "rel", "--devices", "cpu", "--no-progress",
                     "--dask-scheduler", cluster.scheduler_address])  # fmt: skip
    assert code == 0
    assert len(list((tmp_path / "here" / "rel" / "builtin").glob("*.h5"))) == 2


@pytest.mark.parametrize("command", ["extract", "run"])
def test_unreachable_scheduler_is_one_line_and_exit_2(
    tiles, tile_dirs, tmp_path, monkeypatch, capsys, command
) -> None:
    import wsi_mil.cluster as cluster

    monkeypatch.setattr(cluster.connect, "__defaults__", (1.0,))
    if command == "extract":
        argv = ["extract", str(tiles), "--out", str(tmp_path / "f")]
    else:
        cohort = tmp_path / "cohort.csv"
        cohort.write_text("patient_id,slide_id,label\np1,slide_a,0\np2,slide_b,1\n")
        slides = tile_dirs["lossless"].parent / "slides"
        argv = ["run", str(slides), str(cohort), "--out", str(tmp_path / "o")]
    start = time.monotonic()
    code = main([*argv, "--dask-scheduler", "tcp://127.0.0.1:9"])
    assert code == 2 and time.monotonic() - start < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tcp://127.0.0.1:9" in err and "no Dask scheduler" in err
