"""Heatmaps: overlap averaging, normalisation, wrong-slide refusal and every format."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.errors import ConfigError, OutputExistsError
from wsi_mil.mil.attention import write_attention
from wsi_mil.mil.heatmap import (
    SlideMismatchError,
    find_attention,
    parse_formats,
    rank_normalise,
    rasterise,
    render_heatmap,
    tile_average,
)
from wsi_mil.mil.heatmap.viewer import assets_dir
from wsi_mil.tiling.store import source_fingerprint
from wsi_mil.workflows.cli import main
from wsi_mil.wsi.synthetic import make_synthetic_slide

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

# planted tiles: the hot block of the grid (level-0 x 512-767, y 256-511)
HOT = (512, 256)


@pytest.fixture
def slide_and_attention(tmp_path: Path) -> tuple[Path, Path]:
    """A 2048 x 1536 slide, 256-px tiles with stride 128 over its top-left 1152 x 896 px;
    HOT's tile and its neighbours carry the highest attention."""
    slide = Path(make_synthetic_slide(tmp_path / "slide1.svs", 2048, 1536).path)
    xs, ys = np.meshgrid(np.arange(0, 1024, 128), np.arange(0, 768, 128))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    rng = np.random.default_rng(0)
    attention = rng.uniform(0.0, 0.5, len(coords))
    near = (np.abs(coords[:, 0] - HOT[0]) <= 128) & (np.abs(coords[:, 1] - HOT[1]) <= 128)
    attention[near] = 0.9  # the planted region: HOT's tile and its 8 overlapping neighbours
    attention[(coords[:, 0] == HOT[0]) & (coords[:, 1] == HOT[1])] = 1.0
    fp = source_fingerprint(slide)
    att = write_attention(
        tmp_path / "run" / "attention" / "slide1.h5",
        attention / attention.sum(),
        coords,
        attrs={
            "slide_id": "slide1",
            "tile_level0": 256,
            "model": "abmil",
            "source": "ensemble",
            "source_size": fp["size"],
            "source_sha256": fp["sha256"],
        },
    )
    return slide, att


def test_overlap_is_averaged_not_overwritten() -> None:
    # three 4-px tiles with stride 2 on one row: pixels covered by two tiles get the mean
    coords = np.array([[0, 0], [2, 0], [4, 0]])
    mean, count = tile_average(coords, 4, np.array([0.0, 1.0, 2.0]), 1.0, (4, 10))
    np.testing.assert_allclose(mean[0, :8], [0, 0, 0.5, 0.5, 1.5, 1.5, 2, 2])
    assert count[0].tolist() == [1, 1, 2, 2, 2, 2, 1, 1, 0, 0]
    assert np.isnan(mean[:, 8:]).all() and (count[:, :8] == 1).sum() == 16
    # the order of the tiles does not matter (the old code kept the last one drawn)
    rev, _ = tile_average(coords[::-1], 4, np.array([2.0, 1.0, 0.0]), 1.0, (4, 10))
    np.testing.assert_allclose(rev, mean)
    # at a coarser scale a pixel (2 level-0 px) still averages the tiles over it
    half, _ = tile_average(coords, 4, np.array([0.0, 1.0, 2.0]), 2.0, (2, 5))
    np.testing.assert_allclose(half[0, :4], [0, 0.5, 1.5, 2])


def test_raster_smoothing_stays_in_the_scored_tissue() -> None:
    coords = np.array([[0, 0], [4, 0]])
    sharp = rasterise(coords, 4, np.array([0.0, 1.0]), dimensions=(16, 4), scale=1.0, slide_mpp=1.0)
    smooth = rasterise(
        coords, 4, np.array([0.0, 1.0]), dimensions=(16, 4), scale=1.0, slide_mpp=1.0, sigma_um=2.0
    )
    assert np.isnan(sharp.value[:, 8:]).all() and np.isnan(smooth.value[:, 8:]).all()
    assert sharp.value[0, 3] == 0 and 0 < smooth.value[0, 3] < 0.5  # blurred across the edge
    assert smooth.value[0, 0] < smooth.value[0, 7]
    tissue = np.ones((4, 16), bool)
    tissue[:, :2] = False
    masked = rasterise(
        coords, 4, np.array([0.0, 1.0]), dimensions=(16, 4), scale=1.0, slide_mpp=1.0, tissue=tissue
    )
    assert np.isnan(masked.value[:, :2]).all() and masked.value[0, 2] == 0


