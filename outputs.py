"""Atomic outputs, contained output paths and stage manifests shared by every stage.

Every output is written to a temporary name in its final folder and renamed into
place only when complete, so an interrupted run never leaves a half-written file at
a final path. Every stage records what it did per item in a ``manifest.csv``.
File names built from ids (slide, patient) go through :func:`contained_path`, so an id
such as ``../../x`` can never place a file outside its output folder, and every command
checks its output folder with :func:`ensure_writable` before any compute.

Concurrent runs on one folder coordinate through per-item lock files
(:func:`acquire_lock`: created with ``O_CREAT | O_EXCL``, holding the pid and host of
the holder; a lock whose holder process has died is reclaimed), and each run merges
its rows into the folder's manifest instead of replacing it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from wsi_mil.errors import OutputNotWritableError, UnsafePathError

__all__ = [
    "MANIFEST_FIELDS",
    "StopRequest",
    "acquire_lock",
    "atomic_path",
    "contained_path",
    "ensure_writable",
    "id_problem",
    "lock_holder",
    "read_manifest",
    "release_lock",
    "remove_temporaries",
    "stop_signals",
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
    *,
    merge: bool = True,
) -> Path:
    """Write ``rows`` as a CSV manifest atomically; extra keys become extra columns.

    With ``merge`` (the default) the rows of an existing manifest whose ``slide_id`` is
    not among ``rows`` are kept (in their order, before the new slides), and those
    whose ``slide_id`` is among ``rows`` are replaced, so a run over some slides of a
    folder, or two runs on one folder, never drop the others' rows. The
    read-merge-write holds the lock ``<manifest>.lock``.

    Args:
        path: Destination, usually ``<out>/manifest.csv``.
        rows: One mapping per item (slide) with at least the keys in ``fields``.
        fields: Leading column order.
        merge: Keep the rows of other slides from an existing manifest.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held(path.with_name(f".{path.name}.lock")):
        merged = _merge_rows(read_manifest(path), rows) if merge else list(rows)
        extra = sorted({k for row in merged for k in row} - set(fields))
        columns = [*fields, *extra]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in merged:
                writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


def _merge_rows(
    old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``old`` rows whose slide is not in ``new`` (same order), then every ``new`` row."""
    replaced = {str(row.get("slide_id")) for row in new}
    return [row for row in old if str(row.get("slide_id")) not in replaced] + list(new)


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a manifest written by :func:`write_manifest` (empty list if absent)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
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


# ------------------------------------------------------------------ per-item locks

#: Seconds after which an empty or unreadable lock file (a holder that died between
#: creating and writing it) counts as stale.
_UNWRITTEN_LOCK_S = 10.0


def acquire_lock(path: str | os.PathLike[str]) -> bool:
    """Create the lock file ``path`` (``O_CREAT | O_EXCL``) holding ``"<pid> <host>"``.

    A lock left by a process of this host that is no longer running is stale and is
    reclaimed (under the short-lived lock ``<path>.reclaim``, so two reclaimers cannot
    both win). Release it with :func:`release_lock`.

    Args:
        path: The lock file, e.g. ``<out>/.<slide_id>.zarr.lock``.

    Returns:
        True when this process now holds the lock; False when a live process holds it
        (see :func:`lock_holder`).
    """
    path = Path(path)
    for _ in range(3):
        if _create_lock(path):
            return True
        if lock_holder(path) is not None or not _reclaim(path):
            return False
    return False


def release_lock(path: str | os.PathLike[str], *, pid: int | None = None) -> None:
    """Remove the lock file ``path`` if it is held by ``pid`` (default: this process).

    Args:
        path: The lock file.
        pid: The holder to release for, e.g. a worker process that died holding it.
    """
    path = Path(path)
    owner = _read_lock(path)
    if owner is not None and owner[0] == (os.getpid() if pid is None else pid):
        if owner[1] == socket.gethostname():
            path.unlink(missing_ok=True)


def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who holds the lock ``path``: ``"pid N"`` (``"pid N on host H"`` for another host).

    Returns:
        None when the lock is free or stale (its holder on this host is not running, or
        it stayed empty for more than 10 s).
    """
    path = Path(path)
    owner = _read_lock(path)
    if owner is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return "a process that is starting" if age < _UNWRITTEN_LOCK_S else None
    pid, host = owner
    if host != socket.gethostname():
        return f"pid {pid} on host {host}"
    return f"pid {pid}" if _pid_alive(pid) else None


def remove_temporaries(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete the temporaries of the output ``folder/name`` left by an interrupted run.

    Temporaries are those of :func:`atomic_path`: ``.<name>.<random>.tmp``. Call it only
    while holding the item's lock, so no live process is still writing them.

    Args:
        folder: The output's folder.
        name: The output's final file name, e.g. ``slide.zarr``.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.tmp")
    for tmp in folder.glob(f".{_glob_escape(name)}.*.tmp"):
        if not pattern.fullmatch(tmp.name):
            continue  # e.g. of the id "<name>.x", which starts like this one
        with contextlib.suppress(FileNotFoundError):
            _remove(tmp)
            removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _create_lock(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def _read_lock(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file; None when absent, empty or unreadable."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """True when ``pid`` has exited but not been reaped (Linux ``/proc``; else False)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _reclaim(path: Path) -> bool:
    """Remove the stale lock ``path``; False when another process is reclaiming it."""
    guard = path.with_name(path.name + ".reclaim")
    if not _create_lock(guard):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > _UNWRITTEN_LOCK_S:
                guard.unlink()  # a reclaimer died here
        return False
    try:
        if lock_holder(path) is None:
            path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(lock: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold the lock file ``lock`` for a short critical section (waits up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not acquire_lock(lock):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{lock} is held by {lock_holder(lock)} for more than {timeout:g} s; "
                "if no wsi-mil process is running, delete it"
            )
        time.sleep(0.05)
    try:
        yield
    finally:
        release_lock(lock)


# ------------------------------------------------------------------ stop signals


@dataclass
class StopRequest:
    """Set by :func:`stop_signals` when SIGINT or SIGTERM arrives.

    Attributes:
        signum: The signal received, or None.
    """

    signum: int | None = None


_ACTIVE: list[StopRequest] = []


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a :class:`StopRequest` that long loops poll.

    Batches check ``request.signum`` between steps, stop their workers, remove the
    temporaries of the items they were on and write their manifest, instead of dying
    half-way. Nested uses share the outermost request. Outside the main thread (where
    handlers cannot be installed) the request is never set.

    Yields:
        The request (``signum`` stays None until a signal arrives).
    """
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _ACTIVE.append(request)
    try:
        yield request
    finally:
        _ACTIVE.pop()
        for signum, old in previous.items():
            signal.signal(signum, old)
