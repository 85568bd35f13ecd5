"""``wsi-mil extract``: embed the tiles of every tile store with an encoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
Embed every tile of every tile store in TILES (folders of <slide_id>.zarr from `wsi-mil
tile`, or stores) with ENCODER and write one HDF5 bag per slide:

  OUT/<bags>/<slide_id>.h5    features (N, D) float16, coords (N, 2) level-0 (x, y)
  OUT/<bags>/manifest.csv     ok / skipped / failed per store, with the reason
  OUT/<bags>/config.yaml      resolved settings (encoder, weights sha256, devices)

<bags> is --name when given; else the encoder name for hub weights (no --weights),
--weights random and builtin; else <encoder>-<sha8> (the first 8 hex digits of the
weights file's sha256), so two checkpoints of one encoder never share a folder (a folder
<encoder>/ already holding bags of exactly these weights is kept). A folder whose bags
were made with other weights is refused (exit 2), naming both hashes. (timm:<name>
encoders write to OUT/timm_<name>/; with --stain macenko|reinhard and no --name the
folder gets the suffix _stain-<method>, the method, target and each slide's fitted
parameters recorded in its bag; --augment K adds features_augmented (K, N, D) to each
bag: K H&E-jittered views of every tile, embedded from the same decoded tiles, which
training samples (one view per bag each time it is drawn) and prediction ignores.)
Weights: --weights accepts the folder a publisher distributes on Hugging Face
(config.json + model.safetensors or pytorch_model.bin) or a timm state-dict file
(.safetensors / .pth); pickles holding anything but tensors are refused. Without
--weights the hub is tried. `builtin` needs no weights. Re-running skips bags with the
same encoder, weights, tile store, stain and augmentation settings; incomplete stores are
skipped and listed in the manifest.

Tiles are decoded in worker processes (--workers): a slide whose decoding crashes (e.g.
a segfault in a C library) fails alone, named with the signal, and a re-run retries
it. With --workers 0 decoding runs in the device process (no crash isolation with one
device). Two `extract` runs on one --out folder share the work: a slide being embedded
by the other (lock file .<slide_id>.h5.lock) is waited for. SIGINT/SIGTERM stop the
workers, remove temporaries and write the manifest with the slides in flight
"interrupted".

With --dask-scheduler the slides are embedded on a Dask cluster, --dask-chunk slides per
task, each on its worker's first GPU (else its CPU); when workers advertise a GPU
resource (dask worker --resources GPU=1) every task asks for one. Tile stores and OUT
must be on a filesystem the workers share, at the same paths (they are made absolute).
A task whose worker dies is run again elsewhere; bags it had finished are kept.

Exit status: 0 when every slide is ok or skipped; 1 when any slide failed (see
manifest.csv); 2 on invalid arguments (unknown encoder, bad weights, no stores,
unreachable --dask-scheduler);
130 / 143 when interrupted by SIGINT / SIGTERM."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``extract`` subcommand."""
    p = subparsers.add_parser(
        "extract",
        help="embed tiles into per-slide HDF5 feature bags",
        description=_DESCRIPTION,
    )
    p.add_argument("tiles", type=Path, nargs="+", metavar="TILES",
                   help="folder of <slide_id>.zarr stores, or stores")  # fmt: skip
    p.add_argument(
        "--encoder", default="builtin", help="encoder name (see `wsi-mil encoders`; builtin)"
    )
    p.add_argument("--out", required=True, type=Path, help="output root of the bags")
    p.add_argument("--weights", default=None, help="weights folder or file (default: hub)")
    p.add_argument(
        "--name",
        default=None,
        help="bag folder name under OUT (default: the encoder name for hub/random weights, "
        "else <encoder>-<sha8>)",
    )
    p.add_argument(
        "--devices", default=None, help="cpu | cuda:0,cuda:1 (default: all GPUs, else cpu)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="tiles per batch (256)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode workers per device (default: on GPUs the CPU cores per GPU less one, "
        "at most 12; on cpu 2)",
    )
    p.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="bag dtype (float16)"
    )
    p.add_argument("--overwrite", action="store_true", help="redo up-to-date bags")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--dask-scheduler", default=None, help="embed on a Dask cluster (tcp://host:8786)"
    )
    p.add_argument(
        "--dask-chunk", type=int, default=8, help="slides per Dask task (with --dask-scheduler)"
    )
    p.add_argument(
        "--stain", choices=("none", "macenko", "reinhard"), default="none",
        help="stain normalisation, fitted per slide on its tissue tiles (none); bags go to "
        "OUT/<encoder>_stain-<method>/",
    )  # fmt: skip
    p.add_argument(
        "--stain-target", default=None, metavar="PNG",
        help="reference tile to normalise to (default: the bundled H&E target)",
    )  # fmt: skip
    p.add_argument(
        "--augment", type=int, default=0, metavar="K",
        help="also embed K stain-jittered (HED) views of every tile, for training (0)",
    )  # fmt: skip
    p.add_argument(
        "--augment-sigma", type=float, default=None, metavar="S",
        help="HED jitter strength: scale in [1-S, 1+S], shift in [-S, S] (0.05)",
    )  # fmt: skip
    p.add_argument(
        "--augment-seed", type=int, default=0, help="seed of the per-slide jitter draws (0)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``wsi-mil extract``; 1 if any slide failed, 128 + signal when interrupted."""
    from wsi_mil.errors import Interrupted
    from wsi_mil.features import extract_features
    from wsi_mil.outputs import ensure_writable

    ensure_writable(args.out)
    status = 0
    try:
        rows = extract_features(
            args.tiles[0] if len(args.tiles) == 1 else args.tiles,
            args.encoder,
            args.out,
            weights=args.weights,
            name=args.name,
            devices=args.devices,
            batch_size=args.batch_size,
            workers=args.workers,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            scheduler=args.dask_scheduler,
            dask_chunk=args.dask_chunk,
            stain=args.stain,
            stain_target=args.stain_target,
            augment=args.augment,
            augment_sigma=args.augment_sigma,
            augment_seed=args.augment_seed,
        )
    except Interrupted as stop:
        rows, status = stop.rows, stop.exit_status
    states = ("ok", "skipped", "failed", "interrupted")
    counts = {s: sum(r["status"] == s for r in rows) for s in states}
    stopped = f", {counts['interrupted']} interrupted" if status else ""
    print(
        f"extract: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
        f"{stopped}"
    )
    for r in rows:
        if r["status"] != "ok" and r.get("error"):
            print(f"  {r['slide_id']}: {r['status']}: {r['error']}")
    if status:
        print("interrupted: re-run to resume (finished bags are kept)")
        return status
    return 1 if counts["failed"] else 0
