"""Training: learning a planted signal, no test-fold leakage, run folder, resume, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from wsi_mil.errors import CohortError, ConfigError, OutputExistsError
from wsi_mil.features.bags import BagError, write_bag
from wsi_mil.mil.attention import read_attention
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.train import train_cv


def test_classification_learns_planted_signal(classification_run: Any) -> None:
    pooled = classification_run.result.metrics["pooled"]
    assert pooled["auc"]["value"] >= 0.9
    assert pooled["auc"]["ci_low"] <= pooled["auc"]["value"] <= pooled["auc"]["ci_high"]
    assert set(classification_run.result.metrics["folds"]) == {"0", "1", "2"}


def test_planted_tiles_get_the_highest_attention(classification_run: Any) -> None:
    run = classification_run.result.out
    syn = classification_run.syn
    top_hits, ratios = [], []
    for sid, planted in syn.planted.items():
        att = read_attention(run / "attention" / f"{sid}.h5")
        assert att.attention.shape == planted.shape and att.attrs["source"].startswith("fold_")
        if planted.sum() == 0:
            continue
        top = np.argsort(-att.attention)[: int(planted.sum())]
        top_hits.append(planted[top].mean())
        ratios.append(att.attention[planted].mean() / att.attention[~planted].mean())
    assert len(top_hits) == 15
    # the top-attended tiles are the planted ones (chance: 0.15; a GPU run gave 0.7986)
    assert float(np.mean(top_hits)) >= 0.75
    assert float(np.median(ratios)) >= 3.0  # several times the attention of other tiles


def test_test_fold_never_reaches_selection(classification_run: Any) -> None:
    splits = json.loads((classification_run.result.out / "splits.json").read_text())
    events = classification_run.log.events
    for fold in splits["folds"]:
        k, test = fold["fold"], set(fold["test"])
        selects = [i for e, i in events if e == "select" and i["fold"] == k]
        assert selects, "early stopping must evaluate the inner validation split"
        for info in selects:
            assert not set(info["patient_ids"]) & test
            assert set(info["patient_ids"]) == set(fold["val"])
        order = [(e, i.get("split")) for e, i in events if i.get("fold") == k]
        first_test = order.index(("predict", "test"))
        assert all(e != "select" for e, _ in order[first_test:])  # nothing chosen after


def test_run_folder_contents(classification_run: Any) -> None:
    out = classification_run.result.out
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"] == "classification" and config["folds"] == 3
    assert Path(config["cohort"]).is_absolute()
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str, "label": str})
    # exactly the columns of DESIGN.md's run-folder contract
    assert list(preds.columns) == ["patient_id", "fold", "split", "label", "prob_0", "prob_1"]
    assert set(preds["split"]) == {"train", "test"}
    assert len(preds) == 3 * 30  # one row per fold and patient
    assert preds.groupby("patient_id")["split"].apply(lambda s: (s == "test").sum()).eq(1).all()
    np.testing.assert_allclose(preds[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-6)
    for k in range(3):
        state = load_file(out / f"fold_{k}" / "model.safetensors")
        assert state and json.loads((out / f"fold_{k}" / "fold.json").read_text())["fold"] == k
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded_empty_slides"] == [] and metrics["n_patients"] == 30
    assert metrics["n_excluded_empty_slides"] == 0
    splits = json.loads((out / "splits.json").read_text())
    for fold in splits["folds"]:  # outer test fold and inner validation ids, disjoint
        assert fold["val"] and fold["test"] and fold["train"]
        assert not set(fold["val"]) & set(fold["test"])
        assert not set(fold["train"]) & (set(fold["val"]) | set(fold["test"]))
    assert not list(out.rglob("*.tmp"))


def test_survival_learns_planted_signal(survival_run: Any) -> None:
    metrics = survival_run.result.metrics
    assert metrics["pooled"]["harrell_c"]["value"] >= 0.7
    assert metrics["pooled"]["uno_c"]["value"] is not None
    preds = survival_run.result.predictions
    assert {"time", "event", "risk"} <= set(preds.columns)
    assert (survival_run.result.out / "report.html").is_file()
    # every Cox training batch had an event (event-aware sampler): loss never zero
    history = json.loads((survival_run.result.out / "fold_0" / "fold.json").read_text())["history"]
    assert all(v > 0 for v in history["train"])


def test_interrupted_training_resumes(
    tiny_cohort: Any, make_config: Any, event_log: Any, tmp_path: Path
) -> None:
    config = make_config(tiny_cohort, "classification", folds=3, steps=8, n_boot=10)
    out = tmp_path / "run"

    def interrupt(event: str, info: dict[str, Any]) -> None:
        if event == "fold_done" and info["fold"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(config, out, callback=interrupt)
    assert (out / "fold_0" / "model.safetensors").is_file() and (out / "fold_1").is_dir()
    assert not (out / "fold_2").exists() and not (out / "predictions.csv").exists()
    splits = (out / "splits.json").read_text()
    result = train_cv(config, out, callback=event_log)
    assert result.resumed_folds == [0, 1]
    assert {i["fold"] for i in event_log.of("eval")} == {2}
    assert (out / "splits.json").read_text() == splits
    assert len(result.predictions) == 3 * 12


def test_deterministic_on_cpu(tiny_cohort: Any, make_config: Any, tmp_path: Path) -> None:
    config = make_config(tiny_cohort, "classification", folds=2, steps=8, n_boot=0)
    a = train_cv(config, tmp_path / "a").predictions
    b = train_cv(config, tmp_path / "b").predictions
    pd.testing.assert_frame_equal(a, b)


def test_refuses_run_folder_with_other_config(
    tiny_cohort: Any, make_config: Any, tmp_path: Path
) -> None:
    train_cv(make_config(tiny_cohort, "classification", folds=2, steps=4, n_boot=0), tmp_path / "r")
    with pytest.raises(OutputExistsError, match=r"steps: 4 -> 8.*resume it, or pick a new --out"):
        train_cv(
            make_config(tiny_cohort, "classification", folds=2, steps=8, n_boot=0), tmp_path / "r"
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not a wsi-mil run"):
        train_cv(make_config(tiny_cohort, "classification", folds=2, steps=4), tmp_path / "other")


def test_empty_bags_are_excluded_and_counted(tmp_path: Path, make_config: Any) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d", n_patients=8, n_tiles=(10, 20), dims=(8,), empty_slides=2
    )
    result = train_cv(
        make_config(syn, "classification", folds=2, steps=4, n_boot=0), tmp_path / "r"
    )
    assert len(result.metrics["excluded_empty_slides"]) == 2
    assert result.metrics["n_excluded_empty_slides"] == 2
    assert not any(
        (result.out / "attention" / f"{s}.h5").exists()
        for s in result.metrics["excluded_empty_slides"]
    )


def test_bad_inputs(tmp_path: Path, tiny_cohort: Any, make_config: Any) -> None:
    folder = tiny_cohort.features_dirs[0]
    sid = next(iter(tiny_cohort.planted))
    rng = np.random.default_rng(0)
    write_bag(
        folder / f"{sid}.h5",
        rng.standard_normal((5, 3)),
        np.zeros((5, 2)),
        attrs={
            "encoder": "e",
            "weights_sha256": "x",
            "target_mpp": 0.5,
            "tile_px": 224,
            "slide_id": sid,
        },
    )
    with pytest.raises(BagError, match=f"{sid}.h5: feature dim 3 differs from dim 8"):
        train_cv(make_config(tiny_cohort, "classification"), tmp_path / "r1")
    syn = make_synthetic_cohort(tmp_path / "few", n_patients=3, n_tiles=(5, 5), dims=(4,))
    with pytest.raises(CohortError, match="3 patient"):
        train_cv(make_config(syn, "classification", folds=5), tmp_path / "r2")
    syn = make_synthetic_cohort(
        tmp_path / "surv", task="survival", n_patients=6, n_tiles=(5, 5), dims=(4,)
    )
    csv = syn.cohort_csv.read_text().splitlines()
    header = csv[0].split(",")
    ev = header.index("event")
    rows = [",".join("0" if i == ev else v for i, v in enumerate(r.split(","))) for r in csv[1:]]
    syn.cohort_csv.write_text("\n".join([csv[0], *rows]) + "\n")
    with pytest.raises(CohortError, match="no events"):
        train_cv(make_config(syn, "survival", folds=2), tmp_path / "r3")
    with pytest.raises(ConfigError, match="--level"):
        train_cv(make_config(syn, "survival", level="tile"), tmp_path / "r4")
    few = make_synthetic_cohort(tmp_path / "cls", n_patients=6, n_tiles=(5, 5), dims=(4,))
    with pytest.raises(ConfigError, match="histology only"):
        train_cv(make_config(few, "classification", folds=2, clinical=["label"]), tmp_path / "r5")


def test_dual_xattn_histology_stage_trains_exactly_abmil(tmp_path: Path, make_config: Any) -> None:
    """From the same seed, ``dual_xattn``'s warm-start histology stage is the ``abmil``
    run: the path is built first in ``abmil``'s order (same initial weights) and its
    stage returns before any modality-dropout draw (same random draws in training), so
    every fold selects the same step and keeps the same weights."""
    syn = make_synthetic_cohort(tmp_path / "d", task="survival", n_patients=12,
                                n_tiles=(10, 30), dims=(4, 4))  # fmt: skip
    omics = tmp_path / "omics.csv"
    rng = np.random.default_rng(1)
    patients = sorted(set(syn.patients.values()))
    omics.write_text("patient_id,g1,g2\n" + "".join(
        f"{p},{rng.normal():.3f},{rng.normal():.3f}\n" for p in patients))  # fmt: skip
    small = {"dropout": 0.25, "attn_dim": 8}
    abmil = train_cv(
        make_config(syn, "survival", folds=2, n_boot=0, model_kwargs={**small, "hidden_dim": 16}),
        tmp_path / "a",
    )
    dual = train_cv(make_config(syn, "survival", folds=2, n_boot=0, model="dual_xattn",
                                omics=str(omics), omics_group_size=1,
                                model_kwargs={"dim": 16, "n_heads": 2, "histology_dim": 16,
                                              "dropout": 0.25}), tmp_path / "x")  # fmt: skip
    names = {"encoder": "histology_proj", "attention": "histology_pool",
             "classifier": "histology_head"}  # fmt: skip
    for k in range(2):
        a_meta = json.loads((abmil.out / f"fold_{k}" / "fold.json").read_text())
        x_meta = json.loads((dual.out / f"fold_{k}" / "fold.json").read_text())
        assert x_meta["stages"][0]["best_step"] == a_meta["best_step"]
        a_state = load_file(abmil.out / f"fold_{k}" / "model.safetensors")
        x_state = load_file(dual.out / f"fold_{k}" / "model.safetensors")
        for key, value in a_state.items():
            module, _, rest = key.partition(".")
            torch.testing.assert_close(x_state[f"{names.get(module, module)}.{rest}"], value)


def test_fusion_slide_level_and_discrete_loss(tmp_path: Path, make_config: Any) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d",
        task="survival",
        n_patients=10,
        slides_per_patient=(1, 2),
        n_tiles=(10, 20),
        dims=(4, 4),
    )
    patients = sorted(set(syn.patients.values()))
    omics = tmp_path / "omics.csv"
    rng = np.random.default_rng(0)
    omics.write_text(
        "patient_id,g1,g2,g3\n"
        + "".join(
            f"{p},{rng.normal():.3f},{rng.normal():.3f},{rng.normal():.3f}\n" for p in patients[:-2]
        )
    )  # two patients without omics: masked, not zero-filled
    csv = syn.cohort_csv.read_text().splitlines()
    csv = [csv[0] + ",age"] + [f"{r},{40 + i}" for i, r in enumerate(csv[1:])]
    syn.cohort_csv.write_text("\n".join(csv) + "\n")
    # age differs between slides of a patient → cohort error naming the line
    with pytest.raises(CohortError, match=r"age: .* disagrees"):
        train_cv(make_config(syn, "survival", clinical=["age"]), tmp_path / "bad")
    lines = syn.cohort_csv.read_text().splitlines()
    fixed = [lines[0]] + [
        ",".join([*r.split(",")[:-1], str(40 + int(r.split(",")[0][1:]))]) for r in lines[1:]
    ]
    syn.cohort_csv.write_text("\n".join(fixed) + "\n")
    config = make_config(
        syn,
        "survival",
        model="dual_xattn",
        model_kwargs={"dim": 16, "n_heads": 2},
        folds=2,
        steps=8,
        clinical=["age"],
        omics=str(omics),
        omics_group_size=2,
        level="slide",
        survival_loss="discrete",
        n_boot=0,
    )
    result = train_cv(config, tmp_path / "run")
    meta = json.loads((result.out / "fold_0" / "fold.json").read_text())
    assert meta["aggregator"]["omics_groups"] == [[0, 1], [2]]
    assert meta["aggregator"]["n_clinical"] == 1 and meta["in_dim"] == 8
    assert meta["head"]["kind"] == "discrete"
    histology, context, fusion = meta["stages"]
    assert (histology["stage"], histology["lr"]) == ("histology", config.lr)
    assert (fusion["stage"], fusion["lr"]) == ("fusion", pytest.approx(0.1 * config.lr))
    # the context linear path: the lasso, its penalty one of the cross-validated candidates
    assert (context["stage"], context["fit"], context["l1_ratio"]) == ("context", "penalised", 1)
    assert len(context["cv_loss"]) == len(context["penalties"])
    assert context["penalty"] in context["penalties"]
    assert context["offset"]  # fitted on top of the histology path's logits
    assert len(result.predictions) == 2 * 10  # slide bags averaged per patient
    assert list(result.predictions.columns) == [
        "patient_id",
        "fold",
        "split",
        "time",
        "event",
        "risk",
        "linear_predictor",
    ]
    assert not result.predictions.duplicated(["patient_id", "fold", "split"]).any()
    _check_co_attention(result.out, syn, without_omics=set(patients[-2:]))


def _check_co_attention(run: Path, syn: Any, without_omics: set[str]) -> None:
    """One co-attention file per out-of-fold slide, aligned with its bag's tiles."""
    from wsi_mil.features.bags import read_bag
    from wsi_mil.mil.co_attention import read_co_attention

    files = sorted((run / "co_attention").glob("*.h5"))
    assert [f.stem for f in files] == sorted(syn.patients)  # every slide is out of fold once
    for path in files:
        co = read_co_attention(path)
        assert co.tokens == ["group_0", "group_1", "clinical"]
        assert co.attrs["patient_id"] == syn.patients[path.stem]
        bag = read_bag(syn.features_dirs[0] / f"{path.stem}.h5")
        np.testing.assert_array_equal(co.coords, bag.coords)
        assert co.co_attention.shape == (3, len(bag.coords))
        # slide-level bags: each present token's attention sums to 1 over the slide
        present = co.weights > 0
        assert np.allclose(co.co_attention.sum(1)[present], 1, atol=1e-4)
        assert present[:2].any() != (co.attrs["patient_id"] in without_omics)
        assert np.isclose(co.weights.sum(), 1, atol=1e-4)
    summary = pd.read_csv(run / "co_attention_summary.csv")
    assert list(summary["token"]) == ["group_0", "group_1", "clinical"]
    assert list(summary["n_patients"]) == [8, 8, 10]  # two patients without omics
    assert summary["spearman_rho"].between(-1, 1).all()
    from safetensors.numpy import load_file

    folds = [
        load_file(f)["context_linear.weight"] for f in sorted(run.glob("fold_*/model.safetensors"))
    ]
    coef = np.stack([w[0] if len(w) == 1 else w[-1] - w[:-1].mean(0) for w in folds])
    np.testing.assert_allclose(summary["linear_coef"], coef.mean(0), atol=1e-6)
    assert (run / "co_attention.png").stat().st_size > 0
    html = (run / "report.html").read_text()
    assert "Which gene groups count (co-attention)" in html and "<td>group_1</td>" in html


