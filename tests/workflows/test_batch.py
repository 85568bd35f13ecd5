"""Batch orchestration: local pool, failures, Dask."""

from __future__ import annotations

import os

import pytest

from wsi_mil.workflows.batch import Job, run_batch


def square(value: int) -> dict:
    if value < 0:
        raise ValueError(f"negative value {value}")
    return {"status": "ok", "n_tiles": value * value, "pid": os.getpid()}


def _jobs(values):
    return [Job(f"s{v}", f"s{v}.svs", square, {"value": v}) for v in values]


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_do_not_stop_the_batch(workers):
    rows = run_batch(_jobs([2, -1, 3]), workers=workers, progress=False)
    assert [r["slide_id"] for r in rows] == ["s2", "s-1", "s3"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[0]["n_tiles"] == 4 and rows[2]["n_tiles"] == 9
    assert "negative value -1" in rows[1]["error"]
    assert all(r["seconds"] >= 0 for r in rows)


def test_pool_uses_other_processes():
    rows = run_batch(_jobs([1, 2]), workers=2, progress=False)
    assert all(r["pid"] != os.getpid() for r in rows)


def test_dask_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        rows = run_batch(_jobs([3, -2]), scheduler=cluster.scheduler_address, progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["n_tiles"] == 9
