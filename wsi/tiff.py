"""TIFF-level checks shared by both backends: raw tags and truncation detection.

Most slide formats (SVS, NDPI, Philips, OME, generic pyramidal TIFF) are TIFF files.
Reading their first directory directly gives the resolution tags that not every
backend reports, and comparing the image data offsets with the file size catches a
truncated copy at open time instead of halfway through a batch.
"""

from __future__ import annotations

from pathlib import Path

from wsi_mil.errors import SlideOpenError

__all__ = ["check_tiff_complete", "is_tiff", "tiff_tags"]

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: Path) -> bool:
    """Whether ``path`` starts with a (Big)TIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in _MAGIC


def tiff_tags(path: Path) -> dict[str, str]:
    """Description and resolution tags of the first TIFF directory as ``tiff.*`` strings.

    Returns:
        ``{"tiff.ImageDescription", "tiff.XResolution", "tiff.ResolutionUnit"}`` where
        present (unit as ``"centimeter"``, ``"inch"`` or ``"none"``); ``{}`` for a
        non-TIFF or unparsable file.
    """
    import tifffile

    if not is_tiff(path):
        return {}
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
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
                out["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(
                    code, str(code)
                )
            return out
    except Exception:
        return {}


def check_tiff_complete(path: Path) -> None:
    """Raise if any image data of a TIFF file lies beyond its end (a truncated copy).

    Does nothing for non-TIFF files.

    Raises:
        SlideOpenError: The TIFF structure is damaged or the file is truncated.
    """
    import tifffile

    if not is_tiff(path):
        return
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            end = 0
            for page in tif.pages:
                offsets = getattr(page, "dataoffsets", ())
                counts = getattr(page, "databytecounts", ())
                ends = [o + c for o, c in zip(offsets, counts, strict=False) if c]
                if ends:
                    end = max(end, max(ends))
    except Exception as exc:
        raise SlideOpenError(
            f"{path}: damaged TIFF structure ({type(exc).__name__}: {exc}); the file is "
            "probably truncated or corrupt: copy the slide again from its source"
        ) from exc
    if end > size:
        raise SlideOpenError(
            f"{path}: file is truncated: its image data runs to byte {end:,} but the file "
            f"has only {size:,} bytes; copy the slide again from its source"
        )