def _omics_cohort(tmp_path: Path, n_patients: int = 10) -> tuple[Any, Path, list[str]]:
    """A tiny survival cohort of one slide per patient and an omics table (3 genes, two
    groups) in which the last two patients have no row."""
    syn = make_synthetic_cohort(
        tmp_path / "d", task="survival", n_patients=n_patients, n_tiles=(8, 16), dims=(4,)
    )
    patients = sorted(set(syn.patients.values()))
    rng = np.random.default_rng(0)
    omics = tmp_path / "omics.csv"
    rows = "".join(f"{p},{','.join(f'{v:.3f}' for v in rng.normal(size=3))}\n" for p in patients)
    omics.write_text("patient_id,g1,g2,g3\n" + "".join(rows.splitlines(True)[:-2]))
    return syn, omics, patients


def test_patient_without_omics_is_predicted_as_with_its_omics_masked_by_hand(
    tmp_path: Path, make_config: Any
) -> None:
    """Out of fold, a patient with no omics row gets exactly the prediction of its fold
    model fed its tiles and *some* omics values with ``omics_mask`` False; the same
    values unmasked change it (so the comparison can fail)."""
    from wsi_mil.features.bags import read_bag
    from wsi_mil.mil.fold import FoldModel, fold_dir

    syn, omics, patients = _omics_cohort(tmp_path)
    config = make_config(
        syn, "survival", model="dual_xattn", folds=2, steps=20, omics=str(omics),
        omics_group_size=2, n_boot=0,
        # one stage, so the fused correction surely leaves its zero start in 20 steps
        model_kwargs={"dim": 16, "n_heads": 2, "warm_start": False},
    )  # fmt: skip
    result = train_cv(config, tmp_path / "run")
    test = result.predictions[result.predictions["split"] == "test"].set_index("patient_id")
    slide_of = {p: s for s, p in syn.patients.items()}
    for patient in patients[-2:]:
        fm = FoldModel.load(fold_dir(result.out, int(test.loc[patient, "fold"])))
        bag = read_bag(syn.features_dirs[0] / f"{slide_of[patient]}.h5")
        features = torch.as_tensor(bag.features, dtype=torch.float32)[None]
        values = torch.full((1, 3), 2.5)  # someone's omics, never to be read
        with torch.no_grad():
            masked = fm.model(features, omics=values, omics_mask=torch.tensor([False]))
            shown = fm.model(features, omics=values, omics_mask=torch.tensor([True]))
        risk = float(fm.head.predict(masked.logits)[0])
        assert risk == pytest.approx(float(test.loc[patient, "risk"]), abs=1e-5)
        assert abs(float(fm.head.predict(shown.logits)[0]) - risk) > 1e-4
        assert masked.context_weights is not None and torch.all(masked.context_weights == 0)


