"""Feature extraction over a folder of tile stores: ``extract_features``.

Output layout (``out_dir`` is ``wsi-mil extract --out``)::

    <out_dir>/<bags>/<slide_id>.h5     one bag per slide (see bags.py)
    <out_dir>/<bags>/manifest.csv      ok / skipped / failed per store, with reasons
    <out_dir>/<bags>/config.yaml       the fully resolved settings of the last run

The bag folder ``<bags>`` (:func:`bag_folder_name`) is ``--name`` when given; else the
encoder name for the publisher's weights fetched from the hub, ``random`` weights and
weight-free encoders; else ``<encoder>-<sha8>`` (the first 8 hex digits of the weights
file's sha256), so two checkpoints of one architecture never share a folder. A folder
made before this scheme (``<encoder>/`` holding bags of exactly these weights) is kept.
``extract`` refuses to write into a folder whose bags were made with other weights,
naming both hashes. ``timm:<name>`` encoders use the folder ``timm_<name>``. With stain
normalisation (``stain="macenko"``, see :mod:`~wsi_mil.features.stain`) and no
``--name`` the folder gets the suffix ``_stain-macenko`` (``_stain-macenko-<target
sha256[:8]>`` for a user's target tile), so bags of different stain settings never share
a folder. A re-run skips slides whose bag records the same encoder, weights sha256,
tile-store fingerprint and stain setting and redoes the rest.
Each slide's bag is locked while it is extracted (``<bags>/.<slide_id>.h5.lock``, see
:func:`~wsi_mil.outputs.acquire_lock`): temporaries of killed runs are removed under the
lock, and a slide another ``extract`` on the folder is embedding is waited for, then
re-planned, so concurrent runs never fail each other's slides.

A slide whose decoding crashes natively (a segfault in a decode worker) fails alone,
named with the signal, and the batch goes on (see :mod:`~wsi_mil.features.pool`).
SIGINT/SIGTERM stop the workers and write the manifest with the slides in flight
``interrupted`` (:class:`~wsi_mil.errors.Interrupted`).

A store without tiles (no tissue, or a slide smaller than one tile) gets an empty bag:
features (0, D), coords (0, 2), the usual attributes, manifest status ``ok`` with the
message ``no tissue``; training and prediction leave such slides out and count them. A
damaged store (a chunk missing or of the wrong size, see
:func:`~wsi_mil.tiling.verify_store`) fails its slide with a message naming the store and
the chunk and saying to re-run ``wsi-mil tile``, which rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError, Interrupted

__all__ = [
    "bag_folder_name",
    "extract_features",
    "extract_slide",
    "find_stores",
    "plan_extraction",
    "stain_folder",
    "store_fingerprint",
    "write_empty_bag",
]

_DTYPES = ("float16", "float32")


def find_stores(tiles: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """List the tile stores to process.

    Args:
        tiles: A folder of ``<slide_id>.zarr`` stores, one store, or a list of stores and
            folders.

    Raises:
        ConfigError: Nothing found.
    """
    if not isinstance(tiles, str | os.PathLike):
        found: list[Path] = []
        for item in tiles:
            found += [Path(item)] if Path(item).suffix == ".zarr" else find_stores(item)
        return list(dict.fromkeys(found))
    path = Path(tiles)
    if path.suffix == ".zarr":
        return [path]
    if not path.is_dir():
        raise ConfigError(f"tile folder {path} does not exist; run `wsi-mil tile` first")
    stores = sorted(p for p in path.glob("*.zarr") if not p.name.startswith("."))
    if not stores:
        raise ConfigError(f"no <slide_id>.zarr tile stores in {path}; run `wsi-mil tile` first")
    return stores


def store_fingerprint(store: Any) -> str:
    """Hex digest identifying a tile store's content (attributes and tile coordinates).

    The source slide's path is left out so moving a cohort does not force re-extraction.
    """
    attrs = dict(store.attrs)
    attrs.pop("complete", None)
    source = dict(attrs.get("source") or {})
    source.pop("path", None)
    attrs["source"] = source
    digest = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode())
    digest.update(store.coords.tobytes())
    return digest.hexdigest()[:32]


def stain_folder(encoder: str, stain: Any = None) -> str:
    """The bag folder label of ``encoder`` with stain setting ``stain`` (a StainSpec)."""
    return encoder if stain is None else f"{encoder}_stain-{stain.folder_suffix}"


def _same_setting(recorded: Any, spec: Any) -> bool:
    """Whether a bag's recorded stain or augment setting is ``spec`` (None = off)."""
    if spec is None:
        return recorded in (None, {"method": "none"})
    if not isinstance(recorded, dict):
        return False
    return all(recorded.get(k) == v for k, v in spec.record().items())


