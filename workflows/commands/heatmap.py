"""``wsi-mil heatmap``: attention overlay PNG and QuPath GeoJSON of one slide."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``heatmap``."""
    p = subparsers.add_parser(
        "heatmap",
        help="attention heatmap (PNG) and tiles with attention (GeoJSON for QuPath)",
        description=(
            "Colour each tile of SLIDE by its attention percentile over the slide "
            "thumbnail, and write the tiles as GeoJSON polygons with attention "
            "measurements that QuPath can import."
        ),
    )
    p.add_argument("source", help="run folder (uses attention/<slide_id>.h5) or an attention .h5")
    p.add_argument("--slide", required=True, help="the whole-slide image file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-size", type=int, default=2048, help="thumbnail longest side (px)")
    p.add_argument("--alpha", type=float, default=0.55, help="overlay opacity")
    p.add_argument("--mpp", type=float, help="level-0 µm/px for slides without one")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``heatmap``."""
    from wsi_mil.mil.heatmap import find_attention, render_heatmap
    from wsi_mil.mil.run import write_config
    from wsi_mil.outputs import contained_path, ensure_writable
    from wsi_mil.wsi import open_slide

    ensure_writable(args.out)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        slide_id = slide.slide_id
    attention = find_attention(args.source, slide_id)
    paths = render_heatmap(
        attention, args.slide, args.out, max_size=args.max_size, alpha=args.alpha, mpp=args.mpp
    )
    options = {
        "source": str(Path(attention).resolve()),
        "slide": str(Path(args.slide).resolve()),
        "max_size": args.max_size,
        "alpha": args.alpha,
        "mpp": args.mpp,
    }
    write_config(contained_path(args.out, f"{slide_id}_heatmap.yaml"), options)
    print(f"{paths['png']}\n{paths['geojson']}")
    return 0
