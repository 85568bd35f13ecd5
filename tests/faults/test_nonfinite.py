"""Non-finite features: refused when a bag is written and when one is loaded.

Rows of the fault matrix: a NaN in a bag poisoned most predictions and the error named
the wrong patient, never the bag.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_mil.features.bags import BagError, NonFiniteFeaturesError, read_bag
from wsi_mil.mil.train import train_cv
from wsi_mil.workflows.cli import main


def _poison(bag: Path, rows: list[int]) -> None:
    """Overwrite ``rows`` of a bag's features with NaN/inf in place (as bit rot would)."""
    with h5py.File(bag, "r+") as h5:
        for k, row in enumerate(rows):
            h5["features"][row, k % h5["features"].shape[1]] = np.inf if k % 2 else np.nan


def test_write_refuses_and_names_slide_and_count(tmp_path: Path, write_features) -> None:
    feats = np.ones((10, 4), np.float32)
    feats[[1, 4, 7], 2] = [np.nan, np.inf, -np.inf]
    with pytest.raises(NonFiniteFeaturesError, match=r"slide 's1': 3 feature row\(s\)"):
        write_features(tmp_path, "s1", feats)
    assert not list(tmp_path.iterdir())  # nothing at the final path, no temporary


def test_read_refuses_and_names_the_bag(tmp_path: Path, write_features) -> None:
    bag = write_features(tmp_path, "s1", np.ones((10, 4), np.float32))
    _poison(bag, [2, 5])
    with pytest.raises(BagError, match=rf"{bag}: 2 of 10 feature row\(s\) contain NaN or inf"):
        read_bag(bag)


def test_extract_fails_only_the_nan_slide(small_slides, tmp_path: Path, monkeypatch) -> None:
    from wsi_mil.features import extract_features, registry
    from wsi_mil.tiling import tile_slide

    for path in small_slides.values():
        row = tile_slide(path, tmp_path / "tiles", target_mpp=1.0, tile_px=64, min_tissue=0.0,
                         mask_mpp=4.0, qc=False, raise_errors=True)  # fmt: skip
        assert row["n_tiles"] > 0
    real = registry.build_encoder
    calls: list[int] = []

    def nan_encoder(*args, **kwargs):  # the first batch (the largest slide) gets 3 NaN rows
        encoder = real(*args, **kwargs)
        forward = encoder.forward

        def poisoned(x):
            out = forward(x)
            if not calls:
                out = out.clone()
                out[:3] = float("nan")
            calls.append(len(x))
            return out

        encoder.forward = poisoned
        return encoder

    monkeypatch.setattr(registry, "build_encoder", nan_encoder)
    rows = extract_features(tmp_path / "tiles", "builtin", tmp_path / "features",
                            devices="cpu", workers=0, batch_size=4096, progress=False)  # fmt: skip
    by_id = {r["slide_id"]: r for r in rows}
    assert by_id["large"]["status"] == "failed" and by_id["small"]["status"] == "ok"
    assert "NonFiniteFeaturesError: slide 'large': 3 feature row(s)" in by_id["large"]["error"]
    assert not Path(by_id["large"]["path"]).exists() and Path(by_id["small"]["path"]).exists()


def test_predict_names_the_nan_bag(tiny_run, tmp_path: Path, capsys) -> None:
    features = tmp_path / "enc0"
    shutil.copytree(tiny_run.syn.features_dirs[0], features)
    bag = sorted(features.glob("*.h5"))[3]
    _poison(bag, [0])
    out = tmp_path / "p.csv"
    code = main(["predict", str(tiny_run.run), "--features", str(features), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bag}: 1 of " in err and "NaN or inf" in err
    assert not out.exists()


def test_train_names_the_nan_bag(tmp_path: Path, tiny_training) -> None:
    make_cohort, make_config = tiny_training
    syn = make_cohort(tmp_path / "data")
    bag = sorted(syn.features_dirs[0].glob("*.h5"))[5]
    _poison(bag, [1, 2, 3])
    with pytest.raises(BagError, match=rf"{bag}: 3 of \d+ feature row\(s\)"):
        train_cv(make_config(syn), tmp_path / "run")