def _bag_matches(
    bag: Path, encoder: str, sha: str, fingerprint: str, stain: Any = None, augment: Any = None
) -> bool:
    from wsi_mil.features.bags import BagError, bag_info

    if not bag.is_file():
        return False
    try:
        info = bag_info(bag)
    except BagError:
        return False
    return (
        info.get("encoder") == encoder
        and info.get("weights_sha256") == sha
        and info.get("store_fingerprint") == fingerprint
        and _same_setting(info.get("stain"), stain)
        and _same_setting(info.get("augment"), augment)
    )


def bag_folder_name(
    encoder: str,
    weights: str | os.PathLike[str] | None,
    weights_sha256: str,
    out_dir: str | os.PathLike[str],
    name: str | None = None,
) -> str:
    """The bag folder (under ``out_dir``) for ``encoder`` with these weights.

    ``name`` when given; the encoder name for hub weights (``weights=None``),
    ``random`` and weight-free encoders, or when ``<out_dir>/<encoder>/`` already holds
    bags of exactly these weights (folders made before hashed names); otherwise
    ``<encoder>-<first 8 hex digits of the weights sha256>``.

    Raises:
        ConfigError: ``name`` is not a plain folder name.
    """
    from wsi_mil.features.weights import RANDOM_WEIGHTS

    if name is not None:
        if not name or name in (".", "..") or any(c in name for c in "/\\:"):
            raise ConfigError(f"--name must be a plain folder name, got {name!r}")
        return name
    if weights is None or str(weights) == RANDOM_WEIGHTS or weights_sha256 == "none":
        return encoder
    plain = Path(out_dir) / encoder.replace(":", "_").replace("/", "_")
    if weights_sha256 in _recorded_weights(plain):
        return encoder
    return f"{encoder}-{weights_sha256[:8]}"


def _recorded_weights(folder: Path) -> dict[str, str]:
    """``{weights_sha256: a bag recording it}`` over the readable bags in ``folder``."""
    from wsi_mil.features.bags import BagError, bag_info

    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for bag in sorted(folder.glob("*.h5")):
        try:
            sha = str(bag_info(bag).get("weights_sha256", ""))
        except (BagError, OSError):
            continue
        found.setdefault(sha, bag.name)
    return found


def _check_folder_weights(folder: Path, weights_sha256: str) -> None:
    """Refuse a bag folder holding bags made with other weights (naming both hashes)."""
    other = {k: v for k, v in _recorded_weights(folder).items() if k != weights_sha256}
    if other:
        sha, bag = next(iter(other.items()))
        raise ConfigError(
            f"bag folder {folder} holds bags made with other weights (sha256 {sha[:16]}…, "
            f"e.g. {bag}); these weights are sha256 {weights_sha256[:16]}…. Pass --name "
            "to write them to their own folder, another --out, or remove the old bags"
        )


