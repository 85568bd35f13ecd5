"""wsi-mil against its peers, side by side, on one real-tissue slide (a script, not a test).

Usage::

    python benchmarks/peers.py --peer-python /path/to/peers-venv/bin/python
    python benchmarks/peers.py --repeats 1 --tasks grid     # quick look

The peers (LazySlide, TIAToolbox, histolab) come from ``pip install -e .[peers]``,
best in a virtual environment of their own, passed with ``--peer-python`` (default: this
interpreter); a peer that does not import there is skipped, with the reason printed.

Every measurement runs in a fresh subprocess (imports isolated; its peak RSS comes from
``os.wait4``), tools interleaved round by round (``--repeats`` rounds), and each table
cell is the median and the spread (min–max) over the rounds. ``work`` is timed inside
the subprocess after the imports (open the slide ... last result); ``whole`` is the
subprocess's wall time, interpreter start and imports included.

Tasks, all at level-0 0.5 µm/px, 224 px tiles, no overlap, tiles kept at ≥ 50 %
tissue, tissue mask at ``--mask-mpp`` (8 µm/px = level 2 of the test slide) where the
API allows it:

* ``grid`` — tissue detection + tile grid (coordinates only).
* ``pixels`` — the same plus every kept tile's pixels: wsi-mil ``tile_slide`` into a
  zarr store (lossless and jpeg), its reading path alone (``iter_tile_pixels``, no
  store), LazySlide and TIAToolbox iterating their tiles, histolab saving its PNGs
  (histolab's way to deliver tiles), and the decode limit: a plain
  ``openslide.read_region`` loop over wsi-mil's coordinates (pixels only).
* ``features`` — ViT-S/16 (timm ``vit_small_patch16_224``, random weights: nothing is
  downloaded) on CPU over the tiles of a smaller mosaic (tiling done beforehand, not
  timed); wsi-mil through the API and the CLI, LazySlide through
  ``zs.tl.feature_extraction``.

A run whose first round takes longer than ``--slow-s`` seconds is not repeated (histolab's
PNG export takes minutes).

The test slide is a 30000 x 30000 Aperio SVS at 0.5 µm/px mosaicked from the real scan
``CMU-1-Small-Region.svs`` (see ``_mosaic.py``; cached in ``--cache-dir``); without the
real scan, a synthetic slide from ``wsi_mil.wsi.synthetic`` stands in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TILE_PX = 224
MPP = 0.5
MIN_TISSUE = 0.5
VIT = "vit_small_patch16_224"
#: The peers and the packages whose versions are reported with them.
PEERS = {"lazyslide": ["wsidata"], "tiatoolbox": [], "histolab": []}

# --------------------------------------------------------------- inside a worker
# Everything below until "the parent" runs in the measured subprocess; only the
# standard library and each tool's own imports are used (the peers' interpreter may
# not have wsi_mil).


def _level_for(slide_downsamples: list[float], base_mpp: float, mask_mpp: float) -> int:
    """The pyramid level closest to ``mask_mpp`` (not finer than needed)."""
    best = 0
    for i, d in enumerate(slide_downsamples):
        if d * base_mpp <= mask_mpp * 1.01:
            best = i
    return best


def _twice(once) -> dict:
    """``work``: the first call in this process; ``warm``: a second one (as in a batch),
    skipped when the first took over 10 s."""
    t0 = time.perf_counter()
    n = once()
    t1 = time.perf_counter()
    if t1 - t0 > 10:
        return {"work": t1 - t0, "tiles": n}
    once()
    return {"work": t1 - t0, "warm": time.perf_counter() - t1, "tiles": n}


def _wsimil_grid(s: Any, mask_mpp: float) -> Any:
    """wsi-mil's tissue detection and grid on an open slide, at the benchmark settings."""
    from wsi_mil.tiling import detect_tissue, tile_grid

    mask = detect_tissue(s.get_thumbnail(mpp=mask_mpp), mask_mpp)
    scale = mask_mpp / s.mpp
    return tile_grid(mask, s.dimensions, mpp=s.mpp, target_mpp=MPP, tile_px=TILE_PX,
                     min_tissue=MIN_TISSUE, mask_scale=(scale, scale))  # fmt: skip


def w_wsimil_grid(slide: str, out: Path, a: dict) -> dict:
    from wsi_mil.wsi import open_slide

    def once() -> int:
        with open_slide(slide) as s:
            grid = _wsimil_grid(s, a["mask_mpp"])
        if a.get("save_coords"):
            import numpy as np

            np.save(a["save_coords"], grid.coords)
        return grid.n_tiles

    return _twice(once)


