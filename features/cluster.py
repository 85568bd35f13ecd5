"""Feature extraction on a Dask cluster (``wsi-mil extract --dask-scheduler``).

The slides are cut into chunks (``chunk`` slides each, largest first); each chunk is one
Dask task, :func:`extract_chunk`, that embeds its slides on its worker's device with
:func:`~wsi_mil.features.pool.run_device`, the code path of the local pool: the encoder
is built once per chunk and one DataLoader reads ahead across its slides.

- **Resources.** When a connected worker advertises a ``GPU`` resource (workers
  started with ``--resources GPU=1``), every task asks for ``GPU: 1``, so each GPU
  embeds one chunk at a time and CPU-only workers get none. When no worker advertises
  one, tasks carry no resource restriction and run wherever there is a free thread: a
  CPU-only cluster works as it is (start its workers with ``--nthreads 1``, as each task
  uses every core of its worker through torch).
- **Device.** On the worker, ``--devices`` is read as on a local machine: default its
  first visible GPU, else the CPU (one Dask worker per GPU, e.g. with
  ``CUDA_VISIBLE_DEVICES`` per worker, as dask-jobqueue and dask-cuda set up).
- **Decode workers.** A worker process that runs under a nanny is daemonic and may not
  start processes, so the chunk is decoded in the worker process itself unless the
  workers are started with ``DASK_DISTRIBUTED__WORKER__DAEMON=False``.
- **Paths.** Every path in a task is absolute (resolved by the caller): workers run in
  other working folders. The cluster needs the caller's tile stores and output folder on
  a shared filesystem at the same paths.
- **Retries.** A worker that dies (killed, out of memory, preempted) has its task run
  again elsewhere by the scheduler. Bags are written atomically (temporary name, then
  rename), so a killed attempt leaves no partial bag at a final path; a retry removes
  its temporaries and keeps the bags the killed attempt finished (status ``ok``, message
  ``written by an earlier attempt``), so each bag is written once. The caller holds
  every slide's lock meanwhile, so no other ``extract`` writes them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["extract_chunk", "run_on_dask"]

Row = dict[str, Any]

#: Seconds to wait for the first worker before deciding whether tasks ask for a GPU.
WORKER_WAIT_S = 60.0


def extract_chunk(
    tasks: Sequence[Any], job: Any, devices: str | None = None, workers: int | None = None
) -> list[Row]:
    """Embed a chunk of slides on this machine's device (the body of a Dask task).

    Args:
        tasks: :class:`~wsi_mil.features.pool.SlideTask` list (absolute paths).
        job: :class:`~wsi_mil.features.pool.ExtractJob` shared by every chunk.
        devices: ``--devices`` as given; the first device is used (default: the first
            visible GPU, else the CPU).
        workers: Decode workers (None: :func:`~wsi_mil.features.pool.default_workers`);
            0 in a daemonic worker process.

    Returns:
        One manifest row per slide of ``tasks``.
    """
    import multiprocessing as mp

    from wsi_mil.features.pool import default_workers, parse_devices, run_device

    device = parse_devices(devices)[0]
    n = default_workers([device]) if workers is None else workers
    if mp.current_process().daemon:
        n = 0  # a nanny's worker process may not start decode processes
    job = replace(job, workers=n, n_procs=1)
    rows, todo = _done_before(tasks, job)
    if todo:
        emitted: list[Row] = []
        run_device(
            device, job, iter(todo), lambda m: emitted.append(m[1]) if m[0] == "row" else None
        )
        done = {r["slide_id"] for r in emitted}
        rows += emitted + [_row(t, "failed", "no row from the device (stopped?); re-run")
                           for t in todo if t.slide_id not in done]  # fmt: skip
    for row in rows:
        row["device"] = device
    return rows


def _done_before(tasks: Sequence[Any], job: Any) -> tuple[list[Row], list[Any]]:
    """Rows of the bags a killed earlier attempt of this task finished; the rest to do.

    Temporaries of a killed attempt are removed first (the caller holds the locks).
    """
    from wsi_mil.features.extract import _bag_matches
    from wsi_mil.outputs import remove_temporaries

    rows, todo = [], []
    for task in tasks:
        bag = Path(task.bag)
        remove_temporaries(bag.parent, bag.name)
        if _bag_matches(bag, job.encoder, job.weights_sha256, task.fingerprint):
            row = _row(task, "ok", "")
            rows.append({**row, "message": "written by an earlier attempt of this task"})
        else:
            todo.append(task)
    return rows, todo


def _row(task: Any, status: str, error: str) -> Row:
    return {"slide_id": task.slide_id, "path": task.bag, "n_tiles": task.n_tiles,
            "status": status, "error": error, "seconds": 0.0}  # fmt: skip


def _gpu_resources(client: Any) -> dict[str, float] | None:
    """``{"GPU": 1}`` when a connected worker advertises a GPU, else None (no restriction)."""
    from wsi_mil.cluster import worker_resources

    deadline = time.monotonic() + WORKER_WAIT_S
    while not (found := worker_resources(client)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"GPU": 1} if any(r.get("GPU", 0) >= 1 for r in found.values()) else None


def run_on_dask(
    client: Any,
    job: Any,
    tasks: list[Any],
    *,
    devices: str | None = None,
    workers: int | None = None,
    chunk: int = 8,
    stop: Any = None,
    advance: Callable[[Row], None] = lambda row: None,
    worker_timeout: float = 60.0,
) -> list[Row]:
    """Embed ``tasks`` (largest first) in chunks of ``chunk`` slides on a Dask cluster.

    Args:
        client: A connected :class:`distributed.Client`.
        job: :class:`~wsi_mil.features.pool.ExtractJob`.
        tasks: Slides with tiles, bag paths absolute.
        devices: ``--devices`` for every worker (see :func:`extract_chunk`).
        workers: Decode workers per task (None: the worker's default).
        chunk: Slides per task.
        stop: A :class:`~wsi_mil.outputs.StopRequest`; when it is set the outstanding
            tasks are cancelled and their slides reported ``interrupted``.
        advance: Called with each finished row (progress).
        worker_timeout: Seconds without any worker before the outstanding slides fail.

    Returns:
        One row per slide of ``tasks``.
    """
    from distributed import wait

    resources = _gpu_resources(client)
    size = max(1, int(chunk))
    chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    futures = {client.submit(extract_chunk, c, job, devices, workers, resources=resources,
                             pure=False): c for c in chunks}  # fmt: skip
    rows: list[Row] = []
    lost = _LostWorkers(client, worker_timeout)
    while futures:
        if stop is not None and stop.signum is not None:
            rows += _abandon(client, futures, "interrupted", "interrupted; re-run to resume")
            break
        with contextlib.suppress(TimeoutError):
            wait(list(futures), timeout=0.5, return_when="FIRST_COMPLETED")
        done = [f for f in futures if f.done()]
        for fut in done:
            for row in _chunk_rows(fut, futures.pop(fut)):
                rows.append(row)
                advance(row)
        if not done and lost():
            rows += _abandon(
                client,
                futures,
                "failed",
                (f"no Dask worker connected for {worker_timeout:g} s; start workers and re-run"),
            )
    return rows


def _chunk_rows(fut: Any, chunk: list[Any]) -> list[Row]:
    """The rows of a finished task; every slide ``failed`` when the task raised."""
    try:
        return list(fut.result())
    except Exception as exc:  # e.g. KilledWorker after repeated worker deaths
        text = " ".join(str(exc).split())[:300]
        return [_row(t, "failed", f"Dask task failed: {type(exc).__name__}: {text}")
                for t in chunk]  # fmt: skip


def _abandon(client: Any, futures: dict[Any, list[Any]], status: str, error: str) -> list[Row]:
    rows = []
    for fut, chunk in futures.items():
        with contextlib.suppress(Exception):
            client.cancel(fut)
        rows += [_row(t, status, error) for t in chunk]
    futures.clear()
    return rows


class _LostWorkers:
    """True once no worker has been connected for ``timeout`` seconds (checked each second)."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self.since: float | None = None
        self.checked = 0.0

    def __call__(self) -> bool:
        from wsi_mil.cluster import worker_resources

        now = time.monotonic()
        if now - self.checked < 1.0:
            return False
        self.checked = now
        try:
            any_worker = bool(worker_resources(self.client))
        except (OSError, TimeoutError):
            any_worker = False
        if any_worker:
            self.since = None
            return False
        self.since = self.since or now
        return now - self.since > self.timeout
