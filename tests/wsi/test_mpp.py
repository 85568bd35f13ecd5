"""The µm/px fallback chain, source by source."""

from __future__ import annotations

import pytest

from wsi_mil.errors import ConfigError, MissingMPPError
from wsi_mil.wsi.mpp import MPP_RANGE, mpp_candidates, resolve_mpp

OME = (
    '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
    '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
    'PhysicalSizeX="{x}" {unit} PhysicalSizeY="{x}" SizeX="100" SizeY="100" '
    'Type="uint8"/></Image></OME>'
)


@pytest.mark.parametrize(
    ("props", "expected", "source"),
    [
        ({"openslide.mpp-x": "0.2527"}, 0.2527, "openslide.mpp-x"),
        ({"tiffslide.mpp-x": "0.499"}, 0.499, "tiffslide.mpp-x"),
        ({"aperio.MPP": "0.4990"}, 0.499, "aperio.MPP"),
        (
            {"tiff.ImageDescription": "Aperio Image Library v12\r\n1x1|AppMag = 40|MPP = 0.2520"},
            0.252,
            "ImageDescription MPP",
        ),
        (
            {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
            0.25,
            "TIFF resolution",
        ),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, 0.5, "TIFF resolution"),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "INCH"}, 0.25, "TIFF resolution"),
        ({"tiff.ImageDescription": OME.format(x="0.325", unit="")}, 0.325, "OME"),
        (
            {"tiff.ImageDescription": OME.format(x="325", unit='PhysicalSizeXUnit="nm"')},
            0.325,
            "OME",
        ),
        (
            {"tiff.ImageDescription": OME.format(x="0.000275", unit='PhysicalSizeXUnit="mm"')},
            0.275,
            "OME",
        ),
        ({"dicom.PixelSpacing": "0.000243\\0.000243"}, 0.243, "DICOM"),
        (
            {"dicom.SharedFunctionalGroupsSequence[0].PixelSpacing[0]": "0.0005"},
            0.5,
            "DICOM",
        ),
    ],
)
def test_each_source(props: dict[str, str], expected: float, source: str) -> None:
    found = resolve_mpp("x.svs", props)
    assert found.value == pytest.approx(expected)
    assert source in found.source


def test_chain_order_and_placeholder_rejection() -> None:
    props = {
        "openslide.mpp-x": "352.7777",  # 72 dpi placeholder turned into mpp
        "aperio.MPP": "0.5",
        "tiff.XResolution": "72",
        "tiff.ResolutionUnit": "inch",
    }
    sources = [c.source for c in mpp_candidates(props)]
    assert sources[0] == "openslide.mpp-x" and sources[1] == "aperio.MPP"
    assert resolve_mpp("x.svs", props).value == 0.5


@pytest.mark.parametrize(
    "props",
    [
        {},
        {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"},
        {"tiff.XResolution": "96", "tiff.ResolutionUnit": "inch"},
        {"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"},
        {"openslide.mpp-x": "0"},
        {"openslide.mpp-x": "nan"},
        {"openslide.mpp-x": "0.001"},
        {"aperio.MPP": "25"},
    ],
)
def test_missing_or_implausible(props: dict[str, str]) -> None:
    with pytest.raises(MissingMPPError, match=r"slide\.svs.*--mpp"):
        resolve_mpp("/data/slide.svs", props)


def test_range_bounds_are_inclusive() -> None:
    lo, hi = MPP_RANGE
    assert resolve_mpp("x", {"openslide.mpp-x": str(lo)}).value == lo
    assert resolve_mpp("x", {"openslide.mpp-x": str(hi)}).value == hi


def test_explicit_overrides_and_is_validated() -> None:
    assert resolve_mpp("x", {"openslide.mpp-x": "0.25"}, 0.5) == (0.5, "explicit")
    assert resolve_mpp("x", {}, 0.5).value == 0.5
    for bad in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--mpp"):
            resolve_mpp("x", {}, bad)


def test_error_lists_rejected_values() -> None:
    props = {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}
    with pytest.raises(MissingMPPError, match=r"352\.8 µm/px") as info:
        resolve_mpp("s.tif", props)
    assert "mpp column" in str(info.value)
