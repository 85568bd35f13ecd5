"""``wsi-mil verify``: check every tile store and feature bag under a folder."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = ["Damage", "VerifyReport", "add_parser", "find_outputs", "run", "verify_folder"]

_DESCRIPTION = """\
Check every tile store (*.zarr, from `wsi-mil tile`) and feature bag (*.h5, from
`wsi-mil extract`) under DIR, recursively, and name what is damaged:

  tile stores   incomplete (interrupted tiling), a missing array, a chunk missing, of
                the wrong size or whose CRC-32 differs from the one written (stores
                written before checksums: missing or undecodable tiles chunks)
  feature bags  not readable as HDF5, missing attributes, coords and features of
                different lengths, rows holding NaN or inf

Other .h5 files (coordinate exports, attention maps), temporaries and lock files
(.<id>.zarr.lock, .<id>.h5.lock, .manifest.csv.lock) are left out. One line per damaged
item, then a summary. Fix a damaged store by re-running `wsi-mil tile` on its slide (it
rebuilds damaged stores), a damaged bag by deleting it and re-running `wsi-mil extract`.

Exit status: 0 when everything is intact; 1 when anything is damaged; 2 on invalid
arguments (DIR missing, or nothing to check in it)."""

_FIX = {
    "store": "re-run `wsi-mil tile` on its slide (it rebuilds damaged stores)",
    "bag": "delete it and re-run `wsi-mil extract`",
}


@dataclass(frozen=True)
class Damage:
    """One damaged output.

    Attributes:
        path: The store or bag.
        kind: ``"store"`` or ``"bag"``.
        problems: Short texts, one per problem found.
    """

    path: Path
    kind: str
    problems: list[str]

    def line(self) -> str:
        """One line for the console: path, problems and the fix."""
        return (
            f"damaged {self.kind} {self.path}: {'; '.join(self.problems)}; fix: {_FIX[self.kind]}"
        )


@dataclass
class VerifyReport:
    """What :func:`verify_folder` checked and found.

    Attributes:
        stores: Number of tile stores checked.
        bags: Number of feature bags checked.
        damaged: The damaged ones, in the order checked.
    """

    stores: int = 0
    bags: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.damaged


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``verify`` subcommand."""
    p = subparsers.add_parser(
        "verify",
        help="check tile stores and feature bags for damage",
        description=_DESCRIPTION,
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="folder to check, recursively")
    p.add_argument(
        "--quick",
        action="store_true",
        help="stores: check chunk presence and sizes only, not their checksums",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def find_outputs(folder: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """Tile stores and feature bags under ``folder`` (recursively; temporaries, lock files
    such as ``.<id>.zarr.lock`` / ``.<id>.h5.lock`` / ``.manifest.csv.lock`` and hidden
    folders left out).

    Returns:
        ``(stores, bags)``: sorted ``*.zarr`` folders and ``*.h5`` files that are bags
        (or that cannot be opened as HDF5 at all); other HDF5 files are left out.

    Raises:
        ConfigError: ``folder`` does not exist.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"verify: {root} is not a folder; pass the output folder to check")
    stores = sorted(p for p in root.rglob("*.zarr") if p.is_dir() and not _hidden(p, root))
    h5s = sorted(p for p in root.rglob("*.h5") if p.is_file() and not _hidden(p, root))
    bags = [p for p in h5s if not any(p.is_relative_to(s) for s in stores) and _is_bag(p)]
    return stores, bags


def _hidden(path: Path, root: Path) -> bool:
    """True for temporaries, lock files and anything in a hidden folder (``.name``)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_bag(path: Path) -> bool:
    """True for a wsi-mil bag, or an ``.h5`` that is not readable HDF5 at all."""
    import h5py

    from wsi_mil.features.bags import BAG_FORMAT

    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("format") == BAG_FORMAT
    except (OSError, ValueError):
        return True


def verify_folder(
    folder: str | os.PathLike[str], *, content: bool = True, progress: bool = False
) -> VerifyReport:
    """Check every tile store and feature bag under ``folder``.

    Args:
        folder: Any output folder (a tile folder, a features folder, a ``run`` folder).
        content: Compare every store chunk's CRC-32 (else presence and sizes only).
        progress: Show a progress bar on stderr.

    Returns:
        :class:`VerifyReport` (counts and the damaged outputs).

    Raises:
        ConfigError: ``folder`` does not exist or holds no store and no bag.
    """
    from rich.console import Console
    from rich.progress import Progress

    from wsi_mil.features.bags import verify_bag
    from wsi_mil.tiling import verify_store

    stores, bags = find_outputs(folder)
    if not stores and not bags:
        raise ConfigError(f"verify: no tile stores (*.zarr) or feature bags (*.h5) under {folder}")
    report = VerifyReport(stores=len(stores), bags=len(bags))
    items = [("store", p) for p in stores] + [("bag", p) for p in bags]
    with Progress(console=Console(stderr=True), disable=not progress) as bar:
        for kind, path in bar.track(items, description="verify"):
            problems = verify_store(path, content=content) if kind == "store" else verify_bag(path)
            if problems:
                report.damaged.append(Damage(path, kind, problems))
    return report


def run(args: argparse.Namespace) -> int:
    """Run ``wsi-mil verify``; 1 when anything is damaged."""
    report = verify_folder(args.folder, content=not args.quick, progress=not args.no_progress)
    for damage in report.damaged:
        print(damage.line())
    state = f"{len(report.damaged)} damaged" if report.damaged else "all intact"
    print(f"verify: {report.stores} tile stores, {report.bags} feature bags checked; {state}")
    return 0 if report.ok else 1
