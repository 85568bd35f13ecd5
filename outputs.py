"""Atomic outputs, contained output paths and stage manifests shared by every stage.

Every output is written to a temporary name in its final folder and renamed into
place only when complete, so an interrupted run never leaves a half-written file at
a final path. Every stage records what it did per item in a ``manifest.csv``.
File names built from ids (slide, patient) go through :func:`contained_path`, so an id
such as ``../../x`` can never place a file outside its output folder, and every command
checks its output folder with :func:`ensure_writable` before any compute.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any

from wsi_mil.errors import OutputNotWritableError, UnsafePathError

__all__ = [
    "MANIFEST_FIELDS",
    "atomic_path",
    "contained_path",
    "ensure_writable",
    "id_problem",
    "read_manifest",
    "write_manifest",
]

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


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot serve as an id that names files, or None when it can.

    An id (slide or patient) becomes a file name such as ``<slide_id>.h5``, so it must
    be a single, relative path component: not empty, no ``/`` or ``\\``, not ``.`` or
    ``..``, no drive letter and no control characters (NUL, newline...).

    Args:
        value: The id as read (already stripped of surrounding spaces).

    Returns:
        A short reason (for messages), or None when the id is safe.
    """
    if not value:
        return "is empty"
    if "/" in value or "\\" in value:
        return "contains a path separator ('/' or '\\')"
    if value in (".", ".."):
        return "is a relative folder reference ('.' or '..')"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "contains a control character (NUL, tab, newline...)"
    if PureWindowsPath(value).drive:
        return "starts with a drive letter"
    return None


def contained_path(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse a result that is not inside ``root``.

    Use it for every output path built from an id, e.g.
    ``contained_path(out_dir, "qc", f"{slide_id}.png")``. The check is lexical (``..``
    and absolute parts) and on the resolved parent folder (a symlinked subfolder that
    leads elsewhere); a final path that is itself a symlink is allowed, since outputs
    are renamed over it, never written through it.

    Args:
        root: The output folder.
        *parts: Path components below ``root`` (sub-folders, then the file name).

    Returns:
        ``root`` joined with ``parts`` (not resolved).

    Raises:
        UnsafePathError: The result is ``root`` itself or lies outside it, or a part
            holds a NUL character.
    """
    root = Path(root)
    if not _inside(root.resolve(), parts):
        name = "/".join(parts)
        raise UnsafePathError(
            f"refusing to write {name!r}: it is not a file inside the output folder {root}; "
            "the id it was built from must be a plain file name (no '/', '\\', '..' or "
            "absolute path); fix the id"
        )
    return root.joinpath(*parts)


def _inside(base: Path, parts: Sequence[str]) -> bool:
    """True when ``base`` joined with ``parts`` names something strictly below ``base``."""
    if any("\0" in part for part in parts):
        return False
    target = Path(os.path.normpath(base.joinpath(*parts)))
    if target == base or not target.is_relative_to(base):
        return False
    return target.parent.resolve().is_relative_to(base)


def ensure_writable(folder: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Create ``folder`` (with parents) and prove it writable by creating a file in it.

    The probe really writes (and removes) a file, so it also works as root, where
    permission bits do not stop writes, and on full or read-only file systems. Call it
    before any compute so an unusable output folder fails in seconds, not hours.

    Args:
        folder: The output folder.
        what: The argument that named it, for the message (e.g. ``--out``).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        OutputNotWritableError: The folder cannot be created or written; names it.
    """
    folder = Path(folder)
    probe = folder / f".wsi-mil-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"wsi-mil")
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise OutputNotWritableError(
            f"{what}: output folder {folder} is not writable ({exc.strerror or exc}); "
            f"choose another {what} or fix its permissions or free space"
        ) from exc
    return folder
