"""``wsi-mil heatmap``: tile scores of slides as PNG, pyramidal TIFF, Deep Zoom with an
offline viewer, QuPath GeoJSON and top-k galleries."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``heatmap``."""
    p = subparsers.add_parser(
        "heatmap",
        help="heatmaps of tile scores: PNG, pyramidal TIFF, Deep Zoom viewer, QuPath, top-k",
        description=(
            "Score the tiles of each --slide with a trained run (the fold ensemble, or "
            "--fold; from the slide's feature bag, never re-extracting) or take an "
            "attention file, and draw them: PNG (plain slide beside the overlay, with the "
            "prediction, colour scale and model), pyramidal TIFF aligned with the slide, "
            "Deep Zoom tiles with one offline HTML viewer (index.html) per folder, QuPath "
            "GeoJSON of the tiles with measurements, and top/bottom-k tile galleries. "
            "Where tiles overlap, a pixel shows the mean of their scores."
        ),
    )
    p.add_argument(
        "source",
        help="run folder (scores the slide's bag, else uses attention/<slide_id>.h5) "
        "or an attention .h5",
    )
    p.add_argument(
        "--slide", required=True, action="append", help="whole-slide image; repeat for several"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--features",
        action="append",
        metavar="DIR",
        help="bag folder(s) holding <slide_id>.h5 (default: the run's own)",
    )
    p.add_argument("--fold", type=int, help="one fold's model instead of the fold ensemble")
    p.add_argument("--class", dest="target_class", help="class the contribution explains")
    p.add_argument(
        "--gene-group",
        metavar="NAME",
        help="fusion runs (dual_xattn): draw the tiles this gene group (or 'clinical') "
        "attends to, from the run's co_attention/<slide_id>.h5",
    )
    p.add_argument(
        "--format",
        default="all",
        help="comma-separated subset of png,tiff,dzi,geojson,topk (default: all)",
    )
    p.add_argument(
        "--score",
        choices=("attention", "contribution"),
        help="what to colour (default: the signed contribution when the model has one)",
    )
    p.add_argument(
        "--normalise",
        choices=("rank", "raw"),
        default="rank",
        help="rank within the slide (default; signed rank for contributions) or raw values",
    )
    p.add_argument("--sigma-um", type=float, default=0.0, help="Gaussian smoothing σ in µm")
    p.add_argument("--cmap", help="matplotlib colormap (default inferno / RdBu_r)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in the PNG")
    p.add_argument("--png-mpp", type=float, help="µm/px of the PNG (default: fit --max-size)")
    p.add_argument("--max-size", type=int, default=2048, help="PNG panel longest side (px)")
    p.add_argument("--overlay-mpp", type=float, help="µm/px of the TIFF/DZI score raster")
    p.add_argument("--dzi-mpp", type=float, help="finest µm/px of the slide's Deep Zoom image")
    p.add_argument("--top-k", type=int, default=8, help="tiles per top/bottom gallery")
    p.add_argument("--mpp", type=float, help="level-0 µm/px for slides without one")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--overwrite", action="store_true", help="replace heatmaps made with other options"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``heatmap``."""
    from wsi_mil.mil.heatmap import HeatmapOptions, heatmap_slide, parse_formats
    from wsi_mil.mil.heatmap.viewer import assets_dir
    from wsi_mil.outputs import ensure_writable

    ensure_writable(args.out)
    options = HeatmapOptions(
        formats=parse_formats(args.format),
        score=args.score,
        normalise=args.normalise,
        sigma_um=args.sigma_um,
        cmap=args.cmap,
        alpha=args.alpha,
        png_mpp=args.png_mpp,
        max_size=args.max_size,
        overlay_mpp=args.overlay_mpp,
        dzi_mpp=args.dzi_mpp,
        top_k=args.top_k,
        mpp=args.mpp,
    ).check()
    for slide in args.slide:
        paths = heatmap_slide(
            args.source,
            slide,
            args.out,
            options,
            features=args.features,
            fold=args.fold,
            target_class=args.target_class,
            device=args.device,
            overwrite=args.overwrite,
            gene_group=args.gene_group,
        )
        print("\n".join(str(p) for p in paths.values()))
    if "dzi" in options.formats and assets_dir() is None:
        print(
            "note: no index.html viewer - the OpenSeadragon files are not installed "
            "(run `make viewer-assets` in the source tree); the Deep Zoom tiles are written"
        )
    return 0
