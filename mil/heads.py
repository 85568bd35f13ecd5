"""Task heads: how aggregator logits become a loss and a prediction.

* :class:`ClassificationHead` — binary or multiclass, class-weighted cross-entropy;
  predictions are class probabilities (B, C), corrected by prior shift for the class
  weights so that they are calibrated to the training prevalence.
* :class:`CoxHead` — one logit = log relative hazard, weighted Cox partial likelihood
  (:func:`wsi_mil.survival.loss.cox_ph_loss`); predictions are risks (B,), z-scored
  against the fold's training patients.
* :class:`DiscreteTimeHead` — one logit per time bin, discrete-time hazard NLL
  (:func:`wsi_mil.survival.loss.discrete_time_nll`); bins are fitted on training times.

Heads also give the ``labels`` that training batches pass to aggregators with an
instance loss (CLAM, :meth:`Head.instance_labels`): the class for classification, and for
survival binary pseudo-classes cut at the median time of the fold's training patients
(:func:`survival_pseudo_labels`).

Heads are rebuilt from a JSON-serialisable :meth:`state_dict` saved with each fold.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsi_mil.errors import ConfigError
from wsi_mil.mil.cohort import Cohort

__all__ = [
    "SURVIVAL_LOSSES",
    "ClassificationHead",
    "CoxHead",
    "DiscreteTimeHead",
    "Head",
    "SurvivalHead",
    "create_head",
    "head_from_state",
    "prior_shift",
    "survival_pseudo_labels",
]

SURVIVAL_LOSSES = ("cox", "discrete")


class Head(abc.ABC):
    """Base class: ``n_outputs``, ``targets``, ``loss`` and ``predict``."""

    kind: str = ""
    n_outputs: int = 1

    @abc.abstractmethod
    def targets(self, cohort: Cohort, patient_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Target tensors of ``patient_ids`` (one entry per sample)."""
        ...

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of (B, n_outputs) logits."""
        ...

    @abc.abstractmethod
    def predict(self, logits: torch.Tensor) -> np.ndarray:
        """Probabilities (B, C) or risks (B,) as float64 numpy."""
        ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        ...

    def instance_labels(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B,) long ``labels`` for an aggregator's instance loss, or None.

        Called by the trainer on training batches only (never in evaluation).
        """
        return None


