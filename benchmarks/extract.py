"""Feature-extraction throughput: full pipeline from zarr stores vs the model alone.

Prints, for each encoder, in one run and on the same device::

    NAME: ours X tiles/s, model-only Y tiles/s, ratio Z

* ours — :func:`wsi_mil.features.pool.run_pool` over real tile stores: decode workers
  read whole chunks from zarr, tiles go to the device as uint8, are normalised there,
  embedded, and one HDF5 bag per slide is written.
* model-only — the same encoder on the same number of tiles already in memory as
  uint8 tensors on the device, same batch size.

Both rates skip the first batch (encoder build and warm-up); each is the best of
``--repeats`` alternating runs, since shared machines are noisy. On CPU: ``builtin`` and a
ViT-S/16; with CUDA also ``builtin``, ViT-B/16 and ViT-L/16 in bf16 autocast, over at
least ``--gpu-tiles`` tiles (the stores are passed several times when they hold fewer).

With ``--stain macenko|reinhard`` the script measures the cost of stain normalisation
instead: the ViT-S/16 pipeline on the CPU over the same tiles with and without
normalisation (alternating, best of ``--repeats`` each), printing both rates and their
ratio, and the per-slide fit time (:func:`~wsi_mil.features.stain.fit_store`, done once
per slide when it starts) both alone and as a share of that slide's extraction time.

Usage: ``python benchmarks/extract.py [--tiles-dir DIR] [--workers 2] [--batch-size 64]
[--gpu-batch-size 256] [--gpu-tiles 20000] [--stain macenko|reinhard]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch


def make_stores(root: Path, n_slides: int) -> Path:
    """Tile synthetic slides (0.5 µm/px) into 224 px stores at 0.25 µm/px."""
    from wsi_mil.tiling import tile_slide
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    tiles = root / "tiles"
    for i in range(n_slides):
        slide = make_synthetic_slide(root / f"bench_{i}.svs", 6000, 4000, seed=10 + i).path
        tile_slide(slide, tiles, target_mpp=0.25, tile_px=224, min_tissue=0.25, qc=False,
                   raise_errors=True)  # fmt: skip
    return tiles


def bench_pipeline(
    encoder: str, tasks: list, device: str, batch: int, workers: int, out: Path, stain=None
):
    """Tiles/s of the full pipeline, first batch excluded (``stain``: a StainSpec)."""
    from wsi_mil.features.pool import ExtractJob, run_pool

    cuda = device.startswith("cuda")
    job = ExtractJob(encoder, "random", "benchmark", batch, workers, "float16", stain=stain)
    marks: list[tuple[float, int]] = []
    tasks = [t.__class__(t.store, f"{t.slide_id}_{i}", t.n_tiles, str(out / f"{i}.h5"),
                         t.fingerprint) for i, t in enumerate(tasks)]  # fmt: skip

    def emit(msg):
        if msg[0] == "progress":
            if cuda and not marks:  # the clock starts once the first batch is done
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), msg[1]))
        elif msg[0] == "row" and msg[1]["status"] != "ok":
            raise RuntimeError(msg[1])

    run_pool([device], job, tasks, emit)
    end = time.perf_counter()
    n = sum(k for _, k in marks[1:])
    return n / (end - marks[0][0]), sum(k for _, k in marks)


def bench_model(encoder: str, n_tiles: int, device: str, batch_size: int) -> float:
    """Tiles/s of the encoder alone on uint8 tiles already on the device, first batch
    excluded; embeddings stay on the device until the end, as in the pipeline."""
    from wsi_mil.features import create_encoder

    enc = create_encoder(encoder, weights="random", device=device)
    cuda = device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    distinct = [  # a few distinct batches, cycled (no need for n_tiles of host memory)
        torch.randint(0, 256, (batch_size, 224, 224, 3), dtype=torch.uint8, generator=g).to(device)
        for _ in range(min(8, math.ceil(n_tiles / batch_size)))
    ]
    sizes = [min(batch_size, n_tiles - i) for i in range(0, n_tiles, batch_size)]
    out = torch.empty((n_tiles, enc.dim), device=device)
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda and enc.spec.needs_weights
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), ctx:
        out[: sizes[0]] = enc(distinct[0][: sizes[0]]).float()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pos = sizes[0]
        for i, n in enumerate(sizes[1:], 1):
            out[pos : pos + n] = enc(distinct[i % len(distinct)][:n]).float()
            pos += n
        out.cpu()
    return (n_tiles - sizes[0]) / (time.perf_counter() - t0)


def vit_subset(tasks: list, n_tiles: int) -> list:
    """The smallest slides, up to about ``n_tiles`` tiles (keeps CPU ViT runs short)."""
    sub: list = []
    total = 0
    for t in sorted(tasks, key=lambda t: t.n_tiles):
        if sub and total + t.n_tiles > n_tiles:
            break
        sub.append(t)
        total += t.n_tiles
    return sub


def bench_stain_op(method: str, task, batch: int) -> None:
    """Seconds of the normalisation alone and of ViT-S/16 alone on one batch of real tiles
    (the slide's fitted stain, best of 3 each, same process)."""
    from wsi_mil.features import create_encoder
    from wsi_mil.features import stain as st
    from wsi_mil.tiling import open_tile_store

    store = open_tile_store(task.store)
    x = torch.from_numpy(store.read_pixels(0, min(batch, store.n_tiles)))
    src, tgt = st.fit_store(task.store, method), st.stain_spec(method).target_tuple()
    enc = create_encoder("timm:vit_small_patch16_224", weights="random", device="cpu")

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        model = best(lambda: enc(x))
        norm = best(lambda: st.apply_stain(x, src, tgt))
    share = 100 * norm / model
    print(f"{method} alone {norm:.3f} s, ViT-S/16 alone {model:.3f} s per batch of {len(x)} "
          f"tiles: normalisation = {share:.1f} % of the encoder", flush=True)  # fmt: skip


def bench_stain(method: str, tasks: list, args: argparse.Namespace, out: Path) -> None:
    """ViT-S/16 on the CPU with and without ``method``; prints rates, ratio, fit time."""
    from wsi_mil.features.stain import fit_store, stain_spec

    spec = stain_spec(method)
    encoder = "timm:vit_small_patch16_224"
    sub = vit_subset(tasks, args.vit_tiles)
    bench_stain_op(method, sub[0], args.batch_size)
    if args.repeats < 1:
        return
    plain = normed = 0.0
    for _ in range(args.repeats):  # alternate, keep the best of each (shared machines)
        plain = max(plain, bench_pipeline(encoder, sub, "cpu", args.batch_size, args.workers,
                                          out / "plain")[0])  # fmt: skip
        rate, n = bench_pipeline(encoder, sub, "cpu", args.batch_size, args.workers,
                                 out / method, stain=spec)  # fmt: skip
        normed = max(normed, rate)
    fits = []
    for t in sub:
        t0 = time.perf_counter()
        fit_store(t.store, method)
        fits.append(time.perf_counter() - t0)
    per_slide = sum(t.n_tiles for t in sub) / len(sub)

    fit_s = sum(fits) / len(fits)
    fit_share = fit_s / (per_slide / normed + fit_s)
    print(f"ViT-S/16 + {method}: {normed:.1f} tiles/s, plain {plain:.1f} tiles/s, ratio "
          f"{normed / plain:.3f} ({n} tiles, cpu); fit {fit_s:.2f} s per slide = "
          f"{100 * fit_share:.1f} % of a {per_slide:.0f}-tile slide", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles-dir", type=Path, default=None, help="existing tile stores")
    parser.add_argument("--slides", type=int, default=2, help="synthetic slides to tile")
    parser.add_argument("--workers", type=int, default=2, help="decode workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vit-tiles", type=int, default=256, help="tiles for ViTs on CPU")
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    parser.add_argument("--gpu-tiles", type=int, default=20000, help="tiles per CUDA run")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA runs only")
    parser.add_argument("--repeats", type=int, default=2, help="best of N alternating runs")
    parser.add_argument(
        "--stain", choices=("macenko", "reinhard"), default=None,
        help="measure this stain normalisation's cost on ViT-S/16 (CPU) instead "
        "(--repeats 0: the per-batch operation cost only)",
    )  # fmt: skip
    args = parser.parse_args()

    from wsi_mil.features.extract import find_stores, plan_extraction

    tmp = Path(tempfile.mkdtemp(prefix="wsi-mil-bench-"))
    tiles = args.tiles_dir or make_stores(tmp, args.slides)
    tasks, _ = plan_extraction(find_stores(tiles), "bench", tmp / "bags", "x", overwrite=True)
    if args.stain:
        print(f"torch threads {torch.get_num_threads()}, workers {args.workers}, "
              f"batch {args.batch_size}")  # fmt: skip
        bench_stain(args.stain, tasks, args, tmp / "bags")
        return
    cuda = torch.cuda.is_available()
    runs = (
        []
        if args.no_cpu
        else [
            ("builtin", "builtin", "cpu"),
            ("ViT-S/16", "timm:vit_small_patch16_224", "cpu"),
        ]
    )
    if cuda:
        runs += [
            ("builtin (cuda)", "builtin", "cuda:0"),
            ("ViT-B/16 bf16", "timm:vit_base_patch16_224", "cuda:0"),
            ("ViT-L/16 bf16", "timm:vit_large_patch16_224", "cuda:0"),
        ]
    print(f"torch threads {torch.get_num_threads()}, workers {args.workers}, "
          f"batch {args.batch_size} (cuda {args.gpu_batch_size}), cuda {cuda}")  # fmt: skip
    for label, encoder, device in runs:
        sub = tasks
        if device == "cpu" and encoder != "builtin":  # keep CPU ViT runs short
            sub = vit_subset(tasks, args.vit_tiles)
        elif device != "cpu":  # pass the stores again until there are enough tiles
            sub = tasks * max(1, math.ceil(args.gpu_tiles / sum(t.n_tiles for t in tasks)))
        bags = tmp / "bags" / encoder.replace(":", "_")
        batch = args.gpu_batch_size if device != "cpu" else args.batch_size
        ours = model = 0.0
        for _ in range(args.repeats):  # alternate, keep the best of each (shared machines)
            rate, n = bench_pipeline(encoder, sub, device, batch, args.workers, bags)
            ours = max(ours, rate)
            model = max(model, bench_model(encoder, n, device, batch))
        print(f"{label}: ours {ours:.1f} tiles/s, model-only {model:.1f} tiles/s, "
              f"ratio {ours / model:.2f}  ({n} tiles, {device})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
