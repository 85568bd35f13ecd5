"""``wsi-mil tile``: discovery, duplicate ids, manifest, config, exit status."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from wsi_mil.outputs import read_manifest
from wsi_mil.tiling import open_tile_store
from wsi_mil.workflows.cli import main


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with two small synthetic slides, one in a subfolder, plus a non-slide."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("cli-slides")
    (root / "sub").mkdir()
    make_synthetic_slide(root / "a.svs", 1200, 900, mpp=0.5, seed=1)
    make_synthetic_slide(root / "sub" / "b.tif", 1000, 800, mpp=0.5, seed=2, flavour="generic")
    (root / "notes.txt").write_text("not a slide")
    return root


def test_folder_recursive_manifest_config_and_rerun(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiles"
    args = ["tile", str(slides), "--out", str(out), "--workers", "1", "--tile-px", "128",
            "--export-coords"]  # fmt: skip
    assert main(args) == 0
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert set(rows) == {"a", "b"}
    assert all(r["status"] == "ok" and int(r["n_tiles"]) > 0 for r in rows.values())
    assert open_tile_store(out / "a.zarr").tile_px == 128
    assert (out / "coords" / "b.h5").exists() and (out / "qc" / "a.png").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["tile_px"] == 128 and config["target_mpp"] == 0.5 and config["slides"] == 2
    assert "2 ok" in capsys.readouterr().out
    assert main(args) == 0  # resume: everything skipped
    assert {r["status"] for r in read_manifest(out / "manifest.csv")} == {"skipped"}


def test_failed_slide_gives_exit_1_and_is_listed(slides: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.svs"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 4096)
    out = tmp_path / "tiles"
    code = main(["tile", str(slides / "a.svs"), str(bad), "--out", str(out), "--workers", "2",
                 "--pixels", "none"])  # fmt: skip
    assert code == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["a"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and "broken.svs" in rows["broken"]["error"]


def test_duplicate_ids_refused_before_work(slides: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.svs").write_bytes((slides / "a.svs").read_bytes())
    out = tmp_path / "tiles"
    assert main(["tile", str(slides), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "duplicate slide ids" in err and "a:" in err
    assert not (out / "manifest.csv").exists() and not list(out.glob("*.zarr"))


def test_mpp_csv_overrides(slides: Path, tmp_path: Path, capsys) -> None:
    table = tmp_path / "mpp.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "mpp"], ["a", "0.25"]])
    out = tmp_path / "tiles"
    assert main(["tile", str(slides / "a.svs"), "--out", str(out), "--pixels", "none",
                 "--mpp-csv", str(table), "--workers", "1"]) == 0  # fmt: skip
    assert open_tile_store(out / "a.zarr").attrs["mpp"] == 0.25
    table.write_text("slide_id,mpp\na,zero\n")
    assert main(["tile", str(slides / "a.svs"), "--out", str(out), "--mpp-csv", str(table)]) == 2
    assert "row 2" in capsys.readouterr().err
    table.write_text("slide_id,mpp\na,0.25\nb,0.5\na,0.3\n")
    assert main(["tile", str(slides / "a.svs"), "--out", str(out), "--mpp-csv", str(table)]) == 2
    assert "row 4" in capsys.readouterr().err
    table.write_bytes("slide_id,mpp\na,0.3\n".encode("utf-8-sig"))  # as Excel saves it
    assert main(["tile", str(slides / "a.svs"), "--out", str(out), "--pixels", "none",
                 "--mpp-csv", str(table), "--workers", "1"]) == 0  # fmt: skip
    assert open_tile_store(out / "a.zarr").attrs["mpp"] == 0.3


def test_bad_arguments_exit_2(slides: Path, tmp_path: Path, capsys) -> None:
    assert main(["tile", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tile", str(slides), "--out", str(tmp_path / "o"), "--min-tissue", "2"]) == 2
    assert "--min-tissue" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tile", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no slides found" in capsys.readouterr().err


def test_read_only_output_folder(slides: Path, tmp_path: Path, capsys) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only filesystem
        out = Path("/proc/wsi-mil-test-out")
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    assert main(["tile", str(slides / "a.svs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(out) in err


def test_help_documents_exit_status(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["tile", "--help"])
    text = capsys.readouterr().out
    assert "Exit status" in text and "1 when any slide failed" in text


def test_find_slides_extensions_and_dicom_folders(tmp_path: Path) -> None:
    from wsi_mil.workflows.commands.tile import find_slides

    for name in ("a/x.svs", "a/deep/y.NDPI", "b/z.mrxs", "b/z/Data0001.dat", "c/1.dcm",
                 "c/2.dcm", "d/notes.txt", "d/e.tiff"):  # fmt: skip
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = {p.relative_to(tmp_path).as_posix() for p in find_slides([tmp_path])}
    assert found == {"a/x.svs", "a/deep/y.NDPI", "b/z.mrxs", "c/1.dcm", "d/e.tiff"}
    explicit = find_slides([tmp_path / "d" / "notes.txt", tmp_path / "a" / "x.svs"])
    assert [p.name for p in explicit] == ["notes.txt", "x.svs"]  # files are taken as given


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of one good slide and every kind of bad input ``wsi-mil tile`` meets."""
    import numpy as np
    import tifffile

    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("mixed")
    good = make_synthetic_slide(root / "good.svs", 1200, 900, mpp=0.5, seed=3).path
    (root / "empty.svs").write_bytes(b"")
    (root / "text.svs").write_text("not a slide, just a note\n")
    data = good.read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    make_synthetic_slide(root / "nompp.svs", 800, 600, mpp=None, seed=4)
    make_synthetic_slide(root / "dpi72.tif", 800, 600, resolution="72dpi", flavour="generic")
    make_synthetic_slide(root / "tiny.svs", 100, 90, mpp=0.5, seed=5)
    tifffile.imwrite(
        root / "blank.tif", np.full((600, 800, 3), 238, np.uint8), tile=(256, 256),
        photometric="rgb", compression="jpeg", resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )  # fmt: skip
    return root


