"""tile_slide end to end: stores, physical sizes, resume, bad input, QC and exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.tiling import open_tile_store, tile_slide
from wsi_mil.tiling.grid import tile_grid
from wsi_mil.tiling.qc import tissue_geojson


@pytest.mark.parametrize("which", ["slide_050", "slide_025"])
def test_store_geometry_and_pixels(which: str, request, tmp_path: Path) -> None:
    from wsi_mil.wsi import open_slide

    syn = request.getfixturevalue(which)
    row = tile_slide(syn.path, tmp_path, tile_px=128, pixels="lossless")
    assert row["status"] == "ok", row
    store = open_tile_store(tmp_path / f"{syn.path.stem}.zarr")
    assert row["n_tiles"] == store.n_tiles > 10
    with open_slide(syn.path) as slide:
        mpp = slide.mpp
        side = 128 * 0.5 / mpp  # 64 µm in level-0 px: 128 at 0.5 µm/px, 256 at 0.25
        assert store.attrs["tile_level0"] == pytest.approx(side)
        assert store.attrs["tile_level0"] * mpp == pytest.approx(64.0)
        assert (store.coords % round(side) == 0).all()
        # same kept tiles as the grid on the stored mask
        grid = tile_grid(
            store.mask, slide.dimensions, mpp=mpp, tile_px=128, mask_scale=(8 / mpp, 8 / mpp)
        )
        assert {tuple(c) for c in grid.coords} == {tuple(c) for c in store.coords}
        assert (store.tissue >= 0.5).all()
        # pixels = what Slide.read_tile gives for the same tile
        pixels = store.read_pixels(0, store.n_tiles)
        assert pixels.shape == (store.n_tiles, 128, 128, 3)
        for i in np.linspace(0, store.n_tiles - 1, 5).astype(int):
            x, y = (int(v) for v in store.coords[i])
            ref = slide.read_tile(x, y, 128, 0.5).astype(int)
            assert np.abs(ref - pixels[i]).mean() < 2.0
    # tiles lie on tissue of the ground truth
    s = syn.mask_mpp / mpp
    centres = ((store.coords + side / 2) / s).astype(int)
    assert syn.tissue_mask[centres[:, 1], centres[:, 0]].mean() > 0.9


def test_resume_skip_and_rebuild(slide_050, tmp_path: Path) -> None:
    first = tile_slide(slide_050.path, tmp_path, pixels="none", export_coords=True)
    assert first["status"] == "ok" and first["message"] == ""
    png = tmp_path / "qc" / "syn050.png"
    png.unlink()
    again = tile_slide(slide_050.path, tmp_path, pixels="none", export_coords=True)
    assert again["status"] == "skipped" and again["n_tiles"] == first["n_tiles"]
    assert png.exists()  # missing QC output filled in from the store
    changed = tile_slide(slide_050.path, tmp_path, pixels="none", min_tissue=0.9)
    assert changed["status"] == "ok"
    assert "rebuilt" in changed["message"] and "min_tissue" in changed["message"]
    assert open_tile_store(tmp_path / "syn050.zarr").attrs["min_tissue"] == 0.9


def test_no_tissue_gives_empty_store_with_warning(blank_slide: Path, tmp_path: Path) -> None:
    row = tile_slide(blank_slide, tmp_path / "out", pixels="jpeg", export_coords=True)
    assert row["status"] == "ok" and row["n_tiles"] == 0
    assert "no tissue" in row["message"]
    store = open_tile_store(tmp_path / "out" / "blank.zarr")
    assert store.n_tiles == 0 and store.read_pixels().shape == (0, 224, 224, 3)


def test_slide_smaller_than_one_tile(plain_tiff, tmp_path: Path) -> None:
    rgb = np.full((150, 200, 3), 236, np.uint8)
    rgb[20:130, 30:170] = (200, 110, 170)
    path = plain_tiff(tmp_path / "tiny.tif", rgb)
    row = tile_slide(path, tmp_path / "out", mask_mpp=2.0)
    assert row["status"] == "ok" and row["n_tiles"] == 0
    assert "smaller than one tile" in row["message"]


def test_failures_become_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    row = tile_slide(bad, tmp_path / "out")
    assert row["status"] == "failed" and row["slide_id"] == "bad"
    assert "SlideOpenError" in row["error"] and str(bad) in row["error"]
    missing = tile_slide(tmp_path / "nope.svs", tmp_path / "out")
    assert missing["status"] == "failed" and "no such" in missing["error"]
    with pytest.raises(OSError):
        tile_slide(bad, tmp_path / "out", raise_errors=True)
    bad_arg = tile_slide(bad, tmp_path / "out", pixels="png")
    assert bad_arg["status"] == "failed" and "--pixels" in bad_arg["error"]


def test_missing_mpp_needs_override(tmp_path: Path) -> None:
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    syn = make_synthetic_slide(tmp_path / "nompp.svs", 800, 600, mpp=None, seed=1)
    row = tile_slide(syn.path, tmp_path / "out", pixels="none")
    assert row["status"] == "failed" and "MissingMPPError" in row["error"]
    row = tile_slide(syn.path, tmp_path / "out", pixels="none", mpp=0.5)
    assert row["status"] == "ok"
    assert open_tile_store(tmp_path / "out" / "nompp.zarr").attrs["mpp"] == 0.5


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only filesystem
        return Path("/proc/wsi-mil-test-out")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    return out


def test_read_only_output_folder(slide_050, tmp_path: Path) -> None:
    out = _read_only_dir(tmp_path)
    row = tile_slide(slide_050.path, out, pixels="none")
    assert row["status"] == "failed"
    assert "not writable" in row["error"] and str(out) in row["error"]


def test_sigkill_leaves_no_final_store_and_rerun_finishes(slide_025, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; from wsi_mil.tiling import tile_slide; "
        "tile_slide(sys.argv[1], sys.argv[2], target_mpp=0.25, tile_px=64, pixels='jpeg', "
        "min_tissue=0.0, raise_errors=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(slide_025.path), str(out)])
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = list(out.glob(".syn025.zarr.*.tmp")) if out.exists() else []
            if tmps and any(tmps[0].glob("tiles/c/*")):  # pixels being written
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    final = out / "syn025.zarr"
    assert not final.exists() or open_tile_store(final).complete
    assert list(out.glob(".syn025.zarr.*.tmp"))  # the interrupted temporary is left
    row = tile_slide(slide_025.path, out, target_mpp=0.25, tile_px=64, pixels="jpeg",
                     min_tissue=0.0)  # fmt: skip
    assert row["status"] == "ok" and open_tile_store(final).complete
    assert row["n_tiles"] == (4096 // 64) * (3072 // 64)
    assert not list(out.glob(".syn025.zarr.*.tmp"))  # cleaned by the re-run


def test_qc_and_coords_export(slide_050, tmp_path: Path) -> None:
    import h5py
    from PIL import Image

    row = tile_slide(slide_050.path, tmp_path, pixels="none", export_coords=True)
    store = open_tile_store(tmp_path / "syn050.zarr")
    with h5py.File(tmp_path / "coords" / "syn050.h5", "r") as fh:
        coords = fh["coords"]
        assert np.array_equal(coords[:], store.coords) and coords.dtype == np.int64
        attrs = dict(coords.attrs)
    assert attrs["patch_size"] == 224 and attrs["patch_level"] == 0
    assert attrs["patch_size_level0"] == 224
    assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 20
    png = np.asarray(Image.open(tmp_path / "qc" / "syn050.png"))
    assert png.ndim == 3 and min(png.shape[:2]) >= 400
    geo = json.loads((tmp_path / "qc" / "syn050.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    xs = [p[0] for f in geo["features"] for p in f["geometry"]["coordinates"][0]]
    assert 0 <= min(xs) and max(xs) <= 3200 + 16  # level-0 coordinates
    assert row["status"] == "ok"


def test_coords_export_at_025_names_the_matching_level(slide_025, tmp_path: Path) -> None:
    import h5py

    tile_slide(slide_025.path, tmp_path, pixels="none", export_coords=True, qc=False)
    with h5py.File(tmp_path / "coords" / "syn025.h5", "r") as fh:
        attrs = dict(fh["coords"].attrs)
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 448
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
    assert not (tmp_path / "qc").exists()


def test_geojson_polygons_have_holes() -> None:
    mask = np.zeros((20, 30), bool)
    mask[2:18, 2:18] = True
    mask[6:12, 6:12] = False  # a hole
    mask[5:8, 22:27] = True  # a second region
    geo = tissue_geojson(mask, (10.0, 10.0))
    rings = sorted(len(f["geometry"]["coordinates"]) for f in geo["features"])
    assert rings == [1, 2]
    for f in geo["features"]:
        assert f["geometry"]["type"] == "Polygon"
        assert f["properties"]["classification"]["name"] == "Tissue"
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
    big = max(geo["features"], key=lambda f: len(f["geometry"]["coordinates"]))
    outer = np.array(big["geometry"]["coordinates"][0])
    assert outer[:, 0].min() == pytest.approx(20, abs=5) and outer[:, 0].max() == pytest.approx(
        180, abs=5
    )
    assert tissue_geojson(np.zeros((4, 4), bool), (1.0, 1.0))["features"] == []


def test_output_does_not_depend_on_threads(slide_025, tmp_path: Path) -> None:
    kwargs = {"target_mpp": 0.5, "tile_px": 96, "stride_px": 64, "qc": False}
    tile_slide(slide_025.path, tmp_path / "t1", read_threads=1, **kwargs)
    tile_slide(slide_025.path, tmp_path / "t3", read_threads=3, **kwargs)
    one = open_tile_store(tmp_path / "t1" / "syn025.zarr")
    three = open_tile_store(tmp_path / "t3" / "syn025.zarr")
    assert one.n_tiles == three.n_tiles > 0
    assert np.array_equal(one.coords, three.coords)
    assert np.array_equal(one.read_pixels(), three.read_pixels())


def test_changed_source_is_rebuilt(tmp_path: Path) -> None:
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    path = tmp_path / "s.svs"
    make_synthetic_slide(path, 900, 700, mpp=0.5, seed=1)
    assert tile_slide(path, tmp_path / "out", pixels="none")["status"] == "ok"
    make_synthetic_slide(path, 900, 700, mpp=0.5, seed=2)  # same name, new content
    row = tile_slide(path, tmp_path / "out", pixels="none")
    assert row["status"] == "ok" and "source slide changed" in row["message"]


def test_coords_h5_reads_back_as_clam_and_trident_read_it(tmp_path: Path) -> None:
    """patch_level/patch_size as CLAM reads them and patch_size_level0/magnifications as
    TRIDENT reads them both give the stored tiles (a level at the target exists)."""
    import h5py
    import openslide
    from PIL import Image

    from wsi_mil.wsi.synthetic import make_synthetic_slide

    syn = make_synthetic_slide(tmp_path / "x2.svs", 2048, 1536, mpp=0.25, seed=9, level_factor=2)
    row = tile_slide(syn.path, tmp_path / "out", tile_px=128, stride_px=96, export_coords=True)
    assert row["status"] == "ok" and "CLAM" not in row["message"]
    store = open_tile_store(tmp_path / "out" / "x2.zarr")
    with h5py.File(tmp_path / "out" / "coords" / "x2.h5", "r") as fh:
        coords, a = fh["coords"][:], dict(fh["coords"].attrs)
    assert np.array_equal(coords, store.coords)
    assert a["patch_level"] == 1 and a["patch_size"] == 128 and a["patch_size_level0"] == 256
    assert list(a["downsample"]) == [2.0, 2.0] and list(a["level_dim"]) == [1024, 768]
    assert a["level0_magnification"] == 40 and a["target_magnification"] == 20
    assert a["overlap"] == 32 and a["name"] == "x2"
    assert (a["level0_width"], a["level0_height"]) == (2048, 1536)
    pixels = store.read_pixels()
    with openslide.OpenSlide(str(syn.path)) as osr:
        for i in np.linspace(0, len(coords) - 1, 6).astype(int):
            loc = tuple(int(v) for v in coords[i])
            size = int(a["patch_size"])
            clam = np.asarray(osr.read_region(loc, int(a["patch_level"]), (size, size)))[..., :3]
            assert np.array_equal(clam, pixels[i])  # same level, same pixels
            src = round(size * a["level0_magnification"] / a["target_magnification"])
            big = osr.read_region(loc, 0, (src, src)).convert("RGB")
            trident = np.asarray(big.resize((size, size), Image.Resampling.BOX)).astype(int)
            assert np.abs(trident - pixels[i]).mean() < 4.0  # level 1 vs resized level 0


def test_coords_h5_without_a_matching_level_says_how_clam_reads_it(
    slide_025, tmp_path: Path
) -> None:
    import h5py

    row = tile_slide(slide_025.path, tmp_path, pixels="none", export_coords=True, qc=False)
    assert row["status"] == "ok"
    assert "CLAM must read patch_size_level0 (448) px at level 0" in row["message"]
    with h5py.File(tmp_path / "coords" / "syn025.h5", "r") as fh:
        a = dict(fh["coords"].attrs)
    assert a["patch_level"] == 0 and list(a["level_dim"]) == [4096, 3072]
    again = tile_slide(slide_025.path, tmp_path, pixels="none", export_coords=True, qc=False)
    assert again["status"] == "skipped" and "CLAM must read" in again["message"]


def test_skipped_store_repeats_its_warnings(blank_slide: Path, tmp_path: Path) -> None:
    first = tile_slide(blank_slide, tmp_path, pixels="none")
    again = tile_slide(blank_slide, tmp_path, pixels="none")
    assert "no tissue" in first["message"]
    assert again["status"] == "skipped" and "no tissue found" in again["message"]


def test_slide_id_of_ome_tiff_and_failed_rows(tmp_path: Path) -> None:
    row = tile_slide(tmp_path / "case7.ome.tiff", tmp_path / "out")
    assert row["status"] == "failed" and row["slide_id"] == "case7"
