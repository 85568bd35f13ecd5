"""Tile one slide into ``<out_dir>/<slide_id>.zarr`` (:func:`tile_slide`).

Steps: open the slide, read a thumbnail at ``mask_mpp``, detect tissue, lay the tile grid,
read the kept tiles' pixels run by run (one ``read_region`` at the best pyramid level per
horizontal run of adjacent kept tiles, up to 8192 target pixels long, resized once and
cut into tiles, so no pixel outside the kept tiles is decoded twice or at all),
write the store under a temporary name and rename it when complete, then write the QC
overlay PNG and tissue GeoJSON (``<out_dir>/qc/``) and, if asked, the CLAM/TRIDENT
coordinates h5 (``<out_dir>/coords/``).

With annotations (``include_geojson`` / ``exclude_geojson``, QuPath GeoJSON, see
:mod:`wsi_mil.tiling.annotations`) the regions are rasterised onto the tissue-mask grid
and combined with the tissue mask (include: AND, exclude: AND NOT) before the grid is
laid; the store records each file's sha256, so a changed annotation rebuilds it.

A re-run skips a complete, intact store (every chunk checksum verified, see
:func:`~wsi_mil.tiling.store.verify_store`) whose parameters and source fingerprint (a
hash of the whole slide file) match, filling in missing QC/coords files from the store,
and rebuilds any other store (every store with ``overwrite=True``), saying why in the
manifest row's ``message`` (e.g. ``rebuilt: damaged store (chunk tiles/c/0/0/0/0 is
missing)``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_mil import __version__
from wsi_mil.errors import AnnotationError, ConfigError
from wsi_mil.outputs import atomic_path, contained_path, ensure_writable
from wsi_mil.tiling.annotations import (
    RegionSource,
    load_annotations,
    rasterise_polygons,
    region_sources,
)
from wsi_mil.tiling.export import export_coords_h5, matching_level
from wsi_mil.tiling.grid import TileGrid, tile_grid
from wsi_mil.tiling.qc import qc_overlay, save_qc_png, save_tissue_geojson
from wsi_mil.tiling.reader import RegionReader
from wsi_mil.tiling.store import (
    FORMAT,
    PIXEL_MODES,
    IncompleteStoreError,
    TileStore,
    TileWriter,
    create_store,
    open_tile_store,
    source_fingerprint,
    verify_store,
)
from wsi_mil.tiling.tissue import METHOD, TissueParams, check_mask_budget, detect_tissue
from wsi_mil.wsi.mpp import MPP_RANGE

__all__ = [
    "RUN_TARGET_PX",
    "ensure_writable",
    "iter_tile_pixels",
    "store_path",
    "tile_params",
    "tile_slide",
]

#: Longest horizontal run of adjacent tiles (in target pixels) read as one region.
RUN_TARGET_PX = 8192


def store_path(out_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Path of a slide's tile store in ``out_dir``.

    Raises:
        UnsafePathError: ``slide_id`` would place the store outside ``out_dir``.
    """
    return contained_path(out_dir, f"{slide_id}.zarr")


