"""Bags for MIL: lazy loading with a bounded fp16 cache, padding, and batch samplers.

A *unit* is what the model sees as one bag: all tiles of a patient's slides
(``level="patient"``) or one slide (``level="slide"``). Bags are read from
``<features_dir>/<slide_id>.h5`` on first use and kept in a least-recently-used cache of
float16 arrays bounded in bytes; several feature folders are joined with
:func:`wsi_mil.features.multiscale.join_multiscale`: tile by tile when they hold the same
resolution (several encoders), spatially when their µm/px differ (multi-scale bags: each
fine tile gets the coarse tile covering it).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.features.bags import BagError, bag_info, read_bag, read_bag_views
from wsi_mil.features.multiscale import join_multiscale
from wsi_mil.mil.cohort import Cohort

__all__ = [
    "LEVELS",
    "BagBatch",
    "BagScan",
    "BagStore",
    "Unit",
    "collate_bags",
    "event_batches",
    "load_batch",
    "make_units",
    "prefetch",
    "random_batches",
    "scan_bags",
]

LEVELS = ("patient", "slide")
#: Bag attributes recorded per slide by :func:`scan_bags` (what a bag was extracted with).
_PROVENANCE = ("encoder", "weights_sha256", "target_mpp", "tile_px", "path")


@dataclass(frozen=True)
class Unit:
    """One bag for the model.

    Attributes:
        unit_id: Patient id (patient level) or slide id (slide level).
        patient_id: The patient it belongs to.
        slide_ids: Slides whose tiles form the bag, in order.
    """

    unit_id: str
    patient_id: str
    slide_ids: tuple[str, ...]


@dataclass
class BagScan:
    """What :func:`scan_bags` found without reading features.

    Attributes:
        dim: Feature dimension after joining all feature folders.
        dims: Dimension of each feature folder.
        n_tiles: Tiles per slide.
        empty: Slides with no tiles (excluded from training and prediction).
        attrs: Per feature folder, each slide's bag attributes (``encoder``,
            ``weights_sha256``, ``target_mpp``, ``tile_px``, ``path``): what the bags
            were extracted with (:mod:`wsi_mil.mil.provenance`).
    """

    dim: int
    dims: list[int]
    n_tiles: dict[str, int]
    empty: list[str]
    attrs: list[dict[str, dict[str, Any]]] = field(default_factory=list)


def scan_bags(
    slide_ids: Sequence[str],
    features_dirs: Sequence[str | os.PathLike[str]],
    *,
    expected_dims: Sequence[int] | None = None,
) -> BagScan:
    """Check every bag's header: same feature dim in each folder, count tiles.

    Args:
        slide_ids: Slides to check.
        features_dirs: Feature folders (one per encoder).
        expected_dims: Dims the bags must have (e.g. those of a trained model); default:
            the most common dim in each folder.

    Returns:
        :class:`BagScan`; ``n_tiles`` counts the tiles of the finest resolution (the
        rows of the joined bag, see :func:`wsi_mil.features.multiscale.join_multiscale`).

    Raises:
        BagError: A bag whose dim differs (naming the file and both dims), a bag that
            is unreadable, bags of the same µm/px whose tile counts differ, or a coarser
            bag with no tiles where the finest has some.
    """
    problems: list[str] = []
    dims: list[int] = []
    attrs: list[dict[str, dict[str, Any]]] = []
    per_folder: list[dict[str, dict[str, Any]]] = []
    for k, folder in enumerate(map(Path, features_dirs)):
        infos = {s: bag_info(folder / f"{s}.h5") for s in slide_ids}
        per_folder.append(infos)
        attrs.append({s: {a: i.get(a) for a in _PROVENANCE} for s, i in infos.items()})
        found = [i["dim"] for i in infos.values()]
        if expected_dims is not None:
            ref = int(expected_dims[k])
            source = "the trained model"
        else:
            ref = max(set(found), key=found.count) if found else 0
            source = next((i["path"] for i in infos.values() if i["dim"] == ref), "")
        dims.append(ref)
        for info in infos.values():
            if info["dim"] != ref:
                problems.append(
                    f"{info['path']}: feature dim {info['dim']} differs from dim {ref} of "
                    f"{source}; re-extract it with the same encoder"
                )
    n_tiles = {s: _slide_tiles([f[s] for f in per_folder], problems) for s in slide_ids}
    if problems:
        raise BagError(f"{len(problems)} bad feature bag(s):\n" + "\n".join(problems))
    empty = [s for s, n in n_tiles.items() if n == 0]
    return BagScan(sum(dims), dims, n_tiles, empty, attrs)


def _slide_tiles(infos: list[dict[str, Any]], problems: list[str]) -> int:
    """Tiles of one slide's joined bag: the finest resolution's count.

    Appends to ``problems`` bags of the same µm/px with different tile counts and coarser
    bags with no tiles where the finest has some.
    """
    by_mpp: dict[float, list[dict[str, Any]]] = {}
    for info in infos:
        by_mpp.setdefault(round(float(info.get("target_mpp") or 0.0), 6), []).append(info)
    for mpp, group in by_mpp.items():
        first = group[0]
        for info in group[1:]:
            if info["n_tiles"] != first["n_tiles"]:
                problems.append(
                    f"{info['path']}: {info['n_tiles']} tiles but {first['n_tiles']} in "
                    f"{first['path']}, both at {mpp} µm/px; extract every encoder of one "
                    "resolution from the same tile store (bags at different µm/px are "
                    "joined spatially)"
                )
    fine = by_mpp[min(by_mpp)][0]
    for mpp, group in by_mpp.items():
        if group[0]["n_tiles"] == 0 and fine["n_tiles"] > 0:
            problems.append(
                f"{group[0]['path']}: no tiles at {mpp} µm/px but {fine['n_tiles']} in "
                f"{fine['path']}; a fine tile needs a coarse tile to join (re-tile that "
                "scale with a lower --min-tissue)"
            )
    return int(fine["n_tiles"])


def make_units(
    cohort: Cohort, patient_ids: Sequence[str], level: str, skip: set[str]
) -> list[Unit]:
    """Build the bags of ``patient_ids``; slides in ``skip`` (empty bags) are left out.

    Patients left with no slides are dropped.
    """
    units: list[Unit] = []
    for pid in patient_ids:
        slides = tuple(s for s in cohort.patients[pid].slide_ids if s not in skip)
        if not slides:
            continue
        if level == "patient":
            units.append(Unit(pid, pid, slides))
        else:
            units.extend(Unit(s, pid, (s,)) for s in slides)
    return units


class BagStore:
    """Lazy reader of slide bags with a bounded LRU cache of float16 arrays.

    Thread-safe, so a prefetch thread can load the next batch while the model trains.

    Args:
        features_dirs: Feature folders; bags of the same slide are joined tile by tile
            (same µm/px) or spatially onto the finest one (different µm/px).
        cache_bytes: Upper bound of cached feature bytes (0 disables the cache).
    """

    def __init__(self, features_dirs: Sequence[str | os.PathLike[str]], cache_bytes: int) -> None:
        self.features_dirs = [Path(d) for d in features_dirs]
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        #: Tile side in level-0 px per slide read so far (from the bag's coords attributes).
        self.tile_level0: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self._n_views: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        """Bytes of features currently cached."""
        return self._used

    def slide(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (features (N, D) float16, coords (N, 2) int64) of one slide."""
        return self._cached(slide_id, lambda: self._read(slide_id))

    def _cached(
        self, key: str, read: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        item = read()
        with self._lock:
            self._put(key, item)
        return item

    def n_views(self, slide_id: str) -> int:
        """Augmented views K of a slide's joined bag (``extract --augment``; 0 = none).

        With several feature folders, the most any of them holds.
        """
        with self._lock:
            known = self._n_views.get(slide_id)
        if known is None:
            known = max(bag_info(d / f"{slide_id}.h5")["n_views"] for d in self.features_dirs)
            with self._lock:
                self._n_views[slide_id] = known
        return known

    def slide_view(self, slide_id: str, view: int) -> np.ndarray:
        """Features (N, D) float16 of one view: 0 = as extracted, 1..K = jittered view.

        Raises:
            ValueError: ``view`` outside ``0..n_views(slide_id)``.
        """
        k = self.n_views(slide_id)
        if not 0 <= view <= k:
            raise ValueError(f"slide {slide_id!r} has views 0..{k}, not {view}")
        if view == 0:
            return self.slide(slide_id)[0]
        return self._cached(f"{slide_id}\0views", lambda: self._read_views(slide_id))[0][view - 1]

    def _read_views(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(K, N, D) float16 views of the joined bag and its coords.

        View ``v`` joins each folder's view ``v``; a folder with fewer views (or none)
        contributes its plain features.
        """
        k = self.n_views(slide_id)
        bags = [read_bag(d / f"{slide_id}.h5") for d in self.features_dirs]
        stacks = [read_bag_views(d / f"{slide_id}.h5") for d in self.features_dirs]
        names = [d.name for d in self.features_dirs]
        out = []
        for v in range(k):
            parts = [
                bag if st is None or v >= len(st) else bag._replace(features=st[v])
                for bag, st in zip(bags, stacks, strict=True)
            ]
            joined = parts[0] if len(parts) == 1 else join_multiscale(parts, names=names)
            out.append(joined.features.astype(np.float16, copy=False))
        return np.stack(out), bags[0].coords

    def _read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        bags = [read_bag(d / f"{slide_id}.h5") for d in self.features_dirs]
        if len(bags) == 1:
            bag = bags[0]
        else:
            bag = join_multiscale(bags, names=[d.name for d in self.features_dirs])
        tile = bag.attrs.get("coords_attrs", {}).get("patch_size_level0")
        if tile:
            self.tile_level0[slide_id] = round(float(tile))
        return bag.features.astype(np.float16, copy=False), bag.coords

    def _put(self, slide_id: str, item: tuple[np.ndarray, np.ndarray]) -> None:
        size = item[0].nbytes
        if size > self.cache_bytes or slide_id in self._cache:
            return
        while self._used + size > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._used -= old[0].nbytes
        self._cache[slide_id] = item
        self._used += size

    def unit(self, unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All tiles of a unit.

        Returns:
            features (N, D) float16, coords (N, 2) int64, and (N,) int index of each
            tile's slide in ``unit.slide_ids``.
        """
        parts = [self.slide(s) for s in unit.slide_ids]
        if len(parts) == 1:
            feats, coords = parts[0]
            return feats, coords, np.zeros(len(feats), np.int64)
        which = np.concatenate([np.full(len(p[0]), i, np.int64) for i, p in enumerate(parts)])
        feats = np.concatenate([p[0] for p in parts])
        coords = np.concatenate([p[1] for p in parts])
        return feats, coords, which


@dataclass
class BagBatch:
    """A padded batch of bags.

    Attributes:
        features: (B, N_max, D) float16 (cast to float32 on the device).
        mask: (B, N_max) bool, True = real tile.
        units: The units, in batch order.
        tiles: Per unit, the tile indices used (into the unit's full bag), (n_b,).
        views: Per unit, the view drawn for each of its slides (0 = as extracted) when
            loaded with ``views=True``; empty otherwise.
    """

    features: torch.Tensor
    mask: torch.Tensor
    units: list[Unit]
    tiles: list[np.ndarray]
    views: list[tuple[int, ...]] = field(default_factory=list)


def collate_bags(
    bags: Sequence[np.ndarray], dtype: torch.dtype = torch.float32, *, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags of different sizes into one tensor.

    Args:
        bags: Arrays (n_b, D) of any float dtype.
        dtype: Dtype of the padded tensor (float16 halves host-to-device copies; the
            trainer casts to float32 on the device).
        pin: Allocate in page-locked memory (CUDA only), so the copy to the GPU is
            asynchronous.

    Returns:
        features (B, N_max, D) ``dtype`` (zeros on padding) and mask (B, N_max) bool.
    """
    n_max = max(1, max(len(b) for b in bags))
    dim = bags[0].shape[1]
    out = torch.zeros(len(bags), n_max, dim, dtype=dtype, pin_memory=pin)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool, pin_memory=pin)
    for i, bag in enumerate(bags):
        out[i, : len(bag)] = torch.from_numpy(np.ascontiguousarray(bag)).to(dtype)
        mask[i, : len(bag)] = True
    return out, mask


def load_batch(
    store: BagStore,
    units: Sequence[Unit],
    *,
    max_tiles: int | None = None,
    seed: int | None = None,
    pin: bool = False,
    views: bool = False,
) -> BagBatch:
    """Load and pad ``units``; with ``max_tiles``, draw a random subset of tiles per bag.

    Args:
        store: Bag reader.
        units: Bags of the batch.
        max_tiles: Keep at most this many random tiles per bag (training).
        seed: Seed of the tile subsampling and view draws (with the unit id, so it is
            reproducible whatever the load order).
        pin: Pad into page-locked memory (when the model is on a GPU).
        views: Training: each slide with augmented views (``extract --augment K``)
            contributes one of its K + 1 views (0 = as extracted), drawn uniformly
            with ``seed``; validation, test and prediction leave this off.
    """
    bags, tiles, drawn = [], [], []
    for unit in units:
        if views:
            feats, chosen = _unit_view(store, unit, seed)
            drawn.append(chosen)
        else:
            feats = store.unit(unit)[0]
        idx = np.arange(len(feats))
        if max_tiles is not None and len(feats) > max_tiles:
            rng = np.random.default_rng([seed or 0, _stable_hash(unit.unit_id)])
            idx = np.sort(rng.choice(len(feats), size=max_tiles, replace=False))
            feats = feats[idx]
        bags.append(feats)
        tiles.append(idx)
    features, mask = collate_bags(bags, torch.float16, pin=pin)
    return BagBatch(features, mask, list(units), tiles, drawn)


def _unit_view(store: BagStore, unit: Unit, seed: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """A unit's features with one drawn view per slide, and the views drawn."""
    rng = np.random.default_rng([seed or 0, _stable_hash(unit.unit_id), 1])
    chosen = tuple(int(rng.integers(0, store.n_views(s) + 1)) for s in unit.slide_ids)
    parts = [store.slide_view(s, v) for s, v in zip(unit.slide_ids, chosen, strict=True)]
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), chosen


def _stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (Python's ``hash`` is salted)."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle ``range(n)`` into batches of ``batch_size`` (last one may be smaller)."""
    order = rng.permutation(n).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def event_batches(
    events: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Shuffle into batches that each hold at least one event (for the Cox loss).

    Events and censored samples are shuffled separately and dealt round-robin into
    ``min(ceil(n / batch_size), n_events)`` batches, so batches are about
    ``batch_size`` large and none is without events.

    Args:
        events: (n,) 0/1 event indicators.
        batch_size: Target batch size.
        rng: Random generator.

    Returns:
        Lists of indices; every list contains an index with event 1 (when any exists).
    """
    ev = np.asarray(events)
    pos = rng.permutation(np.flatnonzero(ev == 1)).tolist()
    neg = rng.permutation(np.flatnonzero(ev != 1)).tolist()
    n = len(ev)
    n_batches = max(1, min(math.ceil(n / max(1, batch_size)), len(pos) or 1))
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    for i, idx in enumerate(pos + neg):
        batches[i % n_batches].append(idx)
    order = rng.permutation(n_batches)
    return [rng.permutation(batches[i]).tolist() for i in order if batches[i]]


def prefetch(
    jobs: Sequence[Any], load: Callable[[Any], BagBatch], depth: int = 2
) -> Iterator[BagBatch]:
    """Yield ``load(job)`` for each job in order, loading up to ``depth`` ahead in a thread.

    Args:
        jobs: Work items (e.g. lists of units).
        load: Loads one job (must be thread-safe).
        depth: Batches loaded ahead (0 = load in the caller's thread).
    """
    if depth <= 0:
        for job in jobs:
            yield load(job)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-mil-bags") as pool:
        pending: list[Future[BagBatch]] = []
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(load, job))
            if len(pending) > depth:
                break
        while pending:
            batch = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield batch
