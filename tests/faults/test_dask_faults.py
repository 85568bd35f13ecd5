"""Dask: relative outputs resolved, lost workers fail after a timeout, no scheduler → exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_mil.outputs import read_manifest
from wsi_mil.workflows import batch
from wsi_mil.workflows.batch import Job, run_batch
from wsi_mil.workflows.cli import main

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")


def _cluster(n_workers: int) -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, memory_limit="1GiB",
    )  # fmt: skip


def test_relative_out_is_resolved_before_jobs_leave(small_slides, tmp_path: Path,
                                                    monkeypatch) -> None:  # fmt: skip
    (tmp_path / "here").mkdir()
    with _cluster(1) as cluster:
        monkeypatch.chdir(tmp_path / "here")  # the worker's working directory stays elsewhere
        code = main(["tile", str(small_slides["small"]), "--out", "rel", "--tile-px", "64",
                     "--pixels", "none", "--no-qc", "--dask-scheduler",
                     cluster.scheduler_address])  # fmt: skip
    assert code == 0
    row = read_manifest(tmp_path / "here" / "rel" / "manifest.csv")[0]
    assert row["status"] == "ok" and Path(row["store"]).is_absolute()
    assert (tmp_path / "here" / "rel" / "small.zarr").is_dir()


@pytest.mark.slow
def test_lost_worker_and_nanny_fail_after_a_timeout(tmp_path: Path) -> None:
    with _cluster(0) as cluster:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard",
             "--memory-limit", "1GiB"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            with distributed.Client(cluster.scheduler_address) as client:
                client.wait_for_workers(1, timeout=60)
            killer = _kill_group_later(worker, 1.5)
            start = time.monotonic()
            sleep = {"args": [sys.executable, "-c", "import time; time.sleep(60)"]}
            rows = run_batch([Job("a", "a.svs", subprocess.run, sleep)],
                             scheduler=cluster.scheduler_address, progress=False,
                             worker_timeout=2.0)  # fmt: skip
            killer.join()
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert time.monotonic() - start < 30
    assert rows[0]["status"] == "failed"
    assert "no Dask worker connected" in rows[0]["error"] and "start workers" in rows[0]["error"]


def _kill_group_later(proc: subprocess.Popen, delay: float):
    import threading

    def kill() -> None:
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the nanny and its worker

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_unreachable_scheduler_is_one_line_and_exit_2(small_slides, tmp_path: Path, monkeypatch,
                                                      capsys) -> None:  # fmt: skip
    monkeypatch.setattr(batch, "DASK_CONNECT_TIMEOUT", 1.0)
    start = time.monotonic()
    code = main(["tile", str(small_slides["small"]), "--out", str(tmp_path / "t"),
                 "--dask-scheduler", "tcp://127.0.0.1:9"])  # fmt: skip
    assert code == 2 and time.monotonic() - start < 15
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tcp://127.0.0.1:9" in err and "no Dask scheduler" in err
