"""Atomic outputs and stage manifests shared by every stage.

Every output is written to a temporary name in its final folder and renamed into
place only when complete, so an interrupted run never leaves a half-written file at
a final path. Every stage records what it did per item in a ``manifest.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_FIELDS", "atomic_path", "read_manifest", "write_manifest"]

MANIFEST_FIELDS = ("slide_id", "path", "status", "n_tiles", "seconds", "error")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path that is renamed to ``final`` on success.

    Works for files and for directories (e.g. zarr stores). On error the temporary
    path is removed and ``final`` is left untouched.

    Args:
        final: The path the finished output should have.
        overwrite: Replace an existing ``final``; when False, raise ``FileExistsError``.

    Yields:
        A path in the same folder as ``final`` (``.<name>.<random>.tmp``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists; refusing to overwrite it")
            _remove(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_manifest(
    path: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    fields: Sequence[str] = MANIFEST_FIELDS,
) -> Path:
    """Write ``rows`` as a CSV manifest atomically; extra keys become extra columns.

    Args:
        path: Destination, usually ``<out>/manifest.csv``.
        rows: One mapping per item (slide) with at least the keys in ``fields``.
        fields: Leading column order.

    Returns:
        The path written.
    """
    extra = sorted({k for row in rows for k in row} - set(fields))
    columns = [*fields, *extra]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a manifest written by :func:`write_manifest` (empty list if absent)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
