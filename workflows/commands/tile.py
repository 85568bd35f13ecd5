"""``wsi-mil tile``: detect tissue and tile slides into per-slide zarr stores."""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import Any

from wsi_mil import __version__
from wsi_mil.errors import ConfigError
from wsi_mil.wsi.slide import slide_id_from_path

__all__ = [
    "SLIDE_EXTENSIONS",
    "add_parser",
    "annotation_options",
    "find_slides",
    "read_mpp_csv",
    "run",
]

#: File extensions searched for in input folders (case-insensitive).
SLIDE_EXTENSIONS = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".bif", ".vms", ".vmu", ".dcm",
)  # fmt: skip

_DESCRIPTION = """\
Detect tissue on a thumbnail, lay a grid of tiles (TILE_PX pixels at TARGET_MPP µm/px)
and write one zarr store per slide, OUT/<slide_id>.zarr, with the kept tiles'
coordinates, tissue fractions, mask, thumbnail and (unless --pixels none) pixels.
Also writes OUT/qc/<slide_id>.png (thumbnail, tissue outline, kept tiles),
OUT/qc/<slide_id>.geojson (tissue polygons for QuPath, level-0 coordinates),
OUT/coords/<slide_id>.h5 with --export-coords (CLAM/TRIDENT layout),
OUT/manifest.csv (one row per slide: status ok/skipped/failed and why) and
OUT/config.yaml (the resolved configuration).

Folders are searched recursively for .svs .ndpi .mrxs .tif .tiff .scn .bif .vms .vmu
.dcm (one .dcm file per folder); NDPI, MRXS, VMS/VMU and DICOM are read by OpenSlide.
A slide's id is its file name without the extension (for DICOM, its folder name); ids
must be unique within a run.
Re-running skips complete stores with the same parameters and rebuilds the others
(the manifest and the console say why). A slide without a resolution needs --mpp or a
row in --mpp-csv; a slide with no tissue, or smaller than one tile, gets an empty store
(status ok, with a warning).

Annotations (QuPath: File → Export objects as GeoJSON, level-0 pixel coordinates):
--include-geojson tiles only tissue inside the annotated polygons, --exclude-geojson
leaves tissue inside them out (both may be given). Each is a .geojson file (for a
single slide) or a folder holding <slide_id>.geojson per slide (also
<file name>.geojson, <slide_id>.json). A slide without a file in the include folder
fails (named, with the file expected); one without a file in the exclude folder is
tiled as usual. Only annotation objects with Polygon/MultiPolygon geometry are used
(holes respected); --include-class/--exclude-class keep only the named classes. A
file that is not valid GeoJSON fails its slide only. The store records each file's
sha256: a changed annotation rebuilds the store. The QC image outlines the regions in
magenta.

Each slide runs in a worker process: a slide whose reader crashes (e.g. a segfault in
a C library) fails alone, named with the signal. Two `tile` runs on one --out folder
share the work: a slide being tiled by the other (lock file .<slide_id>.zarr.lock)
is left to the end and then waited for. manifest.csv keeps the rows of slides not
in this run. SIGINT/SIGTERM stop the workers, remove the temporaries of the slides
they were on and write the manifest with those slides "interrupted".

Exit status: 0 when every slide is ok or skipped; 1 when any slide failed (listed
on the console and in manifest.csv with the reason and the fix); 2 on invalid
arguments, before any work (bad input path, duplicate slide ids, unwritable output
folder, bad --mpp-csv, unreachable --dask-scheduler); 130 / 143 when interrupted
by SIGINT / SIGTERM."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``tile`` subcommand."""
    p = subparsers.add_parser(
        "tile",
        help="detect tissue and tile slides into zarr stores",
        description=_DESCRIPTION,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files or folders")
    p.add_argument("--out", required=True, type=Path, help="output folder of the stores")
    p.add_argument("--target-mpp", type=float, default=0.5, help="tile µm/px (default 0.5)")
    p.add_argument("--tile-px", type=int, default=224, help="tile side in px (default 224)")
    p.add_argument("--stride-px", type=int, default=None, help="grid step in px (default: tile px)")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="min tissue fraction per tile (0.5)"
    )
    p.add_argument(
        "--pixels",
        choices=("lossless", "jpeg", "none"),
        default="lossless",
        help="tile pixels: lossless (Blosc-LZ4), jpeg (quality 90) or none (default lossless)",
    )
    p.add_argument(
        "--mask-mpp", type=float, default=8.0, help="µm/px of thumbnail and mask (default 8)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel slide processes; each slide runs in one, so a slide that crashes its "
        "reader fails alone (0 = in this process, for debugging) (default: min(4, CPUs))",
    )
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for every slide")
    p.add_argument(
        "--mpp-csv", type=Path, default=None, help="CSV with columns slide_id,mpp (overrides)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "openslide", "tiffslide"),
        default="auto",
        help="slide library (default auto: OpenSlide, then tiffslide)",
    )
    p.add_argument(
        "--include-geojson", type=Path, default=None, metavar="DIR_OR_FILE",
        help="tile only inside these QuPath GeoJSON annotations (<DIR>/<slide_id>.geojson)",
    )  # fmt: skip
    p.add_argument(
        "--exclude-geojson", type=Path, default=None, metavar="DIR_OR_FILE",
        help="leave out tissue inside these QuPath GeoJSON annotations",
    )  # fmt: skip
    p.add_argument(
        "--include-class", default=None, metavar="NAMES",
        help="only annotations of these classes (comma-separated) for --include-geojson",
    )  # fmt: skip
    p.add_argument(
        "--exclude-class", default=None, metavar="NAMES",
        help="only annotations of these classes (comma-separated) for --exclude-geojson",
    )  # fmt: skip
    p.add_argument("--export-coords", action="store_true", help="also write CLAM/TRIDENT coords h5")
    p.add_argument("--no-qc", action="store_true", help="skip the QC PNG and GeoJSON")
    p.add_argument("--overwrite", action="store_true", help="rebuild every store (even complete)")
    p.add_argument("--dask-scheduler", default=None, help="run on a Dask cluster (tcp://host:8786)")
    return p