def w_wsimil_pixels(slide: str, out: Path, a: dict) -> dict:
    from wsi_mil.tiling import tile_slide

    t0 = time.perf_counter()
    row = tile_slide(slide, out, pixels=a["mode"], mask_mpp=a["mask_mpp"], qc=False,
                     target_mpp=MPP, tile_px=TILE_PX, min_tissue=MIN_TISSUE,
                     read_threads=a["threads"], raise_errors=True)  # fmt: skip
    return {"work": time.perf_counter() - t0, "tiles": int(row["n_tiles"])}


def w_wsimil_read(slide: str, out: Path, a: dict) -> dict:
    """wsi-mil's pixel path alone: detection, grid and iter_tile_pixels, no store."""
    from wsi_mil.tiling.pipeline import iter_tile_pixels, tile_params
    from wsi_mil.wsi import open_slide

    t0 = time.perf_counter()
    params = tile_params(target_mpp=MPP, tile_px=TILE_PX, stride_px=None,
                         min_tissue=MIN_TISSUE, pixels="lossless", mask_mpp=a["mask_mpp"],
                         mpp=None)  # fmt: skip
    n = 0
    with open_slide(slide) as s:
        grid = _wsimil_grid(s, a["mask_mpp"])
        level = s.best_level_for_mpp(MPP)
        for block in iter_tile_pixels(s, grid.index, level, params, threads=a["threads"]):
            n += len(block)
    return {"work": time.perf_counter() - t0, "tiles": n}


def w_openslide_pixels(slide: str, out: Path, a: dict) -> dict:
    """The decode limit: read_region per tile over given coordinates, pixels only."""
    import numpy as np
    import openslide

    coords = np.load(a["coords"])
    size = round(TILE_PX * MPP / a["slide_mpp"])
    t0 = time.perf_counter()
    s = openslide.OpenSlide(slide)
    for x, y in coords:
        np.asarray(s.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
    s.close()
    return {"work": time.perf_counter() - t0, "tiles": len(coords)}


def _lazyslide_tiles(slide: str, a: dict):
    import lazyslide as zs
    from wsidata import open_wsi

    wsi = open_wsi(slide)
    mpps = [d * float(wsi.properties.mpp) for d in wsi.properties.level_downsample]
    level = _level_for(list(wsi.properties.level_downsample), mpps[0], a["mask_mpp"])
    zs.pp.find_tissues(wsi, level=level)
    zs.pp.tile_tissues(wsi, TILE_PX, mpp=MPP, background_fraction=1 - MIN_TISSUE)
    return wsi


def w_lazyslide_grid(slide: str, out: Path, a: dict) -> dict:
    return _twice(lambda: len(_lazyslide_tiles(slide, a)["tiles"]))


def w_lazyslide_pixels(slide: str, out: Path, a: dict) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    wsi = _lazyslide_tiles(slide, a)
    n = 0
    for tile in wsi.iter.tile_images("tiles"):
        np.asarray(tile.image)
        n += 1
    return {"work": time.perf_counter() - t0, "tiles": n}


def _tia_extractor(slide: str, a: dict):
    from tiatoolbox.tools.patchextraction import get_patch_extractor
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(slide)
    mask = reader.tissue_mask(method="otsu", resolution=a["mask_mpp"], units="mpp")
    ext = get_patch_extractor(
        input_img=reader, input_mask=mask, method_name="slidingwindow",
        patch_size=(TILE_PX, TILE_PX), resolution=MPP, units="mpp",
        min_mask_ratio=MIN_TISSUE,
    )  # fmt: skip
    return ext


def w_tiatoolbox_grid(slide: str, out: Path, a: dict) -> dict:
    return _twice(lambda: len(_tia_extractor(slide, a).coordinate_list))


def w_tiatoolbox_pixels(slide: str, out: Path, a: dict) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    ext = _tia_extractor(slide, a)
    n = 0
    for patch in ext:
        np.asarray(patch)
        n += 1
    return {"work": time.perf_counter() - t0, "tiles": n}


def _histolab(slide: str, out: Path):
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    s = Slide(slide, processed_path=str(out))
    tiler = GridTiler(tile_size=(TILE_PX, TILE_PX), level=0, check_tissue=True,
                      tissue_percent=100 * MIN_TISSUE, pixel_overlap=0)  # fmt: skip
    return s, tiler, TissueMask()


def w_histolab_grid(slide: str, out: Path, a: dict) -> dict:
    def once() -> int:
        s, tiler, mask = _histolab(slide, out)
        return sum(1 for _ in tiler._grid_coordinates_generator(s, mask))

    return _twice(once)


def w_histolab_pixels(slide: str, out: Path, a: dict) -> dict:
    t0 = time.perf_counter()
    s, tiler, mask = _histolab(slide, out)
    tiler.extract(s, mask)
    work = time.perf_counter() - t0
    return {"work": work, "tiles": sum(1 for _ in Path(out).rglob("*.png"))}


def w_wsimil_features(slide: str, out: Path, a: dict) -> dict:
    from wsi_mil.features import extract_slide

    t0 = time.perf_counter()
    row = extract_slide(a["store"], f"timm:{VIT}", out, weights="random", devices="cpu",
                        batch_size=a["batch"], overwrite=True)  # fmt: skip
    if row["status"] != "ok":
        raise RuntimeError(str(row))
    return {"work": time.perf_counter() - t0, "tiles": int(row["n_tiles"])}


def w_lazyslide_features(slide: str, out: Path, a: dict) -> dict:
    import lazyslide as zs
    import numpy as np
    import timm
    import torch

    wsi = _lazyslide_tiles(slide, a)
    model = timm.create_model(VIT, pretrained=False, num_classes=0).eval()
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)

    def transform(tile: np.ndarray) -> torch.Tensor:  # uint8 (h, w, 3) -> float (3, h, w)
        x = torch.from_numpy(np.ascontiguousarray(tile[..., :3])).permute(2, 0, 1)
        return (x.float() / 255 - mean) / std

    t0 = time.perf_counter()
    zs.tl.feature_extraction(wsi, model, model_name="vit_s16_random", transform=transform,
                             device="cpu", batch_size=a["batch"], pbar=False)  # fmt: skip
    return {"work": time.perf_counter() - t0, "tiles": len(wsi["tiles"])}


