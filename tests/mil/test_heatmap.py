"""Attention heatmap PNG and QuPath GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.errors import ConfigError
from wsi_mil.mil.attention import write_attention
from wsi_mil.mil.heatmap import find_attention, render_heatmap
from wsi_mil.workflows.cli import main
from wsi_mil.wsi.synthetic import make_synthetic_slide


@pytest.fixture
def slide_and_attention(tmp_path: Path) -> tuple[Path, Path]:
    slide = make_synthetic_slide(tmp_path / "slide1.svs", 2048, 1536).path
    xs, ys = np.meshgrid(np.arange(0, 1024, 256), np.arange(0, 768, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    attention = np.linspace(0, 1, len(coords))
    att = write_attention(
        tmp_path / "run" / "attention" / "slide1.h5",
        attention,
        coords,
        attrs={"slide_id": "slide1", "tile_level0": 256},
    )
    return Path(slide), att


def test_render_heatmap(slide_and_attention: tuple[Path, Path], tmp_path: Path) -> None:
    slide, att = slide_and_attention
    paths = render_heatmap(att, slide, tmp_path / "out", max_size=512)
    image = np.asarray(Image.open(paths["png"]))
    assert image.shape[1:] == (512, 3) and image.shape[0] > 384  # overlay + colour scale
    legend = image[384:]
    assert legend.std() > 0  # the colour bar and its caption are drawn
    # the most attended tile (bottom right of the grid) is brighter than the least attended
    assert image[160:180, 200:250].mean() > image[5:50, 5:50].mean()
    geo = json.loads(paths["geojson"].read_text())
    assert len(geo["features"]) == 12
    first = geo["features"][0]
    assert first["geometry"]["coordinates"][0][2] == [256, 256]
    assert first["properties"]["measurements"]["attention_percentile"] == 0.0
    assert first["properties"]["objectType"] == "tile"  # QuPath's tile object type
    last = geo["features"][-1]["properties"]
    assert sum(last["color"]) > sum(first["properties"]["color"])  # hot = bright


def test_heatmap_refuses_attention_of_another_slide(
    slide_and_attention: tuple[Path, Path], tmp_path: Path
) -> None:
    _, att = slide_and_attention
    small = make_synthetic_slide(tmp_path / "small.svs", 512, 512).path
    with pytest.raises(ConfigError, match=r"tiles reach \(768, 512\) but .*small.svs is 512 x 512"):
        render_heatmap(att, small, tmp_path / "out")
    assert not (tmp_path / "out" / "slide1_heatmap.png").exists()


def test_heatmap_command(slide_and_attention: tuple[Path, Path], tmp_path: Path) -> None:
    slide, att = slide_and_attention
    out = tmp_path / "hm"
    assert (
        main(
            [
                "heatmap",
                str(tmp_path / "run"),
                "--slide",
                str(slide),
                "--out",
                str(out),
                "--max-size",
                "256",
            ]
        )
        == 0
    )
    assert (out / "slide1_heatmap.png").is_file() and (out / "slide1_attention.geojson").is_file()
    assert (out / "slide1_heatmap.yaml").is_file()
    assert find_attention(att, "anything") == att
    with pytest.raises(ConfigError, match="no attention for slide 'other'"):
        find_attention(tmp_path / "run", "other")