class ClassificationHead(Head):
    """Class-weighted cross-entropy over ``len(classes)`` logits (2 for binary).

    Weighting class ``c`` by ``w_c`` trains the softmax towards the class posterior of a
    population whose class prior is ``pi_c * w_c`` (balanced for the default weights
    ``w_c = n / (C * n_c)``), not the training prevalence ``pi_c``. :meth:`predict`
    undoes this by prior shift, ``p_c = (q_c / w_c) / sum_j (q_j / w_j)`` with ``q`` the
    softmax, so the probabilities users see are calibrated to the training prevalence
    (an intercept-only model predicts the prevalence). :meth:`balanced_probabilities`
    gives ``q``; its argmax equals that of ``p_c / pi_c`` (the balanced decision).

    Args:
        classes: Class names; logit ``k`` is class ``classes[k]``.
        class_weights: (C,) loss weight per class (default all 1).
    """

    kind = "classification"

    def __init__(self, classes: Sequence[str], class_weights: Sequence[float] | None = None):
        self.classes = list(classes)
        self.n_outputs = len(self.classes)
        weights = class_weights if class_weights is not None else [1.0] * self.n_outputs
        self.class_weights = [float(w) for w in weights]

    @classmethod
    def fit(cls, cohort: Cohort, train_ids: Sequence[str]) -> ClassificationHead:
        """Balanced class weights ``n / (C * n_c)`` from the training patients."""
        labels = [cohort.patients[p].label for p in train_ids]
        counts = np.array([labels.count(c) for c in cohort.classes], float)
        weights = len(labels) / (len(counts) * np.maximum(counts, 1.0))
        return cls(cohort.classes, weights.tolist())

    def targets(self, cohort: Cohort, patient_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        index = {c: i for i, c in enumerate(self.classes)}
        labels = [index[str(cohort.patients[p].label)] for p in patient_ids]
        return {"label": torch.tensor(labels, dtype=torch.long)}

    def loss(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), targets["label"].to(logits.device), weight=weight)

    def balanced_probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """(B, C) softmax of the logits: posteriors under the class-weighted prior."""
        return torch.softmax(logits.float(), dim=1).detach().cpu().double().numpy()

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        """(B, C) class probabilities calibrated to the training prevalence (prior shift
        of :meth:`balanced_probabilities` by the class weights)."""
        return prior_shift(self.balanced_probabilities(logits), self.class_weights)

    def instance_labels(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The class indices (B,)."""
        return targets["label"]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "class_weights": self.class_weights}


def prior_shift(probs: np.ndarray, class_weights: Sequence[float]) -> np.ndarray:
    """Undo class weighting by prior shift: ``p_c ∝ q_c / w_c``.

    Args:
        probs: (B, C) probabilities of a model trained with loss weights ``w``.
        class_weights: (C,) positive loss weights.

    Returns:
        (B, C) probabilities under the unweighted (training) class prior.

    Raises:
        ValueError: weights that are not positive, or a shape mismatch.
    """
    w = np.asarray(class_weights, dtype=np.float64)
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != w.size:
        raise ValueError(f"probs must have shape (B, {w.size}), got {q.shape}")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"class_weights must be positive, got {w.tolist()}")
    p = q / w
    return p / p.sum(axis=1, keepdims=True)


def _survival_targets(cohort: Cohort, patient_ids: Sequence[str]) -> dict[str, torch.Tensor]:
    time = [float(cohort.patients[p].time or 0.0) for p in patient_ids]
    event = [int(cohort.patients[p].event or 0) for p in patient_ids]
    return {
        "time": torch.tensor(time, dtype=torch.float64),
        "event": torch.tensor(event, dtype=torch.long),
    }


def survival_pseudo_labels(time: torch.Tensor, event: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Binary early/late-event pseudo-classes for an instance loss (e.g. CLAM).

    Args:
        time: (B,) event or censoring times.
        event: (B,) 1 = event, 0 = censored.
        cutoff: The median time of the fold's training patients.

    Returns:
        (B,) long: 1 = event at or before ``cutoff``, 0 = followed beyond ``cutoff``
        (censored or not), -1 = unknown (censored at or before ``cutoff``).
    """
    early = (event == 1) & (time <= cutoff)
    late = time > cutoff
    labels = torch.full(time.shape, -1, dtype=torch.long, device=time.device)
    return labels.masked_fill(late, 0).masked_fill(early, 1)


class SurvivalHead(Head):
    """Risk heads: risks are standardised against the fold's training patients.

    A Cox risk is identified only up to an additive constant (and its spread differs
    between folds), so after training each fold's raw risks are z-scored with the mean
    and s.d. of its training patients' risks (:meth:`calibrate`). This keeps the order
    within a fold and makes risks of different folds comparable for pooled metrics and
    the fold ensemble.

    Training batches also carry pseudo-classes for aggregators with an instance loss
    (:meth:`instance_labels`), cut at ``pseudo_cutoff``: the median time of the fold's
    training patients (:meth:`fit_pseudo_labels`; None = no pseudo-classes).
    """

    center: float = 0.0
    scale: float = 1.0
    pseudo_cutoff: float | None = None

    def fit_pseudo_labels(self, cohort: Cohort, train_ids: Sequence[str]) -> SurvivalHead:
        """Set ``pseudo_cutoff`` to the median time of the training patients ``train_ids``."""
        times = [cohort.patients[p].time for p in train_ids]
        known = [float(t) for t in times if t is not None]
        self.pseudo_cutoff = float(np.median(known)) if known else None
        return self

    def instance_labels(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B,) early/late-event pseudo-classes (:func:`survival_pseudo_labels`), or None
        before :meth:`fit_pseudo_labels`."""
        if self.pseudo_cutoff is None:
            return None
        return survival_pseudo_labels(targets["time"], targets["event"], self.pseudo_cutoff)

    def raw_risk(self, logits: torch.Tensor) -> np.ndarray:
        """(B,) risks before standardisation."""
        return logits[:, 0].detach().cpu().double().numpy()

    def calibrate(self, train_logits: torch.Tensor) -> None:
        """Set ``center``/``scale`` from the training patients' logits (U, n_outputs)."""
        raw = self.raw_risk(train_logits)
        self.center = float(raw.mean()) if len(raw) else 0.0
        std = float(raw.std()) if len(raw) > 1 else 0.0
        self.scale = std if std > 1e-12 else 1.0

    def predict(self, logits: torch.Tensor) -> np.ndarray:
        return (self.raw_risk(logits) - self.center) / self.scale

    def linear_predictor(self, risk: Any) -> np.ndarray:
        """Undo :meth:`predict`'s standardisation: (N,) risks -> the model's own (N,)
        risk scale (for the Cox head its log relative hazard), on which the survival
        report fits its Breslow baseline."""
        return np.asarray(risk, dtype=np.float64) * self.scale + self.center

    def _calibration(self) -> dict[str, float | None]:
        return {"center": self.center, "scale": self.scale, "pseudo_cutoff": self.pseudo_cutoff}

    def _set_calibration(self, state: dict[str, Any]) -> SurvivalHead:
        self.center = float(state.get("center", 0.0))
        self.scale = float(state.get("scale", 1.0))
        cutoff = state.get("pseudo_cutoff")
        self.pseudo_cutoff = None if cutoff is None else float(cutoff)
        return self


class CoxHead(SurvivalHead):
    """Weighted Cox partial likelihood of a single risk logit (Efron ties).

    Each sample's weight is its patient's weight (1, or ``patient_weights``) split
    equally among the patient's samples (its slides at slide level; the targets'
    ``weight``, :func:`wsi_mil.mil.weights.unit_weights`), times ``event_weight`` when
    the sample has an event (applied in :meth:`loss`); the weights enter the partial
    likelihood as lifelines' ``weights_col`` does
    (:func:`wsi_mil.survival.loss.cox_ph_loss`).

    Args:
        event_weight: Weight of samples with an event relative to censored ones
            (1 = unweighted Cox).
        patient_weights: ``{patient_id: weight}`` (finite, >= 0) of the training
            patients, or None (all 1). Training-only: not part of :meth:`state_dict`.
    """

    kind = "cox"
    n_outputs = 1

    def __init__(
        self, event_weight: float = 1.0, patient_weights: Mapping[str, float] | None = None
    ) -> None:
        self.event_weight = float(event_weight)
        self.patient_weights = None if patient_weights is None else dict(patient_weights)

    def targets(self, cohort: Cohort, patient_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """``time``, ``event`` and ``weight`` (U,) of ``patient_ids``: the patient's
        weight, shared equally among its entries when a patient is listed several times
        (once per slide); ``event_weight`` is applied by :meth:`loss`."""
        from wsi_mil.mil.weights import unit_weights

        out = _survival_targets(cohort, patient_ids)
        weights = self.patient_weights
        if weights is not None:  # patients outside the fitted set (never trained on) weigh 1
            weights = {p: weights.get(p, 1.0) for p in patient_ids}
        w = unit_weights(list(patient_ids), out["event"].tolist(), patient_weights=weights)
        out["weight"] = torch.from_numpy(w)
        return out

    def loss(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        from wsi_mil.survival.loss import cox_ph_loss

        event = targets["event"].to(logits.device)
        base = targets.get("weight")
        weights = None
        if base is not None and not bool((base == 1).all()):
            weights = base.to(logits.device).float()
        if self.event_weight != 1.0:
            factor = torch.where(event == 1, self.event_weight, 1.0).float()
            weights = factor if weights is None else weights * factor
        return cox_ph_loss(
            logits[:, 0].float(),
            targets["time"].to(logits.device),
            event,
            weights,
            allow_no_events=True,
        )

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.kind, "event_weight": self.event_weight, **self._calibration()}
        if self.patient_weights is not None:  # the weights themselves are training-only
            state["patient_weighted"] = True
        return state


class DiscreteTimeHead(SurvivalHead):
    """Discrete-time hazard NLL over time bins fitted on training event times.

    Args:
        edges: (K + 1,) bin edges from :func:`wsi_mil.survival.loss.make_time_bins`.
    """

    kind = "discrete"

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = [float(e) for e in edges]
        self.n_outputs = len(self.edges) - 1

    @classmethod
    def fit(cls, cohort: Cohort, train_ids: Sequence[str], n_bins: int = 4) -> DiscreteTimeHead:
        """Bins at quantiles of the training event times."""
        from wsi_mil.survival.loss import make_time_bins

        t = _survival_targets(cohort, train_ids)
        return cls(make_time_bins(t["time"].numpy(), t["event"].numpy(), n_bins).tolist())

    def targets(self, cohort: Cohort, patient_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        from wsi_mil.survival.loss import assign_time_bins

        t = _survival_targets(cohort, patient_ids)
        t["bin"] = torch.from_numpy(assign_time_bins(t["time"].numpy(), np.asarray(self.edges)))
        return t

    def loss(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        from wsi_mil.survival.loss import discrete_time_nll

        return discrete_time_nll(
            logits.float(), targets["bin"].to(logits.device), targets["event"].to(logits.device)
        )

    def raw_risk(self, logits: torch.Tensor) -> np.ndarray:
        from wsi_mil.survival.loss import discrete_time_risk

        return discrete_time_risk(logits.float()).detach().cpu().double().numpy()

    def state_dict(self) -> dict[str, Any]:
        edges = [e if np.isfinite(e) else "inf" for e in self.edges]
        return {"kind": self.kind, "edges": edges, **self._calibration()}


def create_head(
    cohort: Cohort,
    train_ids: Sequence[str],
    *,
    survival_loss: str = "cox",
    n_bins: int = 4,
    event_weight: float = 1.0,
    patient_weights: Mapping[str, float] | None = None,
) -> Head:
    """Build the head for ``cohort.task`` fitted on the training patients.

    Args:
        cohort: The cohort (its task picks the head).
        train_ids: Training patients (class weights, time bins, the survival
            pseudo-class cut-off).
        survival_loss: ``cox`` or ``discrete`` (survival only).
        n_bins: Time bins of the discrete-time head.
        event_weight: Cox head: weight of patients with an event (1 = unweighted).
        patient_weights: Cox head: per-patient loss weights (None = all 1).

    Raises:
        ConfigError: Unknown ``survival_loss``.
    """
    if cohort.task == "classification":
        return ClassificationHead.fit(cohort, train_ids)
    if survival_loss == "cox":
        head = CoxHead(event_weight, patient_weights)
        return head.fit_pseudo_labels(cohort, train_ids)
    if survival_loss == "discrete":
        return DiscreteTimeHead.fit(cohort, train_ids, n_bins).fit_pseudo_labels(cohort, train_ids)
    raise ConfigError(
        f"unknown --survival-loss {survival_loss!r}; choose one of {', '.join(SURVIVAL_LOSSES)}"
    )


def head_from_state(state: dict[str, Any]) -> Head:
    """Rebuild a head from :meth:`Head.state_dict`."""
    kind = state.get("kind")
    if kind == "classification":
        return ClassificationHead(state["classes"], state["class_weights"])
    if kind == "cox":
        return CoxHead(state.get("event_weight", 1.0))._set_calibration(state)
    if kind == "discrete":
        return DiscreteTimeHead([float(e) for e in state["edges"]])._set_calibration(state)
    raise ConfigError(f"unknown head kind {kind!r} in a saved fold; was the run made by wsi-mil?")