WORKERS = {k[2:]: v for k, v in globals().items() if k.startswith("w_")}


def _worker_main(argv: list[str]) -> None:
    name, slide, out, blob = argv
    result = WORKERS[name](slide, Path(out), json.loads(blob))
    print("RESULT " + json.dumps(result), flush=True)


# -------------------------------------------------------------------- the parent


def _launch_main(cmd: list[str]) -> None:
    """Run ``cmd`` from this small process; print its output, wall time and peak RSS.

    A child's peak RSS starts from its parent's at ``fork``, so the benchmark's own
    process (numpy, openslide loaded) must not be the parent: this launcher is.
    """
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    sys.stdout.write(res.stdout.decode(errors="replace"))
    print("LAUNCH " + json.dumps({"whole": wall, "rss_mb": rss, "rc": res.returncode}))


def _measure(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` under the launcher: wall s, peak RSS MB (with descendants), result."""
    launcher = [sys.executable, "-S", str(HERE / "peers.py"), "--launch", *cmd]
    res = subprocess.run(launcher, capture_output=True, text=True, env=env)
    out: dict[str, Any] = {}
    lines = res.stdout.splitlines()
    for line in lines:
        if line.startswith("LAUNCH "):
            out.update(json.loads(line[7:]))
        elif line.startswith("RESULT "):
            out.update(json.loads(line[7:]))
    if out.pop("rc", 1) != 0:
        text = (res.stdout + res.stderr).strip()
        out["error"] = text.splitlines()[-2] if len(text.splitlines()) > 1 else text
        out["log"] = text[-3000:]
    return out


class Runner:
    """Builds worker commands and fresh output folders."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = dict(os.environ)

    def worker(self, python: str, name: str, slide: Path, args: dict) -> list[str]:
        return [python, str(HERE / "peers.py"), "--worker", name, str(slide),
                str(self.fresh_dir()), json.dumps(args)]  # fmt: skip

    def fresh_dir(self) -> Path:
        out = self.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out


def _peer_available(python: str, module: str, env: dict[str, str]) -> str | None:
    """None when ``module`` imports under ``python``, else why not."""
    code = f"import {module}, importlib.metadata as m; print(m.version('{module}'))"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode == 0:
        return None
    lines = (res.stderr or res.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {res.returncode}"


def _versions(python: str, modules: list[str], env: dict[str, str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        f"for k in {modules!r}:\n"
        "    try: out[k] = m.version(k)\n"
        "    except Exception: pass\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    return json.loads(res.stdout) if res.returncode == 0 else {}


REAL_SLIDE = HERE.parent.parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def _slides(cache: Path, size: int, source: Path) -> tuple[Path, Path, str]:
    """(big slide, small slide for features, description); mosaicked from ``source``
    when it exists, else synthetic."""
    if source.exists():
        sys.path.insert(0, str(HERE))
        from _mosaic import make_mosaic_slide

        big = cache / f"mosaic-{size}-0.5mpp.svs"
        small = cache / "mosaic-6000-0.5mpp.svs"
        for path, side in ((big, size), (small, 6000)):
            if not path.exists():
                print(f"building {path} from {source.name} ...", flush=True)
                make_mosaic_slide(source, path, side)
        return big, small, f"mosaic of the real scan {source.name}"
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    big = cache / f"synthetic-{size}-0.5mpp.svs"
    small = cache / "synthetic-6000-0.5mpp.svs"
    for path, side in ((big, size), (small, 6000)):
        if not path.exists():
            make_synthetic_slide(path, side, side, mpp=0.5, seed=11)
    return big, small, "synthetic slide (the real scan CMU-1-Small-Region.svs was not found)"


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _table(title: str, results: dict[str, list[dict]], notes: dict[str, str]) -> None:
    print(f"\n{title}")
    print("| tool | work s | warm s | whole s | tiles | peak RSS MB | n |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            err = runs[0].get("error", "skipped") if runs else notes.get(name, "skipped")
            print(f"| {name} | skipped: {err} | | | | | |")
            continue
        tiles = sorted({r.get("tiles") for r in ok})
        print(
            f"| {name} | {_cell([r['work'] for r in ok if 'work' in r])} "
            f"| {_cell([r['warm'] for r in ok if 'warm' in r])} "
            f"| {_cell([r['whole'] for r in ok])} | {', '.join(map(str, tiles))} "
            f"| {_cell([r['rss_mb'] for r in ok], '{:.0f}')} | {len(ok)} |"
        )
    for name, note in notes.items():
        if note:
            print(f"- {name}: {note}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--launch":
        _launch_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with the peers")
    for peer in PEERS:
        p.add_argument(f"--{peer}-python", default=None,
                       help=f"interpreter with {peer} (default: --peer-python)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--feature-repeats", type=int, default=3, help="rounds of the features task")
    p.add_argument("--tasks", nargs="+", default=["grid", "pixels", "features"],
                   choices=["grid", "pixels", "features"])  # fmt: skip
    p.add_argument("--size", type=int, default=30_000, help="side of the test slide (px)")
    p.add_argument("--mask-mpp", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=32, help="feature batch size")
    p.add_argument("--slow-s", type=float, default=120.0, help="do not repeat runs this slow")
    p.add_argument("--histolab-pixels", action="store_true",
                   help="also time histolab's PNG export (minutes; once)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "wsi-mil-peers")  # fmt: skip
    p.add_argument("--real-slide", type=Path, default=REAL_SLIDE,
                   help="real H&E scan to mosaic the slide from (else synthetic)")  # fmt: skip
    args = p.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    big, small, what = _slides(args.cache_dir, args.size, args.real_slide)
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=args.cache_dir))
    run = Runner(work)
    env = run.env
    py = {k: getattr(args, f"{k}_python") or args.peer_python for k in PEERS}
    ours_v = _versions(sys.executable, ["wsi-mil", "openslide-python", "torch", "timm"], env)
    skip = {k: _peer_available(py[k], k, env) for k in PEERS}
    import openslide

    with openslide.OpenSlide(str(big)) as s:
        slide_mpp = float(s.properties["openslide.mpp-x"])
        dims = s.level_dimensions
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"slide: {big.name} ({what}), levels {dims}, {slide_mpp} µm/px")
    print(f"wsi-mil side ({sys.executable}): {ours_v}")
    for k, why in skip.items():
        if why:
            print(f"skipping {k}: does not import under {py[k]} ({why})")
        else:
            mods = [k, *PEERS[k], "openslide-python", "torch", "timm", "numpy"]
            print(f"{k} side ({py[k]}): {_versions(py[k], mods, env)}")
    print(
        f"settings: {TILE_PX} px tiles at {MPP} µm/px, no overlap, ≥ {MIN_TISSUE:.0%} "
        f"tissue, tissue mask at {args.mask_mpp} µm/px; {args.repeats} rounds",
        flush=True,
    )

    a = {"mask_mpp": args.mask_mpp}
    coords = work / "coords.npy"
    cli = [sys.executable, "-m", "wsi_mil.workflows.cli"]

    def job(tool: str, worker: str, slide: Path, **extra: Any):
        """A job: a fresh command line for ``worker`` under ``tool``'s interpreter."""
        python = sys.executable if tool == "wsi-mil" else py[tool]
        return lambda: run.worker(python, worker, slide, {**a, **extra})

    def cli_job(*argv: str):
        return lambda: [*cli, *argv, "--out", str(run.fresh_dir())]

    if "grid" in args.tasks:
        jobs = {
            "wsi-mil API": job("wsi-mil", "wsimil_grid", big, save_coords=str(coords)),
            "wsi-mil CLI (tile --pixels none)": cli_job(
                "tile", str(big), "--pixels", "none", "--no-qc", "--workers", "1",
                "--mask-mpp", str(args.mask_mpp),
            ),
            "LazySlide": job("lazyslide", "lazyslide_grid", big),
            "TIAToolbox": job("tiatoolbox", "tiatoolbox_grid", big),
            "histolab": job("histolab", "histolab_grid", big),
        }  # fmt: skip
        notes = {
            "LazySlide": f"find_tissues at the level nearest {args.mask_mpp:g} µm/px",
            "TIAToolbox": f"otsu tissue_mask at {args.mask_mpp:g} µm/px, min_mask_ratio 0.5",
            "histolab": "TissueMask at its own fixed thumbnail scale; grid coordinates in "
            "the mask's regions, before its per-tile tissue check (which reads pixels)",
        }
        _rounds("tissue + grid", jobs, skip, args, env, notes=notes)
    if "pixels" in args.tasks:
        if not coords.exists():
            _measure(job("wsi-mil", "wsimil_grid", big, save_coords=str(coords))(), env)
        jobs = {
            "wsi-mil tile_slide lossless": job("wsi-mil", "wsimil_pixels", big,
                                               mode="lossless", threads=2),
            "wsi-mil tile_slide jpeg": job("wsi-mil", "wsimil_pixels", big, mode="jpeg",
                                           threads=2),
            "wsi-mil read path, 1 thread": job("wsi-mil", "wsimil_read", big, threads=1),
            "openslide loop (pixels only)": job("wsi-mil", "openslide_pixels", big,
                                                coords=str(coords), slide_mpp=slide_mpp),
            "LazySlide": job("lazyslide", "lazyslide_pixels", big),
            "TIAToolbox": job("tiatoolbox", "tiatoolbox_pixels", big),
        }  # fmt: skip
        if args.histolab_pixels:
            jobs["histolab (PNG files)"] = job("histolab", "histolab_pixels", big)
        _rounds("tissue + grid + every tile's pixels", jobs, skip, args, env)
    if "features" in args.tasks:
        tiles = work / "feature-tiles"
        from wsi_mil.tiling import tile_slide

        row = tile_slide(small, tiles, target_mpp=MPP, tile_px=TILE_PX, min_tissue=MIN_TISSUE,
                         mask_mpp=args.mask_mpp, qc=False, raise_errors=True)  # fmt: skip
        f = {"store": row["store"], "batch": args.batch}
        jobs = {
            "wsi-mil API": job("wsi-mil", "wsimil_features", small, **f),
            "wsi-mil CLI (extract)": cli_job(
                "extract", str(tiles), "--encoder", f"timm:{VIT}", "--weights", "random",
                "--devices", "cpu", "--batch-size", str(args.batch), "--no-progress",
            ),
            "LazySlide": job("lazyslide", "lazyslide_features", small, **f),
        }  # fmt: skip
        _rounds(f"ViT-S/16 features on CPU ({small.name})", jobs, skip, args, env,
                repeats=args.feature_repeats)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


def _rounds(title: str, jobs: dict, skip: dict, args, env, repeats: int | None = None,
            notes: dict[str, str] | None = None) -> None:  # fmt: skip
    """Run every job once per round, interleaved, and print the table."""
    results: dict[str, list[dict]] = {k: [] for k in jobs}
    notes = {k: v for k, v in (notes or {}).items() if v}
    slow: set[str] = set()
    for i in range(repeats or args.repeats):
        for k in skip:  # a peer installed while this runs joins at the next round
            if skip[k]:
                skip[k] = _peer_available(getattr(args, f"{k}_python") or args.peer_python, k, env)
        for name, make in jobs.items():
            peer = next((k for k in skip if name.lower().startswith(k)), None)
            if peer and skip[peer]:
                notes[name] = f"not installed ({skip[peer]})"
                continue
            if notes.get(name, "").startswith("not installed"):
                del notes[name]
            if name in slow or (results[name] and "error" in results[name][-1]):
                continue
            r = _measure(make(), env)
            results[name].append(r)
            if "error" in r:
                print(f"  {name} failed: {r['error']}\n{r.get('log', '')}", flush=True)
            elif r["whole"] > args.slow_s:
                slow.add(name)
                notes[name] = f"{r['whole']:.0f} s: not repeated (over --slow-s {args.slow_s:g})"
            print(f"  round {i + 1} {name}: " + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in r.items() if k != "log"), flush=True)  # fmt: skip
    _table(title, results, notes)


if __name__ == "__main__":
    main()
