"""``wsi-mil init``: write an annotated configuration template for ``wsi-mil run``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``init``."""
    p = subparsers.add_parser(
        "init",
        help="write a configuration template for `wsi-mil run --config`",
        description=(
            "Write a YAML template with every key of `wsi-mil run`, its default and one "
            "line of help. Edit it, then run `wsi-mil run --config PATH`. An existing file "
            "is never overwritten."
        ),
    )
    p.add_argument("path", nargs="?", type=Path, default=Path("wsi-mil.yaml"),
                   help="file to write (default wsi-mil.yaml)")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    """Write the template; exit 2 when ``args.path`` exists."""
    from wsi_mil.errors import OutputExistsError
    from wsi_mil.outputs import atomic_path
    from wsi_mil.workflows.config import render_template

    path: Path = args.path
    if path.exists():
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it (pick "
                                "another path or delete it)")  # fmt: skip
    try:
        with atomic_path(path, overwrite=False) as tmp:
            tmp.write_text(render_template(path.name), encoding="utf-8")
    except FileExistsError:
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it") from None
    print(f"wrote {path}; edit slides, cohort and out, then: wsi-mil run --config {path}")
    return 0
