"""Bag folders are named by weights: two checkpoints of one encoder never share a folder."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.features import bag_info, extract_features
from wsi_mil.features.extract import bag_folder_name
from wsi_mil.features.weights import file_sha256
from wsi_mil.workflows.cli import main

ENC = "timm:vit_tiny_patch16_224"  # small, and takes a timm state-dict file
FOLDER = "timm_vit_tiny_patch16_224"


def _checkpoint(path, seed):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(model.state_dict(), path)
    return path


def _extract(store, out, **kw):
    kw = {"devices": "cpu", "workers": 0, "progress": False, "batch_size": 64, **kw}
    return extract_features([store], ENC, out, **kw)


def test_folder_names(tmp_path):
    assert bag_folder_name("uni", None, "ab" * 32, tmp_path) == "uni"  # hub weights
    assert bag_folder_name("uni", "random", "random-init-seed0", tmp_path) == "uni"
    assert bag_folder_name("builtin", None, "none", tmp_path) == "builtin"
    assert bag_folder_name("uni", "/w/uni.bin", "0123abcd" + "f" * 56, tmp_path) == "uni-0123abcd"
    assert bag_folder_name("uni", "/w/uni.bin", "0" * 64, tmp_path, name="uni-ft") == "uni-ft"
    for bad in ("a/b", "..", "", "c:d"):
        with pytest.raises(ConfigError, match="plain folder name"):
            bag_folder_name("uni", None, "x", tmp_path, name=bad)


@pytest.mark.slow
def test_two_checkpoints_get_two_folders_and_mixing_is_refused(tile_dirs, tmp_path):
    torch.set_num_threads(2)
    store = sorted(tile_dirs["lossless"].glob("*.zarr"))[-1]  # the smaller slide
    a = _checkpoint(tmp_path / "a.safetensors", 1)
    b = _checkpoint(tmp_path / "b.safetensors", 2)
    sha_a, sha_b = file_sha256(a), file_sha256(b)
    out = tmp_path / "features"

    rows_a = _extract(store, out, weights=str(a))
    rows_b = _extract(store, out, weights=str(b))
    bag_a, bag_b = rows_a[0]["path"], rows_b[0]["path"]
    assert bag_a.startswith(str(out / f"{FOLDER}-{sha_a[:8]}"))
    assert bag_b.startswith(str(out / f"{FOLDER}-{sha_b[:8]}"))
    assert bag_info(bag_a)["weights_sha256"] == sha_a
    assert bag_info(bag_b)["weights_sha256"] == sha_b
    assert _extract(store, out, weights=str(a))[0]["status"] == "skipped"  # up to date

    # --name: an explicit folder; reusing it for other weights is refused, naming both
    _extract(store, out, weights=str(a), name="tiny-a")
    with pytest.raises(ConfigError, match=rf"other weights \(sha256 {sha_a[:16]}.*{sha_b[:16]}"):
        _extract(store, out, weights=str(b), name="tiny-a")
    code = main(["extract", str(store.parent), "--encoder", ENC, "--out", str(out),
                 "--weights", str(b), "--name", "tiny-a", "--devices", "cpu",
                 "--no-progress"])  # fmt: skip
    assert code == 2

    # a folder made before hashed names (<encoder>/ with bags of these weights) is kept
    legacy = out / FOLDER
    (out / f"{FOLDER}-{sha_a[:8]}").rename(legacy)
    assert bag_folder_name(ENC, str(a), sha_a, out) == ENC
    assert _extract(store, out, weights=str(a))[0]["path"].startswith(str(legacy / ""))
    assert bag_folder_name(ENC, str(b), sha_b, out) == f"{ENC}-{sha_b[:8]}"
    # random weights use the plain folder, which now holds a's bags: refused
    with pytest.raises(ConfigError, match="holds bags made with other weights"):
        _extract(store, out, weights="random")