def tile_params(
    *,
    target_mpp: float,
    tile_px: int,
    stride_px: int | None,
    min_tissue: float,
    pixels: str,
    mask_mpp: float,
    mpp: float | None,
    chunk_tiles: int = 64,
    jpeg_quality: int = 90,
    tissue: TissueParams | None = None,
) -> dict[str, Any]:
    """Validated parameters that determine a store's content (compared on re-runs).

    Raises:
        ConfigError: A value is out of range (names the argument).
    """
    stride_px = tile_px if stride_px is None else stride_px
    _check(target_mpp > 0, "--target-mpp", target_mpp, "a positive µm/px value such as 0.5")
    _check(tile_px >= 8, "--tile-px", tile_px, "at least 8 (e.g. 224 or 256)")
    _check(stride_px >= 1, "--stride-px", stride_px, "a positive pixel step")
    _check(0.0 <= min_tissue <= 1.0, "--min-tissue", min_tissue, "a fraction within 0..1")
    _check(pixels in PIXEL_MODES, "--pixels", pixels, f"one of {', '.join(PIXEL_MODES)}")
    _check(mask_mpp > 0, "--mask-mpp", mask_mpp, "a positive µm/px value such as 8")
    lo, hi = MPP_RANGE
    _check(
        mpp is None or lo <= mpp <= hi, "--mpp", mpp,
        f"a level-0 resolution within {lo:g}-{hi:g} µm/px (0.25 for 40x, 0.5 for 20x)",
    )  # fmt: skip
    _check(chunk_tiles >= 1, "chunk_tiles", chunk_tiles, "a positive count")
    _check(1 <= jpeg_quality <= 100, "jpeg_quality", jpeg_quality, "within 1..100")
    return {
        "target_mpp": float(target_mpp),
        "tile_px": int(tile_px),
        "stride_px": int(stride_px),
        "min_tissue": float(min_tissue),
        "pixels": str(pixels),
        "mask_mpp": float(mask_mpp),
        "mpp_override": None if mpp is None else float(mpp),
        "chunk_tiles": int(chunk_tiles),
        "jpeg_quality": int(jpeg_quality) if pixels == "jpeg" else None,
        "tissue_method": METHOD,
        "tissue_params": (tissue or TissueParams()).to_dict(),
    }


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid; expected {expected}")


# ------------------------------------------------------------------------ the task