def test_bad_slides_are_listed_with_the_fix(
    mixed: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "tiles"
    args = ["tile", str(mixed), "--out", str(out), "--workers", "1", "--pixels", "none"]
    assert main(args) == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert set(rows) == {"good", "empty", "text", "truncated", "nompp", "dpi72", "tiny", "blank"}
    expect = {
        "empty": ("SlideOpenError", "empty (0 bytes)", "copy the slide again"),
        "text": ("SlideOpenError", "not a readable whole-slide image", "copy it again"),
        "truncated": ("SlideOpenError", "truncated", "copy the slide again"),
        "nompp": ("MissingMPPError", "no physical resolution", "--mpp-csv"),
        "dpi72": ("MissingMPPError", "72 dpi", "--mpp"),
    }
    for sid, phrases in expect.items():
        row = rows[sid]
        assert row["status"] == "failed" and row["n_tiles"] == "", row
        assert str(mixed / Path(row["path"]).name) in row["error"]
        assert all(p in row["error"] for p in phrases), row["error"]
    assert rows["good"]["status"] == "ok" and int(rows["good"]["n_tiles"]) > 0
    for sid, phrase in (("tiny", "smaller than one tile"), ("blank", "no tissue found")):
        assert rows[sid]["status"] == "ok" and rows[sid]["n_tiles"] == "0"
        assert phrase in rows[sid]["message"]
        assert open_tile_store(out / f"{sid}.zarr").n_tiles == 0
    printed = capsys.readouterr().out
    assert "5 failed" in printed and "failed truncated: SlideOpenError" in printed
    assert "note tiny: slide" in printed
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # no log noise
    # the same run with resolutions for the two slides without one: only those are redone
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nnompp,0.5\ndpi72,0.25\nelsewhere,0.5\n")
    assert main([*args, "--mpp-csv", str(table)]) == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["nompp"]["status"] == rows["dpi72"]["status"] == "ok"
    assert open_tile_store(out / "dpi72.zarr").attrs["mpp"] == 0.25
    assert rows["good"]["status"] == "skipped"
    assert (
        rows["tiny"]["status"] == "skipped" and "smaller than one tile" in rows["tiny"]["message"]
    )
    assert {r["status"] for r in rows.values()} == {"ok", "skipped", "failed"}
    assert "match no slide of this run: elsewhere" in capsys.readouterr().out


def test_other_tile_px_rebuilds_and_says_so(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiles"
    base = ["tile", str(slides / "a.svs"), "--out", str(out), "--workers", "1"]
    assert main([*base, "--tile-px", "128"]) == 0
    capsys.readouterr()
    assert main([*base, "--tile-px", "256"]) == 0
    printed = capsys.readouterr().out
    assert "note a: rebuilt: parameters changed" in printed and "tile_px 128→256" in printed
    row = read_manifest(out / "manifest.csv")[0]
    assert row["status"] == "ok" and "tile_px 128→256" in row["message"]
    store = open_tile_store(out / "a.zarr")
    assert store.tile_px == 256 and store.read_pixels(0, 1).shape == (1, 256, 256, 3)


def _store_arrays(path: Path) -> dict:
    store = open_tile_store(path)
    return {
        "coords": store.coords, "tissue": store.tissue, "mask": store.mask,
        "thumbnail": store.thumbnail, "pixels": store.read_pixels(),
    }  # fmt: skip


def test_results_do_not_depend_on_workers_or_backend(slides: Path, tmp_path: Path) -> None:
    import numpy as np

    runs = {
        "w1": ["--workers", "1"],
        "w2": ["--workers", "2"],
        "tiffslide": ["--workers", "1", "--backend", "tiffslide"],
    }
    for name, extra in runs.items():
        args = ["tile", str(slides), "--out", str(tmp_path / name), "--tile-px", "96", *extra]
        assert main(args) == 0
    assert yaml.safe_load((tmp_path / "tiffslide" / "config.yaml").read_text())["backend"] == (
        "tiffslide"
    )
    for sid in ("a", "b"):
        ref = _store_arrays(tmp_path / "w1" / f"{sid}.zarr")
        assert len(ref["coords"]) > 0
        for name in ("w2", "tiffslide"):
            other = _store_arrays(tmp_path / name / f"{sid}.zarr")
            for key, value in ref.items():
                assert np.array_equal(value, other[key]), (sid, name, key)
