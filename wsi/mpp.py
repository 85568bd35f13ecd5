"""Physical resolution (µm per pixel) of a slide, from whatever metadata it carries.

The fallback chain, first usable value wins:

1. ``openslide.mpp-x`` / ``tiffslide.mpp-x`` (the library's own reading),
2. Aperio ``MPP`` (``aperio.MPP`` or ``MPP = …`` in the TIFF ImageDescription),
3. TIFF ``XResolution`` with ``ResolutionUnit`` centimetre or inch,
4. OME-XML ``PhysicalSizeX`` (with ``PhysicalSizeXUnit``, default µm),
5. DICOM ``PixelSpacing`` (mm).

A value outside :data:`MPP_RANGE` is rejected: 72 or 96 dpi (353 or 265 µm/px) is what
image converters write when they know nothing, and 1 px/unit is TIFF's default. An
explicit ``mpp`` always overrides the metadata and must lie in :data:`MPP_RANGE` too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from wsi_mil.errors import ConfigError, MissingMPPError

__all__ = ["MPP_RANGE", "MppCandidate", "mpp_candidates", "resolve_mpp"]

#: Plausible µm/px for a microscope slide scan (level 0).
MPP_RANGE = (0.05, 20.0)

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_APERIO_MPP = re.compile(rf"(?:^|\|)\s*MPP\s*=\s*({_NUMBER})")
_OME_SIZE = re.compile(rf"PhysicalSizeX\s*=\s*\"({_NUMBER})\"")
_OME_UNIT = re.compile(r"PhysicalSizeXUnit\s*=\s*\"([^\"]+)\"")
_UNIT_TO_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


class MppCandidate(NamedTuple):
    """One µm/px value found in the metadata, and where it came from."""

    value: float
    source: str


def _float(text: object) -> float | None:
    if text is None:
        return None
    match = re.search(_NUMBER, str(text))
    if match is None:
        return None
    value = float(match.group(0))
    return value if math.isfinite(value) else None


def _library_mpp(props: Mapping[str, str]) -> list[MppCandidate]:
    out = []
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = _float(props.get(key))
        if value is not None:
            out.append(MppCandidate(value, key))
    return out


def _aperio_mpp(props: Mapping[str, str]) -> list[MppCandidate]:
    value = _float(props.get("aperio.MPP"))
    if value is not None:
        return [MppCandidate(value, "aperio.MPP")]
    match = _APERIO_MPP.search(props.get("tiff.ImageDescription", ""))
    if match:
        return [MppCandidate(float(match.group(1)), "ImageDescription MPP")]
    return []


def _tiff_resolution_mpp(props: Mapping[str, str]) -> list[MppCandidate]:
    xres = _float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    um_per_unit = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    if not xres or um_per_unit is None or xres <= 0:
        return []
    return [MppCandidate(um_per_unit / xres, f"TIFF resolution ({xres:g} px/{unit})")]


def _ome_mpp(props: Mapping[str, str]) -> list[MppCandidate]:
    desc = props.get("tiff.ImageDescription", "")
    if "<OME" not in desc:
        return []
    size = _OME_SIZE.search(desc)
    if size is None:
        return []
    unit_match = _OME_UNIT.search(desc)
    unit = unit_match.group(1) if unit_match else "µm"
    factor = _UNIT_TO_UM.get(unit)
    if factor is None:
        return []
    return [MppCandidate(float(size.group(1)) * factor, f"OME PhysicalSizeX ({unit})")]


def _dicom_mpp(props: Mapping[str, str]) -> list[MppCandidate]:
    for key in sorted(props):
        if key.lower().startswith("dicom.") and "pixelspacing" in key.lower():
            value = _float(props[key])
            if value is not None:
                return [MppCandidate(value * 1e3, f"DICOM {key.removeprefix('dicom.')} (mm)")]
    return []


def mpp_candidates(properties: Mapping[str, str]) -> list[MppCandidate]:
    """All µm/px values found in slide properties, in fallback-chain order.

    Args:
        properties: Slide properties (``openslide.*``, ``tiffslide.*``, ``aperio.*``,
            ``tiff.*``, ``dicom.*`` keys), values as strings.

    Returns:
        The candidates, unvalidated (placeholders included).
    """
    out: list[MppCandidate] = []
    for finder in (_library_mpp, _aperio_mpp, _tiff_resolution_mpp, _ome_mpp, _dicom_mpp):
        out.extend(finder(properties))
    return out


def resolve_mpp(
    path: str | Path, properties: Mapping[str, str], explicit: float | None = None
) -> MppCandidate:
    """The level-0 µm/px of a slide: ``explicit`` if given, else the first plausible value.

    Args:
        path: The slide (for error messages).
        properties: Slide properties, see :func:`mpp_candidates`.
        explicit: A user-supplied override (``--mpp`` or an ``mpp`` cohort column).

    Returns:
        The value and its source.

    Raises:
        ConfigError: ``explicit`` is outside :data:`MPP_RANGE` (or not a number).
        MissingMPPError: No plausible value in the metadata and no override.
    """
    lo, hi = MPP_RANGE
    if explicit is not None:
        value = float(explicit)
        if not lo <= value <= hi:
            raise ConfigError(
                f"--mpp {explicit!r} for {path}: must be a level-0 resolution within "
                f"{lo:g}-{hi:g} µm/px (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
            )
        return MppCandidate(value, "explicit")
    rejected = []
    for candidate in mpp_candidates(properties):
        if lo <= candidate.value <= hi:
            return candidate
        rejected.append(f"{candidate.source} gives {candidate.value:.4g} µm/px")
    detail = (
        f"; ignored implausible values outside {lo:g}-{hi:g} µm/px (a placeholder such as "
        f"72 dpi): {', '.join(rejected)}"
        if rejected
        else ""
    )
    raise MissingMPPError(
        f"{path}: no physical resolution (µm/px) in the slide metadata{detail}. "
        "Pass it explicitly with --mpp (for several slides: `wsi-mil tile --mpp-csv` "
        "with columns slide_id,mpp, or an mpp column in the cohort table), "
        "e.g. --mpp 0.25 for a 40x scan or --mpp 0.5 for 20x."
    )
