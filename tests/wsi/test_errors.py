"""Bad input gives one clear error naming the file and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi_mil.errors import MissingMPPError, SlideOpenError, WsiMilError
from wsi_mil.workflows.cli import main
from wsi_mil.wsi import SyntheticSlide, make_synthetic_slide, open_slide


def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[Path, type[Exception], str]]:
    """name -> (path, expected error, a phrase of the fix)."""
    empty = tmp / "empty.svs"
    empty.touch()
    text = tmp / "notes.svs"
    text.write_text("this is not a slide\n" * 50)
    truncated = tmp / "truncated.svs"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    cut_header = tmp / "cut_header.svs"
    cut_header.write_bytes(data[:64])
    folder = tmp / "folder.svs"
    folder.mkdir()
    no_mpp = make_synthetic_slide(tmp / "no_mpp.svs", 256, 256, mpp=None).path
    dpi72 = make_synthetic_slide(tmp / "dpi72.tif", 256, 256, resolution="72dpi").path
    dpi72_generic = make_synthetic_slide(
        tmp / "dpi72_generic.tif", 256, 256, resolution="72dpi", flavour="generic"
    ).path
    return {
        "empty": (empty, SlideOpenError, "empty"),
        "text-named-svs": (text, SlideOpenError, "not a readable whole-slide image"),
        "truncated": (truncated, SlideOpenError, "truncated"),
        "truncated-header": (cut_header, SlideOpenError, "copy it again"),
        "directory": (folder, SlideOpenError, "is a directory"),
        "missing": (tmp / "missing.svs", SlideOpenError, "no such file"),
        "no-mpp": (no_mpp, MissingMPPError, "--mpp"),
        "72dpi-aperio": (dpi72, MissingMPPError, "--mpp"),
        "72dpi-generic": (dpi72_generic, MissingMPPError, "72 dpi"),
    }


BAD = [
    "empty",
    "text-named-svs",
    "truncated",
    "truncated-header",
    "directory",
    "missing",
    "no-mpp",
    "72dpi-aperio",
    "72dpi-generic",
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bad")
    good = make_synthetic_slide(tmp / "good.svs", 1024, 1024, mpp=0.5, levels=2).path
    return _bad_inputs(tmp, good)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_clear_error(bad_inputs: dict, name: str, backend: str) -> None:
    path, error, fix = bad_inputs[name]
    with pytest.raises(error) as info:
        open_slide(path, backend=backend)
    message = str(info.value)
    assert str(path) in message
    assert fix in message
    assert isinstance(info.value, WsiMilError)
    assert isinstance(info.value, OSError if error is SlideOpenError else ValueError)


@pytest.mark.parametrize("name", BAD)
def test_cli_reports_bad_input_in_one_line(
    bad_inputs: dict, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, fix = bad_inputs[name]
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("wsi-mil info: error: ") and str(path) in err and fix in err


def test_no_mpp_opens_with_explicit_mpp(bad_inputs: dict) -> None:
    for name in ("no-mpp", "72dpi-aperio", "72dpi-generic"):
        path = bad_inputs[name][0]
        with open_slide(path, mpp=0.5) as slide:
            assert slide.mpp == 0.5
            assert slide.read_tile(0, 0, 32, 1.0).shape == (32, 32, 3)


def test_72dpi_error_explains_the_placeholder(bad_inputs: dict) -> None:
    with pytest.raises(MissingMPPError, match=r"352\.8 µm/px") as info:
        open_slide(bad_inputs["72dpi-aperio"][0])
    assert "placeholder" in str(info.value)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_read_error_on_corrupt_tile_data(
    small_slide: SyntheticSlide, tmp_path: Path, backend: str
) -> None:
    """Damaged pixel data (valid structure) fails on read with the file name, not a crash."""
    import tifffile

    path = tmp_path / "corrupt.svs"
    shutil.copy(small_slide.path, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    with open_slide(path, backend=backend) as slide, pytest.raises(SlideOpenError) as info:
        slide.read_region((0, 0), 0, (64, 64))
    assert str(path) in str(info.value) and "corrupt" in str(info.value)


@pytest.mark.parametrize(
    ("name", "fmt", "hint"),
    [
        ("scan.ndpi", "Hamamatsu NDPI", "copy it again"),
        ("scan.NDPI", "Hamamatsu NDPI", "copy it again"),
        ("scan.mrxs", "3DHISTECH MRXS", "folder of the same name"),
        ("scan.dcm", "DICOM WSI", "folder of .dcm files"),
        ("scan.vms", "Hamamatsu VMS", "image files it lists"),
    ],
)
def test_openslide_only_formats_go_to_openslide_alone(
    tmp_path: Path, name: str, fmt: str, hint: str
) -> None:
    """NDPI, MRXS, VMS and DICOM are opened by OpenSlide only; a failure says so."""
    path = tmp_path / name
    path.write_text("not really a scan\n" * 20)
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    message = str(info.value)
    assert f"OpenSlide cannot read this {fmt} file" in message and hint in message
    assert str(path) in message and "tiffslide" not in message  # never tried
    with pytest.raises(SlideOpenError, match=r"read only by OpenSlide.*--backend openslide"):
        open_slide(path, backend="tiffslide")


def test_openslide_only_format_without_openslide_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_mil.wsi.slide as slide_module

    def no_openslide(path: str, name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(slide_module, "open_backend", no_openslide)
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"x" * 100)
    with pytest.raises(SlideOpenError, match="pip install openslide-python openslide-bin"):
        open_slide(path)


def test_other_formats_still_fall_back_to_tiffslide(
    small_slide: SyntheticSlide, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_mil.wsi.slide as slide_module

    real = slide_module.open_backend

    def openslide_fails(path: str, name: str):
        if name == "openslide":
            raise RuntimeError("pretend OpenSlide cannot read it")
        return real(path, name)

    monkeypatch.setattr(slide_module, "open_backend", openslide_fails)
    with open_slide(small_slide.path) as slide:
        assert slide.backend == "tiffslide"
