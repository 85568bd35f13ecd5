"""Per-tile scores of one slide: attention and signed contribution.

Scores come either from a trained run applied to the slide's feature bag (the fold
ensemble, or one fold; features are never re-extracted) or from an attention file
written by ``train``/``predict`` (attention only).

* **attention** — the aggregator's attention over the slide's tiles (a one-slide bag),
  averaged over the fold models; sums to 1 over the slide.
* **contribution** — a signed per-tile share of the slide's output, for aggregators whose
  output is an attention-weighted mean of per-tile outputs followed by a linear layer
  (``abmil`` single-branch, ``clam_sb``, ``mean``): ``a_i * f(x_i)``, where ``f(x_i)`` is
  the model's output for a bag holding tile ``i`` alone. For these models the
  contributions add up exactly to the slide's output: the Cox risk (standardised as
  in ``predictions.csv``) or, for classification, the logit of ``target_class`` minus
  the mean logit of all classes (the log-odds against the others for two classes).
  Positive tiles push towards higher risk / the target class, negative ones away.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError

__all__ = [
    "DECOMPOSABLE",
    "SlideScores",
    "rank_normalise",
    "score_slide",
    "scores_from_attention",
]

#: Aggregators whose output decomposes exactly into per-tile contributions.
DECOMPOSABLE = frozenset({"abmil", "clam_sb", "mean"})

_CHUNK = 4096  # tiles per forward pass of one-tile bags


@dataclass
class SlideScores:
    """Scores of the tiles of one slide.

    Attributes:
        slide_id: The slide.
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
        side: Tile side in level-0 px.
        attention: (N,) float64 attention (sums to 1 over the slide for a one-slide bag).
        contribution: (N,) float64 signed contribution, or None when the model's output
            does not decompose into tiles.
        prediction: The slide's prediction (``{"risk": r}`` or ``{"prob_<c>": p, ...}``),
            empty when unknown (scores read from an attention file).
        model: Aggregator name.
        run: Run folder name (or the attention file's name).
        source: ``"ensemble"``, ``"fold_<k>"``, ``"soup"``...
        target: What the contribution explains (``"risk"`` or ``"class <c>"``), or None.
        fingerprint: The slide file the features came from (``size``, ``sha256``,
            ``path``), as recorded by tiling; may be empty.
        target_mpp: µm/px of the tiles the model saw, or None.
        tile_px: Tile side in px at ``target_mpp``, or None.
    """

    slide_id: str
    coords: np.ndarray
    side: int
    attention: np.ndarray
    contribution: np.ndarray | None = None
    prediction: dict[str, float] = field(default_factory=dict)
    model: str = ""
    run: str = ""
    source: str = ""
    target: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    target_mpp: float | None = None
    tile_px: int | None = None

    def values(self, score: str) -> np.ndarray:
        """(N,) the raw values of ``score`` (``attention`` or ``contribution``).

        Raises:
            ConfigError: ``contribution`` asked for a model without one.
        """
        if score == "attention":
            return self.attention
        if score == "contribution":
            if self.contribution is None:
                raise ConfigError(
                    f"--score contribution: the {self.model or 'given'} scores of slide "
                    f"{self.slide_id} have no signed contribution (it needs a run folder and "
                    f"the slide's feature bag, and an aggregator among "
                    f"{', '.join(sorted(DECOMPOSABLE))}); use --score attention"
                )
            return self.contribution
        raise ConfigError(f"--score must be 'attention' or 'contribution', got {score!r}")

    def default_score(self) -> str:
        """``contribution`` when there is one, else ``attention``."""
        return "attention" if self.contribution is None else "contribution"


def rank_normalise(values: np.ndarray, signed: bool) -> np.ndarray:
    """Rank normalisation within the slide.

    Unsigned: the rank of each value in [0, 1] (ties share the mean rank; 0 = lowest,
    1 = highest). Signed: the sign of each value times the rank of its magnitude among
    all magnitudes, in [-1, 1], so the direction is kept and a few extreme tiles do not
    wash out the rest.

    Args:
        values: (N,) scores.
        signed: Keep signs (contributions) or not (attention).

    Returns:
        (N,) float64.
    """
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return values.copy()
    if not signed:
        return np.ones(n) if n == 1 else (rankdata(values) - 1) / (n - 1)
    magnitude = rankdata(np.abs(values)) / n
    return np.sign(values) * magnitude


def scores_from_attention(path: str | os.PathLike[str]) -> SlideScores:
    """Scores of an attention file (attention only; see :mod:`wsi_mil.mil.attention`).

    Raises:
        WsiMilError: Not an attention file.
        ConfigError: The file has no tiles, or the tile size cannot be inferred.
    """
    from wsi_mil.mil.attention import read_attention

    att = read_attention(path)
    if not len(att.coords):
        raise ConfigError(f"{path} has no tiles; nothing to draw")
    fingerprint = {
        k.removeprefix("source_"): att.attrs[k]
        for k in ("source_size", "source_sha256", "source_path")
        if k in att.attrs
    }
    dims = att.attrs.get("slide_dimensions")
    if dims is not None:
        fingerprint["dimensions"] = [int(v) for v in np.asarray(dims).tolist()]
    return SlideScores(
        slide_id=str(att.attrs.get("slide_id") or Path(path).stem),
        coords=np.asarray(att.coords, np.int64),
        side=_tile_side(att.coords, att.attrs.get("tile_level0")),
        attention=np.asarray(att.attention, np.float64),
        model=str(att.attrs.get("model", "")),
        run=Path(path).parent.parent.name if Path(path).parent.name == "attention" else "",
        source=str(att.attrs.get("source", "")),
        fingerprint=fingerprint,
    )


def scores_from_co_attention(path: str | os.PathLike[str], token: str) -> SlideScores:
    """Scores of one context token of a co-attention file (``co_attention/<slide_id>.h5``
    of a fusion run, :mod:`wsi_mil.mil.co_attention`): the attention of gene group (or
    ``clinical``) ``token`` over the slide's tiles, in the ``attention`` field.

    Raises:
        WsiMilError: Not a co-attention file.
        ConfigError: Unknown token (names the file's tokens), a token the patient does
            not have (no omics: its attention is empty), or no tiles.
    """
    from wsi_mil.mil.co_attention import read_co_attention

    co = read_co_attention(path)
    if token not in co.tokens:
        raise ConfigError(
            f"--gene-group {token!r}: {path} has no such context token; choose from "
            f"{', '.join(co.tokens)}"
        )
    t = co.tokens.index(token)
    values = np.asarray(co.co_attention[t], np.float64)
    if not len(co.coords):
        raise ConfigError(f"{path} has no tiles; nothing to draw")
    if co.weights[t] == 0 and not values.any():
        raise ConfigError(
            f"--gene-group {token!r}: patient {co.attrs.get('patient_id', '?')} of slide "
            f"{co.attrs.get('slide_id', Path(path).stem)} has no {token} input (missing "
            "modality), so the token attends to nothing"
        )
    fingerprint = {
        k.removeprefix("source_"): co.attrs[k]
        for k in ("source_size", "source_sha256", "source_path")
        if k in co.attrs
    }
    return SlideScores(
        slide_id=str(co.attrs.get("slide_id") or Path(path).stem),
        coords=np.asarray(co.coords, np.int64),
        side=_tile_side(co.coords, co.attrs.get("tile_level0")),
        attention=values,
        model=f"{co.attrs.get('model', '')} co-attention of {token}".strip(),
        run=Path(path).parent.parent.name if Path(path).parent.name == "co_attention" else "",
        source=str(co.attrs.get("source", "")),
        fingerprint=fingerprint,
    )


def _tile_side(coords: np.ndarray, tile_level0: Any) -> int:
    """Tile side in level-0 px: ``tile_level0`` when recorded, else the grid spacing."""
    if tile_level0:
        return round(float(tile_level0))
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    positive = np.concatenate([s[s > 0] for s in steps])
    if positive.size == 0:
        raise ConfigError("cannot infer the tile size from a single tile; re-run prediction")
    return int(positive.min())


def score_slide(
    run_dir: str | os.PathLike[str],
    slide_id: str,
    features: Sequence[str | os.PathLike[str]] | None = None,
    *,
    fold: int | None = None,
    target_class: str | None = None,
    device: str = "cpu",
) -> SlideScores:
    """Score one slide's tiles with a trained run (no feature extraction).

    The slide is scored as a bag of its own (attention sums to 1 over its tiles), by
    every finished fold model averaged (the ensemble) or by fold ``fold``.

    Args:
        run_dir: A run folder of ``wsi-mil train``.
        slide_id: The slide; its bag is ``<features>/<slide_id>.h5``.
        features: Bag folders in the run's training order (default: the run's own
            ``features`` from ``config.yaml``).
        fold: One fold's model instead of the ensemble.
        target_class: Class whose log-odds the contributions explain (classification;
            default the last class).
        device: Torch device.

    Returns:
        :class:`SlideScores` with the prediction and, where the model allows it, the
        signed contributions.

    Raises:
        ConfigError: Not a run, missing fold, a run with clinical/omics inputs, unknown
            class, or no bag for the slide.
        BagError: A damaged bag.
    """
    import torch

    from wsi_mil.mil.data import BagStore
    from wsi_mil.mil.predict import load_ensemble

    ens = load_ensemble(run_dir, device)
    members = ens.folds if fold is None else [f for f in ens.folds if f.fold == fold]
    if not members:
        done = ", ".join(str(f.fold) for f in ens.folds)
        raise ConfigError(f"--fold {fold}: {run_dir} has no finished fold {fold} (has {done})")
    if members[0].pre.n_omics or members[0].pre.clinical:
        raise ConfigError(
            f"{run_dir} uses clinical/omics inputs; per-slide heatmaps need a histology-only "
            "run - use the attention files of `wsi-mil predict` instead"
        )
    dirs = [Path(f) for f in (features or ens.config.get("features") or [])]
    _check_bags(dirs, slide_id, len(ens.config.get("features") or dirs))
    store = BagStore(dirs, 0)
    feats, coords = store.slide(slide_id)
    x = torch.from_numpy(np.asarray(feats, np.float32))
    outs = [_member_scores(fm, x, torch.device(device), target_class) for fm in members]
    attention = np.mean([o["attention"] for o in outs], axis=0)
    contrib = [o["contribution"] for o in outs]
    prediction = {
        k: float(np.mean([o["prediction"][k] for o in outs])) for k in outs[0]["prediction"]
    }
    bag_attrs = _finest_bag_attrs(dirs, slide_id)
    return SlideScores(
        slide_id=slide_id,
        coords=np.asarray(coords, np.int64),
        side=_tile_side(np.asarray(coords), store.tile_level0.get(slide_id)),
        attention=attention,
        contribution=None if any(c is None for c in contrib) else np.mean(contrib, axis=0),
        prediction=prediction,
        model=str(ens.config.get("model", "")),
        run=Path(run_dir).resolve().name,
        source="ensemble" if fold is None else f"fold_{fold}",
        target=outs[0]["target"],
        fingerprint=dict(bag_attrs.get("source") or {}),
        target_mpp=_float(bag_attrs.get("target_mpp")),
        tile_px=int(bag_attrs["tile_px"]) if bag_attrs.get("tile_px") else None,
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_bags(dirs: list[Path], slide_id: str, expected: int) -> None:
    if not dirs:
        raise ConfigError("no feature folder: pass --features (the run's config names none)")
    if len(dirs) != expected:
        raise ConfigError(f"the run was trained on {expected} feature folder(s); give as many")
    for d in dirs:
        if not (d / f"{slide_id}.h5").is_file():
            raise ConfigError(
                f"no feature bag for slide {slide_id!r} in {d}; run `wsi-mil extract` on its "
                "tiles (or pass --features with the folder that holds it)"
            )


def _finest_bag_attrs(dirs: list[Path], slide_id: str) -> dict[str, Any]:
    """Attributes of the slide's finest-resolution bag (whose tiles the scores are of)."""
    from wsi_mil.features.bags import bag_info

    infos = [dict(bag_info(d / f"{slide_id}.h5")) for d in dirs]
    return min(infos, key=lambda i: float(i.get("target_mpp") or 0.0))


def _member_scores(fm: Any, x: Any, device: Any, target_class: str | None) -> dict[str, Any]:
    """Attention, contribution and prediction of one fold model on one bag ``x (N, D)``."""
    import torch

    from wsi_mil.mil.heads import ClassificationHead, CoxHead

    model, head = fm.model.to(device).eval(), fm.head
    name = str(fm.meta["aggregator"]["name"])
    with torch.no_grad():
        out = model(x[None].to(device))
        logits = out.logits.float().cpu()
        n = x.shape[0]
        att = (
            np.full(n, 1.0 / n)
            if out.attention is None
            else out.attention[0].float().cpu().numpy().astype(np.float64)
        )
        pred = head.predict(logits)
        if isinstance(head, ClassificationHead):
            prediction = {f"prob_{c}": float(p) for c, p in zip(head.classes, pred[0], strict=True)}
        else:
            prediction = {"risk": float(np.ravel(pred)[0])}
        decomposable = name in DECOMPOSABLE and not getattr(model, "multi_branch", False)
        contribution, target = None, None
        if decomposable and isinstance(head, CoxHead):
            tile = _tile_logits(model, x, device)[:, 0]
            contribution = att * (tile - head.center) / head.scale
            target = "risk"
        elif decomposable and isinstance(head, ClassificationHead):
            k = _class_index(head.classes, target_class)
            tile = _tile_logits(model, x, device)
            contribution = att * (tile[:, k] - tile.mean(axis=1))
            target = f"class {head.classes[k]}"
    return {
        "attention": att,
        "contribution": contribution,
        "prediction": prediction,
        "target": target,
    }


def _class_index(classes: Sequence[str], target: str | None) -> int:
    names = [str(c) for c in classes]
    if target is None:
        return len(names) - 1
    if target not in names:
        raise ConfigError(f"--class {target!r} is not a class of the run ({', '.join(names)})")
    return names.index(target)


def _tile_logits(model: Any, x: Any, device: Any) -> np.ndarray:
    """(N, n_outputs) float64: the model's output for each tile as a bag of its own."""
    parts = []
    for i in range(0, x.shape[0], _CHUNK):
        chunk = x[i : i + _CHUNK, None, :].to(device)
        parts.append(model(chunk).logits.float().cpu().numpy())
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, 1))