def tile_slide(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    stride_px: int | None = None,
    min_tissue: float = 0.5,
    pixels: str = "lossless",
    mask_mpp: float = 8.0,
    mpp: float | None = None,
    export_coords: bool = False,
    qc: bool = True,
    chunk_tiles: int = 64,
    jpeg_quality: int = 90,
    tissue: TissueParams | None = None,
    backend: str = "auto",
    read_threads: int = 2,
    overwrite: bool = False,
    raise_errors: bool = False,
    include_geojson: str | os.PathLike[str] | None = None,
    exclude_geojson: str | os.PathLike[str] | None = None,
    include_class: str | Sequence[str] | None = None,
    exclude_class: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Detect tissue, tile one slide and write ``<out_dir>/<slide_id>.zarr``.

    A picklable top-level function: it is what ``wsi-mil tile`` runs per slide in
    worker processes or on a Dask cluster. The store (read it with
    :func:`~wsi_mil.tiling.open_tile_store`) holds, for the N kept tiles in row-major
    order:

    - ``coords``: int64 (N, 2), level-0 (x, y) of each tile's top-left corner;
    - ``tissue``: float32 (N,), tissue fraction of each tile;
    - ``tiles``: uint8 (N, tile_px, tile_px, 3) RGB at ``target_mpp`` (absent with
      ``pixels="none"``);
    - ``mask``: uint8 (h, w) tissue mask and ``thumbnail`` uint8 (h, w, 3), both at
      ``mask_mpp`` (mask pixel (r, c) covers level-0 ``[c·s, (c+1)·s) × [r·s, (r+1)·s)``,
      ``s = mask_mpp / mpp``); with annotations, ``mask`` is the tissue within them and
      ``regions`` uint8 (h, w) the rasterised annotations (1 where tiles are allowed);
    - attributes as in ``DESIGN.md``, ``complete: true`` written last.

    Tissue detection and the tile grid depend only on the slide and the parameters,
    never on ``read_threads``, the number of worker processes or free memory.

    Args:
        slide_path: The slide file.
        out_dir: Folder of the stores (QC files go to ``qc/``, coordinates to ``coords/``).
        target_mpp: Tile resolution in µm/px.
        tile_px: Tile side in pixels at ``target_mpp``.
        stride_px: Grid step in target pixels (default ``tile_px``; smaller overlaps).
        min_tissue: Minimum tissue fraction of a kept tile.
        pixels: ``"lossless"``, ``"jpeg"`` or ``"none"`` (geometry only).
        mask_mpp: Resolution of the thumbnail and tissue mask in µm/px.
        mpp: Level-0 µm/px override for slides without (or with wrong) resolution.
        export_coords: Also write ``coords/<slide_id>.h5`` (CLAM/TRIDENT layout).
        qc: Write ``qc/<slide_id>.png`` and ``qc/<slide_id>.geojson``.
        chunk_tiles: Tiles per zarr chunk.
        jpeg_quality: Quality of ``pixels="jpeg"``.
        tissue: Tissue-detection parameters.
        backend: Slide reader (``"auto"``, ``"openslide"``, ``"tiffslide"``).
        read_threads: Threads decoding the slide concurrently (the output does not
            depend on it).
        overwrite: Rebuild the store even when a complete one matches.
        raise_errors: Raise instead of returning a ``failed`` row.
        include_geojson: QuPath GeoJSON of the regions to tile (a file, or a folder
            holding ``<slide_id>.geojson``); a slide without a file in the folder fails.
        exclude_geojson: QuPath GeoJSON of regions left out (file or folder); a slide
            without a file in the folder is tiled normally.
        include_class: Only these classes of ``include_geojson`` (``"Tumor,Stroma"``).
        exclude_class: Only these classes of ``exclude_geojson``.

    Returns:
        Manifest row (a dict, no arrays): ``slide_id``, ``path``, ``status`` (ok |
        skipped | failed), ``n_tiles``, ``seconds``, ``error`` (type and message of the
        failure, naming the file and the fix), ``message`` (warnings such as "no tissue",
        and why a store was rebuilt), ``store`` (path of the store).

    Raises:
        Only with ``raise_errors=True``: whatever failed (``SlideOpenError``,
        ``MissingMPPError``, ``ConfigError``, ``AnnotationError``, ``SlideTooLargeError`` over
        :data:`~wsi_mil.tiling.tissue.MASK_PIXEL_BUDGET`, ``UnsafePathError``,
        ``OSError``...).
    """
    start = time.perf_counter()
    slide_path = Path(slide_path)
    row: dict[str, Any] = {
        "slide_id": _slide_id(slide_path),
        "path": str(slide_path),
        "status": "failed",
        "n_tiles": "",
        "seconds": 0.0,
        "error": "",
        "message": "",
        "store": "",
    }
    try:
        params = tile_params(
            target_mpp=target_mpp, tile_px=tile_px, stride_px=stride_px,
            min_tissue=min_tissue, pixels=pixels, mask_mpp=mask_mpp, mpp=mpp,
            chunk_tiles=chunk_tiles, jpeg_quality=jpeg_quality, tissue=tissue,
        )  # fmt: skip
        options: dict[str, Any] = {"export_coords": export_coords, "qc": qc, "backend": backend,
                   "read_threads": read_threads, "overwrite": overwrite,
                   "annotations": {"include": include_geojson, "exclude": exclude_geojson,
                                   "include_class": include_class,
                                   "exclude_class": exclude_class}}  # fmt: skip
        row.update(_tile(slide_path, Path(out_dir), params, **options))
    except Exception as exc:
        if raise_errors:
            raise
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _slide_id(path: Path) -> str:
    """Slide identifier, as ``Slide.slide_id`` (file name without its extension)."""
    from wsi_mil.wsi.slide import slide_id_from_path

    return slide_id_from_path(path)


def _tile(
    slide_path: Path,
    out_dir: Path,
    params: dict[str, Any],
    *,
    export_coords: bool,
    qc: bool,
    backend: str,
    read_threads: int,
    overwrite: bool,
    annotations: dict[str, Any],
) -> dict[str, Any]:
    from wsi_mil.wsi import open_slide

    if not slide_path.exists():
        raise FileNotFoundError(f"{slide_path}: no such slide file; check the path")
    with open_slide(slide_path, backend=backend, mpp=params["mpp_override"]) as slide:
        source = source_fingerprint(slide_path)
        slide_id = slide.slide_id
        final = store_path(out_dir, slide_id)
        sources = region_sources(slide_path, slide_id, **annotations)
        records = {src.mode: src.record() for src in sources}
        params = {**params, "annotations": records or None}
        reason, store = _reuse_reason(final, params, source, overwrite=overwrite)
        if store is not None:
            extra = _side_outputs(store, out_dir, slide, export_coords, qc, missing_only=True)
            notes = ["complete store with the same parameters", *store.attrs.get("warnings", [])]
            notes += extra
            return {
                "slide_id": slide_id, "status": "skipped", "n_tiles": store.n_tiles,
                "message": "; ".join(notes), "store": str(final),
            }  # fmt: skip
        ensure_writable(out_dir)
        _remove_stale_temporaries(final)
        messages = [] if reason == "new" else [f"rebuilt: {reason}"]
        n_tiles, extra = _build_store(slide, final, params, source, read_threads, sources)
        messages += extra
        store = open_tile_store(final)
        messages += _side_outputs(store, out_dir, slide, export_coords, qc, missing_only=False)
    return {
        "slide_id": slide_id, "status": "ok", "n_tiles": n_tiles,
        "message": "; ".join(messages), "store": str(final),
    }  # fmt: skip


def _remove_stale_temporaries(final: Path) -> None:
    """Delete temporaries of this store left by an interrupted run."""
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _reuse_reason(
    final: Path, params: dict[str, Any], source: dict[str, Any], *, overwrite: bool = False
) -> tuple[str | None, TileStore | None]:
    """``(None, store)`` when ``final`` can be reused, else ``(why it must be rebuilt, None)``."""
    if not final.exists():
        return "new", None
    if overwrite:
        return "--overwrite", None
    try:
        store = open_tile_store(final, allow_incomplete=True)
    except IncompleteStoreError:
        return "existing store unreadable", None
    if not store.complete:
        return "existing store incomplete", None
    old = store.attrs.get("params", {})
    changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    if changed:
        long = ("tissue_params", "annotations")
        parts = [f"{k} {old.get(k)!r}→{params.get(k)!r}" for k in changed if k not in long]
        if "tissue_params" in changed:
            parts.append("tissue-detection parameters changed")
        if "annotations" in changed:
            parts.append(_annotations_change(old.get("annotations"), params.get("annotations")))
        return "parameters changed (" + ", ".join(parts) + ")", None
    why = _source_reason(store.attrs.get("source", {}), source)
    return (why, None) if why else _damage_reason(store)


def _annotations_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """``"annotations changed (include file changed, exclude added)"``."""
    old, new = old or {}, new or {}
    parts = []
    for mode in ("include", "exclude"):
        a, b = old.get(mode), new.get(mode)
        if a == b:
            continue
        if a is None or b is None:
            parts.append(f"{mode} {'added' if a is None else 'removed'}")
        elif a.get("sha256") != b.get("sha256"):
            parts.append(f"{mode} file changed")
        else:
            parts.append(f"{mode} classes {a.get('classes')}→{b.get('classes')}")
    return f"annotations changed ({', '.join(parts)})"


def _source_reason(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why the recorded source fingerprint ``old`` does not match ``new`` (or None)."""
    if "sha256" not in old:
        return "store from an older wsi-mil without a full-file source hash"
    if (old.get("size"), old["sha256"]) != (new["size"], new["sha256"]):
        return "source slide changed"
    return None


def _damage_reason(store: TileStore) -> tuple[str | None, TileStore | None]:
    """``(None, store)`` when every chunk checks out, else ``("damaged store (…)", None)``."""
    problems = verify_store(store.path)
    if not problems:
        return None, store
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return f"damaged store ({problems[0]}{more})", None


def _build_store(
    slide: Any,
    final: Path,
    params: dict[str, Any],
    source: dict[str, Any],
    threads: int,
    sources: Sequence[RegionSource] = (),
) -> tuple[int, list[str]]:
    """Detect, grid, read and write the store at ``final``; returns (N, messages)."""
    check_mask_budget(slide, params["mask_mpp"])
    mpp = float(slide.mpp)
    width, height = (int(v) for v in slide.dimensions)
    thumb = np.ascontiguousarray(slide.get_thumbnail(mpp=params["mask_mpp"])[..., :3])
    scale = (params["mask_mpp"] / mpp, params["mask_mpp"] / mpp)  # get_thumbnail's contract
    mask = detect_tissue(thumb, params["mask_mpp"], TissueParams(**params["tissue_params"]))
    regions, notes, record = _annotated_regions(sources, mask.shape, scale, (width, height))
    if regions is not None:
        mask = mask & regions
    grid = tile_grid(
        mask, (width, height), mpp=mpp, target_mpp=params["target_mpp"],
        tile_px=params["tile_px"], stride_px=params["stride_px"],
        min_tissue=params["min_tissue"], mask_scale=scale,
    )  # fmt: skip
    coords, tissue, index = grid.coords, grid.tissue, grid.index
    read_level = int(slide.best_level_for_mpp(params["target_mpp"]))
    messages = _warnings(grid, mask, width, height, mpp, params, regions is not None) + notes
    attrs = {
        "format": FORMAT,
        "slide_id": slide.slide_id,
        "source": source,
        "mpp": mpp,
        "dimensions": [width, height],
        "target_mpp": params["target_mpp"],
        "tile_px": params["tile_px"],
        "stride_px": params["stride_px"],
        "tile_level0": grid.tile_level0,
        "stride_level0": grid.stride_level0,
        "read_level": read_level,
        "mask_mpp": params["mask_mpp"],
        "mask_scale": list(scale),
        "min_tissue": params["min_tissue"],
        "pixels": params["pixels"],
        "chunk_tiles": params["chunk_tiles"],
        "tile_order": "row-major (by y, then x)",
        "grid_shape": list(grid.grid_shape),
        "tissue_method": params["tissue_method"],
        "tissue_params": params["tissue_params"],
        "tissue_fraction": float(mask.mean()) if mask.size else 0.0,
        "params": params,
        "annotations": record,
        "warnings": messages,
        "wsi_mil_version": __version__,
    }
    with atomic_path(final) as tmp:
        group = create_store(
            tmp, attrs=attrs, coords=coords, tissue=tissue, mask=mask, thumbnail=thumb,
            pixels=params["pixels"], tile_px=params["tile_px"],
            chunk_tiles=params["chunk_tiles"], jpeg_quality=params["jpeg_quality"] or 90,
            regions=regions,
        )  # fmt: skip
        writer = TileWriter(group)
        if params["pixels"] != "none":
            for tiles in iter_tile_pixels(slide, index, read_level, params, threads=threads):
                writer.add(tiles)
        writer.close()
    return int(coords.shape[0]), messages


def _annotated_regions(
    sources: Sequence[RegionSource],
    shape: tuple[int, int],
    scale: tuple[float, float],
    dimensions: tuple[int, int],
) -> tuple[np.ndarray | None, list[str], dict[str, Any] | None]:
    """Where the annotations allow tiles on the mask grid.

    Returns:
        ``(bool (h, w) or None without annotations, notes for the manifest, the store's
        ``annotations`` attribute)``.

    Raises:
        AnnotationError: A bad file, or an include file without a (matching) polygon.
    """
    if not sources:
        return None, [], None
    allowed = np.ones(shape, np.bool_)
    notes: list[str] = []
    record: dict[str, Any] = {}
    for src in sources:
        ann = load_annotations(src.path, src.classes)
        which = f" of class {', '.join(src.classes)}" if src.classes else ""
        if not ann.polygons and src.mode == "include":
            raise AnnotationError(
                f"{src.path}: no polygon annotation{which} to tile within (classes found: "
                f"{ann.classes_text()}); draw or export the regions, or fix --include-class"
            )
        inside = rasterise_polygons(ann.polygons, shape, scale)
        allowed &= inside if src.mode == "include" else ~inside
        if not ann.polygons:
            notes.append(f"{src.path.name}: no polygon annotation{which}; nothing excluded")
        elif not inside.any():
            notes.append(
                f"{src.path.name}: the annotations lie outside the slide "
                f"({dimensions[0]}x{dimensions[1]} level-0 px); coordinates must be level-0 "
                "pixels of this slide"
            )
        record[src.mode] = {
            "path": str(src.path), "sha256": src.sha256,
            "classes": list(src.classes) if src.classes else None,
            "n_polygons": len(ann.polygons), "n_ignored": ann.n_ignored,
            "classes_found": ann.classes_found,
        }  # fmt: skip
    return allowed, notes, record


def _warnings(
    grid: TileGrid,
    mask: np.ndarray,
    width: int,
    height: int,
    mpp: float,
    p: dict[str, Any],
    annotated: bool = False,
) -> list[str]:
    if grid.grid_shape[0] == 0 or grid.grid_shape[1] == 0:
        side = grid.tile_level0
        return [
            f"slide ({width}x{height} px at {mpp:g} µm/px) is smaller than one tile "
            f"({p['tile_px']} px at {p['target_mpp']:g} µm/px = {side:.0f} level-0 px); "
            "store has 0 tiles"
        ]
    if not mask.any():
        where = " within the annotations" if annotated else ""
        return [f"no tissue found{where}; store has 0 tiles"]
    if grid.n_tiles == 0:
        return [f"no tile reaches --min-tissue {p['min_tissue']:g}; store has 0 tiles"]
    return []


# -------------------------------------------------------------------- pixel reading


def iter_tile_pixels(
    slide: Any,
    index: np.ndarray,
    level: int,
    params: dict[str, Any],
    *,
    threads: int = 2,
) -> Iterator[np.ndarray]:
    """Yield the tiles' pixels, run by run, in the order of ``index``.

    A run is a sequence of tiles on one grid row in adjacent columns (at most
    ``RUN_TARGET_PX`` target pixels long); it is read as one region at ``level``,
    resized once to ``target_mpp`` and cut. ``threads`` runs are decoded concurrently
    (results are yielded in order, so the output does not depend on it).

    Args:
        slide: An open :class:`wsi_mil.wsi.Slide`.
        index: int64 (N, 2) (row, col) grid positions, in store order.
        level: Pyramid level to read.
        params: Output of :func:`tile_params`.
        threads: Decoding threads.

    Yields:
        uint8 (n, tile_px, tile_px, 3) arrays, concatenating to all N tiles in order.
    """
    if len(index) == 0:
        return
    max_run = max(1, RUN_TARGET_PX // params["stride_px"])
    rows, cols = index[:, 0], index[:, 1]
    breaks = np.flatnonzero((np.diff(rows) != 0) | (np.diff(cols) != 1)) + 1
    parts = [
        run[start : start + max_run]
        for run in np.split(np.arange(len(index)), breaks)
        for start in range(0, len(run), max_run)
    ]
    reader = RegionReader(slide)
    try:
        if threads <= 1:
            for part in parts:
                yield _read_block(reader, index[part], level, params)
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            window: deque[Future[np.ndarray]] = deque()
            for part in parts:
                window.append(pool.submit(_read_block, reader, index[part], level, params))
                if len(window) > 2 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
    finally:
        reader.close()


def _read_block(
    reader: RegionReader, index: np.ndarray, level: int, params: dict[str, Any]
) -> np.ndarray:
    """Tiles (n, tile_px, tile_px, 3) of one run from one region read.

    Resampling matches ``Slide.read_tile``: area averaging (PIL ``BOX``) when shrinking,
    bicubic when enlarging, none when the level is at the target resolution.
    """
    slide = reader.slide
    tp, sp, target = params["tile_px"], params["stride_px"], params["target_mpp"]
    ds = float(slide.level_downsamples[level])
    fl = target / float(slide.mpp) / ds  # level px per target px
    r0, c0 = int(index[:, 0].min()), int(index[:, 1].min())
    r1, c1 = int(index[:, 0].max()), int(index[:, 1].max())
    tw, th = (c1 - c0) * sp + tp, (r1 - r0) * sp + tp  # region size in target px
    fx, fy = c0 * sp * fl, r0 * sp * fl  # region origin in level px (exact)
    ix, iy = math.floor(fx + 1e-9), math.floor(fy + 1e-9)
    ox, oy = fx - ix, fy - iy
    location = (round(ix * ds), round(iy * ds))
    if abs(fl - 1.0) < 1e-9 and ox < 1e-9 and oy < 1e-9:
        pixels = reader.read(location, level, (tw, th))
    else:
        lw, lh = math.ceil(ox + tw * fl) + 1, math.ceil(oy + th * fl) + 1
        region = reader.read(location, level, (lw, lh))
        resample = Image.Resampling.BOX if fl > 1 else Image.Resampling.BICUBIC
        box = (ox, oy, ox + tw * fl, oy + th * fl)
        img = Image.fromarray(np.ascontiguousarray(region))
        pixels = np.asarray(img.resize((tw, th), resample, box=box))
    out = np.empty((len(index), tp, tp, 3), np.uint8)
    for k, (r, c) in enumerate(index):
        y, x = (int(r) - r0) * sp, (int(c) - c0) * sp
        out[k] = pixels[y : y + tp, x : x + tp, :3]
    return out


# ---------------------------------------------------------------- QC / coords files


def _side_outputs(
    store: Any, out_dir: Path, slide: Any, export_coords: bool, qc: bool, *, missing_only: bool
) -> list[str]:
    """QC PNG + GeoJSON and the coordinates h5, from a finished store.

    Returns:
        Notes for the manifest (e.g. how CLAM must read an exported coords file).
    """
    sid = store.slide_id
    scale = tuple(store.attrs["mask_scale"])
    png = contained_path(out_dir, "qc", f"{sid}.png")
    geo = contained_path(out_dir, "qc", f"{sid}.geojson")
    if qc and not (missing_only and png.exists()):
        image = qc_overlay(
            store.thumbnail, store.mask, store.coords, float(store.attrs["tile_level0"]), scale,
            regions=store.regions,
        )  # fmt: skip
        save_qc_png(png, image)
    if qc and not (missing_only and geo.exists()):
        save_tissue_geojson(geo, store.mask, scale)
    if not export_coords:
        return []
    h5 = contained_path(out_dir, "coords", f"{sid}.h5")
    downsamples = [float(d) for d in slide.level_downsamples]
    mpp = float(store.attrs["mpp"])
    if not (missing_only and h5.exists()):
        export_coords_h5(
            h5, store.coords, slide_id=sid, tile_px=store.tile_px,
            target_mpp=store.target_mpp, mpp=mpp, level_downsamples=downsamples,
            level0_dimensions=tuple(store.attrs["dimensions"]),
            level_dimensions=[tuple(d) for d in slide.level_dimensions],
            stride_px=int(store.attrs["stride_px"]),
        )  # fmt: skip
    if matching_level(mpp, store.target_mpp, downsamples) is None:
        size0 = round(store.tile_px * store.target_mpp / mpp)
        return [
            f"coords h5: no pyramid level is at {store.target_mpp:g} µm/px, so patch_level "
            f"is 0; TRIDENT reads it as is, CLAM must read patch_size_level0 ({size0}) px "
            f"at level 0 and resize to {store.tile_px}"
        ]
    return []
