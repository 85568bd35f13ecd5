"""One parametrized slide fixture: generated slides of several kinds + the real slide."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from wsi_mil.wsi import Slide, SyntheticSlide, make_synthetic_slide, open_slide

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REAL_SLIDE = REAL_DATA / "CMU-1-Small-Region.svs"


@dataclass(frozen=True)
class SlideCase:
    """A slide to test and what we know about it.

    ``mpp`` is the true µm/px; ``metadata_mpp`` is False when the file carries no
    usable resolution (opening it then needs ``mpp=``).
    """

    name: str
    path: Path
    width: int
    height: int
    mpp: float
    metadata_mpp: bool
    levels: int
    vendor: str
    synthetic: SyntheticSlide | None = None

    def open(self, backend: str = "auto") -> Slide:
        """Open, passing the true mpp when the file has none."""
        return open_slide(self.path, backend=backend, mpp=None if self.metadata_mpp else self.mpp)


# name: (width, height, make_synthetic_slide kwargs, true mpp, metadata mpp?, vendor)
_GENERATED = {
    "aperio-0.5um-3lv-x2": (2048, 1536, {"mpp": 0.5, "levels": 3, "level_factor": 2}),
    "aperio-0.25um-2lv-x4": (2048, 1024, {"mpp": 0.25, "levels": 2, "level_factor": 4}),
    "generic-1um-1lv": (1024, 768, {"mpp": 1.0, "levels": 1, "flavour": "generic"}),
    "generic-0.5um-2lv": (1536, 1536, {"mpp": 0.5, "levels": 2, "flavour": "generic"}),
    "aperio-no-mpp": (1024, 1024, {"mpp": None, "levels": 2, "level_factor": 2}),
    "aperio-72dpi": (1024, 768, {"mpp": 0.5, "resolution": "72dpi", "levels": 1}),
    "generic-72dpi": (768, 1024, {"mpp": 0.5, "resolution": "72dpi", "flavour": "generic"}),
}
CASE_NAMES = [*_GENERATED, "real-CMU-1-Small-Region"]


@pytest.fixture(scope="session")
def generated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wsi-slides")


@pytest.fixture(scope="session", params=CASE_NAMES)
def slide_case(request: pytest.FixtureRequest, generated_dir: Path) -> SlideCase:
    """Every kind of slide the tests run against (generated, plus the real one)."""
    name = request.param
    if name.startswith("real-"):
        if not REAL_SLIDE.exists():
            pytest.skip(f"real slide not found at {REAL_SLIDE}")
        return SlideCase(name, REAL_SLIDE, 2220, 2967, 0.499, True, 1, "aperio")
    width, height, kwargs = _GENERATED[name]
    flavour = kwargs.get("flavour", "aperio")
    suffix = ".svs" if flavour == "aperio" else ".tif"
    synth = make_synthetic_slide(
        generated_dir / f"{name}{suffix}", width, height, seed=len(name), **kwargs
    )
    true_mpp = kwargs["mpp"] or 0.5
    has_mpp = kwargs["mpp"] is not None and kwargs.get("resolution", "mpp") == "mpp"
    vendor = "aperio" if flavour == "aperio" else "generic-tiff"
    return SlideCase(
        name, synth.path, width, height, true_mpp, has_mpp, kwargs.get("levels", 1), vendor,
        synth,
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_slide(generated_dir: Path) -> SyntheticSlide:
    """A small Aperio-like slide with mpp, for tests that need just one."""
    return make_synthetic_slide(generated_dir / "small.svs", 1024, 768, mpp=0.5, levels=2)
