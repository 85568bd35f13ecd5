"""``wsi-mil heatmap`` formats against baselines measured in the same run (a script).

Usage::

    .venv/bin/python benchmarks/heatmap.py                 # 0.9 Gpx slide, ~50k tiles
    .venv/bin/python benchmarks/heatmap.py --size 8192     # quick run

A synthetic slide (``wsi/synthetic.py``, 30000² px at 0.5 µm/px by default, cached in
``--cache-dir``) is tiled at ``--target-mpp`` (default 0.5 µm/px: 224-px tiles with a
stride of ``--stride-px`` 84 px, about 50,500 overlapping tiles, geometry only) and given
smooth synthetic scores (attention and signed contribution; no model: scoring is not
what is timed). Each format is then written by ``render_heatmap`` alone, and a baseline
doing the same job the straightforward way, each in a fresh process (so each reports its
own peak memory and CPU time, threads included). One line per format:
``FORMAT: ours X s (C cpu-s, P MB), baseline Y s (D cpu-s, Q MB), ratio Z`` with
``ratio = baseline seconds / our seconds`` (> 1: ours faster), then the totals per slide
against the issue's goals (PNG + GeoJSON + top-k under 10 s, all formats under 60 s on
2 cores) and the load average, since wall seconds on a shared machine grow with it.
Baselines:

- ``png``: OpenSlide ``get_thumbnail`` + one PIL rectangle per tile + alpha blend
  (flat blocks, no overlap averaging, no caption).
- ``geojson``: the same features built in memory and written with one ``json.dump``.
- ``topk``: the same top and bottom tiles read with OpenSlide ``read_region`` at the
  best level, resized and saved as PNG (no grid image).
- ``tiff``: the same overlay raster upsampled to each pyramid level in memory and
  written with tifffile alone (same tiling, JPEG, levels).
- ``dzi``: the slide's Deep Zoom tiles (same levels, 256 px, JPEG 85) written with
  OpenSlide's ``DeepZoomGenerator``; ours also writes the overlay's Deep Zoom image and
  the viewer, so this ratio understates ours.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("png", "geojson", "topk", "tiff", "dzi")


def _slide(size: int, cache: Path) -> Path:
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"heatmap-{size}x{size}-0.5mpp.svs"
    if not path.exists():
        t0 = time.perf_counter()
        print(f"generating {path} ({size * size / 1e9:.2f} gigapixels)...", flush=True)
        make_synthetic_slide(path, size, size, mpp=0.5, seed=17, mask_mpp=8.0)
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _tiles(slide: Path, cache: Path, target_mpp: float, tile_px: int, stride_px: int) -> Path:
    from wsi_mil.tiling import tile_slide

    out = cache / f"tiles-{target_mpp:g}-{tile_px}-{stride_px}"
    row = tile_slide(
        slide, out, target_mpp=target_mpp, tile_px=tile_px, stride_px=stride_px, pixels="none",
        qc=False,
    )  # fmt: skip
    if row["status"] == "failed":
        raise SystemExit(f"tiling failed: {row['error']}")
    return out / f"{slide.stem}.zarr"


def _scores(store_path: Path) -> Any:
    """Smooth synthetic scores for every tile of the store."""
    from wsi_mil.mil.heatmap.scores import SlideScores
    from wsi_mil.tiling import open_tile_store

    store = open_tile_store(store_path)
    coords = store.coords
    w, h = store.attrs["dimensions"]
    u, v = coords[:, 0] / w, coords[:, 1] / h
    field = np.sin(6 * u) * np.cos(5 * v) + 0.1 * np.random.default_rng(0).normal(size=len(u))
    attention = np.exp(field)
    attention /= attention.sum()
    return SlideScores(
        slide_id=store.slide_id, coords=coords, side=round(store.attrs["tile_level0"]),
        attention=attention, contribution=field * attention, prediction={"risk": 0.4},
        model="abmil", run="benchmark", source="ensemble", target="risk",
        target_mpp=store.target_mpp, tile_px=store.tile_px,
    )  # fmt: skip


# ---------------------------------------------------------------------- ours


def ours(fmt: str, scores: Any, slide: Path, out: Path, top_k: int) -> None:
    """One format written by ``render_heatmap``."""
    from wsi_mil.mil.heatmap import render_heatmap

    render_heatmap(scores, slide, out, formats=(fmt,), top_k=top_k)


# ---------------------------------------------------------------------- baselines


def _colours(scores: Any) -> np.ndarray:
    """(N, 3) uint8 colours of the rank-normalised contributions (as ours colours them)."""
    from wsi_mil.mil.heatmap.render import HeatmapOptions, colour_scale

    norm, scale = colour_scale(scores.contribution, "contribution", HeatmapOptions(), scores.target)
    return scale.rgba(norm)[:, :3]


def base_png(scores: Any, slide: Path, out: Path, max_size: int = 2048) -> None:
    import openslide
    from PIL import Image, ImageDraw

    osr = openslide.OpenSlide(str(slide))
    thumb = osr.get_thumbnail((max_size, max_size)).convert("RGB")
    f = thumb.size[0] / osr.dimensions[0]
    overlay = thumb.copy()
    draw = ImageDraw.Draw(overlay)
    for (x, y), rgb in zip(scores.coords, _colours(scores), strict=True):
        x0, y0 = x * f, y * f
        draw.rectangle([x0, y0, x0 + scores.side * f, y0 + scores.side * f], fill=tuple(rgb))
    Image.blend(thumb, overlay, 0.5).save(out / "baseline.png")
    osr.close()


def _tile_feature(x: int, y: int, side: int, a: float, c: float) -> dict[str, Any]:
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "tile", "measurements": {"attention": a, "contribution": c}},
    }


def base_geojson(scores: Any, slide: Path, out: Path) -> None:
    features = [
        _tile_feature(x, y, scores.side, float(a), float(c))
        for (x, y), a, c in zip(
            scores.coords.tolist(), scores.attention, scores.contribution, strict=True
        )
    ]
    with open(out / "baseline.geojson", "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)


def base_topk(scores: Any, slide: Path, out: Path, top_k: int) -> None:
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(slide))
    mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
    order = np.argsort(-scores.contribution, kind="stable")
    picked = np.concatenate([order[:top_k], order[::-1][:top_k]])
    level = osr.get_best_level_for_downsample(scores.target_mpp / mpp + 1e-6)
    ds = osr.level_downsamples[level]
    size = math.ceil(scores.side / ds)
    for i in picked:
        x, y = (int(v) for v in scores.coords[i])
        tile = osr.read_region((x, y), level, (size, size)).convert("RGB")
        tile = tile.resize((scores.tile_px, scores.tile_px), Image.Resampling.BOX)
        tile.save(out / f"tile_{x}_{y}.png")
    osr.close()


def base_tiff(scores: Any, slide: Path, out: Path) -> None:
    import tifffile

    from wsi_mil.mil.heatmap.render import HeatmapOptions, _overlay_raster, colour_scale
    from wsi_mil.wsi import open_slide

    norm, scale = colour_scale(scores.contribution, "contribution", HeatmapOptions(), "risk")
    with open_slide(slide) as s:
        raster = _overlay_raster(s, scores, norm, HeatmapOptions())
        width, height, mpp = *s.dimensions, s.mpp
    rgba = scale.rgba(raster.value)
    rgb = np.where(rgba[..., 3:4] > 0, rgba[..., :3], np.uint8(255))
    rows, cols = rgb.shape[:2]
    with tifffile.TiffWriter(out / "baseline.tif", bigtiff=True) as tw:
        level, w, h = 0, width, height
        while True:
            f = 2.0**level
            ri = np.minimum(((np.arange(h) + 0.5) * f / raster.scale).astype(np.int64), rows - 1)
            ci = np.minimum(((np.arange(w) + 0.5) * f / raster.scale).astype(np.int64), cols - 1)
            image = rgb[ri[:, None], ci[None, :]]  # the whole level in memory
            tw.write(
                image, tile=(256, 256), photometric="rgb", compression="jpeg",
                compressionargs={"level": 90}, subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), resolutionunit="CENTIMETER",
            )  # fmt: skip
            del image
            if max(w, h) <= 256:
                break
            level, w, h = level + 1, (w + 1) // 2, (h + 1) // 2


def base_dzi(scores: Any, slide: Path, out: Path) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    osr = openslide.OpenSlide(str(slide))
    mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
    gen = DeepZoomGenerator(osr, tile_size=256, overlap=0, limit_bounds=False)
    skip = round(math.log2(max(1.0, scores.target_mpp / mpp)))  # finest level at target_mpp
    for level in range(gen.level_count - skip):
        folder = out / "baseline_files" / str(level)
        folder.mkdir(parents=True)
        cols, rows = gen.level_tiles[level]
        for row in range(rows):
            for col in range(cols):
                tile = gen.get_tile(level, (col, row))
                tile.save(folder / f"{col}_{row}.jpeg", format="JPEG", quality=85)
    osr.close()


# ---------------------------------------------------------------------- harness


_WARM = (
    "openslide", "openslide.deepzoom", "tifffile", "PIL.Image", "PIL.ImageDraw", "scipy.stats",
    "scipy.ndimage",
    "matplotlib.pyplot", "wsi_mil.wsi", "wsi_mil.mil.heatmap.render",
    "wsi_mil.mil.heatmap.png", "wsi_mil.mil.heatmap.qupath", "wsi_mil.mil.heatmap.gallery",
    "wsi_mil.mil.heatmap.viewer", "wsi_mil.mil.heatmap.pyramid",
)  # fmt: skip


def _cpu() -> float:
    """CPU seconds of this process so far (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _job(
    kind: str, fmt: str, scores: Any, slide: str, out: str, top_k: int
) -> tuple[float, float, float]:
    """Run one side in this (fresh) process; returns (seconds, CPU seconds, peak MB)."""
    import importlib

    for name in _WARM:  # imports are not what is timed
        importlib.import_module(name)
    folder = Path(out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0, c0 = time.perf_counter(), _cpu()
    if kind == "ours":
        ours(fmt, scores, Path(slide), folder, top_k)
    elif fmt == "topk":
        base_topk(scores, Path(slide), folder, top_k)
    else:
        {"png": base_png, "geojson": base_geojson, "tiff": base_tiff, "dzi": base_dzi}[fmt](
            scores, Path(slide), folder
        )
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, cpu, peak


def _measure(kind: str, fmt: str, scores: Any, slide: Path, work: Path, top_k: int) -> tuple:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_job, (kind, fmt, scores, str(slide), str(work / kind), top_k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=30000, help="slide side in px at 0.5 µm/px")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--stride-px", type=int, default=84, help="grid step at target mpp")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench"
    )
    args = parser.parse_args()
    slide = _slide(args.size, args.cache_dir)
    store = _tiles(slide, args.cache_dir, args.target_mpp, args.tile_px, args.stride_px)
    scores = _scores(store)
    print(
        f"{platform.node()} ({os.cpu_count()} CPUs, load average {_load()}): slide "
        f"{args.size}x{args.size} px at 0.5 µm/px, {len(scores.coords)} tiles of "
        f"{args.tile_px} px at {args.target_mpp:g} µm/px, stride {args.stride_px} px",
        flush=True,
    )
    ours_s: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            t_ours, c_ours, m_ours = _measure("ours", fmt, scores, slide, Path(tmp), args.top_k)
            t_base, c_base, m_base = _measure("baseline", fmt, scores, slide, Path(tmp), args.top_k)
            ours_s[fmt] = (t_ours, c_ours)
            print(
                f"{fmt}: ours {t_ours:.2f} s ({c_ours:.1f} cpu-s, {m_ours:.0f} MB), "
                f"baseline {t_base:.2f} s ({c_base:.1f} cpu-s, {m_base:.0f} MB), "
                f"ratio {t_base / t_ours:.2f}",
                flush=True,
            )
    for name, fmts, goal in (
        ("png+geojson+topk", ("png", "geojson", "topk"), 10.0),
        ("all formats", FORMATS, 60.0),
    ):
        if all(f in ours_s for f in fmts):
            wall = sum(ours_s[f][0] for f in fmts)
            cpu = sum(ours_s[f][1] for f in fmts)
            verdict = "met" if wall < goal else "missed"
            print(
                f"{name}: ours {wall:.1f} s per slide ({cpu:.1f} cpu-s); goal < {goal:g} s "
                f"on 2 cores: {verdict} at load average {_load()}"
            )


def _load() -> str:
    """The 1-minute load average (how shared the machine is)."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    main()
