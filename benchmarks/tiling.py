"""Tiling throughput against baselines measured in the same run (a script, not a test).

Usage::

    .venv/bin/python benchmarks/tiling.py                # ≥1-gigapixel synthetic slide
    .venv/bin/python benchmarks/tiling.py --size 8192    # quick run

Prints one line per comparison, ``NAME: ours X s, baseline Y s, ratio Z`` where
``ratio = baseline seconds / our seconds`` (> 1: ours faster):

1. ``detect+grid``: our tissue detection (numba) and integral-image grid, from the
   same thumbnail at ``--mask-mpp``, against a straightforward OpenCV implementation of
   the usual saturation-threshold segmentation (HSV, median blur, Otsu threshold,
   closing, contours with holes, area filter, per-tile point-in-contour test).
   Goal: ratio ≥ 2.
2. ``tiling-vs-decode``: ``tile_slide`` with pixels to zarr (everything: thumbnail,
   detection, reading, compression, QC; in a warm process, as in a batch) against the
   decode limit, i.e. reading exactly
   the same tiles with ``openslide.OpenSlide.read_region`` alone, in the same number of
   processes. ratio = our tiles/s ÷ decode-limit tiles/s. Goal: ratio ≥ 0.7.

The synthetic slide is cached in ``--cache-dir`` (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _slide(size: int, cache: Path) -> Path:
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    path = cache / f"bench-{size}x{size}-0.5mpp.svs"
    if not path.exists():
        t0 = time.perf_counter()
        print(f"generating {path} ({size * size / 1e9:.2f} gigapixels)...", flush=True)
        make_synthetic_slide(path, size, size, mpp=0.5, seed=11, mask_mpp=8.0)
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ----------------------------------------------------------------- baseline (1)


def baseline_segment_and_grid(
    thumb: np.ndarray, scale: float, dims: tuple[int, int], tile0: float, min_area_px: float
) -> np.ndarray:
    """Usual OpenCV segmentation + per-tile contour test; returns kept (x, y) level-0."""
    import cv2

    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], 7)
    _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((4, 4), np.uint8))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    tissue, holes = [], []
    if hierarchy is not None:
        for i, cont in enumerate(contours):
            if hierarchy[0][i][3] != -1:
                continue  # a hole: handled with its parent
            kids = [contours[j] for j in range(len(contours)) if hierarchy[0][j][3] == i]
            area = cv2.contourArea(cont) - sum(cv2.contourArea(k) for k in kids)
            if area >= min_area_px:
                tissue.append(cont)
                holes.append(kids)
    kept = []
    n_cols = int((dims[0] - tile0) // tile0) + 1
    n_rows = int((dims[1] - tile0) // tile0) + 1
    for r in range(n_rows):
        for c in range(n_cols):
            x, y = c * tile0, r * tile0
            # four points around the tile centre (in thumbnail px), as usual
            cx, cy = (x + tile0 / 2) / scale, (y + tile0 / 2) / scale
            d = tile0 / 4 / scale
            points = ((cx - d, cy - d), (cx + d, cy - d), (cx - d, cy + d), (cx + d, cy + d))
            for cont, kids in zip(tissue, holes, strict=True):
                inside = any(cv2.pointPolygonTest(cont, p, False) >= 0 for p in points)
                if inside and not any(cv2.pointPolygonTest(k, (cx, cy), False) > 0 for k in kids):
                    kept.append((round(x), round(y)))
                    break
    return np.asarray(kept, np.int64).reshape(-1, 2)


def bench_detection(path: Path, mask_mpp: float, repeats: int) -> None:
    from wsi_mil.tiling import detect_tissue, tile_grid
    from wsi_mil.wsi import open_slide

    with open_slide(path) as slide:
        thumb = slide.get_thumbnail(mpp=mask_mpp)
        dims, mpp = slide.dimensions, slide.mpp
    scale = mask_mpp / mpp
    tile0 = 224 * 0.5 / mpp
    detect_tissue(thumb[:64, :64], mask_mpp)  # load compiled kernels (cache=True)
    tile_grid(np.ones((4, 4), bool), (1000, 1000), mpp=mpp)

    def ours() -> int:
        mask = detect_tissue(thumb, mask_mpp)
        grid = tile_grid(mask, dims, mpp=mpp, mask_scale=(scale, scale))
        return grid.n_tiles

    def base() -> int:
        min_area_px = 20_000.0 / mask_mpp**2
        return len(baseline_segment_and_grid(thumb, scale, dims, tile0, min_area_px))

    t_ours, n_ours = _best(ours, repeats)
    t_base, n_base = _best(base, repeats)
    print(f"  thumbnail {thumb.shape[1]}x{thumb.shape[0]} at {mask_mpp} µm/px; "
          f"tiles kept: ours {n_ours}, baseline {n_base}")  # fmt: skip
    _line("detect+grid", t_ours, t_base)


def _best(fn, repeats: int) -> tuple[float, int]:
    best, out = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _line(name: str, ours: float, base: float) -> None:
    print(f"{name}: ours {ours:.3f} s, baseline {base:.3f} s, ratio {base / ours:.2f}", flush=True)


# ----------------------------------------------------------------- baseline (2)


def _decode_part(args: tuple[str, int, int, np.ndarray]) -> int:
    import openslide

    path, level, size, coords = args
    slide = openslide.OpenSlide(path)
    for x, y in coords:
        slide.read_region((int(x), int(y)), level, (size, size))
    slide.close()
    return len(coords)


def _warm_up(cache: Path) -> None:
    """Tile a tiny slide once so that compiled kernels are loaded (as in a batch)."""
    from wsi_mil.tiling import tile_slide
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    tiny = cache / "warm-up-1024.svs"
    if not tiny.exists():
        make_synthetic_slide(tiny, 1024, 1024, mpp=0.5, seed=1)
    for pixels in ("lossless", "jpeg"):
        tile_slide(tiny, cache / "warm-up", pixels=pixels, min_tissue=0.0, raise_errors=True)
    shutil.rmtree(cache / "warm-up", ignore_errors=True)


def bench_tiling(path: Path, workers: int, pixels: str, out: Path) -> None:
    from wsi_mil.tiling import open_tile_store, tile_slide

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if workers == 1:
        row = tile_slide(path, out, pixels=pixels, raise_errors=True)
    else:  # one slide split over processes is not what we do: run it in one worker
        with mp.get_context("spawn").Pool(1) as pool:
            row = pool.apply(tile_slide, (path, out), {"pixels": pixels, "raise_errors": True})
    t_ours = time.perf_counter() - t0
    store = open_tile_store(out / f"{path.stem}.zarr")
    level, n = int(store.attrs["read_level"]), store.n_tiles
    size = round(store.tile_px * store.target_mpp / store.attrs["mpp"])
    nbytes = sum(f.stat().st_size for f in (out / f"{path.stem}.zarr" / "tiles").rglob("*"))
    parts = np.array_split(store.coords, workers)
    t0 = time.perf_counter()
    if workers == 1:
        _decode_part((str(path), level, size, store.coords))
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_decode_part, [(str(path), level, size, p) for p in parts])
    t_base = time.perf_counter() - t0
    print(f"  {n} tiles of {store.tile_px} px, pixels={pixels}, {nbytes / max(1, n):.0f} "
          f"bytes/tile; ours {n / t_ours:.0f} tiles/s, decode limit {n / t_base:.0f} tiles/s "
          f"({row['status']})")  # fmt: skip
    _line(f"tiling-vs-decode[{pixels}]", t_ours, t_base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=int, default=32768, help="slide side in px (32768²≈1.07 Gpx)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes for both sides of (2)")
    parser.add_argument("--mask-mpp", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixels", nargs="+", default=["lossless", "jpeg"])
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    path = _slide(args.size, args.cache_dir)
    bench_detection(path, args.mask_mpp, args.repeats)
    _warm_up(args.cache_dir)
    for pixels in args.pixels:
        bench_tiling(path, args.workers, pixels, args.cache_dir / "tiles")


if __name__ == "__main__":
    main()
