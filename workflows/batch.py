"""Per-slide batch execution: a local pool of worker processes or a Dask cluster.

Each slide is one :class:`Job`: a picklable top-level function and its keyword
arguments, returning a manifest row (``dict``). A failing job never stops the batch:
its exception becomes a ``status="failed"`` row naming the error, so a 10,000-slide
run keeps going and its manifest lists what went wrong.

Isolation and interruption:

- Every job runs in a worker process (also with one worker), so a slide whose reader
  crashes natively (a segfault in a C library) fails alone: its row names the slide and
  the signal (``worker process died with SIGSEGV while tiling <path>``), the worker is
  replaced and the batch goes on. ``workers=0`` runs the jobs in this process instead
  (for debugging; a native crash then ends the batch).
- A job's :attr:`Job.lock` is held while it runs, so two processes working on one
  output folder never work on one slide at once: the second defers the slide to the end
  of its batch and waits for the other to finish it (it then usually finds the output
  complete and skips it).
- SIGINT and SIGTERM stop the batch: workers are stopped, the temporaries of the slides
  they were on are removed, and :class:`~wsi_mil.errors.Interrupted` carries the rows
  so far (those slides ``interrupted``) so the caller can still write its manifest.
- Workers exit within a second when the batch's process dies (even ``kill -9``).
- On Dask, an unreachable scheduler fails within :data:`DASK_CONNECT_TIMEOUT` seconds
  (:class:`~wsi_mil.errors.SchedulerUnreachableError`), and a cluster left without any
  worker fails the outstanding slides after ``worker_timeout`` seconds instead of hanging.

Fault injection (tests only): see :data:`wsi_mil.processes.CRASH_ENV`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wsi_mil.errors import Interrupted
from wsi_mil.outputs import (
    StopRequest,
    acquire_lock,
    lock_holder,
    release_lock,
    remove_temporaries,
    stop_signals,
)
from wsi_mil.processes import crash_hook, interrupted_by, signal_name

__all__ = ["DASK_CONNECT_TIMEOUT", "Job", "run_batch"]

Row = dict[str, Any]

#: Seconds to wait for a Dask scheduler to answer before giving up.
DASK_CONNECT_TIMEOUT = 5.0

_POLL_S = 0.2


@dataclass(frozen=True)
class Job:
    """One unit of per-slide work.

    Attributes:
        slide_id: Identifier used in the manifest.
        path: The input file (for the manifest).
        fn: Picklable top-level function returning a manifest row.
        kwargs: Keyword arguments for ``fn``. Before a job is sent to a Dask cluster,
            relative paths in arguments whose name ends in ``_dir`` or ``_path`` are
            made absolute (workers have other working directories).
        lock: Lock file held by the batch's process while the job runs (see
            :func:`~wsi_mil.outputs.acquire_lock`); None = no lock.
        outputs: ``(folder, final name)`` of each output the job writes through
            :func:`~wsi_mil.outputs.atomic_path`; their temporaries are removed before
            the job runs (left by a killed run) and after it is interrupted or crashes.
    """

    slide_id: str
    path: str
    fn: Callable[..., Row]
    kwargs: dict[str, Any] = field(default_factory=dict)
    lock: str | None = None
    outputs: tuple[tuple[str, str], ...] = ()


def _execute(job: Job) -> Row:
    """Run one job, turning any exception into a ``failed`` row."""
    start = time.perf_counter()
    crash_hook(job.slide_id)
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


def _row(job: Job, status: str, error: str) -> Row:
    return {"slide_id": job.slide_id, "path": job.path, "status": status, "error": error}


def _remove_outputs_temporaries(job: Job) -> None:
    for folder, name in job.outputs:
        remove_temporaries(folder, name)


# ------------------------------------------------------------------ slide claims


class _Claims:
    """Hands out jobs in order once their lock is held; defers those locked elsewhere.

    A deferred job is retried at every call once the others are handed out; after
    ``lock_wait`` seconds it becomes a ``skipped`` row naming the holder.
    """

    def __init__(self, jobs: Sequence[Job], lock_wait: float) -> None:
        self.jobs = jobs
        self.lock_wait = lock_wait
        self.todo = deque(range(len(jobs)))
        self.deferred: dict[int, float] = {}
        self.rows: list[tuple[int, Row]] = []

    @property
    def done(self) -> bool:
        """True when every job was handed out or turned into a row."""
        return not self.todo and not self.deferred

    @property
    def waiting(self) -> int:
        """Jobs waiting for another process's lock."""
        return len(self.deferred)

    def take(self) -> int | None:
        """Index of the next job to run (its lock now held), or None for now."""
        while self.todo:
            i = self.todo.popleft()
            if self._claim(i):
                return i
            self.deferred[i] = time.monotonic()
        for i, since in list(self.deferred.items()):
            if self._claim(i):
                del self.deferred[i]
                return i
            if time.monotonic() - since > self.lock_wait:
                del self.deferred[i]
                self.rows.append((i, self._locked_row(self.jobs[i])))
        return None

    def drain(self) -> list[tuple[int, Row]]:
        """Rows produced without running a job (slides still locked by others)."""
        rows, self.rows = self.rows, []
        return rows

    def release(self, i: int, *, clean: bool = False) -> None:
        """Release job ``i``'s lock, first removing its temporaries when ``clean``."""
        job = self.jobs[i]
        if clean:
            _remove_outputs_temporaries(job)
        if job.lock is not None:
            release_lock(job.lock)

    def _claim(self, i: int) -> bool:
        job = self.jobs[i]
        if job.lock is not None and not acquire_lock(job.lock):
            return False
        _remove_outputs_temporaries(job)  # left by a killed run; nobody else writes them
        return True

    def _locked_row(self, job: Job) -> Row:
        holder = lock_holder(job.lock) if job.lock else None
        return _row(
            job,
            "skipped",
            f"locked by {holder or 'another process'} for more than {self.lock_wait:g} s "
            f"(another wsi-mil process is working on it; lock file {job.lock}); re-run when "
            "it has finished",
        )


