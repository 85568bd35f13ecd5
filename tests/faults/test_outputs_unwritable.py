"""Unwritable output folders: one line and exit 2 naming the folder, before any compute.

Rows of the fault matrix: read-only or full output folders gave raw tracebacks in
extract/train/report/predict/heatmap. The check really writes a probe file, so it holds
for root too (for whom permission bits do not prevent writes); the tests block the
folder with a regular file in its path, which stops root as well.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from wsi_mil.errors import OutputNotWritableError, WsiMilError
from wsi_mil.outputs import ensure_writable
from wsi_mil.workflows.cli import main


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A folder path that cannot be created: its parent is a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "out"


def test_ensure_writable_creates_and_leaves_nothing(tmp_path: Path) -> None:
    folder = ensure_writable(tmp_path / "new" / "deep")
    assert folder.is_dir() and not list(folder.iterdir())


def test_ensure_writable_names_the_folder(blocked: Path) -> None:
    with pytest.raises(OutputNotWritableError, match=rf"--out: output folder {blocked} is not"):
        ensure_writable(blocked)
    assert issubclass(OutputNotWritableError, WsiMilError)
    assert issubclass(OutputNotWritableError, PermissionError)


def test_ensure_writable_probes_by_writing(tmp_path: Path, monkeypatch) -> None:
    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputNotWritableError, match=r"No space left on device.*--report"):
        ensure_writable(tmp_path, what="--report")
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a read-only /proc")
def test_read_only_file_system() -> None:
    with pytest.raises(OutputNotWritableError, match="/proc/wsi-mil-test-out"):
        ensure_writable("/proc/wsi-mil-test-out")


def _check(code: int, err: str, folder: Path) -> None:
    assert code == 2, err
    assert "not writable" in err and str(folder) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tile(small_slides, blocked: Path, capsys) -> None:
    code = main(["tile", str(small_slides["small"]), "--out", str(blocked)])
    _check(code, capsys.readouterr().err, blocked)


def test_extract_before_anything_else(tmp_path: Path, blocked: Path, capsys) -> None:
    code = main(["extract", str(tmp_path / "no_tiles_yet"), "--out", str(blocked)])
    _check(code, capsys.readouterr().err, blocked)


def test_predict(tiny_run, blocked: Path, tmp_path: Path, capsys) -> None:
    features = str(tiny_run.syn.features_dirs[0])
    out = blocked / "p.csv"
    code = main(["predict", str(tiny_run.run), "--features", features, "--out", str(out)])
    _check(code, capsys.readouterr().err, blocked)
    code = main(["predict", str(tiny_run.run), "--features", features, "--out",
                 str(tmp_path / "p.csv"), "--attention-dir", str(blocked)])  # fmt: skip
    err = capsys.readouterr().err
    _check(code, err, blocked)
    assert "--attention-dir" in err and not (tmp_path / "p.csv").exists()


def test_heatmap(small_slides, blocked: Path, tmp_path: Path, capsys) -> None:
    code = main(["heatmap", str(tmp_path), "--slide", str(small_slides["small"]), "--out",
                 str(blocked)])  # fmt: skip
    _check(code, capsys.readouterr().err, blocked)


def test_report(tiny_run, blocked: Path, capsys) -> None:
    code = main(["report", str(tiny_run.run), "--out", str(blocked)])
    _check(code, capsys.readouterr().err, blocked)


def test_run_before_tiling(small_slides, blocked: Path, tmp_path: Path, write_cohort,
                           capsys) -> None:  # fmt: skip
    table = write_cohort(tmp_path / "cohort.csv", [["P1", "small", "0"]])
    code = main(["run", str(small_slides["small"]), str(table), "--out", str(blocked)])
    _check(code, capsys.readouterr().err, blocked)


def test_train_before_any_training(tmp_path: Path) -> None:
    from wsi_mil.mil.synthetic import make_synthetic_cohort

    syn = make_synthetic_cohort(tmp_path / "d", n_patients=6, n_tiles=(5, 10), dims=(4,))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["train", str(syn.cohort_csv), "--features", str(syn.features_dirs[0]),
            "--task", "classification", "--folds", "2", "--out", str(blocker / "run")]  # fmt: skip
    assert main(argv) == 2
