"""Training learns with its defaults on the real path: generated slides → ``tile`` →
``extract --encoder builtin`` → ``train`` (no training option but task and model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from wsi_mil.features.bags import read_bag
from wsi_mil.mil.attention import read_attention
from wsi_mil.mil.co_attention import read_co_attention
from wsi_mil.mil.planted import make_multimodal_cohort, make_planted_cohort, planted_tiles
from wsi_mil.workflows.cli import main


@pytest.fixture(scope="module")
def planted15(tmp_path_factory: pytest.TempPathFactory):
    """40 patients, a region of ~15 % of the tissue in half of them, tiled and embedded."""
    root = tmp_path_factory.mktemp("planted15")
    cohort = make_planted_cohort(root, 0.15, n_patients=40, slide_px=2048, seed=1)
    tiles, feats = root / "tiles", root / "features"
    assert main(["tile", str(cohort.slides), "--out", str(tiles), "--target-mpp", "1.0",
                 "--tile-px", "128", "--workers", "2"]) == 0  # fmt: skip
    assert main(["extract", str(tiles), "--encoder", "builtin", "--out", str(feats)]) == 0
    return cohort, feats / "builtin"


def test_planted_cohort_has_one_region_of_the_asked_size(planted15) -> None:
    cohort, _ = planted15
    table = pd.read_csv(cohort.cohort)
    assert len(table) == 40 and (table["label"] == "pos").sum() == 20
    for row in table.itertuples():
        with np.load(cohort.truth / f"{row.slide_id}.npz") as truth:
            region, tissue = truth["region"], truth["tissue"]
        share = region.sum() / tissue.sum()
        assert share == pytest.approx(row.planted_share, abs=1e-4)
        if row.label == "neg":
            assert not region.any()
        else:
            assert 0.08 <= share <= 0.2
            assert ndimage.label(region, structure=np.ones((3, 3)))[1] == 1  # contiguous


def test_planted_tiles_reads_the_truth_at_tile_resolution(tmp_path: Path) -> None:
    region = np.zeros((10, 10), bool)
    region[2:6, 4:8] = True  # mask px of 8 level-0 px (mask_mpp 4, mpp 0.5)
    np.savez(tmp_path / "t.npz", region=region, tissue=region | True, mask_mpp=4.0, mpp=0.5)
    coords = np.array([[32, 16], [48, 32], [0, 0], [56, 40]])  # 16-px tiles
    assert planted_tiles(tmp_path / "t.npz", coords, 16).tolist() == [True, True, False, False]


@pytest.mark.slow
def test_abmil_learns_with_default_options(planted15, tmp_path: Path) -> None:
    cohort, bags = planted15
    run = tmp_path / "run"
    argv = ["train", str(cohort.cohort), "--features", str(bags), "--task", "classification",
            "--model", "abmil", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pooled"]["auc"]["value"] >= 0.9
    # the out-of-fold attention points at the planted region
    table = pd.read_csv(cohort.cohort)
    scores = []
    for slide_id in table.loc[table["label"] == "pos", "slide_id"]:
        att = read_attention(run / "attention" / f"{slide_id}.h5")
        tile = int(att.attrs["tile_level0"])
        truth = planted_tiles(cohort.truth / f"{slide_id}.npz", att.coords, tile)
        scores.append(roc_auc_score(truth, att.attention))
    assert float(np.mean(scores)) >= 0.8


def _harrell(table: pd.DataFrame, score: pd.Series) -> float:
    return float(concordance_index_censored(table["event"].astype(bool), table["time"], score)[0])


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("WSI_MIL_FUSION_TEST"),
    reason="opt-in (WSI_MIL_FUSION_TEST=1): 7-10 minutes on 2 cores, longer than the "
    "rest of the learning tests together",
)
def test_dual_xattn_fuses_histology_and_omics(planted15, tmp_path: Path) -> None:
    """Log hazard ``2 h + 1.5 z``: the planted region (``h``) and one gene group of eight
    (``z``) each carry part of it, and even the *true* value of either alone orders the
    40 patients with C < 0.7 (0.664 and 0.676; the true log hazard: 0.79).
    ``dual_xattn``, trained with its defaults on the tiles and the omics table (a fifth
    of the patients without omics), must reach the issue's C of 0.7 out of fold, above
    either truth alone, and its context linear path must give the informative group
    ``G00`` the largest mean coefficient of the eight. (Measured 2026-11-30: C 0.730
    with the current defaults, the context lasso adjusted for the histology path and
    that path trained as ``abmil``: ``G00`` kept in 4 of 5 folds, 0.72 ± 0.43. Earlier
    versions: 0.695 before the histology warm start, 0.679 with it, 0.697 with the
    early-stopped context linear path, 0.679 with the lasso fitted alone.)
    Its co-attention files are aligned with each slide's tiles."""
    cohort, bags = planted15
    mm = make_multimodal_cohort(cohort, tmp_path / "mm", histology_effect=2.0, omics_effect=1.5,
                                n_groups=8, group_size=5, missing=0.2, seed=2)  # fmt: skip
    table = pd.read_csv(mm.cohort, dtype={"patient_id": str}).set_index("patient_id")
    alone = [_harrell(table, table[c]) for c in ("planted_share", "omics_signal")]
    assert max(alone) < 0.7  # the truth of either modality alone: weaker
    run = tmp_path / "run"
    argv = ["train", str(mm.cohort), "--features", str(bags), "--task", "survival",
            "--model", "dual_xattn", "--omics", str(mm.omics), "--omics-groups",
            str(mm.groups), "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    c_index = metrics["pooled"]["harrell_c"]["value"]
    assert c_index >= 0.7 and c_index > max(alone)
    summary = pd.read_csv(run / "co_attention_summary.csv").set_index("token")
    assert summary["linear_coef"].abs().idxmax() == "G00" and summary.loc["G00", "linear_coef"] > 0
    without = set(table.index) - set(pd.read_csv(mm.omics, dtype={"patient_id": str})["patient_id"])
    for row in table.itertuples():
        co = read_co_attention(run / "co_attention" / f"{row.slide_id}.h5")
        np.testing.assert_array_equal(co.coords, read_bag(bags / f"{row.slide_id}.h5").coords)
        assert co.tokens[0] == "G00" and co.co_attention.shape == (8, len(co.coords))
        assert co.attrs["tile_level0"] > 0 and "source_sha256" in co.attrs
        assert (co.weights.sum() == 0) == (row.Index in without)
