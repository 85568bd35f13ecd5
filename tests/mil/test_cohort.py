"""Cohort validation: every problem at once, patients grouped whatever the row order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import CohortError
from wsi_mil.mil.cohort import load_cohort, load_omics
from wsi_mil.mil.tabular import TabularPreprocessor


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bags(folder: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        (folder / f"{sid}.h5").write_bytes(b"")  # only existence is checked here
    return folder


def test_groups_slides_by_patient_and_accepts_case_id(tmp_path: Path) -> None:
    csv = _write(
        tmp_path / "c.csv",
        "case_id,slide_id,label\nB,b1,tumour\nA,a1,normal\nB,b2,tumour\n\nA,a2,normal\n",
    )
    cohort = load_cohort(
        csv, task="classification", features_dirs=[_bags(tmp_path / "f", ["a1", "a2", "b1", "b2"])]
    )
    assert cohort.patient_ids == ["B", "A"]
    assert cohort.patients["B"].slide_ids == ["b1", "b2"]
    assert cohort.patients["A"].slide_ids == ["a1", "a2"]
    assert cohort.classes == ("normal", "tumour")


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    csv = _write(
        tmp_path / "bad.csv",
        "patient_id,slide_id,time,event,age\n"
        "P1,s1,10,1,50\n"  # line 2 fine
        "P1,s1,10,1,50\n"  # line 3 duplicate slide
        "P2,s1,5,0,40\n"  # line 4 slide under two patients
        "P3,s3,,1,30\n"  # line 5 missing time
        "P4,s4,abc,1,30\n"  # line 6 unparsable time
        "P5,s5,-3,0,30\n"  # line 7 negative time
        "P6,s6,4,2,30\n"  # line 8 event not 0/1
        "P7,s7,4,1,30\n",  # line 9 bag missing
    )
    feats = _bags(tmp_path / "f", ["s1", "s3", "s4", "s5", "s6"])
    with pytest.raises(CohortError) as err:
        load_cohort(csv, task="survival", features_dirs=[feats], clinical=["age", "stage"])
    text = str(err.value)
    expected = [
        f"{csv}:1: stage: unknown clinical covariate",
        f"{csv}:3: slide_id: duplicate slide id 's1'",
        f"{csv}:4: patient_id: slide 's1' is under patient 'P2'",
        f"{csv}:5: time:",
        f"{csv}:6: time: time 'abc' is not a finite number",
        f"{csv}:7: time: negative time",
        f"{csv}:8: event: event '2' must be 0",
        f"{csv}:9: slide_id: no feature bag",
    ]
    for line in expected:
        assert line in text, line
    # listed in line order, one per line, after a one-line summary
    lines = text.splitlines()[1:]
    assert len(lines) == len(expected)
    assert all(got.startswith(want) for got, want in zip(lines, expected, strict=True))
    assert text.startswith(f"{len(expected)} problem(s)")


def test_missing_columns_and_inconsistent_patient_labels(tmp_path: Path) -> None:
    csv = _write(tmp_path / "c.csv", "slide_id,label\ns1,a\n")
    with pytest.raises(CohortError, match="patient_id: missing column"):
        load_cohort(csv, task="classification")
    csv = _write(tmp_path / "d.csv", "patient_id,slide_id,label\nP,s1,a\nP,s2,b\nQ,s3,\n")
    with pytest.raises(CohortError) as err:
        load_cohort(csv, task="classification")
    assert f"{csv}:3: label: 'b' disagrees with 'a' for patient 'P' on line 2" in str(err.value)
    assert f"{csv}:4: label: missing label" in str(err.value)


def test_unlabelled_rows_allowed_for_inference(tmp_path: Path) -> None:
    csv = _write(tmp_path / "c.csv", "patient_id,slide_id\nP,s1\n")
    cohort = load_cohort(csv, task="survival", require_targets=False)
    assert not cohort.labelled and cohort.patients["P"].time is None


def test_omics_groups_and_errors(tmp_path: Path) -> None:
    omics = _write(tmp_path / "o.csv", "patient_id,g1,g2,g3\nP1,1,2,3\nP2,4,,6\n")
    table = load_omics(omics, group_size=2)
    assert table.groups == [[0, 1], [2]]
    assert np.isnan(table.values[1, 1])
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"pathA": ["g1", "g3"], "pathB": ["g2", "nope"]}))
    with pytest.raises(CohortError, match=r"pathB: columns not in o.csv: \['nope'\]"):
        load_omics(omics, groups=groups)
    groups.write_text(json.dumps({"pathA": ["g1", "g3"], "pathB": ["g2"]}))
    assert load_omics(omics, groups=groups).groups == [[0, 2], [1]]
    bad = _write(tmp_path / "b.csv", "patient_id,g1\nP1,x\nP1,2\n")
    with pytest.raises(CohortError) as err:
        load_omics(bad)
    assert f"{bad}:2: g1: 'x' is not a finite number" in str(err.value)
    assert f"{bad}:3: patient_id: patient 'P1' appears twice" in str(err.value)


def test_preprocessing_is_fitted_on_training_patients_only(tmp_path: Path) -> None:
    csv = _write(
        tmp_path / "c.csv",
        "patient_id,slide_id,label,age,stage\nA,a,0,40,I\nB,b,1,60,II\nC,c,0,1000,III\nD,d,1,,\n",
    )
    omics = _write(tmp_path / "o.csv", "patient_id,g1\nA,1\nB,3\nC,500\n")
    cohort = load_cohort(csv, task="classification", clinical=["age", "stage"], omics=omics)
    pre = TabularPreprocessor.fit(cohort, ["A", "B"])
    x, mask = pre.transform_clinical(cohort, ["A", "B", "C", "D"])
    assert pre.clinical["age"] == {"kind": "numeric", "mean": 50.0, "std": 10.0}
    assert pre.clinical["stage"]["categories"] == ["I", "II"]  # III only in the test patient
    np.testing.assert_allclose(x[:, 0], [-1.0, 1.0, 95.0, 0.0])
    np.testing.assert_array_equal(x[2, 1:], [0.0, 0.0])  # unseen category: all zeros
    np.testing.assert_array_equal(mask, [True, True, True, False])
    om, om_mask = pre.transform_omics(cohort, ["A", "C", "D"])
    np.testing.assert_allclose(om[:, 0], [-1.0, 498.0, 0.0])
    np.testing.assert_array_equal(om_mask, [True, True, False])
    again = TabularPreprocessor.from_state(json.loads(json.dumps(pre.state_dict())))
    np.testing.assert_array_equal(again.transform_clinical(cohort, ["C"])[0], x[2:3])
