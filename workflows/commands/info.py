"""``wsi-mil info SLIDE``: what a slide is (size, pyramid, resolution, vendor)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from wsi_mil.wsi import open_slide

__all__ = ["add_parser", "run", "slide_info"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="show a slide's dimensions, pyramid levels, µm/px, vendor and backend",
        description=(
            "Open a whole-slide image and print its dimensions, pyramid levels "
            "(dimensions and downsamples), level-0 µm/px and where it came from, vendor, "
            "backend and objective power. Label and macro images are not read."
        ),
    )
    parser.add_argument("slide", help="slide file (SVS, NDPI, MRXS, tiled TIFF, DICOM...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 µm/px, overriding the slide metadata (needed when it has none)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "openslide", "tiffslide"),
        default="auto",
        help="slide library (default: openslide, then tiffslide)",
    )
    return parser


def slide_info(path: str, *, backend: str = "auto", mpp: float | None = None) -> dict[str, Any]:
    """Metadata of a slide as a JSON-ready dict.

    Returns:
        Keys ``path``, ``slide_id``, ``width``, ``height``, ``levels`` (list of
        ``{level, width, height, downsample, mpp}``), ``mpp``, ``mpp_source``,
        ``vendor``, ``backend``, ``objective_power``, ``associated_images`` (names only).
    """
    with open_slide(path, backend=backend, mpp=mpp) as slide:
        width, height = slide.dimensions
        levels = [
            {
                "level": i,
                "width": w,
                "height": h,
                "downsample": slide.level_downsamples[i],
                "mpp": slide.level_mpp(i),
            }
            for i, (w, h) in enumerate(slide.level_dimensions)
        ]
        return {
            "path": str(slide.path),
            "slide_id": slide.slide_id,
            "width": width,
            "height": height,
            "levels": levels,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "vendor": slide.vendor,
            "backend": slide.backend,
            "objective_power": slide.objective_power,
            "associated_images": list(slide.associated_image_names),
        }


def _format(info: dict[str, Any]) -> str:
    power = info["objective_power"]
    lines = [
        f"slide            {info['path']}",
        f"dimensions       {info['width']} x {info['height']} px",
        f"mpp              {info['mpp']:.4g} µm/px ({info['mpp_source']})",
        f"vendor           {info['vendor']}",
        f"backend          {info['backend']}",
        f"objective power  {f'{power:g}x' if power else 'unknown'}",
        f"associated       {', '.join(info['associated_images']) or 'none'}",
        "levels",
    ]
    for lv in info["levels"]:
        lines.append(
            f"  {lv['level']:>2}  {lv['width']:>7} x {lv['height']:<7}  "
            f"downsample {lv['downsample']:<8.4g} {lv['mpp']:.4g} µm/px"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the slide's metadata; errors are raised as wsi_mil.errors classes."""
    info = slide_info(args.slide, backend=args.backend, mpp=args.mpp)
    print(json.dumps(info, indent=2) if args.json else _format(info))
    return 0
