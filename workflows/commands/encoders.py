"""``wsi-mil encoders``: list the registered tile encoders, dims and licences."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``encoders`` subcommand."""
    p = subparsers.add_parser(
        "encoders",
        help="list tile encoders (names, dims, licences)",
        description="List the encoders `wsi-mil extract --encoder` accepts, with embedding "
        "dimension, input size, expected µm/px, pooling, licence and source. Any timm "
        "model is also available as timm:<model name>.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the registry."""
    from wsi_mil.features import list_encoders

    specs = [s.describe() for s in list_encoders()]
    if args.json:
        print(json.dumps(specs, indent=2))
        return 0
    header = ("name", "dim", "input", "mpp", "pooling", "licence")
    rows = [
        (s["name"], str(s["dim"]), str(s["input_px"] or "any"), str(s["mpp"] or "-"),
         s["pooling"], s["licence"])
        for s in specs
    ]  # fmt: skip
    rows.append(("timm:<model>", "model", "model", "-", "timm", "see model card"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
