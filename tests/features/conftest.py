"""Fixtures for feature tests: small synthetic slides tiled with the real tiler."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tile_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two slides tiled at 1 µm/px, 64 px tiles: ``pixels`` (lossless) and ``none`` stores."""
    from wsi_mil.tiling import tile_slide
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("feature_tiles")
    slides = [
        make_synthetic_slide(root / "slides" / "slide_a.svs", 3000, 2000, seed=1).path,
        make_synthetic_slide(root / "slides" / "slide_b.svs", 2000, 1600, seed=2).path,
    ]
    out = {}
    for mode in ("lossless", "none"):
        for path in slides:
            row = tile_slide(
                path, root / mode, target_mpp=1.0, tile_px=64, pixels=mode, qc=False,
                chunk_tiles=16, raise_errors=True,
            )  # fmt: skip
            assert row["status"] == "ok" and row["n_tiles"] > 10, row
        out[mode] = root / mode
    return out


@pytest.fixture
def tiles(tile_dirs, tmp_path) -> Path:
    """A private copy of the lossless stores (tests may modify it)."""
    dst = tmp_path / "tiles"
    shutil.copytree(tile_dirs["lossless"], dst)
    return dst
