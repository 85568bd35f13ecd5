"""extract_features / `wsi-mil extract`: bags, manifest, resume, bad input, pool."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
import zarr

from wsi_mil.errors import ConfigError, EncoderError
from wsi_mil.features import bag_info, extract_features, extract_slide, read_bag
from wsi_mil.tiling import open_tile_store
from wsi_mil.workflows.cli import main


def _rows(rows):
    return {r["slide_id"]: r for r in rows}


def _run(tiles, out, **kw):
    kw.setdefault("devices", "cpu")
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 32)
    return extract_features(tiles, kw.pop("encoder", "builtin"), out, **kw)


def test_builtin_bags_manifest_and_config(tiles, tmp_path):
    out = tmp_path / "features"
    rows = _rows(_run(tiles, out))
    assert set(rows) == {"slide_a", "slide_b"}
    for sid, row in rows.items():
        assert row["status"] == "ok", row
        store = open_tile_store(tiles / f"{sid}.zarr")
        bag = read_bag(out / "builtin" / f"{sid}.h5")
        assert bag.features.shape == (store.n_tiles, 159) and bag.features.dtype == np.float16
        np.testing.assert_array_equal(bag.coords, store.coords)
        assert np.isfinite(bag.features).all()
        a = bag.attrs
        assert a["encoder"] == "builtin" and a["weights_sha256"] == "none"
        assert a["tile_px"] == 64 and a["target_mpp"] == 1.0 and a["slide_id"] == sid
        assert a["coords_attrs"]["patch_size_level0"] == 128
        assert len(a["store_fingerprint"]) == 32
    with open(out / "builtin" / "manifest.csv") as fh:
        manifest = list(csv.DictReader(fh))
    assert [m["status"] for m in manifest] == ["ok", "ok"]
    import yaml

    cfg = yaml.safe_load((out / "builtin" / "config.yaml").read_text())
    assert cfg["encoder"]["name"] == "builtin" and cfg["devices"] == ["cpu"]
    _check_clam_and_trident_reading(tiles, out)


def _clam_read(slide, h5_path, index):
    """Read tile ``index`` the way CLAM's Whole_Slide_Bag_FP does (from the attributes)."""
    import h5py

    with h5py.File(h5_path) as h5:
        level = int(h5["coords"].attrs["patch_level"])
        size = int(h5["coords"].attrs["patch_size"])
        x, y = (int(v) for v in h5["coords"][index])
    return slide.read_region((x, y), level, (size, size))


