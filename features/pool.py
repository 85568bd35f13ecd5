"""Per-device extraction workers: one process per device, fed by decode workers.

Each device process builds the encoder once, then takes slides from a shared queue
(largest first). For each slide a :class:`torch.utils.data.DataLoader` of decode
workers reads whole chunks of tiles from the zarr store (or from the slide when the
store has no pixels) as uint8, in pinned memory on CUDA; the device process moves them
as uint8, normalises on the device, and runs the encoder under ``inference_mode``
(bf16/fp16 autocast on CUDA). The next slide's loader is started before the current
slide is finished, so its decode workers are already reading when the device frees up,
and each bag is written by a background thread while the device embeds the next slide.
"""

from __future__ import annotations

import contextlib
import math
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

__all__ = ["ExtractJob", "SlideTask", "parse_devices", "run_device", "run_pool"]

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


# ------------------------------------------------------------------ decode workers


class _ChunkDataset(Dataset):
    """Item i = uint8 tiles (n, tile_px, tile_px, 3) for rows [i·rows, (i+1)·rows)."""

    def __init__(self, store: str, rows: int, n_tiles: int) -> None:
        self.store = store
        self.rows = rows
        self.n_tiles = n_tiles
        self._reader: Any = None

    def __len__(self) -> int:
        return math.ceil(self.n_tiles / self.rows)

    def _open(self) -> Any:
        if self._reader is None:
            from wsi_mil.tiling import open_tile_store

            st = open_tile_store(self.store)
            if st.has_pixels:
                self._reader = st.read_pixels
            else:
                self._reader = _SlideReader(st)
        return self._reader

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.rows
        stop = min(self.n_tiles, start + self.rows)
        return torch.from_numpy(np.ascontiguousarray(self._open()(start, stop)))


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


def _loader(task: SlideTask, job: ExtractJob, chunk: int, pin: bool) -> Iterator[torch.Tensor]:
    rows = max(chunk, round(job.batch_size / chunk) * chunk)
    ds = _ChunkDataset(task.store, rows, task.n_tiles)
    kwargs: dict[str, Any] = {}
    if job.workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    loader = DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=job.workers, pin_memory=pin, **kwargs
    )
    return iter(loader)  # with workers, reading starts now


# ---------------------------------------------------------------- device process


def _autocast(device: torch.device, encoder: Any) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not encoder.spec.needs_weights:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _embed(
    encoder: Any, batches: Iterator[torch.Tensor], n: int, device: torch.device, emit: Emit
) -> torch.Tensor:
    """Run the encoder over a slide's batches → float32 (n, dim) on the CPU."""
    out = torch.empty((n, encoder.dim), dtype=torch.float32, device=device)
    pos = 0
    with torch.inference_mode(), _autocast(device, encoder):
        for tiles in batches:
            x = tiles.to(device, non_blocking=True)
            out[pos : pos + len(x)] = encoder(x).float()
            pos += len(x)
            emit(("progress", len(x)))
    if pos != n:
        raise RuntimeError(f"read {pos} tiles, expected {n}")
    return out.cpu()


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


def _chunk_tiles(store: str) -> int:
    from wsi_mil.tiling import open_tile_store

    return open_tile_store(store).chunk_tiles


def run_device(device: str, job: ExtractJob, tasks: Iterator[SlideTask], emit: Emit) -> None:
    """Embed every slide ``tasks`` yields on ``device``; report through ``emit``.

    Messages: ``("progress", n_tiles)`` and ``("row", manifest row)``. A failing slide
    gives a ``failed`` row and the loop goes on; a failure to build the encoder raises.
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
    pin = dev.type == "cuda"

    def start(task: SlideTask | None) -> tuple[SlideTask, Any, float] | None:
        if task is None:
            return None
        t0 = time.perf_counter()
        try:
            return task, _loader(task, job, _chunk_tiles(task.store), pin), t0
        except Exception as exc:
            return task, exc, t0

    current = start(next(tasks, None))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-writer") as writer:
        pending: Future[dict[str, Any]] | None = None
        while current is not None:
            upcoming = start(next(tasks, None))  # its decode workers read while we compute
            task, batches, t0 = current
            row, feats = _embed_slide(task, batches, encoder, dev, emit)
            if pending is not None:  # at most one slide's features wait to be written
                emit(("row", pending.result()))
            pending = writer.submit(_finish, task, row, feats, t0, job, encoder)
            current = upcoming
        if pending is not None:
            emit(("row", pending.result()))


_SLIDE_ERRORS = (WsiMilError, OSError, ValueError, RuntimeError)


def _embed_slide(
    task: SlideTask, batches: Any, encoder: Any, dev: torch.device, emit: Emit
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Embed one slide; a failure becomes a ``failed`` row (features ``None``)."""
    row: dict[str, Any] = {"slide_id": task.slide_id, "path": task.bag, "n_tiles": task.n_tiles}
    try:
        if isinstance(batches, Exception):
            raise batches
        return row, _embed(encoder, batches, task.n_tiles, dev, emit)
    except _SLIDE_ERRORS as exc:
        row.update(status="failed", error=_one_line(exc))
        return row, None


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
    while True:
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
        ctx.Process(target=_process_main, args=(d, job, task_q, result_q), daemon=True)
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