def plan_extraction(
    stores: Sequence[Path],
    encoder: str,
    out_dir: Path,
    weights_sha256: str,
    *,
    overwrite: bool,
    folder: str | None = None,
    stain: Any = None,
    augment: Any = None,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Split stores into tasks (largest first) and rows for skipped/failed stores.

    Bags go to ``<out_dir>/<folder>/`` (default: the encoder name, see
    :func:`bag_folder_name`); ``stain`` (a :class:`~wsi_mil.features.stain.StainSpec`
    or None) and ``augment`` (an :class:`~wsi_mil.features.augment.AugmentSpec` or None)
    must match for a bag to be up to date.

    Returns:
        ``(tasks, rows)``: :class:`~wsi_mil.features.pool.SlideTask` list and manifest
        rows of stores that need no work (up to date, incomplete, unreadable, damaged).
        Tasks with ``n_tiles == 0`` (stores without tissue) come last; they need no
        encoder: write their bags with :func:`write_empty_bag`.
    """
    from wsi_mil.features.pool import SlideTask

    tasks, rows = [], []
    for path in stores:
        row: dict[str, Any] = {
            "slide_id": path.stem, "path": str(path), "n_tiles": 0, "store": str(path)
        }  # fmt: skip
        planned = _plan_store(
            path,
            row,
            encoder,
            out_dir,
            weights_sha256,
            overwrite,
            folder or encoder,
            stain,
            augment,
        )
        if isinstance(planned, dict):
            rows.append(planned)
        else:
            tasks.append(SlideTask(str(path), *planned))
    tasks.sort(key=lambda t: (t.n_tiles == 0, -t.n_tiles, t.slide_id))
    return tasks, rows


def _plan_store(
    path: Path,
    row: dict[str, Any],
    encoder: str,
    out_dir: Path,
    sha: str,
    overwrite: bool,
    folder: str,
    stain: Any = None,
    augment: Any = None,
) -> dict[str, Any] | tuple[str, int, str, str]:
    """A finished manifest row for ``path``, or ``(slide_id, n_tiles, bag, fingerprint)``."""
    from wsi_mil.features.bags import bag_path
    from wsi_mil.tiling import open_tile_store, verify_store

    try:
        st = open_tile_store(path, allow_incomplete=True)
        if not st.complete:
            return {**row, "status": "skipped", "error": "tile store incomplete "
                    "(interrupted tiling?); re-run `wsi-mil tile`"}  # fmt: skip
        damage = verify_store(path, content=False)  # one stat per chunk
        if damage:
            return {**row, "status": "failed", "error": f"damaged tile store {path}: "
                    f"{'; '.join(damage[:3])}; re-run `wsi-mil tile` (it rebuilds damaged "
                    "stores)"}  # fmt: skip
        fp = store_fingerprint(st)
        bag = bag_path(out_dir, folder, st.slide_id)
        row.update(slide_id=st.slide_id, n_tiles=st.n_tiles, path=str(bag))
    except Exception as exc:
        return {**row, "status": "failed", "error": f"unreadable tile store: {exc}"}
    if not overwrite and _bag_matches(bag, encoder, sha, fp, stain, augment):
        note = "up to date; no tissue" if st.n_tiles == 0 else "up to date"
        return {**row, "status": "skipped", "error": "", "message": note}
    return st.slide_id, st.n_tiles, str(bag), fp


def write_empty_bag(
    task: Any,
    *,
    encoder: str,
    weights_sha256: str,
    dim: int,
    dtype: str,
    stain: Any = None,
    augment: Any = None,
) -> Path:
    """Write the bag of a store without tiles: features (0, dim), coords (0, 2).

    Args:
        task: A :class:`~wsi_mil.features.pool.SlideTask` with ``n_tiles == 0``.
        encoder: Encoder name recorded in the bag.
        weights_sha256: Recorded in the bag.
        dim: Embedding dimension D of the encoder.
        dtype: ``float16`` or ``float32``.
        stain: The run's :class:`~wsi_mil.features.stain.StainSpec` (recorded) or None.
        augment: The run's :class:`~wsi_mil.features.augment.AugmentSpec` or None
            (recorded; ``features_augmented`` (K, 0, dim)).

    Returns:
        The bag path (attributes as for a bag with tiles, see
        :mod:`wsi_mil.features.bags`).
    """
    import numpy as np

    from wsi_mil.features.bags import write_bag
    from wsi_mil.features.registry import get_encoder_spec
    from wsi_mil.tiling import open_tile_store

    st = open_tile_store(task.store)
    spec = get_encoder_spec(encoder)
    attrs = {
        "encoder": encoder,
        "weights_sha256": weights_sha256,
        "target_mpp": st.target_mpp,
        "tile_px": st.tile_px,
        "slide_id": task.slide_id,
        "mpp": st.attrs.get("mpp"),
        "tile_level0": st.attrs.get("tile_level0"),
        "store_fingerprint": task.fingerprint,
        "store": str(Path(task.store).resolve()),
        "source": st.attrs.get("source"),
        "pooling": spec.pooling,
        "input_px": spec.input_px,
        "stain": stain.record() if stain is not None else {"method": "none"},
        "augment": augment.record(task.slide_id) if augment is not None else {"method": "none"},
    }
    feats = np.zeros((0, int(dim)), np.float32)
    views = None if augment is None else np.zeros((augment.k, 0, int(dim)), np.float32)
    return write_bag(task.bag, feats, np.zeros((0, 2), np.int64), attrs=attrs, dtype=dtype,
                     augmented=views)  # fmt: skip


def _empty_bags(
    tasks: list[Any],
    rows: list[dict[str, Any]],
    encoder: str,
    resolved: Any,
    dtype: str,
    stain: Any = None,
    augment: Any = None,
) -> list[dict[str, Any]]:
    """Write the empty bags of ``tasks`` (stores without tiles); their manifest rows."""
    import time

    if not tasks:
        return []
    dim = _encoder_dim(encoder, resolved, rows)
    out = []
    for task in tasks:
        t0 = time.perf_counter()
        row = {"slide_id": task.slide_id, "path": task.bag, "n_tiles": 0, "store": task.store}
        try:
            write_empty_bag(task, encoder=encoder, weights_sha256=resolved.sha256, dim=dim,
                            dtype=dtype, stain=stain, augment=augment)  # fmt: skip
            row.update(status="ok", error="", message="no tissue")
        except (OSError, ValueError) as exc:
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        out.append({**row, "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _encoder_dim(encoder: str, resolved: Any, rows: list[dict[str, Any]]) -> int:
    """D of ``encoder``: from its spec, a bag of this run, or its architecture (``meta``)."""
    from wsi_mil.features.bags import BagError, bag_info
    from wsi_mil.features.registry import build_encoder, get_encoder_spec

    spec = get_encoder_spec(encoder)
    if spec.dim is not None:
        return int(spec.dim)
    for row in rows:
        if row.get("status") in ("ok", "skipped") and int(row.get("n_tiles") or 0) > 0:
            try:
                return int(bag_info(row["path"])["dim"])
            except BagError:
                continue
    return int(build_encoder(spec, resolved, "meta").dim)


def _lock_of(task: Any) -> Path:
    """The lock file of a slide's bag: ``<bags>/.<slide_id>.h5.lock``."""
    from wsi_mil.outputs import contained_path

    bag = Path(task.bag)
    return contained_path(bag.parent, f".{bag.name}.lock")


def _claim(tasks: list[Any]) -> tuple[list[Any], list[Any]]:
    """Lock the bags of ``tasks`` and remove their temporaries left by a killed run.

    Returns:
        ``(claimed, deferred)``: the tasks now locked by this process, and those another
        live process is extracting (left for later, see :func:`_wait_for_locks`).
    """
    from wsi_mil.outputs import acquire_lock, remove_temporaries

    claimed, deferred = [], []
    for task in tasks:
        Path(task.bag).parent.mkdir(parents=True, exist_ok=True)
        if acquire_lock(_lock_of(task)):
            remove_temporaries(Path(task.bag).parent, Path(task.bag).name)
            claimed.append(task)
        else:
            deferred.append(task)
    return claimed, deferred


def _release(tasks: list[Any]) -> None:
    from wsi_mil.outputs import release_lock

    for task in tasks:
        release_lock(_lock_of(task))


def _wait_for_locks(deferred: list[Any], stop: Any, lock_wait: float) -> list[Any]:
    """Wait until the lock of some of ``deferred`` is free; the tasks now free.

    Raises:
        Interrupted: SIGINT/SIGTERM arrived while waiting.
    """
    import time

    from wsi_mil.errors import Interrupted
    from wsi_mil.outputs import lock_holder

    deadline = time.monotonic() + lock_wait
    while True:
        free = [t for t in deferred if lock_holder(_lock_of(t)) is None]
        if free or time.monotonic() > deadline:
            return free
        if stop.signum is not None:
            raise Interrupted(stop.signum, [])
        time.sleep(0.2)


def _locked_rows(deferred: list[Any], lock_wait: float) -> list[dict[str, Any]]:
    """``skipped`` rows of slides another process kept locked for ``lock_wait`` seconds."""
    from wsi_mil.outputs import lock_holder

    return [{"slide_id": t.slide_id, "path": t.bag, "n_tiles": t.n_tiles, "store": t.store,
             "status": "skipped", "error": f"locked by {lock_holder(_lock_of(t))} (another "
             f"`wsi-mil extract` on this folder) for {lock_wait:g} s; re-run when it ends"}
            for t in deferred]  # fmt: skip


def extract_features(
    tiles: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    encoder: str = "builtin",
    out_dir: str | os.PathLike[str] = "features",
    *,
    weights: str | os.PathLike[str] | None = None,
    devices: str | list[str] | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = True,
    manifest: bool = True,
    lock_wait: float = 600.0,
    scheduler: str | None = None,
    dask_chunk: int = 8,
    name: str | None = None,
    stain: str = "none",
    stain_target: str | os.PathLike[str] | None = None,
    augment: int = 0,
    augment_sigma: float | None = None,
    augment_seed: int = 0,
) -> list[dict[str, Any]]:
    """Embed every tile of every store and write one bag per slide.

    Args:
        tiles: Folder of ``<slide_id>.zarr`` tile stores (or store paths).
        encoder: Encoder name (see ``wsi-mil encoders``) or ``timm:<model>``.
        out_dir: Output root; bags go to ``<out_dir>/<bags>/<slide_id>.h5`` where
            ``<bags>`` is ``name``, the encoder name (hub / random / no weights) or
            ``<encoder>-<sha8>`` (see :func:`bag_folder_name`).
        weights: Weights folder/file, ``None`` = hub download, ``"random"`` = tests only.
        devices: ``"cpu"``, ``"cuda:0,cuda:1"``, ...; default every GPU, else CPU.
        batch_size: Tiles per forward pass (rounded to whole store chunks).
        workers: Decode worker processes per device; ``None`` = on GPUs the CPU cores per
            GPU less one (at most 12), on the CPU 2 (see
            :func:`~wsi_mil.features.pool.default_workers`).
        dtype: Feature dtype in the bags (``float16`` or ``float32``).
        overwrite: Redo slides whose bag is up to date.
        progress: Show a progress bar (tiles) on stderr.
        manifest: Write ``manifest.csv`` and ``config.yaml`` (off for per-slide calls).
        lock_wait: Seconds to wait for slides another ``extract`` on this folder is
            embedding (lock ``<bags>/.<slide_id>.h5.lock``), once the others are done;
            they are then re-planned (usually up to date) or ``skipped``, naming the holder.
        scheduler: Address of a Dask scheduler (``tcp://host:8786``): the slides are
            embedded in chunks on its workers instead of local devices (see
            :mod:`wsi_mil.features.cluster`); ``devices`` and ``workers`` then apply on
            each worker. Paths are resolved here; the cluster must see them.
        dask_chunk: Slides per Dask task.
        name: Bag folder name (``--name``) instead of the default.
        stain: Stain normalisation ``none``, ``macenko`` or ``reinhard`` (see
            :mod:`~wsi_mil.features.stain`): fitted per slide on its tissue tiles,
            applied on the device before the encoder's preprocessing and recorded in
            each bag (``stain`` attribute); without ``name`` the bags go to
            ``<bags>_stain-<method>``.
        stain_target: Reference tile (PNG) to normalise to; default the bundled target.
        augment: K > 0 also embeds K stain-jittered views of every tile (HED jitter, see
            :mod:`~wsi_mil.features.augment`; after stain normalisation when both are
            set) from the same decoded batch and stores them as ``features_augmented``
            (K, N, D) in each bag, with the draws in its ``augment`` attribute; training
            samples one view per bag each time it draws the bag.
        augment_sigma: Jitter strength σ (default
            :data:`~wsi_mil.features.augment.DEFAULT_SIGMA`).
        augment_seed: Seed of the per-slide draws.

    Returns:
        Manifest rows (also written to ``<out_dir>/<bags>/manifest.csv``): slide_id,
        path (the bag), status (ok / skipped / failed; a slide whose decoding crashed
        natively fails alone, its error naming the signal), n_tiles, seconds, error, and
        ``message`` where there is a note (``up to date``, ``no tissue``: an empty bag
        for a store without tiles).

    Raises:
        EncoderError: Unknown encoder, bad weights, hub unreachable with no weights.
        ConfigError: Bad arguments or no stores, or the bag folder holds bags made with
            other weights (the message names both hashes).
        SchedulerUnreachableError: ``scheduler`` did not answer (within seconds).
        Interrupted: SIGINT or SIGTERM arrived: the decode workers and device processes
            were stopped and the manifest written (slides in flight ``interrupted``,
            slides not started without a row); carries the rows.
    """
    from wsi_mil.features.bags import bag_path
    from wsi_mil.features.pool import ExtractJob, default_workers, parse_devices
    from wsi_mil.features.registry import get_encoder_spec
    from wsi_mil.features.weights import RANDOM_WEIGHTS, resolve_weights
    from wsi_mil.outputs import stop_signals, write_manifest

    devs = parse_devices(devices) if scheduler is None else []  # Dask: read on each worker
    per_worker = workers
    workers = default_workers(devs) if workers is None and devs else (workers or 0)
    _check_args(batch_size, workers, dtype)
    if dask_chunk < 1:
        raise ConfigError(f"--dask-chunk must be ≥ 1, got {dask_chunk}")
    spec = get_encoder_spec(encoder)
    resolved = resolve_weights(spec, weights)
    from wsi_mil.features.stain import stain_spec

    try:
        stain_setting = stain_spec(stain, stain_target)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    augment_setting = _augment_spec(augment, augment_sigma, augment_seed)
    stores = find_stores(tiles)
    if scheduler is not None:
        with _dask_client(scheduler):  # unreachable: fail now, before any work
            pass
        stores = [p.resolve() for p in stores]  # workers run in other folders
        out_dir = Path(out_dir).resolve()
    folder = bag_folder_name(encoder, weights, resolved.sha256, out_dir, name)
    folder = folder if name else stain_folder(folder, stain_setting)
    enc_dir = bag_path(out_dir, folder, "x").parent
    _check_folder_weights(enc_dir, resolved.sha256)
    tasks, rows = plan_extraction(stores, encoder, Path(out_dir), resolved.sha256,
                                  overwrite=overwrite, folder=folder,
                                  stain=stain_setting, augment=augment_setting)  # fmt: skip
    weights_arg = RANDOM_WEIGHTS if weights == RANDOM_WEIGHTS else resolved.path
    job = ExtractJob(
        encoder=encoder,
        weights=str(weights_arg) if weights_arg is not None else None,
        weights_sha256=resolved.sha256,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        n_procs=max(1, min(len(devs), sum(t.n_tiles > 0 for t in tasks))),
        stain=stain_setting,
        augment=augment_setting,
    )
    config = {
        "stage": "extract",
        "tiles": [str(s) for s in stores] if len(stores) < 20 else str(tiles),
        "out_dir": str(out_dir),
        "bags": str(enc_dir),
        "name": folder,
        "encoder": spec.describe() | {"name": encoder},
        "weights": str(resolved.path) if resolved.path else weights,
        "weights_sha256": resolved.sha256,
        "devices": devs[: job.n_procs] if scheduler is None else (devices or "auto"),
        "dask_scheduler": scheduler,
        "batch_size": batch_size,
        "workers": workers,
        "dtype": dtype,
        "overwrite": overwrite,
        "stain": stain_setting.record() if stain_setting is not None else {"method": "none"},
        "augment": augment_setting.record() if augment_setting else {"method": "none"},
    }
    if manifest:
        _write_config(enc_dir / "config.yaml", config)
    stopped = None
    with _dask_client(scheduler) as client, stop_signals() as stop:
        dask = None if client is None else _Dask(client, devices, per_worker, dask_chunk, stop)
        run = _Settings(devs[: job.n_procs], job, resolved, Path(out_dir), overwrite, progress,
                        lock_wait, folder, dask)  # fmt: skip
        try:
            rows += _extract_rounds(tasks, run, stop)
        except Interrupted as exc:
            rows, stopped = rows + exc.rows, exc
    order = {str(p): i for i, p in enumerate(stores)}
    rows.sort(key=lambda r: order.get(r["store"], len(order)))
    for row in rows:
        row.setdefault("seconds", 0.0)
        row["encoder"] = encoder
    if manifest:
        write_manifest(enc_dir / "manifest.csv", rows)
    if stopped is not None:
        raise Interrupted(stopped.signum, rows)
    return rows


@dataclass(frozen=True)
class _Settings:
    """What every round of :func:`_extract_rounds` needs."""

    devices: list[str]
    job: Any
    resolved: Any
    out_dir: Path
    overwrite: bool
    progress: bool
    lock_wait: float
    folder: str
    dask: Any = None


@dataclass(frozen=True)
class _Dask:
    """Where and how :func:`_run_dask` submits the slides."""

    client: Any
    devices: str | list[str] | None
    workers: int | None
    chunk: int
    stop: Any


@contextlib.contextmanager
def _dask_client(scheduler: str | None) -> Iterator[Any]:
    """A client of ``scheduler`` (None without one); fails fast when it does not answer."""
    if scheduler is None:
        yield None
        return
    from wsi_mil.cluster import connect

    with connect(scheduler) as client:
        yield client


def _extract_rounds(tasks: list[Any], run: _Settings, stop: Any) -> list[dict[str, Any]]:
    """Extract ``tasks``; those another process holds are waited for, then re-planned.

    Raises:
        Interrupted: SIGINT/SIGTERM; carries the rows so far.
    """
    rows: list[dict[str, Any]] = []
    try:
        deferred = _extract_claimed(tasks, run, rows)
        while deferred:
            free = _wait_for_locks(deferred, stop, run.lock_wait)
            if not free:
                return rows + _locked_rows(deferred, run.lock_wait)
            deferred = [t for t in deferred if t not in free]
            again, planned = plan_extraction([Path(t.store) for t in free], run.job.encoder,
                                             run.out_dir, run.resolved.sha256,
                                             overwrite=run.overwrite,
                                             folder=run.folder,
                                             stain=run.job.stain,
                                             augment=run.job.augment)  # fmt: skip
            rows += planned
            deferred += _extract_claimed(again, run, rows)
    except Interrupted as exc:
        raise Interrupted(exc.signum, rows + exc.rows) from None
    return rows


def _extract_claimed(tasks: list[Any], run: _Settings, rows: list[dict[str, Any]]) -> list[Any]:
    """Extract the tasks this process can lock (rows appended to ``rows``); the others."""
    claimed, deferred = _claim(tasks)
    try:
        full = [t for t in claimed if t.n_tiles > 0]
        if run.dask is not None:
            rows += _run_dask(run.dask, run.job, full, run.progress)
        else:
            rows += _run(run.devices, run.job, full, run.progress)
        empty = [t for t in claimed if t.n_tiles == 0]
        rows += _empty_bags(empty, rows, run.job.encoder, run.resolved, run.job.dtype,
                            run.job.stain, run.job.augment)  # fmt: skip
    finally:
        _release(claimed)
    return deferred


def _augment_spec(k: int, sigma: float | None, seed: int) -> Any:
    """The :class:`~wsi_mil.features.augment.AugmentSpec` of ``--augment K`` (None for 0)."""
    if k is None or int(k) == 0:
        if sigma is not None:
            raise ConfigError("--augment-sigma needs --augment K (K jittered views per tile)")
        return None
    from wsi_mil.features.augment import DEFAULT_SIGMA, AugmentSpec

    try:
        return AugmentSpec(int(k), DEFAULT_SIGMA if sigma is None else float(sigma), int(seed))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_args(batch_size: int, workers: int, dtype: str) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be ≥ 0, got {workers}")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")


