"""Path containment: ids that would escape an output folder are refused.

Rows of the fault matrix: a cohort ``slide_id`` such as ``../../../X`` or an absolute
path made ``train``/``predict`` write attention outside the run, once over an input bag.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import CohortError, UnsafePathError, WsiMilError
from wsi_mil.features.bags import bag_path
from wsi_mil.mil.attention import write_attention
from wsi_mil.mil.cohort import load_cohort
from wsi_mil.mil.data import BagStore, Unit
from wsi_mil.mil.unit_attention import write_unit_attention
from wsi_mil.outputs import contained_path, id_problem
from wsi_mil.tiling.pipeline import store_path
from wsi_mil.workflows.cli import main

BAD_IDS = ["../../../X", "/abs/x", "a\\b", "..", ".", "C:evil", "tab\there", "bell\x07"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_id_problem_names_the_reason(bad: str) -> None:
    assert id_problem(bad)
    assert id_problem("TCGA-AB-1234-01Z.svs_x") is None and id_problem("a..b") is None


def test_cohort_lists_every_unsafe_id_with_its_line(tmp_path: Path, write_cohort) -> None:
    rows = [[f"P{i}", bad, "0"] for i, bad in enumerate(BAD_IDS)]
    rows += [["../p", "fine", "1"], ["ok", "ok_slide", "1"]]
    table = write_cohort(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError) as info:
        load_cohort(table, task="classification")
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{len(BAD_IDS) + 1} problem(s)")
    for i, bad in enumerate(BAD_IDS, start=2):
        assert any(line.startswith(f"{table}:{i}: slide_id: slide id {bad!r}") for line in lines), (
            bad
        )
    assert f"{table}:{len(BAD_IDS) + 2}: patient_id: patient id '../p' contains a path" in str(
        info.value
    )


def test_contained_path_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "out"
    assert contained_path(root, "qc", "s.png") == root / "qc" / "s.png"
    assert contained_path(root, "a..b.h5") == root / "a..b.h5"
    for parts in (("../x.h5",), ("/etc/x",), ("qc", "../../x"), ("..",), (".",), ("a\0.h5",)):
        with pytest.raises(UnsafePathError, match="refusing to write"):
            contained_path(root, *parts)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        contained_path(root, "link", "x.h5")


def test_store_and_bag_paths_are_contained(tmp_path: Path) -> None:
    assert store_path(tmp_path, "s1") == tmp_path / "s1.zarr"
    with pytest.raises(UnsafePathError):
        store_path(tmp_path, "../s1")
    with pytest.raises(UnsafePathError):
        bag_path(tmp_path, "builtin", "/abs/s1")
    with pytest.raises(UnsafePathError):
        bag_path(tmp_path, "..", "s1")


def test_unit_attention_never_writes_outside(tmp_path: Path, write_features) -> None:
    features = tmp_path / "features"
    features.mkdir()
    victim = write_features(tmp_path, "victim", np.ones((3, 4), np.float32))  # ../victim.h5
    before = _sha(victim)
    store = BagStore([features], cache_bytes=0)
    unit = Unit("../victim", "p1", ("../victim",))
    with pytest.raises(UnsafePathError, match="victim"):
        write_unit_attention(
            features, store, [unit], [np.ones(3)], source="ensemble", model_name="abmil"
        )
    assert _sha(victim) == before


def test_predict_refuses_a_cohort_aimed_at_an_input_bag(tiny_run, tmp_path: Path, write_cohort,
                                                       capsys) -> None:  # fmt: skip
    enc0 = tiny_run.syn.features_dirs[0]
    victim = sorted(enc0.glob("*.h5"))[0]
    before = _sha(victim)
    sneaky = f"../{enc0.name}/{victim.stem}"  # enc0/<sneaky>.h5 exists; att/<sneaky>.h5 = victim
    table = write_cohort(tmp_path / "cohort.csv", [["P1", sneaky, "0"]])
    out = tmp_path / "preds" / "p.csv"
    code = main(["predict", str(tiny_run.run), "--features", str(enc0), "--cohort", str(table),
                 "--out", str(out), "--attention-dir", str(enc0.parent / "att")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"{table}:2: slide_id: slide id {sneaky!r} contains a path separator" in err
    assert _sha(victim) == before and not out.exists()
    assert not list((enc0.parent / "att").glob("*.h5"))


def test_heatmap_refuses_a_slide_id_from_the_attention_file(small_slides, tmp_path: Path,
                                                            capsys) -> None:  # fmt: skip
    att = tmp_path / "att.h5"
    coords = np.array([[0, 0], [64, 0]], np.int64)
    write_attention(att, np.array([0.2, 0.8]), coords, attrs={"slide_id": "../../evil",
                                                              "tile_level0": 64})  # fmt: skip
    out = tmp_path / "a" / "b" / "out"
    code = main(["heatmap", str(att), "--slide", str(small_slides["small"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to write" in err and "evil" in err
    assert not list(tmp_path.rglob("*evil*"))


def test_unsafe_path_error_is_a_user_error() -> None:
    assert issubclass(UnsafePathError, WsiMilError) and issubclass(UnsafePathError, ValueError)