def test_rank_normalisation() -> None:
    assert rank_normalise(np.array([3.0, 1.0, 2.0]), signed=False).tolist() == [1.0, 0.0, 0.5]
    signed = rank_normalise(np.array([-5.0, 1.0, 2.0, -0.5]), signed=True)
    assert signed.tolist() == [-1.0, 0.5, 0.75, -0.25]  # sign kept, rank of the magnitude


def test_every_format_puts_the_planted_tiles_on_top(
    slide_and_attention: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, att = slide_and_attention
    out = tmp_path / "out"
    paths = render_heatmap(att, slide, out, max_size=512, top_k=4)
    assert {"png", "tiff", "dzi", "overlay_dzi", "geojson", "topk", "bottomk"} <= set(paths)
    # PNG: [plain | overlay] with caption and colour bar; the hot block is bright
    with Image.open(paths["png"]) as png:
        image = np.asarray(png.convert("RGB")).astype(int)
    assert image.shape[1] == 2 * 512 + 8 and image.shape[0] > 384 + 40
    assert image.std() > 0
    # GeoJSON: one polygon per tile, measurements, bands; the hot tile has percentile 1
    geo = json.loads(paths["geojson"].read_text())
    assert len(geo["features"]) == 48
    best = max(geo["features"], key=lambda f: f["properties"]["measurements"]["score"])
    ring = best["geometry"]["coordinates"][0]
    assert ring[0] == list(HOT) and ring[2] == [HOT[0] + 256, HOT[1] + 256]
    props = best["properties"]
    assert props["objectType"] == "tile" and props["classification"]["name"] == "heatmap: high"
    assert props["measurements"]["attention_percentile"] == 1.0
    # top-k: the first tile of the gallery is the planted one, read at full resolution
    tiles = sorted((out / "topk" / "slide1").glob("top_01_*.png"))
    assert tiles and tiles[0].name.startswith(f"top_01_x{HOT[0]}_y{HOT[1]}_")
    with Image.open(tiles[0]) as tile:
        assert tile.size == (256, 256)
    # TIFF: the overlay at the hot block's centre is the hottest colour of the colormap
    import tiffslide

    with tiffslide.TiffSlide(paths["tiff"]) as t:
        centre = np.asarray(t.read_region((HOT[0] + 128, HOT[1] + 128), 0, (1, 1)))[0, 0, :3]
        cold = np.asarray(t.read_region((64, 64), 0, (1, 1)))[0, 0, :3]
    assert int(centre.astype(int).sum()) > int(cold.astype(int).sum())
    # the viewer data lists the planted tile first
    data = paths["dzi"].with_name("slide1_viewer.js").read_text()
    top = json.loads(data.split('["slide1"] = ', 1)[1].rstrip(";\n"))["top"][0]
    assert (top["x"], top["y"]) == HOT


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_overlay_tiff_opens_at_every_level_aligned_with_level_0(
    slide_and_attention: tuple[Path, Path], tmp_path: Path, reader: str
) -> None:
    slide, att = slide_and_attention
    tif = render_heatmap(att, slide, tmp_path / "o", formats=("tiff",), overlay_mpp=0.25)["tiff"]
    if reader == "openslide":
        import openslide

        handle = openslide.OpenSlide(str(tif))
    else:
        import tiffslide

        handle = tiffslide.TiffSlide(str(tif))
    with handle as t:
        assert t.dimensions == (2048, 1536)
        assert t.level_count >= 3
        assert float(t.properties[f"{reader}.mpp-x"]) == pytest.approx(0.5, rel=1e-3)  # the slide
        full = np.asarray(t.read_region((0, 0), 0, t.dimensions))[..., :3].astype(int)
        for level in range(t.level_count):
            ds = t.level_downsamples[level]
            assert ds == pytest.approx(2**level, rel=0.01)
            w, h = t.level_dimensions[level]
            assert (w, h) == (-(-2048 // 2**level), -(-1536 // 2**level))
            img = np.asarray(t.read_region((0, 0), level, (w, h)))[..., :3].astype(int)
            # the hot block's centre and an unscored corner keep their colours at every level
            y, x = int((HOT[1] + 128) / ds), int((HOT[0] + 128) / ds)
            assert np.abs(img[y, x] - full[HOT[1] + 128, HOT[0] + 128]).max() < 40
            assert img[-1, -1].min() > 230  # white: no score


def test_wrong_slide_is_refused_naming_both(
    slide_and_attention: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide, att = slide_and_attention
    # same size, other bytes: the fingerprint tells them apart
    other = Path(make_synthetic_slide(tmp_path / "other.svs", 2048, 1536, seed=7).path)
    with pytest.raises(
        SlideMismatchError, match=r"computed on slide 'slide1'.*other.svs is slide 'other'"
    ):
        render_heatmap(att, other, tmp_path / "out")
    assert not (tmp_path / "out" / "slide1_heatmap.png").exists()
    # a smaller slide: its tiles lie outside
    small = Path(make_synthetic_slide(tmp_path / "small.svs", 512, 512).path)
    with pytest.raises(SlideMismatchError, match=r"tiles reach \(896, 640\).*512 x 512"):
        render_heatmap(att, small, tmp_path / "out")
    # the CLI exits 2 with one line naming both
    code = main(["heatmap", str(att), "--slide", str(other), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "'slide1'" in err and "'other'" in err
    # the same bytes under another name are accepted
    renamed = tmp_path / "renamed.svs"
    shutil.copy(slide, renamed)
    assert render_heatmap(att, renamed, tmp_path / "ok", formats=("geojson",))["geojson"].is_file()


def test_heatmap_command_refuses_other_options_without_overwrite(
    slide_and_attention: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide, att = slide_and_attention
    out = tmp_path / "hm"
    argv = [
        "heatmap",
        str(tmp_path / "run"),
        "--slide",
        str(slide),
        "--out",
        str(out),
        "--max-size",
        "256",
        "--format",
        "png,geojson",
    ]
    assert main(argv) == 0
    assert (out / "slide1_heatmap.png").is_file() and (out / "slide1_attention.geojson").is_file()
    assert (out / "slide1_heatmap.yaml").is_file() and not (out / "slide1_overlay.tif").exists()
    assert main(argv) == 0  # same options: redone
    assert main([*argv, "--sigma-um", "50"]) == 2
    assert "other options (sigma_um differ" in capsys.readouterr().err
    assert main([*argv, "--sigma-um", "50", "--overwrite"]) == 0
    assert find_attention(att, "anything") == att
    with pytest.raises(ConfigError, match="no attention for slide 'other'"):
        find_attention(tmp_path / "run", "other")
    with pytest.raises(ConfigError, match="choose from"):
        parse_formats("png,jpeg")
    assert issubclass(OutputExistsError, FileExistsError)


def _viewer_page(slide_and_attention: tuple[Path, Path], tmp_path: Path) -> Path:
    slide, att = slide_and_attention
    paths = render_heatmap(att, slide, tmp_path / "view", formats=("dzi",), dzi_mpp=0.5)
    return paths["viewer"]


@pytest.mark.skipif(assets_dir() is None, reason="OpenSeadragon not installed: make viewer-assets")
def test_viewer_files(slide_and_attention: tuple[Path, Path], tmp_path: Path) -> None:
    page = _viewer_page(slide_and_attention, tmp_path)
    folder = page.parent
    assert (folder / "viewer" / "openseadragon.min.js").is_file()
    assert (folder / "viewer" / "LICENSE-openseadragon.txt").is_file()
    assert (folder / "slide1_files" / "0" / "0_0.jpeg").is_file()
    top = max(int(p.name) for p in (folder / "slide1_files").iterdir())
    assert top == 11  # ceil(log2(2048))
    text = page.read_text()
    assert '["slide1"]' in text and "http" not in text.replace("http://schemas", "")


@pytest.mark.skipif(assets_dir() is None, reason="OpenSeadragon not installed: make viewer-assets")
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_viewer_opens_offline_in_headless_chromium(
    slide_and_attention: tuple[Path, Path], tmp_path: Path
) -> None:
    page = _viewer_page(slide_and_attention, tmp_path)
    url = page.resolve().as_uri()
    common = [
        str(CHROMIUM),
        *CHROMIUM_FLAGS,
        "--virtual-time-budget=20000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    body = dom[dom.index("<body") : dom.index(">", dom.index("<body"))]
    assert 'data-errors="0"' in body, dom[-2000:]
    assert 'data-status="ready"' in body and 'data-layers="2"' in body
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, "--window-size=900,700", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=180,
        check=True,
    )
    with Image.open(shot) as screen:
        pixels = np.asarray(screen.convert("RGB")).astype(int)
    assert pixels.std() > 10  # not blank
    # the overlay's colours are on screen (inferno's hot oranges/yellows)
    assert ((pixels[..., 0] > 200) & (pixels[..., 2] < 120)).sum() > 100


def _dzi_level(files: Path, level: int) -> np.ndarray:
    """The tiles of one Deep Zoom level put together (rows, cols, C)."""
    tiles = {tuple(map(int, p.stem.split("_"))): p for p in (files / str(level)).iterdir()}
    n_cols = 1 + max(c for c, _ in tiles)
    n_rows = 1 + max(r for _, r in tiles)
    assert len(tiles) == n_cols * n_rows
    bands = []
    for r in range(n_rows):
        row = []
        for c in range(n_cols):
            with Image.open(tiles[c, r]) as tile:
                row.append(np.asarray(tile))
        bands.append(np.hstack(row))
    return np.vstack(bands)


@pytest.mark.parametrize("threads", [1, 2])
def test_dzi_levels_are_the_image_halved(tmp_path: Path, threads: int) -> None:
    from wsi_mil.mil.heatmap.pyramid import write_dzi

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (700, 555, 4), dtype=np.uint8)
    image[..., 3] = np.where(rng.random((700, 555)) < 0.2, 0, 255)  # transparent holes
    image[300:, 300:] = (10, 200, 30, 255)  # uniform tiles (encoded once, reused)
    calls: list[tuple[int, int]] = []

    def rows(y: int, h: int) -> np.ndarray:
        calls.append((y, h))
        return image[y : y + h]

    dzi = write_dzi(tmp_path / "img.dzi", (555, 700), rows, "png", threads=threads)
    assert 'Width="555" Height="700"' in dzi.read_text()
    assert sorted(calls) == [(0, 256), (256, 256), (512, 188)]  # every row read once
    files = tmp_path / "img_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(11))  # ceil(log2(700))
    expected = image
    for level in range(10, -1, -1):
        got = _dzi_level(files, level)
        f = 2 ** (10 - level)
        assert got.shape == (-(-700 // f), -(-555 // f), 4), level
        np.testing.assert_array_equal(got, expected, err_msg=f"level {level}")
        expected = np.asarray(Image.fromarray(expected).reduce(2))  # premultiplied 2x2 box
    # the JPEG slide tiles match the image within JPEG error, and files do not depend
    # on the number of threads
    rgb = np.ascontiguousarray(image[..., :3])
    write_dzi(tmp_path / "a.dzi", (555, 700), lambda y, h: rgb[y : y + h], "jpeg", threads=1)
    write_dzi(tmp_path / "b.dzi", (555, 700), lambda y, h: rgb[y : y + h], "jpeg", threads=3)
    full = _dzi_level(tmp_path / "a_files", 10).astype(int)
    assert full.shape == rgb.shape and np.abs(full[512:, 512:] - rgb[512:, 512:]).max() <= 3
    for a in (tmp_path / "a_files").rglob("*.jpeg"):
        assert (
            a.read_bytes()
            == (tmp_path / "b_files" / a.relative_to(tmp_path / "a_files")).read_bytes()
        )


def test_slide_dzi_is_the_slide_at_every_level(
    slide_and_attention: tuple[Path, Path], tmp_path: Path
) -> None:
    from wsi_mil.wsi import open_slide

    slide, att = slide_and_attention
    paths = render_heatmap(att, slide, tmp_path / "d", formats=("dzi",), dzi_mpp=0.5)
    files = paths["dzi"].with_name("slide1_files")
    with open_slide(slide) as s:
        full = s.read_region((0, 0), 0, s.dimensions).astype(int)
        for level, f in ((11, 1), (9, 4), (7, 16)):
            got = _dzi_level(files, level).astype(int)
            want = s.get_thumbnail(mpp=0.5 * f).astype(int) if f > 1 else full
            assert got.shape == want.shape, level
            assert np.abs(got - want).mean() < 4, level  # JPEG error only
    overlay = _dzi_level(paths["overlay_dzi"].with_name("slide1_overlay_files"), 0)
    assert overlay.shape == (1, 1, 4)


def _write_co_attention(
    path: Path, co: np.ndarray, weights: np.ndarray, coords: np.ndarray, **attrs: object
) -> None:
    import h5py

    from wsi_mil.mil.co_attention import CO_ATTENTION_FORMAT

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("co_attention", data=co.astype(np.float32))
        h5.create_dataset("weights", data=weights.astype(np.float32))
        h5.create_dataset("coords", data=coords)
        h5.attrs.update(format=CO_ATTENTION_FORMAT, slide_id="slide1", patient_id="p1",
                        tokens=json.dumps(["G00", "G01", "clinical"]), model="dual_xattn",
                        source="fold_0", **attrs)  # fmt: skip


def test_gene_group_heatmap_draws_the_tiles_that_group_attends_to(
    slide_and_attention: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--gene-group G01`` colours the run's co-attention of G01 (hot on HOT's tile),
    not the histology attention; unknown and absent groups are refused by name."""
    from wsi_mil.mil.heatmap import load_scores

    slide, att = slide_and_attention
    coords = np.asarray(h5_coords(att))
    co = np.full((3, len(coords)), 1.0 / len(coords))
    co[1] = np.where((coords[:, 0] == HOT[0]) & (coords[:, 1] == HOT[1]), 10.0, 1.0)
    co[1, (coords[:, 0] == 0) & (coords[:, 1] == 0)] = 0.0
    co[1] /= co[1].sum()
    fp = source_fingerprint(slide)
    _write_co_attention(tmp_path / "run" / "co_attention" / "slide1.h5", co,
                        np.array([0.2, 0.5, 0.3]), coords, tile_level0=256,
                        source_size=fp["size"], source_sha256=fp["sha256"])  # fmt: skip
    scores, origin = load_scores(tmp_path / "run", "slide1", gene_group="G01")
    assert origin.startswith("co-attention file") and scores.side == 256
    assert scores.fingerprint["sha256"] == fp["sha256"]
    np.testing.assert_allclose(scores.attention, co[1], rtol=1e-6)
    assert "G01" in scores.model
    out = tmp_path / "hm"
    argv = ["heatmap", str(tmp_path / "run"), "--slide", str(slide), "--out", str(out),
            "--max-size", "256", "--format", "png,geojson", "--gene-group", "G01"]  # fmt: skip
    assert main(argv) == 0
    geo = json.loads((out / "slide1_attention.geojson").read_text())
    best = max(geo["features"], key=lambda f: f["properties"]["measurements"]["score"])
    assert best["geometry"]["coordinates"][0][0] == list(HOT)
    assert main([*argv[:-1], "G07"]) == 2
    assert "choose from G00, G01, clinical" in capsys.readouterr().err
    _write_co_attention(tmp_path / "run2" / "co_attention" / "slide1.h5",
                        np.zeros((3, len(coords))), np.array([0.0, 0.0, 1.0]), coords)  # fmt: skip
    with pytest.raises(ConfigError, match="has no G00 input"):
        load_scores(tmp_path / "run2", "slide1", gene_group="G00")
    with pytest.raises(ConfigError, match="no co-attention for slide 'other'"):
        load_scores(tmp_path / "run", "other", gene_group="G00")


def h5_coords(path: Path) -> np.ndarray:
    from wsi_mil.mil.attention import read_attention

    return read_attention(path).coords