def _write_config(path: Path, config: dict[str, Any]) -> None:
    import yaml

    from wsi_mil.outputs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))


def _run(devices: list[str], job: Any, tasks: list[Any], progress: bool) -> list[dict[str, Any]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from wsi_mil.features.pool import run_pool
    from wsi_mil.outputs import stop_signals

    rows: list[dict[str, Any]] = []
    if not tasks:
        return rows
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles · {task.fields[slides]} slides done"),
        TimeRemainingColumn(),
    )
    total = sum(t.n_tiles for t in tasks)
    with Progress(*columns, disable=not progress) as bar:
        tid = bar.add_task(f"extract {job.encoder}", total=total, slides=0)

        def emit(msg: tuple[str, Any]) -> None:
            kind, payload = msg
            if kind == "progress":
                bar.advance(tid, payload)
            elif kind == "row":
                rows.append(payload)
                bar.update(tid, slides=len(rows))

        with stop_signals() as stop:
            run_pool(devices, job, tasks, emit)
    stores = {t.slide_id: t.store for t in tasks}
    if stop.signum is not None:
        for r in rows:
            r["store"] = stores[r["slide_id"]]
        raise Interrupted(stop.signum, rows)
    done = {r["slide_id"] for r in rows}
    for t in tasks:  # a device process died before reporting these
        if t.slide_id not in done:
            rows.append({"slide_id": t.slide_id, "path": t.bag, "status": "failed",
                         "n_tiles": t.n_tiles, "error": "device process died; re-run"})  # fmt: skip
    for r in rows:
        r["store"] = stores[r["slide_id"]]
    return rows


