"""A slide whose reader crashes natively fails alone, named with the signal; re-runs retry it."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.outputs import read_manifest
from wsi_mil.processes import CRASH_ENV
from wsi_mil.workflows.cli import main

_TILE = ["--tile-px", "64", "--pixels", "none", "--no-qc", "--mask-mpp", "4"]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*") if p.name != ".manifest.csv.lock")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tile_segfault_fails_that_slide_only(small_slides, tmp_path: Path, monkeypatch,
                                             capsys, workers: str) -> None:  # fmt: skip
    out = tmp_path / "tiles"
    args = ["tile", *map(str, small_slides.values()), "--out", str(out), "--workers", workers,
            *_TILE]  # fmt: skip
    monkeypatch.setenv(CRASH_ENV, "large")
    assert main(args) == 1
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["small"]["status"] == "ok"
    assert rows["large"]["status"] == "failed"
    error = rows["large"]["error"]
    assert "worker process died with SIGSEGV while tiling" in error
    assert str(small_slides["large"]) in error
    assert not (out / "large.zarr").exists() and (out / "small.zarr").exists()
    assert _leftovers(out) == []  # no temporaries, no locks
    assert "failed large: worker process died with SIGSEGV" in capsys.readouterr().out
    monkeypatch.delenv(CRASH_ENV)
    assert main(args) == 0  # the re-run retries the failed slide only
    rows = {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["large"]["status"] == "ok" and rows["small"]["status"] == "skipped"


def test_every_slide_crashing_still_finishes_the_batch(small_slides, tmp_path: Path,
                                                        monkeypatch) -> None:  # fmt: skip
    from wsi_mil.workflows.batch import Job, run_batch

    monkeypatch.setenv(CRASH_ENV, "x")
    jobs = [Job("x", "x.svs", dict, {}), Job("y", "y.svs", dict, {"status": "ok"}),
            Job("x", "x2.svs", dict, {})]  # fmt: skip
    rows = run_batch(jobs, workers=1, progress=False, action="reading")
    assert [r["status"] for r in rows] == ["failed", "ok", "failed"]
    assert "SIGSEGV while reading x2.svs" in rows[2]["error"]
