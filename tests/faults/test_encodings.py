"""Cohort, omics and ``--mpp-csv`` tables that are not UTF-8: one line, exit 2.

Rows of the fault matrix: a cohort saved by a spreadsheet as Windows-1252 (with a
non-ASCII name) or as UTF-16 gave a raw ``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.errors import CohortError, ConfigError
from wsi_mil.mil.cohort import load_cohort, load_omics, read_utf8_text
from wsi_mil.workflows.cli import main

ROWS = [["Pé", "s1", "0"], ["P2", "s2", "1"]]


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [("cp1252", ":2: byte 0xe9 is not valid UTF-8"), ("utf-16", "UTF-16/UTF-32")],
)
def test_cohort_not_utf8(tmp_path: Path, write_cohort, encoding: str, expected: str) -> None:
    table = write_cohort(tmp_path / "cohort.csv", ROWS, encoding=encoding)
    with pytest.raises(CohortError) as info:
        load_cohort(table, task="classification")
    message = str(info.value)
    assert str(table) in message and expected in message and "re-save it as UTF-8" in message
    assert "\n" not in message


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_cohort_utf8_with_or_without_bom(tmp_path: Path, write_cohort, encoding: str) -> None:
    table = write_cohort(tmp_path / "cohort.csv", ROWS, encoding=encoding)
    cohort = load_cohort(table, task="classification")
    assert cohort.patient_ids == ["Pé", "P2"]


def test_nul_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"patient_id,slide_id\x00\n")
    with pytest.raises(ConfigError, match="NUL bytes"):
        read_utf8_text(path, ConfigError)


def test_omics_table_not_utf8(tmp_path: Path) -> None:
    table = tmp_path / "omics.csv"
    table.write_bytes("patient_id,GÈNE\nP1,1.5\n".encode("cp1252"))
    with pytest.raises(CohortError, match=rf"{table}:1: byte 0xc8 .*re-save it as UTF-8"):
        load_omics(table)


def test_predict_cli_with_cp1252_cohort(tiny_run, tmp_path: Path, write_cohort, capsys) -> None:
    table = write_cohort(tmp_path / "cohort.csv", ROWS, encoding="cp1252")
    out = tmp_path / "p.csv"
    code = main(["predict", str(tiny_run.run), "--features", str(tiny_run.syn.features_dirs[0]),
                 "--cohort", str(table), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{table}:2:" in err and "UTF-8" in err and not out.exists()


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16"])
def test_tile_mpp_csv_not_utf8(small_slides, tmp_path: Path, encoding: str, capsys) -> None:
    table = tmp_path / "mpp.csv"
    table.write_bytes("slide_id,mpp\nsmall,0.5\nsmällér,0.25\n".encode(encoding))
    out = tmp_path / "tiles"
    code = main(["tile", str(small_slides["small"]), "--out", str(out), "--mpp-csv", str(table)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--mpp-csv {table}" in err and "re-save it as UTF-8" in err
    assert not list(out.glob("*.zarr"))


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16"])
def test_run_cli_refuses_before_tiling(small_slides, tmp_path: Path, write_cohort, encoding: str,
                                       capsys) -> None:  # fmt: skip
    table = write_cohort(tmp_path / "cohort.csv", ROWS, encoding=encoding)
    out = tmp_path / "out"
    code = main(["run", str(small_slides["small"]), str(table), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(table) in err and "re-save it as UTF-8" in err
    assert not (out / "tiles").exists()


def test_run_validates_the_whole_cohort_before_tiling(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,slide_id,label\nP1,S1,a\nP2,,b\nP3,../x,a\n")
    out = tmp_path / "out"
    assert main(["run", str(slides), str(cohort), "--out", str(out)]) == 2
    assert not (out / "tiles").exists()