def _check_clam_and_trident_reading(tiles, out):
    """CLAM's read of a bag's tiles covers the embedded tissue; TRIDENT's sizes agree."""
    from wsi_mil.wsi import open_slide

    store = open_tile_store(tiles / "slide_b.zarr")
    h5_path = out / "builtin" / "slide_b.h5"
    ca = read_bag(h5_path).attrs["coords_attrs"]
    assert ca["patch_level"] == 0 and ca["patch_size"] == ca["patch_size_level0"] == 128
    # TRIDENT's relation between the level-0 size and the magnifications (10 µm / mpp)
    assert ca["level0_magnification"] == 20 and ca["target_magnification"] == 10
    assert ca["patch_size_level0"] == store.tile_px * ca["level0_magnification"] // 10
    with open_slide(store.source_path) as slide:
        for i in (0, store.n_tiles // 2, store.n_tiles - 1):
            region = torch.from_numpy(_clam_read(slide, h5_path, i)).permute(2, 0, 1)[None]
            clam = torch.nn.functional.interpolate(region.float(), size=64, mode="area")
            ours = torch.from_numpy(store.read_pixels(i, i + 1)).permute(0, 3, 1, 2).float()
            assert (clam - ours).abs().mean() < 3, i  # same tissue, same field of view


def test_rerun_skips_and_resumes_after_kill(tiles, tmp_path, monkeypatch):
    import wsi_mil.features.bags as bags

    out = tmp_path / "features"
    real = bags._write_coords_attrs
    calls = {"n": 0}

    def killed_on_second_bag(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run is killed while writing the 2nd bag
        return real(*args, **kwargs)

    monkeypatch.setattr(bags, "_write_coords_attrs", killed_on_second_bag)
    with pytest.raises(KeyboardInterrupt):
        _run(tiles, out)
    monkeypatch.setattr(bags, "_write_coords_attrs", real)
    written = sorted(p.name for p in (out / "builtin").glob("*.h5"))
    assert written == ["slide_a.h5"]  # the largest first; nothing half-written at a final path
    (out / "builtin" / ".slide_b.h5.deadbeef.tmp").write_bytes(b"partial")  # SIGKILL leftover
    first = bag_info(out / "builtin" / "slide_a.h5")

    rows = _rows(_run(tiles, out))
    assert rows["slide_a"]["status"] == "skipped" and rows["slide_a"]["message"] == "up to date"
    assert rows["slide_b"]["status"] == "ok"
    assert not list((out / "builtin").glob("*.tmp"))
    assert bag_info(out / "builtin" / "slide_a.h5") == first

    # a changed tile store (re-tiled) is re-extracted
    group = zarr.open_group(str(tiles / "slide_b.zarr"), mode="r+")
    group.attrs["min_tissue"] = 0.6
    rows = _rows(_run(tiles, out))
    assert rows["slide_a"]["status"] == "skipped" and rows["slide_b"]["status"] == "ok"
    rows = _rows(_run(tiles, out, overwrite=True))
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_incomplete_and_broken_stores_are_reported(tiles, tmp_path):
    group = zarr.open_group(str(tiles / "slide_b.zarr"), mode="r+")
    group.attrs["complete"] = False
    (tiles / "junk.zarr").mkdir()
    rows = _rows(_run(tiles, tmp_path / "f"))
    assert rows["slide_a"]["status"] == "ok"
    assert rows["slide_b"]["status"] == "skipped"
    assert "incomplete" in rows["slide_b"]["error"] and "wsi-mil tile" in rows["slide_b"]["error"]
    assert rows["junk"]["status"] == "failed" and "not a tile store" in rows["junk"]["error"]
    assert not (tmp_path / "f" / "builtin" / "slide_b.h5").exists()


def test_non_finite_features_refuse_the_slide(tiles, tmp_path, monkeypatch):
    from wsi_mil.features.encoders.builtin import HandcraftedFeatures

    real = HandcraftedFeatures.forward

    def nan_in_first_row(self, x):
        out = real(self, x)
        out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(HandcraftedFeatures, "forward", nan_in_first_row)
    rows = _rows(_run(tiles, tmp_path / "f"))
    for sid in ("slide_a", "slide_b"):
        assert rows[sid]["status"] == "failed"
        assert "NaN or inf" in rows[sid]["error"] and sid in rows[sid]["error"]
    assert not list((tmp_path / "f" / "builtin").glob("*.h5"))


def test_two_cpu_processes_match_one(tiles, tmp_path):
    one = _run(tiles, tmp_path / "one", workers=1)
    two = _run(tiles, tmp_path / "two", devices="cpu,cpu", workers=1)  # decode workers too
    assert {r["status"] for r in one + two} == {"ok"}
    for sid in ("slide_a", "slide_b"):
        a = read_bag(tmp_path / "one" / "builtin" / f"{sid}.h5")
        b = read_bag(tmp_path / "two" / "builtin" / f"{sid}.h5")
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)


def test_device_process_failure_is_reported(tiles, tmp_path):
    from safetensors.torch import save_file

    from wsi_mil.features import create_encoder

    tiny = create_encoder("timm:vit_tiny_patch16_224", weights="random")
    save_file(tiny.backbone.model.state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(EncoderError, match=r"device process failed: cpu: .*do not fit"):
        _run(tiles, tmp_path / "f", encoder="timm:vit_small_patch16_224", devices="cpu,cpu",
             weights=str(tmp_path / "tiny.safetensors"))  # fmt: skip


def test_pixels_none_store_reads_from_slide(tile_dirs, tmp_path):
    rows = _rows(_run(tile_dirs["none"], tmp_path / "none"))
    assert rows["slide_b"]["status"] == "ok", rows
    _run([tile_dirs["lossless"] / "slide_b.zarr"], tmp_path / "px")
    a = read_bag(tmp_path / "none" / "builtin" / "slide_b.h5")
    b = read_bag(tmp_path / "px" / "builtin" / "slide_b.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32),
                               atol=0.05, rtol=0.05)  # fmt: skip


def test_vit_encoder_with_random_weights_and_float32(tiles, tmp_path):
    row = extract_slide(
        tiles / "slide_b.zarr", "timm:vit_tiny_patch16_224", tmp_path,
        weights="random", devices="cpu", batch_size=48, dtype="float32",
    )  # fmt: skip
    assert row["status"] == "ok", row
    bag = read_bag(tmp_path / "timm_vit_tiny_patch16_224" / "slide_b.h5")
    assert bag.features.shape[1] == 192 and bag.features.dtype == np.float32
    assert bag.attrs["weights_sha256"] == "random-init-seed0"
    # identical to running the encoder on the store's pixels directly
    from wsi_mil.features import create_encoder

    enc = create_encoder("timm:vit_tiny_patch16_224", weights="random")
    px = open_tile_store(tiles / "slide_b.zarr").read_pixels(0, 5)
    with torch.inference_mode():
        ref = enc(torch.from_numpy(px)).numpy()
    np.testing.assert_allclose(bag.features[:5], ref, atol=1e-5)


def test_bad_arguments(tiles, tmp_path):
    with pytest.raises(ConfigError, match=r"no <slide_id>\.zarr"):
        _run(tmp_path, tmp_path / "f")
    with pytest.raises(ConfigError, match="does not exist"):
        _run(tmp_path / "missing", tmp_path / "f")
    with pytest.raises(ConfigError, match="--devices"):
        _run(tiles, tmp_path / "f", devices="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            _run(tiles, tmp_path / "f", devices="cuda:0")
    with pytest.raises(ConfigError, match="batch-size"):
        _run(tiles, tmp_path / "f", batch_size=0)
    with pytest.raises(EncoderError, match="unknown encoder"):
        _run(tiles, tmp_path / "f", encoder="nope")


def test_cli_extract_and_encoders(tiles, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    code = main(["extract", str(tiles), "--out", str(out), "--devices", "cpu", "--workers", "0",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    assert "2 ok, 0 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "builtin" / "slide_a.h5").exists()

    assert main(["encoders"]) == 0
    listing = capsys.readouterr().out
    assert "phikon-v2" in listing and "CC-BY-NC-ND-4.0" in listing and "2560" in listing

    assert main(["extract", str(tiles), "--out", str(out), "--encoder", "bogus"]) == 2
    assert "unknown encoder 'bogus'" in capsys.readouterr().err

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert main(["extract", str(tiles), "--out", str(out), "--encoder", "phikon"]) == 2
    assert "--weights" in capsys.readouterr().err

    shutil.rmtree(out / "builtin")
    group = zarr.open_group(str(tiles / "slide_b.zarr"), mode="r+")
    group.attrs["complete"] = False
    code = main(["extract", str(tiles), "--out", str(out), "--devices", "cpu", "--workers", "0",
                 "--no-progress"])  # fmt: skip
    assert code == 0  # skipped stores are reported, not failures
    assert "slide_b: skipped: tile store incomplete" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("devices", "cpus", "expected"),
    [
        (["cpu"], 16, 2),  # the encoder needs the cores
        (["cpu", "cpu"], 64, 2),
        (["cuda:0"], 16, 12),  # the H100 benchmark's setting
        (["cuda:0"], 64, 12),  # capped
        (["cuda:0", "cuda:1"], 16, 7),
        (["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 4, 1),  # never zero on GPUs
    ],
)
def test_default_workers(devices, cpus, expected):
    from wsi_mil.features.pool import default_workers

    assert default_workers(devices, cpus=cpus) == expected
    assert default_workers(devices) >= 1


def test_parse_devices():
    from wsi_mil.features.pool import parse_devices

    expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    assert parse_devices(None) == expected
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert parse_devices(["cpu"]) == ["cpu"]
    with pytest.raises(ConfigError, match="empty"):
        parse_devices(" , ")


def test_one_loader_reads_ahead_across_slides(tiles, monkeypatch):
    """Largest slide first; one DataLoader for all slides, and its decode workers are
    asked for the next slide's tiles before the current slide's last batch is embedded."""
    import wsi_mil.features.pool as pool
    from wsi_mil.features.extract import find_stores, plan_extraction

    events = []
    loaders = []
    real_iter, real_loader = pool._ChunkPlan.__iter__, pool._loader

    def plan_iter(self):
        for item in real_iter(self):
            events.append(("request", self.taken[item.seq].slide_id))
            yield item

    def loader(*args, **kwargs):
        loaders.append(args)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(pool._ChunkPlan, "__iter__", plan_iter)
    monkeypatch.setattr(pool, "_loader", loader)
    tasks, _ = plan_extraction(find_stores(tiles), "builtin", tiles.parent / "f", "none",
                               overwrite=False)  # fmt: skip
    assert tasks[0].n_tiles > tasks[1].n_tiles
    assert [t.slide_id for t in tasks] == ["slide_a", "slide_b"]  # largest first
    job = pool.ExtractJob("builtin", None, "none", batch_size=16, workers=2)
    rows = []

    def emit(msg):
        if msg[0] == "row":
            rows.append(msg[1])
        elif msg[0] == "progress":
            events.append(("embedded", len(rows)))

    pool.run_pool(["cpu"], job, tasks, emit)
    assert [r["status"] for r in rows] == ["ok", "ok"] and len(loaders) == 1
    first_b = events.index(("request", "slide_b"))
    embedded_a = [i for i, e in enumerate(events) if e[0] == "embedded"]
    assert first_b < embedded_a[tasks[0].n_tiles // 16 - 1]  # read ahead into slide_b


def test_corrupt_chunk_fails_only_its_slide(tiles, tmp_path):
    """A tile chunk that cannot be decoded fails its slide; the other slide is embedded."""
    chunk = tiles / "slide_a.zarr" / "tiles" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc frame" * 10)
    rows = _rows(_run(tiles, tmp_path / "f", workers=2))
    assert rows["slide_b"]["status"] == "ok"
    assert rows["slide_a"]["status"] == "failed" and rows["slide_a"]["error"], rows["slide_a"]
    assert not (tmp_path / "f" / "builtin" / "slide_a.h5").exists()


def test_run_device_reports_a_task_without_tiles(tiles):
    """``run_device`` is public: a task with no tiles gets a failed row, not silence."""
    import wsi_mil.features.pool as pool

    task = pool.SlideTask(str(tiles / "slide_a.zarr"), "slide_a", 0, str(tiles / "a.h5"), "x")
    rows = []
    job = pool.ExtractJob("builtin", None, "none", batch_size=16, workers=0)
    pool.run_device("cpu", job, iter([task]), lambda m: rows.append(m[1]) if m[0] == "row" else 0)
    assert [r["status"] for r in rows] == ["failed"] and "has no tiles" in rows[0]["error"]


def test_device_process_stops_taking_slides_when_its_parent_died(monkeypatch):
    import multiprocessing
    import queue
    from types import SimpleNamespace

    import wsi_mil.features.pool as pool

    a, b, c = (SimpleNamespace(slide_id=s) for s in "abc")
    tasks = queue.Queue()
    for item in (a, b, None):
        tasks.put(item)
    said = []
    assert list(pool._queue_iter(tasks, said.append)) == [a, b]  # no parent (main process)
    assert said == [("take", "a"), ("take", "b"), ("end", None)]  # announced to the parent
    tasks.put(c)

    class Dead:
        def is_alive(self):
            return False

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: Dead())
    assert list(pool._queue_iter(tasks, said.append)) == []
    assert tasks.qsize() == 1  # the slide is left for nobody, not embedded
