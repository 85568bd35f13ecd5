"""TIFF-level inspection shared by both backends: raw tags and truncation detection.

Most slide formats (SVS, NDPI, Philips, OME, generic pyramidal TIFF) are TIFF files.
Reading their directories directly gives the resolution tags that not every backend
reports, and comparing the image data offsets with the file size catches a truncated
copy at open time instead of halfway through a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from wsi_mil.errors import SlideOpenError

__all__ = ["TiffInfo", "inspect_tiff", "is_tiff"]

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class TiffInfo(NamedTuple):
    """What :func:`inspect_tiff` found.

    Attributes:
        tags: ``tiff.ImageDescription``, ``tiff.XResolution`` and ``tiff.ResolutionUnit``
            (``"centimeter"``, ``"inch"`` or ``"none"``) of the first directory, where
            present; empty for a non-TIFF file.
        problem: Why tifffile could not parse the file (``None`` when it could). A
            backend may still read it; this explains the failure when none can.
    """

    tags: dict[str, str]
    problem: str | None


def is_tiff(path: Path) -> bool:
    """Whether ``path`` starts with a (Big)TIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in _MAGIC


def inspect_tiff(path: Path) -> TiffInfo:
    """First-directory tags of a TIFF file, after checking it is not truncated.

    Returns:
        The tags, or empty tags and a ``problem`` when the structure cannot be parsed.

    Raises:
        SlideOpenError: Image data lies beyond the end of the file (a partial copy).
    """
    if not is_tiff(path):
        return TiffInfo({}, None)
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            tags = _first_tags(tif)
            end = _data_end(tif)
    except Exception as exc:  # any parse failure: let the backends have a go
        return TiffInfo({}, f"damaged TIFF structure ({type(exc).__name__}: {exc})")
    size = path.stat().st_size
    if end > size:
        raise SlideOpenError(
            f"{path}: file is truncated: its image data runs to byte {end:,} but the file "
            f"has only {size:,} bytes; copy the slide again from its source"
        )
    return TiffInfo(tags, None)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's log warnings ("invalid page offset"...) while inspecting: a
    damaged file is reported once, by the error raised, not by log lines on stderr."""
    logger = logging.getLogger("tifffile")
    drop = _DropRecords()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _first_tags(tif: object) -> dict[str, str]:
    tags = tif.pages.first.tags  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    desc = tags.get("ImageDescription")
    if desc is not None:
        out["tiff.ImageDescription"] = str(desc.value)
    xres = tags.get("XResolution")
    if xres is not None:
        num, den = xres.value
        out["tiff.XResolution"] = repr(num / den) if den else "0"
    unit = tags.get("ResolutionUnit")
    if unit is not None:
        code = int(unit.value)
        out["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(code, str(code))
    return out


def _data_end(tif: object) -> int:
    """Largest byte offset + count of any image data in the file."""
    end = 0
    for page in tif.pages:  # type: ignore[attr-defined]
        offsets = getattr(page, "dataoffsets", ())
        counts = getattr(page, "databytecounts", ())
        ends = [o + c for o, c in zip(offsets, counts, strict=False) if c]
        if ends:
            end = max(end, *ends)
    return end
