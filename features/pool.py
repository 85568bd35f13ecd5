"""Per-device extraction workers: one process per device, fed by decode workers.

Each device process builds the encoder once, then takes slides from a shared queue
(largest first). One :class:`torch.utils.data.DataLoader` per device process serves
every slide: its decode workers start once, read whole chunks of tiles from the zarr
stores (or from the slide when a store has no pixels) as uint8, in pinned memory on
CUDA, and read ahead across slide boundaries, so the device never waits for the next
slide. The device process moves tiles as uint8, normalises them on the device, and runs
the encoder under ``inference_mode`` (bf16/fp16 autocast on CUDA); each bag is written
by a background thread while the device embeds the next slide.
"""

from __future__ import annotations

import contextlib
import os
import queue
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
    """

    encoder: str
    weights: str | None
    weights_sha256: str
    batch_size: int = 256
    workers: int = 2
    dtype: str = "float16"
    n_procs: int = 1


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
                yield _Chunk(seq, task.store, 0, 0, _one_line(exc))
                continue
            rows = max(chunk, round(self.batch_size / chunk) * chunk)  # whole store chunks
            for start in range(0, task.n_tiles, rows):
                yield _Chunk(seq, task.store, start, min(task.n_tiles, start + rows))


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
        try:
            tiles = self._reader(item.store)(item.start, item.stop)
        except _SLIDE_ERRORS as exc:
            where = f"{item.store}: tiles {item.start}:{item.stop} unreadable"
            return item.seq, item.start, f"{where} ({_one_line(exc)}); re-tile this slide"
        return item.seq, item.start, torch.from_numpy(np.ascontiguousarray(tiles))


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

    def __init__(self, seq: int, task: SlideTask) -> None:
        self.seq = seq
        self.task = task
        self.t0 = time.perf_counter()
        self.out: torch.Tensor | None = None
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
                self.out = torch.empty((self.task.n_tiles, encoder.dim), device=dev)
            x = tiles.to(dev, non_blocking=True)
            self.out[start : start + len(x)] = encoder(x).float()
        except _SLIDE_ERRORS as exc:
            self.error = _one_line(exc)
            return 0
        self.n_done += len(x)
        return len(x)

    def result(self) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The manifest row so far and the features on the CPU (``None`` when failed)."""
        task = self.task
        row: dict[str, Any] = {"slide_id": task.slide_id, "path": task.bag, "n_tiles": task.n_tiles}
        if not self.complete or self.out is None:
            error = self.error or f"RuntimeError: read {self.n_done} tiles, expected {task.n_tiles}"
            row.update(status="failed", error=error)
            return row, None
        return row, self.out.cpu()


def _write(task: SlideTask, feats: torch.Tensor, job: ExtractJob, encoder: Any) -> None:
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
    }
    write_bag(task.bag, feats.numpy(), st.coords, attrs=attrs, dtype=job.dtype)