@pytest.mark.parametrize(
    "old",
    [
        {"omics_encoder": "snn", "residual": False, "modality_dropout": 0.0,
         "histology_dim": None, "histology_fallback": False, "warm_start": False,
         "context_linear": False},
        {"histology_dim": None, "histology_fallback": False, "warm_start": False,
         "context_linear": False},
        {"context_linear": False},
    ],
    ids=["before-the-residual-path", "before-the-histology-fallback",
         "before-the-context-linear-path"],
)  # fmt: skip
def test_dual_xattn_fold_saved_before_a_default_changed_loads_as_trained(
    tmp_path: Path, old: dict[str, Any]
) -> None:
    """A ``fold.json`` that does not name an option was trained with its old value: SNN
    group encoders, no residual, no modality dropout, no histology fallback, no context
    linear path."""
    from safetensors.torch import save_file

    from wsi_mil.mil.fold import FoldModel
    from wsi_mil.mil.heads import CoxHead
    from wsi_mil.mil.models import create_aggregator
    from wsi_mil.mil.tabular import TabularPreprocessor

    model = create_aggregator("dual_xattn", 4, 1, omics_groups=[[0, 1], [2]], dim=8, n_heads=2,
                              **old)  # fmt: skip
    config = {k: v for k, v in model.aggregator_config.items() if k not in old}
    head = CoxHead()
    fold = tmp_path / "fold_0"
    fold.mkdir()
    save_file(model.state_dict(), str(fold / "model.safetensors"))
    (fold / "fold.json").write_text(json.dumps({
        "fold": 0, "aggregator": config, "head": head.state_dict(),
        "preprocessing": TabularPreprocessor().state_dict(),
    }))  # fmt: skip
    loaded = FoldModel.load(fold).model
    assert loaded.aggregator_config == model.aggregator_config
    assert loaded.histology_fallback == model.histology_fallback
    assert loaded.context_linear is None


