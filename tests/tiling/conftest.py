"""Fixtures of the tiling tests: small synthetic slides written once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REAL_SLIDE = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"
)


@pytest.fixture(scope="session")
def slide_050(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic slide at 0.5 µm/px (3200 x 2400 px) and its ground truth at 4 µm/px."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    path = tmp_path_factory.mktemp("slides") / "syn050.svs"
    return make_synthetic_slide(path, 3200, 2400, mpp=0.5, seed=3, mask_mpp=4.0)


@pytest.fixture(scope="session")
def slide_025(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic slide at 0.25 µm/px (4096 x 3072 px) and its ground truth at 4 µm/px."""
    from wsi_mil.wsi.synthetic import make_synthetic_slide

    path = tmp_path_factory.mktemp("slides") / "syn025.svs"
    return make_synthetic_slide(path, 4096, 3072, mpp=0.25, seed=5, mask_mpp=4.0)


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """The real Aperio slide of ../shared/data (test skipped when absent)."""
    if not REAL_SLIDE.exists():
        pytest.skip("../shared/data/CMU-1-Small-Region.svs not present")
    return REAL_SLIDE


def _write_plain_tiff(path: Path, rgb: np.ndarray, mpp: float = 0.5) -> Path:
    """A single-level tiled JPEG TIFF with a resolution (readable by OpenSlide)."""
    import tifffile

    tifffile.imwrite(
        path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


@pytest.fixture()
def plain_tiff():
    """``plain_tiff(path, rgb, mpp=0.5)`` writes a single-level tiled TIFF slide."""
    return _write_plain_tiff


@pytest.fixture()
def blank_slide(tmp_path: Path) -> Path:
    """A 2000 x 1500 slide of off-white background only (no tissue)."""
    return _write_plain_tiff(tmp_path / "blank.tif", np.full((1500, 2000, 3), 236, np.uint8))
