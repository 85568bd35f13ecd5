"""Per-device extraction workers: one process per device, fed by decode workers.

Each device process builds the encoder once, then takes slides from a shared queue
(largest first). One :class:`torch.utils.data.DataLoader` per device process serves
every slide: its decode workers start once, read whole chunks of tiles from the zarr
stores (or from the slide when a store has no pixels) as uint8, in pinned memory on
CUDA, and read ahead across slide boundaries, so the device never waits for the next
slide. The device process moves tiles as uint8, normalises them on the device, and runs
the encoder under ``inference_mode`` (bf16/fp16 autocast on CUDA); each bag is written
by a background thread while the device embeds the next slide.

Crash isolation: when a decode worker dies (a native crash, e.g. a segfault in a C
library; torch raises "DataLoader worker ... is killed by signal"), the slides in flight
are embedded again one at a time in a fresh DataLoader, so only the one that crashes
again fails (its row names the signal), and the rest of the queue goes on in a new
DataLoader. A device process that dies fails the slide it was on (several in flight:
each is retried alone in a new process) and is replaced. With ``workers=0`` decoding
runs in the device process, which with one device is the caller's: no isolation then.
SIGINT/SIGTERM (:func:`~wsi_mil.outputs.stop_signals`) stop the loaders and device
processes; the slides in flight get ``interrupted`` rows.

Fault injection (tests only): when ``WSI_MIL_TEST_CRASH``
(:data:`~wsi_mil.processes.CRASH_ENV`) names a slide id, the process decoding
that slide kills itself with SIGSEGV.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_mil.errors import WsiMilError
from wsi_mil.processes import crash_hook, interrupted_by, signal_name

__all__ = [
    "ExtractJob",
    "SlideTask",
    "default_workers",
    "parse_devices",
    "run_device",
    "run_pool",
]

Emit = Callable[[tuple[str, Any]], None]


@dataclass(frozen=True)
class SlideTask:
    """One slide to embed.

    Attributes:
        store: Path of ``<slide_id>.zarr``.
        slide_id: Slide identifier.
        n_tiles: Number of tiles (for ordering and progress).
        bag: Final path of the bag.
        fingerprint: Tile-store fingerprint recorded in the bag.
    """

    store: str
    slide_id: str
    n_tiles: int
    bag: str
    fingerprint: str


@dataclass(frozen=True)
class ExtractJob:
    """Settings shared by every device process (picklable).

    Attributes:
        encoder: Registry name.
        weights: Resolved weights path, ``"random"`` or ``None`` (weight-free).
        weights_sha256: Recorded in every bag.
        batch_size: Tiles per forward pass (rounded to whole store chunks).
        workers: Decode worker processes per device (0 = decode in the device process).
        dtype: Bag feature dtype (``float16`` or ``float32``).
        n_procs: Device processes sharing this machine (CPU threads are split).
        stain: Stain normalisation (:class:`~wsi_mil.features.stain.StainSpec`), fitted
            per slide on its tiles when the slide starts; ``None`` = none.
        augment: Stain augmentation (:class:`~wsi_mil.features.augment.AugmentSpec`):
            K jittered views of every tile embedded from the same decoded batch and
            written as ``features_augmented`` (K, N, D); ``None`` = none.
    """

    encoder: str
    weights: str | None
    weights_sha256: str
    batch_size: int = 256
    workers: int = 2
    dtype: str = "float16"
    n_procs: int = 1
    stain: Any = None
    augment: Any = None


def parse_devices(devices: str | list[str] | None) -> list[str]:
    """Turn ``--devices`` into a list of torch device strings.

    Args:
        devices: ``"cpu"``, ``"cuda:0,cuda:1"``, ``"cpu,cpu"`` (two CPU processes), a
            list, or ``None`` = every visible GPU, else the CPU.

    Raises:
        wsi_mil.errors.ConfigError: Malformed device or CUDA device not available.
    """
    from wsi_mil.errors import ConfigError

    if devices is None or devices == "" or devices == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        try:
            dev = torch.device(item)
        except RuntimeError:
            raise ConfigError(f"--devices: {item!r} is not a device (use cpu or cuda:N)") from None
        if dev.type == "cuda":
            idx = dev.index or 0
            if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
                raise ConfigError(
                    f"--devices: {item!r} is not available "
                    f"({torch.cuda.device_count()} CUDA device(s) visible); use cpu"
                )
            out.append(f"cuda:{idx}")
        elif dev.type == "cpu":
            out.append("cpu")
        else:
            raise ConfigError(f"--devices: {item!r} is not supported (use cpu or cuda:N)")
    if not out:
        raise ConfigError("--devices is empty; use cpu or cuda:0,cuda:1")
    return out


def default_workers(devices: list[str], cpus: int | None = None) -> int:
    """Decode workers per device process when ``--workers`` is not given.

    On GPUs, each device process gets its share of the CPU cores, less one for itself,
    capped at 12. On an H100 with 16 cores, 12 workers kept ViT-B/16 bf16 at 0.84 of the
    model alone. On the CPU the encoder needs the cores, so 2.

    Args:
        devices: From :func:`parse_devices`.
        cpus: Usable CPU cores (default: this process's affinity).
    """
    if all(d == "cpu" for d in devices):
        return 2
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(12, (cpus or 1) // len(devices) - 1))


# ------------------------------------------------------------------ decode workers


@dataclass(frozen=True)
class _Chunk:
    """One decode work item: tile rows ``[start, stop)`` of the ``seq``-th slide taken.

    ``error`` is set when the slide could not even be planned (unreadable store); the
    item then carries the message instead of pixels.
    """

    seq: int
    slide_id: str
    store: str
    start: int
    stop: int
    error: str = ""


class _ChunkPlan:
    """The DataLoader's sampler: :class:`_Chunk` items over the slides ``tasks`` yields.

    Slides are pulled lazily, in the device process's main thread, only when the decode
    workers need more work; with several devices each one takes the next-largest slide
    from the shared queue when it gets there. ``taken[seq]`` is the ``seq``-th slide.
    """

    def __init__(self, tasks: Iterator[SlideTask], batch_size: int) -> None:
        self.tasks = tasks
        self.batch_size = batch_size
        self.taken: list[SlideTask] = []

    def __iter__(self) -> Iterator[_Chunk]:
        for task in self.tasks:
            seq = len(self.taken)
            self.taken.append(task)
            try:
                chunk = _chunk_tiles(task.store)
                if task.n_tiles < 1:
                    raise ValueError(f"{task.store} has no tiles to embed")
            except _SLIDE_ERRORS as exc:
                yield _Chunk(seq, task.slide_id, task.store, 0, 0, _one_line(exc))
                continue
            rows = max(chunk, round(self.batch_size / chunk) * chunk)  # whole store chunks
            for start in range(0, task.n_tiles, rows):
                stop = min(task.n_tiles, start + rows)
                yield _Chunk(seq, task.slide_id, task.store, start, stop)


class _ChunkDataset(Dataset):
    """Decodes a :class:`_Chunk` → ``(seq, start, tiles)``.

    ``tiles`` is uint8 (n, tile_px, tile_px, 3), or the error text when the read failed.
    Each decode worker keeps the last few stores open: slides arrive in order.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._readers: dict[str, Callable[[int, int], np.ndarray]] = {}

    def _reader(self, store: str) -> Callable[[int, int], np.ndarray]:
        if store not in self._readers:
            from wsi_mil.tiling import open_tile_store

            st = open_tile_store(store)
            self._readers[store] = st.read_pixels if st.has_pixels else _SlideReader(st)
            while len(self._readers) > self.keep:
                self._readers.pop(next(iter(self._readers)))
        return self._readers[store]

    def __getitem__(self, item: _Chunk) -> tuple[int, int, torch.Tensor | str]:
        if item.error:
            return item.seq, item.start, item.error
        crash_hook(item.slide_id)
        try:
            tiles = self._reader(item.store)(item.start, item.stop)
        except _SLIDE_ERRORS as exc:
            where = f"{item.store}: tiles {item.start}:{item.stop} unreadable"
            return item.seq, item.start, f"{where} ({_one_line(exc)}); re-tile this slide"
        return item.seq, item.start, torch.from_numpy(np.ascontiguousarray(tiles))


def _worker_death(exc: BaseException) -> str | None:
    """How a decode worker died, from torch's error (``SIGSEGV``); None for other errors.

    Torch raises ``RuntimeError("DataLoader worker (pid N) is killed by signal:
    Segmentation fault.")`` (or ``... exited unexpectedly``) in the loading process.
    """
    text = str(exc).strip()
    if not isinstance(exc, RuntimeError) or not text.startswith("DataLoader worker"):
        return None
    found = re.search(r"killed by signal: ([^.]+)", text)
    if not found:
        return "an unexpected exit"
    for sig in signal.Signals:
        if signal.strsignal(sig) == found.group(1).strip():
            return sig.name
    return found.group(1).strip()


def _exit_signal(loader: Any) -> str | None:
    """The signal (``SIGSEGV``) a decode worker of ``loader`` (a DataLoader iterator) died
    of; None when none is known (torch's error then says "exited unexpectedly")."""
    for worker in getattr(loader, "_workers", None) or []:
        if worker.exitcode is not None and worker.exitcode < 0:
            return signal_name(worker.exitcode)
    return None


class _SlideReader:
    """Reads a store's tiles from its source slide (stores tiled with ``--pixels none``)."""

    def __init__(self, store: Any) -> None:
        from wsi_mil.wsi import open_slide

        self.coords = store.coords
        self.tile_px = store.tile_px
        self.target_mpp = store.target_mpp
        path = store.source_path
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{store.path} holds no pixels and its slide {path} is missing; "
                "restore the slide or re-tile with --pixels lossless"
            )
        self.slide = open_slide(path, mpp=store.attrs.get("mpp"))

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self.slide.read_tiles(self.coords[start:stop], self.tile_px, self.target_mpp)