def find_slides(inputs: list[str | os.PathLike[str]]) -> list[Path]:
    """Slide files named in ``inputs`` (files as given; folders searched recursively).

    Raises:
        ConfigError: An input does not exist or no slide was found.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            dcm_dirs: set[Path] = set()
            for f in sorted(path.rglob("*")):
                if not f.is_file() or f.suffix.lower() not in SLIDE_EXTENSIONS:
                    continue
                if f.suffix.lower() == ".dcm":
                    if f.parent in dcm_dirs:
                        continue
                    dcm_dirs.add(f.parent)
                found.append(f)
        else:
            raise ConfigError(f"input {path} does not exist; pass slide files or folders")
    if not found:
        raise ConfigError(
            f"no slides found in {', '.join(map(str, inputs))} "
            f"(looked for {' '.join(SLIDE_EXTENSIONS)})"
        )
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _check_duplicates(ids: dict[Path, str]) -> None:
    by_id: dict[str, list[Path]] = {}
    for s, sid in ids.items():
        by_id.setdefault(sid, []).append(s)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in sorted(dups.items()))
        raise ConfigError(
            f"duplicate slide ids (file stems) would share one store: {lines}; "
            "rename the files or tile them into different --out folders"
        )


def read_mpp_csv(path: Path) -> dict[str, float]:
    """Read ``slide_id,mpp`` overrides.

    Raises:
        ConfigError: Missing file/columns, a file that is not UTF-8, or a value outside
            :data:`~wsi_mil.wsi.mpp.MPP_RANGE` (names the row).
    """
    from wsi_mil.mil.cohort import read_utf8_text
    from wsi_mil.wsi.mpp import MPP_RANGE

    if not path.is_file():
        raise ConfigError(f"--mpp-csv {path} does not exist")
    lo, hi = MPP_RANGE
    try:
        text = read_utf8_text(path, ConfigError)  # UTF-8, with or without Excel's BOM
    except ConfigError as exc:
        raise ConfigError(f"--mpp-csv {exc}") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"slide_id", "mpp"} <= cols:
            raise ConfigError(f"--mpp-csv {path} needs columns slide_id,mpp (found {sorted(cols)})")
        out: dict[str, float] = {}
        for i, row in enumerate(reader, start=2):
            try:
                value = float(row["mpp"])
            except (TypeError, ValueError):
                value = float("nan")
            if not lo <= value <= hi:
                raise ConfigError(
                    f"--mpp-csv {path} row {i}: mpp {row['mpp']!r} for slide "
                    f"{row['slide_id']!r} is not a resolution within {lo:g}-{hi:g} µm/px "
                    "(e.g. 0.25 for 40x, 0.5 for 20x); fix the row"
                )
            sid = str(row["slide_id"]).strip()
            if sid in out:
                raise ConfigError(
                    f"--mpp-csv {path} row {i}: slide {sid!r} is listed twice; keep one row"
                )
            out[sid] = value
    return out


def annotation_options(args: argparse.Namespace, n_slides: int) -> dict[str, Any]:
    """``tile_slide``'s annotation arguments, checked before any work.

    Raises:
        ConfigError: A path that does not exist, a file given for several slides, or a
            class filter without its annotations.
    """
    from wsi_mil.tiling.annotations import parse_classes

    out: dict[str, Any] = {}
    for mode in ("include", "exclude"):
        source: Path | None = getattr(args, f"{mode}_geojson", None)
        classes = parse_classes(getattr(args, f"{mode}_class", None))
        if source is None:
            if classes:
                raise ConfigError(f"--{mode}-class needs --{mode}-geojson")
            continue
        if not source.exists():
            raise ConfigError(
                f"--{mode}-geojson {source} does not exist; give a QuPath GeoJSON file or a "
                "folder of <slide_id>.geojson files"
            )
        if source.is_file() and n_slides > 1:
            raise ConfigError(
                f"--{mode}-geojson {source} is one file for {n_slides} slides; give a folder "
                "of <slide_id>.geojson files (one per slide)"
            )
        out[f"{mode}_geojson"] = str(source.resolve())  # jobs may run elsewhere (Dask)
        out[f"{mode}_class"] = ",".join(classes) if classes else None
    return out


def run(args: argparse.Namespace) -> int:
    """Tile every slide; returns 1 when any slide failed, else 0."""
    import yaml

    from wsi_mil.errors import Interrupted
    from wsi_mil.outputs import atomic_path, ensure_writable, write_manifest
    from wsi_mil.tiling.pipeline import tile_params
    from wsi_mil.workflows.batch import run_batch

    if args.workers < 0:
        raise ConfigError(f"--workers={args.workers} is invalid; expected 0 or more")
    params = tile_params(
        target_mpp=args.target_mpp, tile_px=args.tile_px, stride_px=args.stride_px,
        min_tissue=args.min_tissue, pixels=args.pixels, mask_mpp=args.mask_mpp, mpp=args.mpp,
    )  # fmt: skip
    slides = find_slides(args.inputs)
    ids = {s: slide_id_from_path(s) for s in slides}
    _check_duplicates(ids)
    annotations = annotation_options(args, len(slides))
    mpp_map = read_mpp_csv(args.mpp_csv) if args.mpp_csv else {}
    out: Path = args.out.resolve()  # jobs may run elsewhere (Dask workers)
    ensure_writable(out)
    common = {
        "target_mpp": args.target_mpp, "tile_px": args.tile_px, "stride_px": args.stride_px,
        "min_tissue": args.min_tissue, "pixels": args.pixels, "mask_mpp": args.mask_mpp,
        "export_coords": args.export_coords, "qc": not args.no_qc, "overwrite": args.overwrite,
        **annotations,
    }  # fmt: skip
    jobs = [_job(s, ids[s], out, common, mpp_map.get(ids[s], args.mpp), args.backend)
            for s in slides]  # fmt: skip
    unused = sorted(set(mpp_map) - set(ids.values()))
    if unused:
        print(f"note: --mpp-csv rows match no slide of this run: {', '.join(unused)}")
    config = {
        "command": "tile",
        "wsi_mil_version": __version__,
        "inputs": [str(i) for i in args.inputs],
        "slides": len(slides),
        "out": str(out.resolve()),
        "workers": args.workers,
        "dask_scheduler": args.dask_scheduler,
        "mpp": args.mpp,
        "mpp_csv": str(args.mpp_csv) if args.mpp_csv else None,
        "mpp_overrides": mpp_map,
        "backend": args.backend,
        "export_coords": bool(args.export_coords),
        "qc": not args.no_qc,
        "include_geojson": annotations.get("include_geojson"),
        "include_class": annotations.get("include_class"),
        "exclude_geojson": annotations.get("exclude_geojson"),
        "exclude_class": annotations.get("exclude_class"),
        **params,
    }
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    status = 0
    try:
        rows = run_batch(jobs, workers=args.workers, scheduler=args.dask_scheduler,
                         desc="tiling", action="tiling")  # fmt: skip
    except Interrupted as stop:
        rows, status = stop.rows, stop.exit_status
    manifest = write_manifest(out / "manifest.csv", rows)
    states = ("ok", "skipped", "failed", "interrupted")
    counts = {k: sum(r.get("status") == k for r in rows) for k in states}
    stopped = f", {counts['interrupted']} interrupted" if status else ""
    print(
        f"tiled {len(rows)} slides: {counts['ok']} ok, {counts['skipped']} skipped, "
        f"{counts['failed']} failed{stopped}; "
        f"tiles: {sum(int(r.get('n_tiles') or 0) for r in rows)}; manifest: {manifest}"
    )
    for r in rows:
        if r.get("status") in ("failed", "interrupted"):
            print(f"  {r.get('status')} {r.get('slide_id')}: {r.get('error')}")
        elif r.get("status") == "skipped" and str(r.get("error") or "").startswith("locked"):
            print(f"  skipped {r.get('slide_id')}: {r.get('error')}")
        elif r.get("status") == "ok" and r.get("message"):
            print(f"  note {r.get('slide_id')}: {r.get('message')}")
    if status:
        print(f"interrupted: {len(slides) - len(rows)} slides not started; re-run to resume")
        return status
    return 1 if counts["failed"] else 0


def _job(
    slide: Path, slide_id: str, out: Path, common: dict[str, Any], mpp: float | None, backend: str
) -> Any:
    """The batch job tiling ``slide`` into ``out`` (its lock and outputs named)."""
    from wsi_mil.outputs import contained_path
    from wsi_mil.tiling.pipeline import tile_slide
    from wsi_mil.workflows.batch import Job

    lock = contained_path(out, f".{slide_id}.zarr.lock")
    outputs = ((out, f"{slide_id}.zarr"), (out / "qc", f"{slide_id}.png"),
               (out / "qc", f"{slide_id}.geojson"), (out / "coords", f"{slide_id}.h5"))  # fmt: skip
    kwargs = {**common, "slide_path": str(slide), "out_dir": str(out), "mpp": mpp,
              "backend": backend}  # fmt: skip
    return Job(slide_id=slide_id, path=str(slide), fn=tile_slide, kwargs=kwargs, lock=str(lock),
               outputs=tuple((str(f), n) for f, n in outputs))  # fmt: skip
