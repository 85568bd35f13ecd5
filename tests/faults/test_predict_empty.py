"""``wsi-mil predict`` never exits 0 with empty outputs.

Row of the fault matrix: with every bag empty, ``predict`` wrote a header-only CSV and
exited 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.bags import BagError
from wsi_mil.mil.predict import predict_cohort
from wsi_mil.workflows.cli import main


@pytest.fixture
def empty_bags(tmp_path: Path, write_features) -> Path:
    folder = tmp_path / "enc0"
    for sid in ("e1", "e2", "e3"):
        write_features(folder, sid, np.zeros((0, 8), np.float32))
    return folder


def test_cli_exits_2_when_every_bag_is_empty(tiny_run, empty_bags: Path, tmp_path: Path,
                                             capsys) -> None:  # fmt: skip
    out = tmp_path / "preds" / "p.csv"
    code = main(["predict", str(tiny_run.run), "--features", str(empty_bags), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no patient can be predicted" in err
    assert "all 3 slide(s) have empty bags" in err and "e1, e2, e3" in err
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    assert not (out.parent / "p_attention").exists()


def test_cohort_of_empty_bags_is_refused(tiny_run, empty_bags: Path, tmp_path: Path,
                                         write_cohort) -> None:  # fmt: skip
    table = write_cohort(tmp_path / "c.csv", [["P1", "e1", "0"], ["P2", "e2", "1"]])
    with pytest.raises(BagError, match=r"all 2 slide\(s\) have empty bags"):
        predict_cohort(tiny_run.run, [empty_bags], cohort=table, out=tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_partly_empty_still_predicts(tiny_run, empty_bags: Path, tmp_path: Path,
                                     write_features) -> None:  # fmt: skip
    write_features(empty_bags, "full", np.random.default_rng(0).standard_normal((12, 8)))
    table = predict_cohort(tiny_run.run, [empty_bags], out=tmp_path / "p.csv", n_boot=5)
    assert list(table["patient_id"]) == ["full"]
    assert table.attrs["excluded_empty_slides"] == ["e1", "e2", "e3"]