def _run_dask(dask: _Dask, job: Any, tasks: list[Any], progress: bool) -> list[dict[str, Any]]:
    """Embed ``tasks`` on the Dask cluster (:func:`~wsi_mil.features.cluster.run_on_dask`).

    Raises:
        Interrupted: SIGINT/SIGTERM; the outstanding slides ``interrupted``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from wsi_mil.features.cluster import run_on_dask

    if not tasks:
        return []
    devices = ",".join(dask.devices) if isinstance(dask.devices, list) else dask.devices
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TextColumn("tiles (Dask)"), disable=not progress) as bar:
        tid = bar.add_task(f"extract {job.encoder}", total=sum(t.n_tiles for t in tasks))

        def advance(row: dict[str, Any]) -> None:
            bar.advance(tid, int(row.get("n_tiles") or 0))

        rows = run_on_dask(dask.client, job, tasks, devices=devices, workers=dask.workers,
                           chunk=dask.chunk, stop=dask.stop, advance=advance)  # fmt: skip
    stores = {t.slide_id: t.store for t in tasks}
    for r in rows:
        r["store"] = stores[r["slide_id"]]
    if dask.stop.signum is not None:
        raise Interrupted(dask.stop.signum, rows)
    return rows


def extract_slide(
    store: str | os.PathLike[str],
    encoder: str = "builtin",
    out_dir: str | os.PathLike[str] = "features",
    **kwargs: Any,
) -> dict[str, Any]:
    """Extract one tile store (a picklable per-slide function for Dask or scripts).

    Same arguments as :func:`extract_features`; returns the slide's manifest row.
    """
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("manifest", False)
    rows = extract_features([store], encoder, out_dir, **kwargs)
    return rows[0]
