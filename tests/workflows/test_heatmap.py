"""``heatmap`` on the real path: generated slides → ``tile`` → ``extract --encoder builtin``
→ a brief ``train`` → ``heatmap`` scored from the bags (no re-extraction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wsi_mil.mil.heatmap import score_slide
from wsi_mil.mil.planted import make_planted_cohort, planted_tiles
from wsi_mil.workflows.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """8 patients with a planted region in half, tiled, embedded, trained briefly."""
    root = tmp_path_factory.mktemp("heatmap_run")
    cohort = make_planted_cohort(root, 0.2, n_patients=8, slide_px=1024, seed=3)
    tiles, feats, run = root / "tiles", root / "features", root / "run"
    assert main(["tile", str(cohort.slides), "--out", str(tiles), "--target-mpp", "1.0",
                 "--tile-px", "64", "--stride-px", "32", "--workers", "2"]) == 0  # fmt: skip
    assert main(["extract", str(tiles), "--encoder", "builtin", "--out", str(feats)]) == 0
    argv = ["train", str(cohort.cohort), "--features", str(feats / "builtin"), "--task",
            "classification", "--model", "abmil", "--folds", "2", "--steps", "60",
            "--n-boot", "10", "--device", "cpu", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    return cohort, feats / "builtin", run


def test_contributions_add_up_to_the_prediction(trained) -> None:
    cohort, bags, run = trained
    table = pd.read_csv(cohort.cohort)
    sid = str(table.loc[table["label"] == "pos", "slide_id"].iloc[0])
    for fold in (0, 1):
        s = score_slide(run, sid, [bags], fold=fold)
        assert s.target == "class pos" and s.contribution is not None
        assert s.attention.sum() == pytest.approx(1.0, abs=1e-4)
        p = s.prediction["prob_pos"]
        # two classes: the contributions add up to (logit_pos - logit_neg) / 2; the
        # prediction is shifted back to the training prevalence by the class weights
        head = json.loads((run / f"fold_{fold}" / "fold.json").read_text())["head"]
        w = dict(zip(head["classes"], head["class_weights"], strict=True))
        logit = np.log(p / (1 - p)) + np.log(w["pos"] / w["neg"])
        assert 2 * s.contribution.sum() == pytest.approx(logit, abs=1e-3)


@pytest.mark.slow
def test_heatmap_of_a_trained_run(trained, tmp_path: Path, capsys) -> None:
    cohort, _, run = trained
    table = pd.read_csv(cohort.cohort)
    sid = str(table.loc[table["label"] == "pos", "slide_id"].iloc[0])
    slide = next(cohort.slides.glob(f"{sid}.*"))
    out = tmp_path / "hm"
    argv = ["heatmap", str(run), "--slide", str(slide), "--out", str(out),
            "--sigma-um", "40", "--max-size", "512", "--top-k", "6"]  # fmt: skip
    assert main(argv) == 0
    names = ["_heatmap.png", "_overlay.tif", ".dzi", "_overlay.dzi", "_attention.geojson"]
    for name in [f"{sid}{n}" for n in names] + [f"topk/{sid}_top.png"]:
        assert (out / name).is_file(), name
    options = yaml.safe_load((out / f"{sid}_heatmap.yaml").read_text())
    assert options["formats"] == ["png", "tiff", "dzi", "geojson", "topk"]
    geo = json.loads((out / f"{sid}_attention.geojson").read_text())
    coords = np.array([f["geometry"]["coordinates"][0][0] for f in geo["features"]])
    m = [f["properties"]["measurements"] for f in geo["features"]]
    assert len(coords) == len(m) > 50 and {"score", "attention", "contribution"} <= set(m[0])
    # tile side from the bag: 64 px at 1 µm/px on a 1 µm/px slide, stride 32 (overlap)
    ring = geo["features"][0]["geometry"]["coordinates"][0]
    assert ring[2][0] - ring[0][0] == 64
    truth = planted_tiles(cohort.truth / f"{sid}.npz", coords, 64)
    score = np.array([v["score"] for v in m])
    assert truth.any() and score[truth].mean() > score[~truth].mean()  # planted tiles score higher
    # an attention file of one slide over another slide: refused, exit 2, both named
    other = str(table.loc[table["slide_id"] != sid, "slide_id"].iloc[0])
    att = run / "attention" / f"{other}.h5"
    capsys.readouterr()
    assert main(["heatmap", str(att), "--slide", str(slide), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"'{other}'" in err and f"'{sid}'" in err