def _loader(plan: _ChunkPlan, workers: int, pin: bool) -> DataLoader:
    """One DataLoader for every slide of a device process: its decode workers start once
    and read ahead across slide boundaries, so the device never waits between slides."""
    extra: dict[str, Any] = {"prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(
        _ChunkDataset(), sampler=plan, batch_size=None, num_workers=workers,
        pin_memory=pin, **extra,
    )  # fmt: skip


def _chunk_tiles(store: str) -> int:
    from wsi_mil.tiling import open_tile_store

    return open_tile_store(store).chunk_tiles


# ---------------------------------------------------------------- device process


def _autocast(device: torch.device, encoder: Any) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not encoder.spec.needs_weights:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class _Slide:
    """Embeddings of one slide as its batches arrive (float32 (n, dim) on the device)."""

    def __init__(self, seq: int, task: SlideTask, stain: Any = None, augment: Any = None) -> None:
        self.seq = seq
        self.task = task
        self.stain = stain  # StainSpec | None
        self.stain_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.stain_record: dict[str, Any] | None = None
        self.augment = augment  # AugmentSpec | None
        self.views: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.t0 = time.perf_counter()
        self.out: torch.Tensor | None = None
        #: (K, n, dim) embeddings of the jittered views (``augment``), on the device
        self.aug: torch.Tensor | None = None
        self.n_done = 0
        self.error = ""

    @property
    def complete(self) -> bool:
        return not self.error and self.n_done == self.task.n_tiles

    def add(self, start: int, tiles: torch.Tensor | str, encoder: Any, dev: torch.device) -> int:
        """Embed one batch into rows ``start:``; returns the number of tiles embedded."""
        if self.error:
            return 0
        if isinstance(tiles, str):
            self.error = tiles
            return 0
        try:
            if self.out is None:
                self._fit_stain(dev)
                self.out = torch.empty((self.task.n_tiles, encoder.dim), device=dev)
                self._start_views(dev, encoder.dim)
            x = tiles.to(dev, non_blocking=True)
            y = encoder(x) if self.stain_fn is None else encoder(x, stain=self.stain_fn)
            self.out[start : start + len(x)] = y.float()
            if self.aug is not None:  # the same decoded tiles, jittered
                for i, view in enumerate(self.views):
                    self.aug[i, start : start + len(x)] = encoder(x, stain=view).float()
        except _SLIDE_ERRORS as exc:
            if _worker_death(exc):
                raise  # torch's SIGCHLD handler: a decode worker died, not this slide
            self.error = _one_line(exc)
            return 0
        self.n_done += len(x)
        return len(x)

    def _fit_stain(self, dev: torch.device) -> None:
        """Fit the slide's stain on its tiles (:func:`~wsi_mil.features.stain.fit_store`)."""
        if self.stain is None:
            return
        from wsi_mil.features import stain as st

        source = st.fit_store(self.task.store, self.stain.method)
        target = self.stain.target_tuple()
        src = type(source)(*(v.to(dev) for v in source))
        tgt = type(target)(*(v.to(dev) for v in target))
        self.stain_fn = lambda t: st.apply_stain(t, src, tgt)
        self.stain_record = self.stain.record(source)

    def _start_views(self, dev: torch.device, dim: int) -> None:
        """Prepare the jittered views (after the stain fit, which they follow)."""
        if self.augment is None:
            return
        from wsi_mil.features.augment import view_functions

        self.views = view_functions(self.augment, self.task.slide_id, dev, self.stain_fn)
        self.aug = torch.empty((len(self.views), self.task.n_tiles, dim), device=dev)

    def augmented(self) -> tuple[dict[str, Any], torch.Tensor] | None:
        """The ``augment`` record and the views' features on the CPU, or ``None``."""
        if self.augment is None or self.aug is None:
            return None
        return self.augment.record(self.task.slide_id), self.aug.cpu()

    def result(self) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The manifest row so far and the features on the CPU (``None`` when failed)."""
        task = self.task
        row: dict[str, Any] = {"slide_id": task.slide_id, "path": task.bag, "n_tiles": task.n_tiles}
        if not self.complete or self.out is None:
            error = self.error or f"RuntimeError: read {self.n_done} tiles, expected {task.n_tiles}"
            row.update(status="failed", error=error)
            return row, None
        return row, self.out.cpu()


def _write(task: SlideTask, feats: torch.Tensor, job: ExtractJob, encoder: Any,
           stain: dict[str, Any] | None = None,
           augmented: tuple[dict[str, Any], torch.Tensor] | None = None) -> None:  # fmt: skip
    from wsi_mil.features.bags import write_bag
    from wsi_mil.tiling import open_tile_store

    st = open_tile_store(task.store)
    a = st.attrs
    attrs = {
        "encoder": job.encoder,
        "weights_sha256": job.weights_sha256,
        "target_mpp": st.target_mpp,
        "tile_px": st.tile_px,
        "slide_id": task.slide_id,
        "mpp": a.get("mpp"),
        "tile_level0": a.get("tile_level0"),
        "store_fingerprint": task.fingerprint,
        "store": str(Path(task.store).resolve()),
        "source": a.get("source"),
        "pooling": encoder.spec.pooling,
        "input_px": encoder.spec.input_px,
        "stain": stain or {"method": "none"},
        "augment": augmented[0] if augmented is not None else {"method": "none"},
    }
    views = augmented[1].numpy() if augmented is not None else None
    write_bag(task.bag, feats.numpy(), st.coords, attrs=attrs, dtype=job.dtype, augmented=views)


@dataclass(frozen=True)
class _Broken:
    """Why a DataLoader stopped before its slides were done.

    Attributes:
        how: The signal of a dead decode worker (``SIGSEGV``), or of the stop request.
        tasks: The slides in flight (taken, no row yet).
        stopped: True for SIGINT/SIGTERM, False for a decode worker that died.
    """

    how: str
    tasks: list[SlideTask]
    stopped: bool = False


class _Device:
    """The encoder of one device and the slides it embeds, one DataLoader at a time."""

    def __init__(self, dev: torch.device, job: ExtractJob, encoder: Any, emit: Emit,
                 stop: Any) -> None:  # fmt: skip
        self.dev, self.job, self.encoder, self.emit, self.stop = dev, job, encoder, emit, stop
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-writer")
        self.pending: list[Future[dict[str, Any]]] = []
        self.closed: set[int] = set()

    def run(self, tasks: Iterator[SlideTask]) -> None:
        """Embed every slide of ``tasks``; a decode worker that dies fails its slide only.

        The slides in flight when a decode worker died are embedded again one at a time
        in a fresh DataLoader, so only the one that crashes again fails; the rest of
        ``tasks`` goes on in a new DataLoader.
        """
        try:
            while (broken := self.drain(tasks)) is not None and not broken.stopped:
                broken = self.retry_alone(broken.tasks)
                if broken is not None:
                    break
            self.flush(keep=0)
            if broken is not None:
                self.interrupted(broken.tasks)
        finally:
            self.writer.shutdown(wait=True)

    def retry_alone(self, suspects: list[SlideTask]) -> _Broken | None:
        """Embed each of ``suspects`` alone; fail those whose decode worker dies again."""
        for k, task in enumerate(suspects):
            broken = self.drain(iter([task]))
            if broken is not None and broken.stopped:
                return _Broken(broken.how, suspects[k:], stopped=True)
            if broken is not None:
                self.fail(task, broken.how)
        return None

    def drain(self, tasks: Iterator[SlideTask]) -> _Broken | None:
        """Embed the slides of ``tasks`` through one DataLoader; None when all are done."""
        plan = _ChunkPlan(tasks, self.job.batch_size)
        loader = iter(_loader(plan, self.job.workers, pin=self.dev.type == "cuda"))
        self.closed = set()
        try:
            return self._loop(loader, plan)
        except RuntimeError as exc:
            how = _worker_death(exc)
            if how is None:
                raise
            how = _exit_signal(loader) or how
            return _Broken(how, [t for i, t in enumerate(plan.taken) if i not in self.closed])
        finally:
            shutdown = getattr(loader, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _loop(self, loader: Iterator[Any], plan: _ChunkPlan) -> _Broken | None:
        slide: _Slide | None = None
        for seq, start, tiles in loader:
            if slide is not None and slide.seq != seq:
                self.close(slide)  # incomplete: its missing batches are reported
                slide = None
            if self.stop.signum is not None:
                left = [t for i, t in enumerate(plan.taken) if i not in self.closed]
                return _Broken(signal_name(-(self.stop.signum or 0)), left, stopped=True)
            if slide is None:
                slide = _Slide(seq, plan.taken[seq], self.job.stain, self.job.augment)
            n = slide.add(start, tiles, self.encoder, self.dev)
            if n:
                self.emit(("progress", n))
            if slide.complete:
                self.close(slide)
                slide = None
        if slide is not None:
            self.close(slide)
        return None

    def close(self, slide: _Slide) -> None:
        """Hand ``slide`` to the bag writer; report the slide written before it."""
        row, feats = slide.result()
        args = (slide.task, row, feats, slide.t0, self.job, self.encoder, slide.stain_record,
                slide.augmented() if feats is not None else None)  # fmt: skip
        self.pending.append(self.writer.submit(_finish, *args))
        self.closed.add(slide.seq)
        self.flush(keep=1)  # at most one slide's features wait to be written

    def flush(self, keep: int) -> None:
        """Report written bags until at most ``keep`` are still being written."""
        while len(self.pending) > keep:
            row = self.pending[0].result()
            self.pending.pop(0)
            self.emit(("row", row))

    def fail(self, task: SlideTask, how: str) -> None:
        """Report ``task`` failed: its decode worker died with ``how``."""
        self.emit(("row", _row(task, "failed", (
            f"decode worker died with {how} while reading {task.store} (a crash in the "
            "slide or tile reader: this store or its slide is damaged or unsupported; "
            "other slides are not affected; check it with `wsi-mil verify` or re-tile it)"
        ))))  # fmt: skip

    def interrupted(self, tasks: list[SlideTask]) -> None:
        """Report ``tasks`` interrupted (no bag of theirs was started)."""
        for task in tasks:
            error = f"{interrupted_by(self.stop.signum)} while embedding it; re-run"
            self.emit(("row", _row(task, "interrupted", error + " to resume")))


def _row(task: SlideTask, status: str, error: str) -> dict[str, Any]:
    return {"slide_id": task.slide_id, "path": task.bag, "n_tiles": task.n_tiles,
            "status": status, "error": error, "seconds": 0.0}  # fmt: skip


def run_device(device: str, job: ExtractJob, tasks: Iterator[SlideTask], emit: Emit) -> None:
    """Embed every slide ``tasks`` yields on ``device``; report through ``emit``.

    One DataLoader serves every slide (decode workers fork once and read ahead across
    slides); each finished slide's bag is written by a background thread while the
    device embeds the next. Messages: ``("progress", n_tiles)`` and ``("row", manifest
    row)``. A failing slide gives a ``failed`` row and the loop goes on; so does a slide
    whose decode worker dies (a native crash: the row names the signal). On SIGINT or
    SIGTERM (see :func:`~wsi_mil.outputs.stop_signals`) the slides in flight get
    ``interrupted`` rows and the remaining ones none. A failure to build the encoder
    raises.
    """
    from wsi_mil.features.registry import build_encoder, get_encoder_spec
    from wsi_mil.features.weights import RANDOM_WEIGHTS, ResolvedWeights
    from wsi_mil.outputs import stop_signals

    dev = torch.device(device)
    if dev.type == "cpu" and job.n_procs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.n_procs))
    # the weights were resolved and hashed once by the caller (job.weights_sha256)
    path = None if job.weights in (None, RANDOM_WEIGHTS) else Path(job.weights)
    resolved = ResolvedWeights(path, job.weights_sha256)
    encoder = build_encoder(get_encoder_spec(job.encoder), resolved, dev)
    with stop_signals() as stop, torch.inference_mode(), _autocast(dev, encoder):
        _Device(dev, job, encoder, emit, stop).run(tasks)


_SLIDE_ERRORS = (WsiMilError, OSError, ValueError, RuntimeError)


def _finish(
    task: SlideTask,
    row: dict[str, Any],
    feats: torch.Tensor | None,
    t0: float,
    job: ExtractJob,
    encoder: Any,
    stain: dict[str, Any] | None = None,
    augmented: tuple[dict[str, Any], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write the bag (in the writer thread, while the device embeds the next slide)."""
    if feats is not None:
        try:
            _write(task, feats, job, encoder, stain, augmented)
            row.update(status="ok", error="")
        except _SLIDE_ERRORS as exc:
            row.update(status="failed", error=_one_line(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------- several processes


def _queue_iter(tasks: Any, emit: Emit) -> Iterator[SlideTask]:
    """Slides from the shared queue until its end marker, or until the parent has died
    (device processes are not daemonic, so they must not outlive a killed parent).

    Each slide is announced (``("take", slide_id)``) before its first chunk is read, so
    the parent knows which slides a device process that dies was on.
    """
    import multiprocessing as mp

    parent = mp.parent_process()
    while parent is None or parent.is_alive():
        task = tasks.get()
        if task is None:
            emit(("end", None))  # its end marker is taken: a replacement needs another
            return
        emit(("take", task.slide_id))
        yield task


def _process_main(device: str, job: ExtractJob, tasks: Any, conn: Any) -> None:
    """Entry point of a device process (spawned); reports over the pipe ``conn``."""
    try:
        run_device(device, job, _queue_iter(tasks, conn.send), conn.send)
    except BaseException as exc:
        conn.send(("fatal", f"{device}: {_one_line(exc)}"))
    finally:
        conn.send(("done", device))


class _DeviceProcess:
    """A spawned device process, the pipe it reports on and the slides it is on."""

    def __init__(
        self, ctx: Any, device: str, job: ExtractJob, tasks: Any, alone: bool = False
    ) -> None:
        self.device, self.alone = device, alone
        self.tasks = tasks  # kept: the child unpickles it after start() returns
        self.conn, child = ctx.Pipe(duplex=False)
        # not daemonic: a device process starts its own decode workers
        self.proc = ctx.Process(target=_process_main, args=(device, job, tasks, child))
        self.proc.start()
        child.close()
        self.inflight: list[str] = []
        self.done = False  # it said so: no slide of its left without a row
        self.ended = False  # the process has exited
        self.took_end = False  # it took its end marker from the queue

    def messages(self) -> Iterator[tuple[str, Any]]:
        """The messages received so far."""
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll():
                yield self.conn.recv()

    def stop(self, timeout: float = 5.0) -> None:
        """Wait for the process to exit, then terminate it."""
        self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)


class _Pool:
    """Device processes sharing one queue of slides; a process that dies fails the slide
    it was on (named with the signal) and is replaced, so the others go on."""

    def __init__(self, devices: list[str], job: ExtractJob, tasks: list[SlideTask], emit: Emit,
                 stop: Any) -> None:  # fmt: skip
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.job, self.emit, self.stop = job, emit, stop
        self.tasks = {t.slide_id: t for t in tasks}
        self.queue: Any = self.ctx.Queue()
        for task in tasks:
            self.queue.put(task)
        for _ in devices:
            self.queue.put(None)
        self.procs = [_DeviceProcess(self.ctx, d, job, self.queue) for d in devices]
        self.restarts = len(tasks)
        self.fatal: list[str] = []
        self.signalled = False

    def run(self) -> None:
        """Collect the messages of every process until all have ended."""
        from multiprocessing.connection import wait

        try:
            while live := [p for p in self.procs if not p.ended]:
                if self.stop.signum is not None and not self.signalled:
                    self.signalled = True
                    for p in live:
                        with contextlib.suppress(OSError):
                            p.proc.terminate()  # SIGTERM: it reports its slides interrupted
                wait([p.conn for p in live] + [p.proc.sentinel for p in live], timeout=1.0)
                for p in live:
                    self._read(p)
        finally:
            for p in self.procs:
                p.stop()

    def _read(self, p: _DeviceProcess) -> None:
        for kind, payload in p.messages():
            if kind == "take":
                p.inflight.append(payload)
            elif kind == "row":
                with contextlib.suppress(ValueError):
                    p.inflight.remove(payload["slide_id"])
                self.emit((kind, payload))
            elif kind == "fatal":
                self.fatal.append(str(payload))
            elif kind == "done":
                p.done = True
            elif kind == "end":
                p.took_end = True
            else:
                self.emit((kind, payload))
        if not p.proc.is_alive():
            p.proc.join(timeout=5)
            p.ended = True
            if not p.done:
                self._died(p)

    def _died(self, p: _DeviceProcess) -> None:
        """Report or retry the slides ``p`` was on, and replace it on the shared queue.

        One slide in flight fails, named with the signal. Several (one being decoded,
        one whose bag was being written) are each embedded again alone in a new
        process, so only the one that crashes again fails.
        """
        if self.stop.signum is not None:
            for sid in p.inflight:
                error = f"{interrupted_by(self.stop.signum)}; re-run to resume"
                self.emit(("row", _row(self.tasks[sid], "interrupted", error)))
            return
        if len(p.inflight) == 1 or p.alone:
            for sid in p.inflight:
                self.emit(("row", _row(self.tasks[sid], "failed", self._crash_error(p, sid))))
        else:
            for sid in p.inflight:
                private: Any = self.ctx.Queue()
                private.put(self.tasks[sid])
                private.put(None)
                self.procs.append(_DeviceProcess(self.ctx, p.device, self.job, private, True))
        if not p.alone and self.restarts > 0:
            self.restarts -= 1
            if p.took_end:
                self.queue.put(None)  # the replacement's end marker
            self.procs.append(_DeviceProcess(self.ctx, p.device, self.job, self.queue))

    def _crash_error(self, p: _DeviceProcess, sid: str) -> str:
        return (
            f"device process {p.device} died with {signal_name(p.proc.exitcode)} while "
            f"embedding {self.tasks[sid].store} (a crash in the slide or tile reader or the "
            "encoder: this store or its slide is damaged or unsupported; other slides are "
            "not affected; check it with `wsi-mil verify` or re-tile it)"
        )


def run_pool(devices: list[str], job: ExtractJob, tasks: list[SlideTask], emit: Emit) -> None:
    """Embed ``tasks`` (already ordered largest first) on ``devices``.

    One device: in this process. Several: one spawned process per device pulling from
    a shared queue, so a free device always takes the next-largest slide. A device
    process that dies (a native crash) fails the slides it was on, named with the
    signal, and is replaced. On SIGINT/SIGTERM the device processes are stopped and
    report their slides ``interrupted``.

    Raises:
        wsi_mil.errors.EncoderError: A device process could not build the encoder.
    """
    from wsi_mil.errors import EncoderError
    from wsi_mil.outputs import stop_signals

    if len(devices) == 1:
        run_device(devices[0], job, iter(tasks), emit)
        return
    with stop_signals() as stop:
        pool = _Pool(devices, job, tasks, emit, stop)
        pool.run()
    if pool.fatal:
        raise EncoderError("device process failed: " + " | ".join(pool.fatal))
