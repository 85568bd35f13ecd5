"""The public surface of ``wsi_mil.wsi`` and ``wsi_mil.tiling``: complete and cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("numba", "zarr", "openslide", "tiffslide", "tifffile", "h5py", "PIL", "torch")


@pytest.mark.parametrize("package", ["wsi_mil.wsi", "wsi_mil.tiling"])
def test_import_is_cheap(package: str) -> None:
    code = f"import sys, {package}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""  # nothing heavy loads until a name is used


@pytest.mark.parametrize("package", ["wsi_mil.wsi", "wsi_mil.tiling"])
def test_all_names_resolve(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    assert module.__all__ == sorted(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_user_facing_api_is_exported() -> None:
    import wsi_mil.tiling as tiling
    import wsi_mil.wsi as wsi

    assert {"open_slide", "Slide", "make_synthetic_slide", "slide_id_from_path"} <= set(wsi.__all__)
    assert {"detect_tissue", "tile_slide", "open_tile_store", "TileStore", "tile_grid"} <= set(
        tiling.__all__
    )
