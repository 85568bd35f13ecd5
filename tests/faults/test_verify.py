"""``wsi-mil verify DIR``: every store and bag checked, the damaged ones named, exit 0/1/2."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from wsi_mil.workflows.cli import main
from wsi_mil.workflows.commands.verify import verify_folder


@pytest.fixture
def outputs(small_slides: dict[str, Path], tmp_path: Path, write_features: Callable) -> Path:
    """``out/tiles`` (a good, an incomplete store and a coords export) and
    ``out/features/enc0`` (a good bag, one with NaN rows, one with short coords, one
    that is not HDF5)."""
    from wsi_mil.tiling import tile_slide

    out = tmp_path / "out"
    tiles = out / "tiles"
    row = tile_slide(small_slides["small"], tiles, tile_px=32, qc=False, export_coords=True)
    assert row["status"] == "ok", row
    shutil.copytree(tiles / "small.zarr", tiles / "half.zarr")
    zarr.open_group(str(tiles / "half.zarr"), mode="r+").attrs["complete"] = False
    bags = out / "features" / "enc0"
    feats = np.ones((6, 8), np.float32)
    good = write_features(bags, "good", feats)
    for name in ("nan", "short"):
        shutil.copyfile(good, bags / f"{name}.h5")
    with h5py.File(bags / "nan.h5", "r+") as h5:
        h5["features"][2, 3] = np.nan
    with h5py.File(bags / "short.h5", "r+") as h5:
        del h5["coords"]
        h5.create_dataset("coords", data=np.zeros((4, 2), np.int64))
    (bags / "garbage.h5").write_bytes(b"not an hdf5 file")
    (bags / ".good.h5.1234.tmp").write_bytes(b"a leftover temporary")
    return out


def test_verify_names_every_damaged_output(outputs: Path, capsys) -> None:
    assert main(["verify", str(outputs), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    damaged = {line.split(":")[0].split()[-1]: line for line in lines[:-1]}
    features = outputs / "features" / "enc0"
    assert sorted(damaged) == sorted(
        str(p) for p in (outputs / "tiles" / "half.zarr", *(features / f"{n}.h5"
                         for n in ("garbage", "nan", "short")))
    )  # fmt: skip
    assert "incomplete" in damaged[str(outputs / "tiles" / "half.zarr")]
    assert "1 of 6 feature rows contain NaN or inf (rows [2])" in damaged[str(features / "nan.h5")]
    assert "coords have shape (4, 2), features 6 rows" in damaged[str(features / "short.h5")]
    assert "not a readable HDF5" in damaged[str(features / "garbage.h5")]
    assert all("fix: " in line for line in damaged.values())
    assert lines[-1] == "verify: 2 tile stores, 4 feature bags checked; 4 damaged"


def test_verify_folder_is_importable_and_clean_folders_pass(outputs: Path, capsys) -> None:
    for name in ("nan", "short", "garbage"):
        (outputs / "features" / "enc0" / f"{name}.h5").unlink()
    shutil.rmtree(outputs / "tiles" / "half.zarr")
    report = verify_folder(outputs)
    assert report.ok and (report.stores, report.bags) == (1, 1)
    assert main(["verify", str(outputs), "--quick", "--no-progress"]) == 0
    assert "all intact" in capsys.readouterr().out


def test_verify_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no tile stores (*.zarr) or feature bags (*.h5)" in err and "\n" not in err.strip()