def test_test_bags_are_not_read_before_the_model_is_chosen(
    tiny_cohort: Any, make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_mil.mil.train as train_module
    from wsi_mil.mil.data import BagStore

    log: list[tuple[str, Any]] = []

    class RecordingStore(BagStore):
        def slide(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
            log.append(("read", slide_id))
            return super().slide(slide_id)

    monkeypatch.setattr(train_module, "BagStore", RecordingStore)
    config = make_config(tiny_cohort, "classification", folds=3, steps=12, n_boot=0)
    train_cv(config, tmp_path / "run", callback=lambda e, i: log.append((e, i)))
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    start = 0
    for fold in splits["folds"]:
        test_slides = {s for s, p in tiny_cohort.patients.items() if p in set(fold["test"])}
        end = next(
            n
            for n, (e, i) in enumerate(log)
            if e == "predict" and i["fold"] == fold["fold"] and i["split"] == "test"
        )
        read = {i for e, i in log[start:end] if e == "read"}
        assert read and not read & test_slides  # training + selection never touch test bags
        start = end


def test_small_classes_and_few_events_are_refused(tmp_path: Path, make_config: Any) -> None:
    three = make_synthetic_cohort(
        tmp_path / "c3", n_patients=8, n_classes=3, n_tiles=(5, 5), dims=(4,)
    )  # classes 0, 1, 2 with 3, 3, 2 patients
    with pytest.raises(CohortError, match=r"fewer patients than --folds 3 \('2' has 2\)"):
        train_cv(make_config(three, "classification", folds=3), tmp_path / "r1")
    assert not (tmp_path / "r1").exists()  # refused before anything is written
    surv = make_synthetic_cohort(
        tmp_path / "s", task="survival", n_patients=6, n_tiles=(5, 5), dims=(4,)
    )
    lines = surv.cohort_csv.read_text().splitlines()
    ev = lines[0].split(",").index("event")
    rows = [r.split(",") for r in lines[1:]]
    for i, r in enumerate(rows):
        r[ev] = "1" if i == 0 else "0"
    surv.cohort_csv.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    with pytest.raises(CohortError, match=r"1 event\(s\) but --folds 2"):
        train_cv(make_config(surv, "survival", folds=2), tmp_path / "r2")


@pytest.mark.parametrize(
    ("task", "n_patients", "n_classes", "folds", "level", "model"),
    [
        ("classification", 6, 2, 2, "patient", "abmil"),
        ("classification", 9, 3, 3, "slide", "transmil"),
        ("survival", 7, 2, 2, "patient", "abmil"),
        ("survival", 8, 2, 3, "slide", "clam_sb"),
    ],
)
def test_tiny_cohorts_train_end_to_end(
    tmp_path: Path,
    make_config: Any,
    task: str,
    n_patients: int,
    n_classes: int,
    folds: int,
    level: str,
    model: str,
) -> None:
    syn = make_synthetic_cohort(
        tmp_path / "d",
        task=task,
        n_patients=n_patients,
        n_classes=n_classes,
        slides_per_patient=(1, 2),
        n_tiles=(4, 9),
        dims=(4,),
        seed=n_patients,
    )
    config = make_config(
        syn, task, folds=folds, steps=4, n_boot=5, level=level, model=model, max_tiles=4
    )
    if model == "transmil":
        config.model_kwargs = {"hidden_dim": 16, "n_heads": 2}
    result = train_cv(config, tmp_path / "run")
    test = result.predictions[result.predictions["split"] == "test"]
    assert sorted(test["patient_id"]) == sorted(set(syn.patients.values()))
    assert set(result.metrics["folds"]) == {str(k) for k in range(folds)}


def test_resume_removes_temporaries_of_a_killed_run(
    tiny_cohort: Any, make_config: Any, tmp_path: Path
) -> None:
    config = make_config(tiny_cohort, "classification", folds=2, steps=4, n_boot=0)
    out = tmp_path / "run"

    def interrupt(event: str, info: dict[str, Any]) -> None:
        if event == "fold_done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(config, out, callback=interrupt)
    stale = out / ".fold_1.deadbeef.tmp"  # what a SIGKILL during the fold save leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (out / "attention" / ".x.h5.0badf00d.tmp").write_bytes(b"half")
    result = train_cv(config, out)
    assert result.resumed_folds == [0]
    assert not list(out.rglob("*.tmp"))
    assert load_file(out / "fold_1" / "model.safetensors")


def test_inner_validation_without_events_does_not_pick_the_checkpoint() -> None:
    from wsi_mil.mil.data import Unit
    from wsi_mil.mil.train import UnitSet, _informative

    units = [Unit(f"P{i}", f"P{i}", (f"S{i}",)) for i in range(3)]
    cox = TrainConfig(task="survival", cohort="c.csv", features=["f"])
    censored = UnitSet(units, {"time": torch.ones(3), "event": torch.zeros(3)})
    assert not _informative(censored, cox, 0)  # a Cox loss of 0 cannot rank checkpoints
    one_event = UnitSet(units, {"time": torch.ones(3), "event": torch.tensor([0.0, 1.0, 0.0])})
    assert _informative(one_event, cox, 0)
    assert not _informative(UnitSet([], {}), cox, 0)
    cls = TrainConfig(task="classification", cohort="c.csv", features=["f"])
    assert _informative(UnitSet(units, {"label": torch.zeros(3, dtype=torch.long)}), cls, 0)


def test_schedule_is_in_steps_whatever_the_cohort_size() -> None:
    from wsi_mil.mil.data import Unit
    from wsi_mil.mil.train import UnitSet, _make_optimizer, _step_plan

    cfg = TrainConfig(task="classification", cohort="c.csv", features=["f"], steps=300,
                      warmup_steps=20, lr=1e-2, batch_size=8)  # fmt: skip
    for n in (3, 30, 3000):
        units = [Unit(f"P{i}", f"P{i}", (f"S{i}",)) for i in range(n)]
        plan = _step_plan(UnitSet(units, {"label": torch.zeros(n, dtype=torch.long)}), cfg, 0)
        assert len(plan) == 300  # passes are chained until the budget is spent
        assert all(1 <= len(idx) <= 8 for _, idx in plan)
    opt, sched = _make_optimizer(torch.nn.Linear(2, 1), cfg)
    lrs = []
    for _ in range(300):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2 / 20) and lrs[19] == pytest.approx(1e-2)
    assert all(a < b for a, b in itertools.pairwise(lrs[:20]))  # linear warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[19:]))  # cosine decay
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_early_stopping_restores_the_best_checkpoint(
    tiny_cohort: Any, make_config: Any, event_log: Any, tmp_path: Path
) -> None:
    config = make_config(tiny_cohort, "classification", folds=2, steps=2000, eval_every=5,
                         patience=30, n_boot=0)  # fmt: skip
    train_cv(config, tmp_path / "r", callback=event_log)
    for k in (0, 1):
        meta = json.loads((tmp_path / "r" / f"fold_{k}" / "fold.json").read_text())
        assert meta["steps_run"] < 2000  # stopped early
        assert meta["steps_run"] - meta["best_step"] >= 30
        vals = dict(zip(meta["history"]["step"], meta["history"]["val"], strict=True))
        assert vals[meta["best_step"]] <= min(vals.values()) + 1e-3
        steps = [i["step"] for i in event_log.of("eval") if i["fold"] == k]
        assert steps == list(range(5, meta["steps_run"] + 1, 5))
