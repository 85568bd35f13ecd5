"""Capacity on paper: per-slide costs of each stage here, projected to 1k–100k slides.

Generated slides (``--slides`` of ``--side``² px at 0.5 µm/px, H&E-like tissue) go through
the real ``wsi-mil tile`` (224-px tiles at ``--target-mpp``) and ``wsi-mil extract
--encoder builtin`` on this machine, one process each, so the per-slide seconds are
per worker. The baseline in the same run is the decode floor: OpenSlide (or tiffslide)
``read_region`` of the same tiles at level 0 in one process, so ``tile / floor`` says
how much of tiling is more than reading pixels.

Per-tile costs come from the seconds each stage's manifest records per slide (the
work on the slide, without the command's start-up). The projection scales them to
``--tiles-per-slide`` (a typical 40× biopsy or resection at 0.5 µm/px: 10,000–30,000
tissue tiles) and divides by the workers: tiling by ``--tile-workers`` CPU processes,
extraction by ``--gpus`` at the GPU throughput ``--gpu-tiles-s`` (default: ViT-B/16 on
one H100 as measured by ``benchmarks/cuda.sh``, 7,130 tiles/s; tiling and extraction
overlap slide by slide in a cluster, so the wall time is the slower of the two), plus
training, which does not grow with the cohort (a fixed step budget per fold,
``--train-minutes``). Costs use ``--cpu-hour`` (per CPU worker) and ``--gpu-hour`` (per
GPU) prices; every assumption is printed. Usage::

    python benchmarks/scale.py [--slides 3] [--side 8192] [--tile-workers 64] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from wsi_mil.workflows.cli import main as cli


def make_slides(folder: Path, n: int, side: int) -> list[Path]:
    """``n`` generated slides (reused when present)."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"S{i:02d}.svs"
        if not path.is_file():
            make_synthetic_slide(path, side, side, mpp=0.5, seed=i, associated=False)
        paths.append(path)
    return paths


def timed(argv: list[str]) -> float:
    """Seconds of one CLI call (it must succeed)."""
    t0 = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"wsi-mil {argv[0]} failed")
    return time.perf_counter() - t0


def work_seconds(manifest: Path) -> float:
    """Seconds spent on the slides themselves (the stage manifest's ``seconds``), without
    the command's start-up (imports, worker processes)."""
    import csv

    with open(manifest, newline="") as fh:
        return sum(float(r["seconds"] or 0) for r in csv.DictReader(fh) if r["status"] == "ok")


def decode_floor(slides: list[Path], tiles: Path) -> float:
    """Seconds to read every kept tile's level-0 region with the slide reader alone."""
    from wsi_mil.tiling import open_tile_store
    from wsi_mil.wsi import open_slide

    t0 = time.perf_counter()
    for path in slides:
        store = open_tile_store(tiles / f"{path.stem}.zarr")
        size = int(store.attrs["tile_level0"])
        with open_slide(path) as slide:
            for x, y in store.coords:
                slide.read_region((int(x), int(y)), 0, (size, size))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--side", type=int, default=8192, help="slide side in px (0.5 µm/px)")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--data", type=Path, default=None, help="reuse generated slides here")
    parser.add_argument("--tiles-per-slide", type=int, default=20_000)
    parser.add_argument("--tile-workers", type=int, default=64, help="CPU tiling processes")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-tiles-s", type=float, default=7130.0, help="tiles/s per GPU")
    parser.add_argument("--train-minutes", type=float, default=60.0)
    parser.add_argument("--cpu-hour", type=float, default=0.04, help="price per CPU worker-h")
    parser.add_argument("--gpu-hour", type=float, default=2.50, help="price per GPU-hour")
    args = parser.parse_args()
    root = args.data or Path(tempfile.mkdtemp(prefix="wsi-mil-scale-"))
    slides = make_slides(root / "slides", args.slides, args.side)
    tiles, feats = root / "tiles", root / "features"
    t_tile = timed(["tile", *map(str, slides), "--out", str(tiles), "--target-mpp",
                    str(args.target_mpp), "--tile-px", "224", "--workers", "1",
                    "--overwrite"])  # fmt: skip
    t_floor = decode_floor(slides, tiles)
    t_extract = timed(["extract", str(tiles), "--encoder", "builtin", "--out", str(feats),
                       "--workers", "0", "--overwrite"])  # fmt: skip
    from wsi_mil.tiling import open_tile_store

    n_tiles = sum(len(open_tile_store(tiles / f"{p.stem}.zarr").coords) for p in slides)
    w_tile = work_seconds(tiles / "manifest.csv")
    w_extract = work_seconds(feats / "builtin" / "manifest.csv")
    per_tile_tile = w_tile / n_tiles
    per_tile_cpu_extract = w_extract / n_tiles
    print(f"measured here ({os.cpu_count()} CPU cores, one process per stage), "
          f"{args.slides} slides of {args.side}² px, {n_tiles} tiles of 224 px at "
          f"{args.target_mpp} µm/px; data in {root}")  # fmt: skip
    print(f"  tile:    {t_tile:6.1f} s wall, {w_tile:6.1f} s on the slides = "
          f"{1e3 * per_tile_tile:6.2f} ms/tile (decode floor {1e3 * t_floor / n_tiles:.2f} "
          f"ms/tile; floor / tile {t_floor / w_tile:.2f})")  # fmt: skip
    print(f"  extract: {t_extract:6.1f} s wall, {w_extract:6.1f} s on the slides = "
          f"{1e3 * per_tile_cpu_extract:6.2f} ms/tile (builtin encoder, CPU)")  # fmt: skip
    tps = args.tiles_per_slide
    print(
        f"\nprojection: {tps} tiles/slide, {args.tile_workers} tiling processes, "
        f"{args.gpus} GPUs at {args.gpu_tiles_s:.0f} tiles/s each, training "
        f"{args.train_minutes:.0f} min, ${args.cpu_hour}/CPU-h, ${args.gpu_hour}/GPU-h"
    )
    print(
        f"{'slides':>8} {'tile h':>8} {'extract h':>9} {'train h':>7} {'wall h':>7} {'cost $':>8}"
    )
    for n in (1_000, 10_000, 100_000):
        tile_h = n * tps * per_tile_tile / args.tile_workers / 3600
        extract_h = n * tps / (args.gpu_tiles_s * args.gpus) / 3600
        train_h = args.train_minutes / 60
        wall = max(tile_h, extract_h) + train_h
        cost = wall * (args.tile_workers * args.cpu_hour + args.gpus * args.gpu_hour)
        print(f"{n:>8} {tile_h:>8.1f} {extract_h:>9.1f} {train_h:>7.1f} {wall:>7.1f} {cost:>8.0f}")


if __name__ == "__main__":
    main()
