"""Per-slide batch execution: a local process pool or a Dask cluster.

Each slide is one :class:`Job`: a picklable top-level function and its keyword
arguments, returning a manifest row (``dict``). A failing job never stops the batch:
its exception becomes a ``status="failed"`` row naming the error, so a 10,000-slide
run keeps going and its manifest lists what went wrong.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["Job", "run_batch"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Job:
    """One unit of per-slide work.

    Attributes:
        slide_id: Identifier used in the manifest.
        path: The input file (for the manifest).
        fn: Picklable top-level function returning a manifest row.
        kwargs: Keyword arguments for ``fn``.
    """

    slide_id: str
    path: str
    fn: Callable[..., Row]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _execute(job: Job) -> Row:
    """Run one job, turning any exception into a ``failed`` row."""
    start = time.perf_counter()
    try:
        row = dict(job.fn(**job.kwargs))
    except Exception as exc:
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        if not isinstance(exc, OSError | ValueError):
            row["traceback"] = traceback.format_exc(limit=6)
    row.setdefault("slide_id", job.slide_id)
    row.setdefault("path", job.path)
    row.setdefault("seconds", round(time.perf_counter() - start, 3))
    return row


def _failed(job: Job, exc: BaseException) -> Row:
    return {
        "slide_id": job.slide_id,
        "path": job.path,
        "status": "failed",
        "error": f"worker died: {type(exc).__name__}: {exc}",
    }


def _local(jobs: Sequence[Job], workers: int) -> Iterator[tuple[int, Row]]:
    if workers <= 1:
        for i, job in enumerate(jobs):
            yield i, _execute(job)
        return
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_execute, job): i for i, job in enumerate(jobs)}
        try:
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    yield i, fut.result()
                except Exception as exc:
                    yield i, _failed(jobs[i], exc)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _dask(jobs: Sequence[Job], scheduler: str) -> Iterator[tuple[int, Row]]:
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        futures = [client.submit(_execute, job, pure=False) for job in jobs]
        index = {fut.key: i for i, fut in enumerate(futures)}
        for fut in as_completed(futures):
            i = index[fut.key]
            try:
                yield i, fut.result()
            except Exception as exc:
                yield i, _failed(jobs[i], exc)


def run_batch(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    desc: str = "slides",
    progress: bool = True,
) -> list[Row]:
    """Run ``jobs`` and return one manifest row per job, in input order.

    Args:
        jobs: The per-slide jobs.
        workers: Local processes (1 = run in this process). Ignored with ``scheduler``.
        scheduler: Address of a Dask distributed scheduler (``tcp://host:8786``); the
            same per-slide jobs are submitted to the cluster instead of a local pool.
        desc: Label of the progress bar.
        progress: Show a progress bar on stderr.

    Returns:
        Rows with at least ``slide_id``, ``path``, ``status`` and ``seconds``.
    """
    rows: list[Row | None] = [None] * len(jobs)
    stream = _dask(jobs, scheduler) if scheduler else _local(jobs, workers)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(desc, total=len(jobs), failed=0)
        n_failed = 0
        for i, row in stream:
            rows[i] = row
            n_failed += row.get("status") == "failed"
            bar.update(task, advance=1, failed=n_failed)
    return [row for row in rows if row is not None]
