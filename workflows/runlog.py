"""``run.log``: the console output of ``wsi-mil run``, also written to a file.

Plain text goes to the file as printed; progress-bar redraws (cursor movement,
carriage returns) go to the console only, so the log holds the stage commands, their
summaries and the per-slide failures, not thousands of bar frames.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["tee_to_log"]

_SGR = re.compile(r"\x1b\[[0-9;]*m")


class _Tee(io.TextIOBase):
    """A text stream writing to ``console`` and, without redraws, to ``log``."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        plain = _SGR.sub("", text)
        if "\x1b" not in plain and "\r" not in plain and not self.log.closed:
            self.log.write(plain)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        if not self.log.closed:
            self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> Any:  # type: ignore[override]
        return getattr(self.console, "encoding", "utf-8")


@contextlib.contextmanager
def tee_to_log(path: str | os.PathLike[str], title: str) -> Iterator[Path]:
    """Copy ``sys.stdout`` and ``sys.stderr`` to ``path`` (appended) inside the block.

    Args:
        path: The log file; each use appends a header line with the time and ``title``.
        title: What is logged (the command line).

    Yields:
        The log file's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err