def run_device(device: str, job: ExtractJob, tasks: Iterator[SlideTask], emit: Emit) -> None:
    """Embed every slide ``tasks`` yields on ``device``; report through ``emit``.

    One DataLoader serves every slide (decode workers fork once and read ahead across
    slides); each finished slide's bag is written by a background thread while the
    device embeds the next. Messages: ``("progress", n_tiles)`` and ``("row", manifest
    row)``. A failing slide gives a ``failed`` row and the loop goes on; a failure to
    build the encoder raises.
    """
    from wsi_mil.features.registry import build_encoder, get_encoder_spec
    from wsi_mil.features.weights import RANDOM_WEIGHTS, ResolvedWeights

    dev = torch.device(device)
    if dev.type == "cpu" and job.n_procs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.n_procs))
    # the weights were resolved and hashed once by the caller (job.weights_sha256)
    path = None if job.weights in (None, RANDOM_WEIGHTS) else Path(job.weights)
    resolved = ResolvedWeights(path, job.weights_sha256)
    encoder = build_encoder(get_encoder_spec(job.encoder), resolved, dev)
    plan = _ChunkPlan(tasks, job.batch_size)
    loader = _loader(plan, job.workers, pin=dev.type == "cuda")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-writer") as writer:
        pending: list[Future[dict[str, Any]]] = []

        def close(slide: _Slide) -> None:
            row, feats = slide.result()
            if pending:  # at most one slide's features wait to be written
                emit(("row", pending.pop().result()))
            pending.append(writer.submit(_finish, slide.task, row, feats, slide.t0, job, encoder))

        slide: _Slide | None = None
        with torch.inference_mode(), _autocast(dev, encoder):
            for seq, start, tiles in loader:
                if slide is not None and slide.seq != seq:
                    close(slide)  # incomplete: its missing batches are reported
                    slide = None
                if slide is None:
                    slide = _Slide(seq, plan.taken[seq])
                n = slide.add(start, tiles, encoder, dev)
                if n:
                    emit(("progress", n))
                if slide.complete:
                    close(slide)
                    slide = None
        if slide is not None:
            close(slide)
        if pending:
            emit(("row", pending.pop().result()))


_SLIDE_ERRORS = (WsiMilError, OSError, ValueError, RuntimeError)


def _finish(
    task: SlideTask,
    row: dict[str, Any],
    feats: torch.Tensor | None,
    t0: float,
    job: ExtractJob,
    encoder: Any,
) -> dict[str, Any]:
    """Write the bag (in the writer thread, while the device embeds the next slide)."""
    if feats is not None:
        try:
            _write(task, feats, job, encoder)
            row.update(status="ok", error="")
        except _SLIDE_ERRORS as exc:
            row.update(status="failed", error=_one_line(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------- several processes


def _queue_iter(tasks: Any) -> Iterator[SlideTask]:
    """Slides from the shared queue until its end marker, or until the parent has died
    (device processes are not daemonic, so they must not outlive a killed parent)."""
    import multiprocessing as mp

    parent = mp.parent_process()
    while parent is None or parent.is_alive():
        task = tasks.get()
        if task is None:
            return
        yield task


def _process_main(device: str, job: ExtractJob, tasks: Any, results: Any) -> None:
    """Entry point of a device process (spawned)."""
    try:
        run_device(device, job, _queue_iter(tasks), results.put)
    except BaseException as exc:
        results.put(("fatal", f"{device}: {_one_line(exc)}"))
    finally:
        results.put(("done", device))


def run_pool(devices: list[str], job: ExtractJob, tasks: list[SlideTask], emit: Emit) -> None:
    """Embed ``tasks`` (already ordered largest first) on ``devices``.

    One device: in this process. Several: one spawned process per device pulling from
    a shared queue, so a free device always takes the next-largest slide.

    Raises:
        wsi_mil.errors.EncoderError: A device process could not build the encoder.
    """
    if len(devices) == 1:
        run_device(devices[0], job, iter(tasks), emit)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    task_q: Any = ctx.Queue()
    result_q: Any = ctx.Queue()
    for task in tasks:
        task_q.put(task)
    for _ in devices:
        task_q.put(None)
    procs = [
        # not daemonic: a device process starts its own decode workers
        ctx.Process(target=_process_main, args=(d, job, task_q, result_q))
        for d in devices
    ]
    for p in procs:
        p.start()
    try:
        _collect(procs, result_q, emit)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def _collect(procs: list[Any], result_q: Any, emit: Emit) -> None:
    from wsi_mil.errors import EncoderError

    done = 0
    fatal: list[str] = []
    while done < len(procs):
        try:
            kind, payload = result_q.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a process died without reporting; its slides get no row
            continue
        if kind == "done":
            done += 1
        elif kind == "fatal":
            fatal.append(str(payload))
        else:
            emit((kind, payload))
    if fatal:
        raise EncoderError("device process failed: " + " | ".join(fatal))
