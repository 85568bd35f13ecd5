"""Errors raised on bad user input.

Every error subclasses a builtin (so ``except OSError`` keeps working) and
:class:`WsiMilError`, which the CLI catches to print one clear line and exit with
status 2 instead of a traceback. Messages name the file, row or argument and say how
to fix the problem.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "BagMismatchError",
    "CohortError",
    "ConfigError",
    "EncoderError",
    "Interrupted",
    "MissingMPPError",
    "MissingModalityError",
    "OutputExistsError",
    "OutputNotWritableError",
    "SchedulerUnreachableError",
    "SlideOpenError",
    "SlideTooLargeError",
    "UnsafePathError",
    "WsiMilError",
]


class WsiMilError(Exception):
    """Base for errors caused by user input (a file, a row, an argument)."""


class SlideOpenError(WsiMilError, OSError):
    """A slide file is missing, unreadable or not a whole-slide image."""


class MissingMPPError(WsiMilError, ValueError):
    """A slide has no usable physical resolution; pass ``--mpp`` or an ``mpp`` column."""


class CohortError(WsiMilError, ValueError):
    """The cohort table (or an omics/clinical table) is invalid."""


class EncoderError(WsiMilError, ValueError):
    """An unknown encoder name or weights that do not fit the encoder."""


class ConfigError(WsiMilError, ValueError):
    """An invalid argument or configuration value."""


class BagMismatchError(WsiMilError, ValueError):
    """Feature bags made differently (encoder, weights, resolution, tile size) from the
    bags a model was trained on; ``--allow-mismatch`` overrides."""


class MissingModalityError(WsiMilError, ValueError):
    """A fusion model is applied without one of its inputs (omics, clinical);
    ``--mask-missing-modalities`` overrides."""


class OutputExistsError(WsiMilError, FileExistsError):
    """An output already exists and would be overwritten with something different."""


class OutputNotWritableError(WsiMilError, PermissionError):
    """An output folder cannot be created or written (read-only, full, or a file)."""


class UnsafePathError(WsiMilError, ValueError):
    """An id (slide, patient) would place an output file outside its output folder."""


class SlideTooLargeError(WsiMilError, ValueError):
    """A slide needs more pixels decoded than the pixel budget allows (no usable pyramid)."""


class AnnotationError(WsiMilError, ValueError):
    """An annotation file (QuPath GeoJSON) is missing, unreadable or not valid GeoJSON."""


class SchedulerUnreachableError(WsiMilError, ConnectionError):
    """A Dask scheduler (``--dask-scheduler``) did not answer within the connect timeout."""


class Interrupted(KeyboardInterrupt):
    """A batch was stopped by SIGINT or SIGTERM after cleaning up; carries its rows.

    Not a :class:`WsiMilError`: nothing is wrong with the input, and the command exits
    with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM) after writing its manifest.
    A ``KeyboardInterrupt`` so that code not expecting it stops as on Ctrl-C.

    Attributes:
        signum: The signal received.
        rows: Manifest rows of the slides finished, and of those interrupted
            (``status="interrupted"``); slides never started have no row.
    """

    def __init__(self, signum: int, rows: list[dict]) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.rows = rows

    @property
    def exit_status(self) -> int:
        """The conventional exit status: ``128 + signum``."""
        return 128 + self.signum
