"""Repeated outer cross-validation and the inner model choice (``repeats``, ``search``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.mil.predict import load_ensemble
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.search import candidate_configs, parse_search, pick_candidate
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.train import train_cv


def _null_config(syn: Any, **extra: Any) -> TrainConfig:
    options: dict[str, Any] = {
        "task": "survival",
        "cohort": str(syn.cohort_csv),
        "features": [str(d) for d in syn.features_dirs],
        "model": "mean",
        "model_kwargs": {"hidden_dim": 8, "dropout": 0.0},
        "folds": 3,
        "steps": 30,
        "warmup_steps": 0,
        "eval_every": 10,
        "patience": 20,
        "lr": 3e-3,
        "batch_size": 8,
        "n_boot": 0,
        "device": "cpu",
        "prefetch": 1,
    }
    options.update(extra)
    return TrainConfig(**options)


def test_repeated_cv_on_null_data(tmp_path: Path, event_log: Any) -> None:
    """Features carry no information on survival: the mean C over repeats is near 0.5,
    each repeat has its own splits, and the run folder stays usable by ``predict``."""
    syn = make_synthetic_cohort(
        tmp_path / "d",
        task="survival",
        n_patients=60,
        n_tiles=(4, 8),
        dims=(8,),
        planted_fraction=(0.0, 0.0),
        seed=11,
    )
    run = tmp_path / "run"
    result = train_cv(_null_config(syn, repeats=5), run, callback=event_log)
    summary = result.metrics["repeats"]
    c = summary["pooled"]["harrell_c"]
    assert summary["n"] == 5 and summary["seeds"] == [0, 1, 2, 3, 4]
    assert len(c["values"]) == 5 and c["n_defined"] == 5 and c["sd"] > 0
    assert c["mean"] == pytest.approx(np.mean(c["values"]))
    assert 0.45 <= c["mean"] <= 0.55, c
    # repeat 0 is the run folder itself, as for a single repeat
    assert c["values"][0] == result.metrics["pooled"]["harrell_c"]["value"]
    tests = []
    for r in range(5):
        folder = run if r == 0 else run / f"repeat_{r}"
        splits = json.loads((folder / "splits.json").read_text())
        assert splits["seed"] == r
        tests.append([sorted(f["test"]) for f in splits["folds"]])
        for name in ("predictions.csv", "metrics.json", "fold_0/model.safetensors"):
            assert (folder / name).is_file(), (r, name)
        got = json.loads((folder / "metrics.json").read_text())["pooled"]["harrell_c"]["value"]
        assert got == c["values"][r]
    assert len({json.dumps(t) for t in tests}) == 5  # every repeat has its own partition
    assert {info["repeat"] for info in event_log.of("fold_done")} == set(range(5))
    assert [fm.fold for fm in load_ensemble(run).folds] == [0, 1, 2]  # repeat 0's folds
    # resuming trains nothing
    again = train_cv(_null_config(syn, repeats=5), run)
    assert again.metrics["repeats"]["pooled"]["harrell_c"]["values"] == c["values"]


def test_search_chooses_on_inner_validation_only(tmp_path: Path, event_log: Any) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=24, n_tiles=(4, 8), dims=(8,), seed=4
    )
    config = _null_config(syn, search={"lr": [3e-3, 1e-4], "dropout": [0.0, 0.5]})
    result = train_cv(config, tmp_path / "run", callback=event_log)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    searched = event_log.of("search")
    assert len(searched) == 3 * 4
    for fold in splits["folds"]:
        k = fold["fold"]
        val = set(fold["val"])
        # every loss that ranked candidates or checkpoints is on inner validation patients
        for info in event_log.of("select"):
            if info["fold"] == k:
                assert set(info["patient_ids"]) == val
        meta = json.loads((tmp_path / "run" / f"fold_{k}" / "fold.json").read_text())
        losses = [c["val_loss"] for c in meta["search"]["candidates"]]
        assert losses == [i["val_loss"] for i in searched if i["fold"] == k]
        assert (
            meta["search"]["chosen"]
            == meta["search"]["candidates"][int(np.argmin(losses))]["params"]
        )
        assert meta["aggregator"]["dropout"] == meta["search"]["chosen"]["dropout"]
    # the test patients are predicted only after the choice of their fold
    names = [e for e, _ in event_log.events]
    for k in range(3):
        last_search = max(
            i for i, (e, info) in enumerate(event_log.events) if e == "search" and info["fold"] == k
        )
        first_test = min(
            i
            for i, (e, info) in enumerate(event_log.events)
            if e == "predict" and info["fold"] == k and info["split"] == "test"
        )
        assert last_search < first_test, names
    chosen = result.metrics["search"]["chosen"]
    assert set(chosen) == {"fold_0", "fold_1", "fold_2"}
    assert result.metrics["search"]["grid"] == {"lr": [3e-3, 1e-4], "dropout": [0.0, 0.5]}


def test_search_syntax_and_refusals() -> None:
    grid = parse_search(["lr=1e-3,3e-4", "dropout=0.1,0.25", "hidden-dim=64"])
    assert grid == {"lr": [1e-3, 3e-4], "dropout": [0.1, 0.25], "hidden_dim": [64]}
    config = TrainConfig("survival", "c.csv", ["f"], model_kwargs={"attn_dim": 8}, search=grid)
    cands = candidate_configs(config)
    assert len(cands) == 4
    params, cfg = cands[1]
    assert params == {"lr": 1e-3, "dropout": 0.25, "hidden_dim": 64}
    assert cfg.lr == 1e-3 and cfg.model_kwargs == {"attn_dim": 8, "dropout": 0.25, "hidden_dim": 64}
    assert pick_candidate([0.5, None, 0.4, 0.4]) == 2 and pick_candidate([None]) is None
    for bad in (["lr"], ["lr="], ["lr=1", "lr=2"]):
        with pytest.raises(ConfigError, match="--search"):
            parse_search(bad)
    with pytest.raises(ConfigError, match="--val-fraction > 0"):
        TrainConfig("survival", "c", ["f"], search={"lr": [1e-3]}, val_fraction=0).validate()
    from wsi_mil.mil.search import check_search

    with pytest.raises(ConfigError, match="--search event_weight: cannot be searched"):
        check_search(TrainConfig("survival", "c", ["f"], search={"event_weight": [1, 2]}))
