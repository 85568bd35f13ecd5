"""`wsi-mil report` end to end on generated predictions, incl. every kind of bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wsi_mil.errors import OutputExistsError
from wsi_mil.survival.metrics import harrell_c
from wsi_mil.survival.report import load_predictions, make_report
from wsi_mil.survival.validate import SurvivalDataError
from wsi_mil.workflows.cli import main

BOOT = ["--bootstrap", "20"]


def _strict_json(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"report.json holds {name}, which is not valid JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.fixture
def run_dir(tmp_path: Path, make_preds) -> Path:
    df = make_preds(n_patients=90)
    df.loc[df["patient_id"] == "P001", "patient_id"] = "<script>alert('x')</script>"
    df["stage"] = np.where(df["grade"] == 3, "<b>III</b> $x$", "I-II")
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    df.to_csv(run / "predictions.csv", index=False)
    return run


def test_report_end_to_end(run_dir: Path, capsys):
    rc = main(["report", str(run_dir), "--covariates", "age,stage", "--groups", "3", *BOOT])
    assert rc == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    html = (run_dir / "report.html").read_text()
    data = _strict_json(run_dir / "report.json")

    # self-contained: figures embedded, nothing fetched from the network, no scripts
    assert html.count("data:image/png;base64,") == 7
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "&lt;b&gt;III&lt;/b&gt;" in html and "<b>III" not in html
    for name in ("km", "cindex", "auc", "forest", "calibration", "brier", "risk"):
        for ext in ("png", "svg"):
            assert (run_dir / "report_figures" / f"{name}.{ext}").stat().st_size > 1000
    assert (run_dir / "report_figures" / "km.svg").read_text().lstrip().startswith("<?xml")
    config = yaml.safe_load((run_dir / "report_config.yaml").read_text())["report"]
    assert config["groups"] == 3 and config["covariates"] == ["age", "stage"]
    assert not list(run_dir.rglob("*.tmp"))

    # the numbers are the statistics of the test rows
    df = load_predictions(run_dir / "predictions.csv")
    test = df[df["split"] == "test"]
    assert data["cohort"]["patients"] == 90
    assert data["cohort"]["events"] == int(df.drop_duplicates("patient_id")["event"].sum())
    ref = harrell_c(test["time"], test["event"], test["risk"], n_bootstrap=20)
    pooled = data["concordance"]["pooled"]["harrell"]
    assert pooled["estimate"] == pytest.approx(ref.estimate)
    assert pooled["lower"] == pytest.approx(ref.lower)
    for fold in data["concordance"]["per_fold"]:
        te = test[test["fold"] == fold["fold"]]
        assert fold["n_test"] == len(te)
        est = harrell_c(te["time"], te["event"], te["risk"], n_bootstrap=0).estimate
        assert fold["harrell"]["estimate"] == pytest.approx(est)
        assert fold["uno"]["lower"] <= fold["uno"]["estimate"] <= fold["uno"]["upper"]
    strat = data["stratification"]
    for fold, cut in strat["cutoffs"].items():
        train = df[(df["fold"] == int(fold)) & (df["split"] == "train")]["risk"]
        np.testing.assert_allclose(cut, np.quantile(train, [1 / 3, 2 / 3]))
    assert sum(g["n"] for g in strat["groups"]) == len(test)
    assert strat["logrank"]["p_value"] < 0.05
    assert strat["at_risk"]["times"][0] == 0
    assert strat["at_risk"]["high"][0] == next(
        g["n"] for g in strat["groups"] if g["label"] == "high"
    )
    models = {(r["model"], r["variable"]) for r in data["hazard_ratios"]["rows"]}
    assert ("multivariable", "risk group=high") in models
    assert (
        "univariate",
        "stage=I-II",
    ) in models  # categorical: first sorted level is the reference
    assert len(data["time_auc"]["auc"]) == len(data["time_auc"]["times"]) >= 3
    assert 0 < data["brier"]["ibs"] < data["brier"]["ibs_km"]  # real signal beats KM
    assert data["cohort"]["median_follow_up"] > 0
    assert data["summary"][0].startswith("90 patients")
    assert all(line in html for line in data["summary"][:1])


def test_covariates_of_a_training_run_come_from_its_cohort(tmp_path: Path, make_preds):
    """A training run's predictions.csv has no clinical columns: the report joins them
    from the cohort its config.yaml names, one value per patient."""
    df = make_preds(n_patients=60)
    run = tmp_path / "run"
    run.mkdir()
    df.drop(columns=["age"]).to_csv(run / "predictions.csv", index=False)
    patients = df.drop_duplicates("patient_id")[["patient_id", "age"]]
    cohort = pd.concat(
        [patients.assign(slide_id=patients["patient_id"] + s) for s in "ab"], ignore_index=True
    )
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"cohort": str(tmp_path / "cohort.csv")}))
    joined = load_predictions(run / "predictions.csv", ["age"])
    assert joined["age"].tolist() == df["age"].tolist()
    assert make_report(run, covariates=["age"], n_bootstrap=10).json.is_file()

    cohort.loc[cohort.index[-1], "age"] = -1.0  # one slide of a patient disagrees
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    with pytest.raises(SurvivalDataError, match="one value per patient"):
        load_predictions(run / "predictions.csv", ["age"])


def test_report_from_csv_with_out_and_times(tmp_path: Path, make_preds):
    csv = tmp_path / "preds.csv"
    make_preds(n_patients=60, clinical=False).to_csv(csv, index=False)
    out = tmp_path / "out"
    res = make_report(csv, out, times=[10.0, 20.0], n_bootstrap=10)
    assert res.html == out / "report.html" and res.html.exists()
    assert res.data["time_auc"]["times"] == [10.0, 20.0]
    assert res.data["parameters"]["times"] == [10.0, 20.0]
    assert res.data["input"]["sha256"] and res.data["input"]["rows"] == 180
    assert not (tmp_path / "report.html").exists()


def test_refuses_to_overwrite_report_of_other_input(run_dir: Path, capsys, make_preds):
    assert main(["report", str(run_dir), *BOOT]) == 0
    first = (run_dir / "report.json").read_text()
    # same input: regenerating is fine
    assert main(["report", str(run_dir), "--bootstrap", "5"]) == 0
    other = run_dir.parent / "other.csv"
    make_preds(n_patients=40, seed=3).to_csv(other, index=False)
    capsys.readouterr()
    assert main(["report", str(other), "--out", str(run_dir), *BOOT]) == 2
    err = capsys.readouterr().err
    assert "different input" in err and "--force" in err
    with pytest.raises(OutputExistsError):
        make_report(other, run_dir, n_bootstrap=5)
    assert json.loads((run_dir / "report.json").read_text())["input"] == json.loads(first)["input"]
    assert main(["report", str(other), "--out", str(run_dir), "--force", *BOOT]) == 0
    assert json.loads((run_dir / "report.json").read_text())["input"]["path"] == str(
        other.resolve()
    )


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "predictions.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("time", -3.0, r"column 'time' must be finite and >= 0; line 7 of predictions.csv"),
        ("time", np.nan, r"column 'time' must be finite and >= 0; line 7 .* has nan"),
        ("event", 2, r"column 'event' must be 0 \(censored\) or 1 \(event\); line 7 .* has 2"),
        ("risk", np.nan, r"column 'risk' must be finite; line 7 of predictions.csv"),
        ("split", "validation", r"column 'split' must be 'train' or 'test'; line 7"),
    ],
)
def test_bad_values_name_column_and_line(tmp_path, make_preds, capsys, column, value, message):
    df = make_preds(n_patients=20)
    df[column] = df[column].astype(object)
    df.loc[5, column] = value  # CSV line 7: header + 0-based row 5
    path = _write(tmp_path, df)
    assert main(["report", str(path), *BOOT]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "(patient_id 'P005')" in err
    assert not (tmp_path / "report.html").exists()


def test_missing_columns_and_inconsistent_rows(tmp_path, make_preds):
    df = make_preds(n_patients=20)
    with pytest.raises(SurvivalDataError, match=r"required column.*'risk' missing"):
        load_predictions(_write(tmp_path, df.drop(columns="risk")))
    with pytest.raises(SurvivalDataError, match=r"covariate column.*'stage' missing"):
        load_predictions(_write(tmp_path, df), ["stage"])
    bad = df.copy()
    bad.loc[bad.index[-1], "time"] = bad["time"].iloc[-1] + 5
    with pytest.raises(SurvivalDataError, match="differs between rows of the same patient"):
        load_predictions(_write(tmp_path, bad))
    dup = pd.concat([df, df.iloc[[3]]], ignore_index=True)
    with pytest.raises(SurvivalDataError, match=f"line {len(df) + 2} .* repeats fold"):
        load_predictions(_write(tmp_path, dup))
    with pytest.raises(SurvivalDataError, match="no row has split 'test'"):
        load_predictions(_write(tmp_path, df[df["split"] == "train"]))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(SurvivalDataError, match=r"without predictions\.csv"):
        make_report(empty_dir, n_bootstrap=0)
    with pytest.raises(SurvivalDataError, match="does not exist"):
        make_report(tmp_path / "missing.csv", n_bootstrap=0)


def _undefined_cases(make_preds) -> dict[str, tuple[pd.DataFrame, list[str], str]]:
    base = make_preds(n_patients=24)
    no_events = base.assign(event=0)
    single = base[base["patient_id"] == "P000"]
    tied = base.assign(time=5.0)
    constant = base.assign(site=1.0)
    return {
        "no events": (no_events, [], "Harrell's C, pooled: not defined — no events"),
        "single patient": (single, [], "a single patient"),
        "all times tied": (tied, [], "all follow-up times are equal"),
        "constant covariate": (constant, ["age", "site"], "covariate 'site' is constant"),
    }


@pytest.mark.parametrize(
    "case", ["no events", "single patient", "all times tied", "constant covariate"]
)
def test_undefined_statistics_are_reported_not_raised(tmp_path, make_preds, case):
    df, covariates, expected = _undefined_cases(make_preds)[case]
    res = make_report(_write(tmp_path, df), covariates=covariates, n_bootstrap=10)
    html = res.html.read_text()
    assert expected in unescape(html)
    assert res.data["notes"]
    _strict_json(res.json)


def test_import_is_cheap():
    code = (
        "import sys, wsi_mil.survival, wsi_mil.workflows.commands.report;"
        "heavy = [m for m in ('torch', 'matplotlib', 'lifelines', 'sksurv', 'pandas') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_package_exports_resolve():
    import importlib

    import wsi_mil.survival as survival

    assert sorted(survival.__all__) == sorted(survival._WHERE)
    for name in survival.__all__:
        obj = getattr(survival, name)
        module = importlib.import_module(f"wsi_mil.survival.{survival._WHERE[name]}")
        assert obj is getattr(module, name)
        assert name in module.__all__


def test_cindex_figure_with_a_ci_that_excludes_the_estimate() -> None:
    """A percentile bootstrap CI from a few resamples can miss the estimate."""
    from wsi_mil.survival.figures import _fig_cindex

    off = {"estimate": 0.7, "lower": 0.72, "upper": 0.9}
    data = {"concordance": {"tau": 10.0, "per_fold": [{"fold": 0, "harrell": off, "uno": off}],
                            "pooled": {"harrell": off, "uno": {"estimate": None}}}}  # fmt: skip
    assert _fig_cindex(data) is not None