# ------------------------------------------------------------------ local workers


def _watch_parent(parent: int) -> None:
    """Exit this process within a second once ``parent`` has died (even by ``kill -9``)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(conn: Any, parent: int) -> None:
    """Entry point of a worker process: run the jobs sent over ``conn`` until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the batch's process decides
    _watch_parent(parent)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(_execute(job))


class _Worker:
    """A worker process running one job at a time, sent over a pipe."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, os.getpid()), daemon=True, name="wsi-mil-worker"
        )
        self.proc.start()
        child.close()
        self.index: int | None = None

    def submit(self, index: int, job: Job) -> None:
        """Send ``job`` (the ``index``-th of the batch)."""
        self.conn.send(job)
        self.index = index

    def result(self) -> Row | None:
        """The finished job's row; None while it runs.

        Raises:
            ChildProcessError: The process died (the message names the signal).
        """
        if self.conn.poll():
            with contextlib.suppress(EOFError, OSError):
                row = self.conn.recv()
                self.index = None
                return row
        elif self.proc.is_alive():
            return None
        self.proc.join(timeout=5)
        raise ChildProcessError(signal_name(self.proc.exitcode))

    def close(self) -> None:
        """Let an idle process exit on its own (it releases its resources), else stop it."""
        if self.index is None and self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
                self.proc.join(timeout=5)
        self.stop()

    def stop(self) -> None:
        """Stop the process now (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self.conn.close()


class _LocalPool:
    """``workers`` worker processes fed from :class:`_Claims`; a dead one is replaced."""

    def __init__(
        self, jobs: Sequence[Job], claims: _Claims, workers: int, stop: StopRequest, action: str
    ) -> None:
        self.jobs, self.claims, self.stop, self.action = jobs, claims, stop, action
        self.ctx = mp.get_context("spawn")
        self.size = max(1, min(workers, len(jobs)))
        self.pool: list[_Worker] = []

    def run(self) -> Iterator[tuple[int, Row]]:
        """Yield ``(job index, row)`` as jobs finish; stop early when a signal arrives."""
        try:
            while not self.claims.done or self._busy():
                yield from self.claims.drain()
                if self.stop.signum is not None:
                    yield from self._interrupt()
                    return
                self._feed()
                self._wait()
                yield from self._collect()
            yield from self.claims.drain()
        finally:
            for worker in self.pool:
                worker.close()

    def _busy(self) -> list[_Worker]:
        return [w for w in self.pool if w.index is not None]

    def _feed(self) -> None:
        while len(self.pool) < self.size:
            self.pool.append(_Worker(self.ctx))
        for k, worker in enumerate(self.pool):
            if worker.index is None and (i := self.claims.take()) is not None:
                try:
                    worker.submit(i, self.jobs[i])
                except OSError:  # it died while idle: replace it
                    worker.stop()
                    self.pool[k] = _Worker(self.ctx)
                    self.pool[k].submit(i, self.jobs[i])

    def _wait(self) -> None:
        busy = self._busy()
        if busy:
            wait_for([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=_POLL_S)
        else:
            time.sleep(_POLL_S)  # only slides locked by another process are left

    def _collect(self) -> Iterator[tuple[int, Row]]:
        for k, worker in enumerate(self.pool):
            i = worker.index
            if i is None:
                continue
            try:
                row = worker.result()
            except ChildProcessError as exc:
                self.pool[k] = _Worker(self.ctx)
                yield i, self._died(i, str(exc))
                continue
            if row is not None:
                self.claims.release(i)
                yield i, row

    def _died(self, i: int, how: str) -> Row:
        job = self.jobs[i]
        self.claims.release(i, clean=True)
        if self.stop.signum is not None:
            return _row(job, "interrupted", f"{_stopped(self.stop)} while {self.action} it")
        return _row(
            job,
            "failed",
            f"worker process died with {how} while {self.action} {job.path} (a crash in "
            "the slide reader: this slide is damaged or unsupported; other slides are not "
            "affected; check the file, e.g. with `wsi-mil info`)",
        )

    def _interrupt(self) -> Iterator[tuple[int, Row]]:
        for worker in self.pool:
            i = worker.index
            worker.stop()
            if i is not None:
                self.claims.release(i, clean=True)
                yield i, _row(self.jobs[i], "interrupted", f"{_stopped(self.stop)} while "
                              f"{self.action} it; re-run to resume")  # fmt: skip
        self.pool = []


def _stopped(stop: StopRequest) -> str:
    return interrupted_by(stop.signum)


def _in_process(
    jobs: Sequence[Job], claims: _Claims, stop: StopRequest, action: str
) -> Iterator[tuple[int, Row]]:
    """Run the jobs in this process (``workers=0``: no crash isolation)."""
    while not claims.done and stop.signum is None:
        yield from claims.drain()
        i = claims.take()
        if i is None:
            time.sleep(_POLL_S)
            continue
        try:
            row = _execute(jobs[i])
        except KeyboardInterrupt:
            stop.signum = signal.SIGINT
            claims.release(i, clean=True)
            yield i, _row(jobs[i], "interrupted", f"{_stopped(stop)} while {action} it")
            return
        claims.release(i)
        yield i, row
    yield from claims.drain()


# ------------------------------------------------------------------ Dask


def _absolute(job: Job) -> Job:
    """``job`` with relative ``*_dir`` / ``*_path`` arguments made absolute."""
    kwargs = dict(job.kwargs)
    for key, value in job.kwargs.items():
        if key.endswith(("_dir", "_path")) and isinstance(value, str | os.PathLike):
            kwargs[key] = str(Path(value).resolve())
    return replace(job, kwargs=kwargs, path=str(Path(job.path).resolve()))


def _connect(scheduler: str) -> Any:
    """A Dask client of ``scheduler`` (see :func:`wsi_mil.cluster.connect`).

    Raises:
        SchedulerUnreachableError: No answer within :data:`DASK_CONNECT_TIMEOUT` seconds.
    """
    from wsi_mil.cluster import connect

    return connect(scheduler, timeout=DASK_CONNECT_TIMEOUT)


class _DaskRun:
    """The jobs submitted to a Dask cluster as their locks are taken."""

    def __init__(
        self,
        jobs: Sequence[Job],
        claims: _Claims,
        scheduler: str,
        stop: StopRequest,
        worker_timeout: float,
    ) -> None:
        self.jobs, self.claims, self.scheduler, self.stop = jobs, claims, scheduler, stop
        self.worker_timeout = worker_timeout
        self.futures: dict[Any, int] = {}
        self.no_workers_since: float | None = None
        self.checked = 0.0

    def run(self) -> Iterator[tuple[int, Row]]:
        """Yield ``(job index, row)`` as jobs finish on the cluster."""
        from distributed import wait

        with _connect(self.scheduler) as client:
            while not self.claims.done or self.futures:
                yield from self.claims.drain()
                if self.stop.signum is not None:
                    yield from self._abandon(client, f"{_stopped(self.stop)}; re-run to resume",
                                             "interrupted")  # fmt: skip
                    return
                while (i := self.claims.take()) is not None:
                    job = _absolute(self.jobs[i])
                    self.futures[client.submit(_execute, job, pure=False, retries=0)] = i
                if not self.futures:
                    time.sleep(_POLL_S)
                    continue
                with contextlib.suppress(TimeoutError):
                    wait(list(self.futures), timeout=_POLL_S * 2, return_when="FIRST_COMPLETED")
                done = [fut for fut in self.futures if fut.done()]
                yield from self._finished(done)
                if not done and self._cluster_lost(client):
                    yield from self._abandon(client, self._lost_message(), "failed")
            yield from self.claims.drain()

    def _finished(self, done: Any) -> Iterator[tuple[int, Row]]:
        for fut in done:
            i = self.futures.pop(fut)
            try:
                row = fut.result()
            except Exception as exc:
                row = _row(self.jobs[i], "failed", f"worker died: {type(exc).__name__}: {exc}")
            self.claims.release(i, clean=row.get("status") == "failed")
            yield i, row

    def _cluster_lost(self, client: Any) -> bool:
        """True when no worker has been connected for ``worker_timeout`` seconds."""
        now = time.monotonic()
        if now - self.checked < 1.0:
            return False
        self.checked = now
        if client.status not in ("running", "connecting"):
            return True
        try:
            workers = client.scheduler_info(n_workers=1).get("workers") or {}
        except (OSError, TimeoutError):
            workers = {}
        if workers:
            self.no_workers_since = None
            return False
        self.no_workers_since = self.no_workers_since or now
        return now - self.no_workers_since > self.worker_timeout

    def _lost_message(self) -> str:
        return (
            f"no Dask worker connected to {self.scheduler} for {self.worker_timeout:g} s "
            "(workers lost, e.g. killed with their nanny); the slide was not processed; "
            "start workers and re-run"
        )

    def _abandon(self, client: Any, error: str, status: str) -> Iterator[tuple[int, Row]]:
        for fut, i in list(self.futures.items()):
            with contextlib.suppress(Exception):
                client.cancel(fut)
            self.claims.release(i, clean=True)
            yield i, _row(self.jobs[i], status, error)
        self.futures.clear()
        while (j := self.claims.take()) is not None:  # not submitted yet
            self.claims.release(j)
            if status == "failed":
                yield j, _row(self.jobs[j], status, error)
        self.claims.deferred.clear()


# ------------------------------------------------------------------ entry point


def run_batch(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    desc: str = "slides",
    action: str = "processing",
    progress: bool = True,
    lock_wait: float = 600.0,
    worker_timeout: float = 60.0,
) -> list[Row]:
    """Run ``jobs`` and return one manifest row per job, in input order.

    Args:
        jobs: The per-slide jobs.
        workers: Worker processes (each job runs in one; a crash fails that job only).
            0 runs the jobs in this process (no crash isolation; for debugging).
            Ignored with ``scheduler``.
        scheduler: Address of a Dask distributed scheduler (``tcp://host:8786``); the
            same per-slide jobs are submitted to the cluster instead of a local pool.
        desc: Label of the progress bar.
        action: What a job does, for messages (``"tiling"`` →
            ``worker process died with SIGSEGV while tiling <path>``).
        progress: Show a progress bar on stderr.
        lock_wait: Seconds to wait for a slide whose lock another process holds, once
            every other slide is done; then it gets a ``skipped`` row naming the holder.
        worker_timeout: Seconds a Dask cluster may have no worker at all before the
            outstanding slides fail.

    Returns:
        Rows with at least ``slide_id``, ``path``, ``status`` and ``seconds``; slides
        left waiting for a lock get a ``skipped`` row.

    Raises:
        Interrupted: SIGINT or SIGTERM arrived; carries the rows of the slides finished
            or interrupted (``status="interrupted"``), the latter's temporaries removed.
        SchedulerUnreachableError: ``scheduler`` did not answer.
    """
    rows: list[Row | None] = [None] * len(jobs)
    claims = _Claims(jobs, lock_wait)
    with stop_signals() as stop, _bar(desc, len(jobs), progress) as update:
        if scheduler:
            stream = _DaskRun(jobs, claims, scheduler, stop, worker_timeout).run()
        elif workers <= 0:
            stream = _in_process(jobs, claims, stop, action)
        else:
            stream = _LocalPool(jobs, claims, workers, stop, action).run()
        for i, row in stream:
            rows[i] = row
            update(row, claims.waiting)
    done = [row for row in rows if row is not None]
    if stop.signum is not None:
        raise Interrupted(stop.signum, done)
    return done


@contextlib.contextmanager
def _bar(desc: str, total: int, progress: bool) -> Iterator[Callable[[Row, int], None]]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed{task.fields[waiting]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(desc, total=total, failed=0, waiting="")
        failed = 0

        def update(row: Row, waiting: int) -> None:
            nonlocal failed
            failed += row.get("status") == "failed"
            note = f", {waiting} locked by another process" if waiting else ""
            bar.update(task, advance=1, failed=failed, waiting=note)

        yield update
