"""Penalised fits with a head's loss (:mod:`wsi_mil.mil.penalised`) against
scikit-survival and scikit-learn, and the cross-validated choice of the penalty."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil.heads import ClassificationHead, CoxHead
from wsi_mil.mil.penalised import PenalisedFit, _folds, fit_penalised


def _survival(n: int, beta: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """(n, P) covariates on different scales and Cox targets with log hazard ``z @ beta``
    (``z`` the standardised covariates), about 70 % events."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(beta)))
    time = rng.exponential(np.exp(-z @ beta))
    censor = rng.exponential(2 * np.median(time), size=n)
    scale = np.arange(1, len(beta) + 1) * 3.0  # the fit must undo this
    targets = {
        "time": torch.tensor(np.minimum(time, censor)),
        "event": torch.tensor((time <= censor).astype(np.int64)),
    }
    return z * scale, targets


def _cox_fit(x: np.ndarray, targets: dict[str, torch.Tensor], **kwargs: Any) -> PenalisedFit:
    """:func:`fit_penalised` of the Cox loss, one patient per row."""
    head = CoxHead()
    return fit_penalised(
        torch.tensor(x, dtype=torch.float32),
        lambda logits, idx: head.loss(logits, {k: v[idx] for k, v in targets.items()}),
        [str(i) for i in range(len(x))],
        **kwargs,
    )


def test_fixed_penalty_matches_scikit_survival_ridge_cox() -> None:
    """With one candidate penalty ``lam`` the fit minimises mean Cox loss + lam/2 |w|^2
    on unit-SD covariates: scikit-survival's ``CoxPHSurvivalAnalysis(alpha=d * lam)``
    (its objective is the summed loss + alpha/2 |w|^2; ``d`` events) on the same
    standardised covariates, coefficients mapped back to the original scale."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x, targets = _survival(120, np.array([0.8, -0.5, 0.0]), seed=1)
    lam = 0.05
    fit = _cox_fit(x, targets, l1_ratio=0.0, penalties=(lam,))
    sd = x.std(axis=0)
    d = int(targets["event"].sum())
    y = Surv.from_arrays(targets["event"].numpy().astype(bool), targets["time"].numpy())
    reference = CoxPHSurvivalAnalysis(alpha=d * lam, ties="efron").fit(x / sd, y)
    np.testing.assert_allclose(fit.weight[:, 0].numpy() * sd, reference.coef_, atol=2e-3)
    assert fit.penalty == lam and fit.penalties == (lam,) and len(fit.cv_loss) == 1
    # a larger penalty shrinks every coefficient towards 0
    stiffer = _cox_fit(x, targets, l1_ratio=0.0, penalties=(1.0,))
    assert float(stiffer.weight.norm()) < float(fit.weight.norm())


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_fixed_elastic_net_penalty_matches_scikit_survival_coxnet(l1_ratio: float) -> None:
    """The L1 part: ``CoxnetSurvivalAnalysis(alphas=[lam * d / n], l1_ratio)`` (its
    objective is the loss summed over samples / n + the same elastic-net penalty), on
    standardised covariates; ours is exactly 0 where Coxnet's is (the lasso zeroes
    some of the noise covariates)."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    x, targets = _survival(120, np.array([0.8, -0.5, 0.0, 0.0]), seed=5)
    lam = 0.1
    fit = _cox_fit(x, targets, l1_ratio=l1_ratio, penalties=(lam,))
    sd = x.std(axis=0)
    d, n = int(targets["event"].sum()), len(x)
    y = Surv.from_arrays(targets["event"].numpy().astype(bool), targets["time"].numpy())
    reference = CoxnetSurvivalAnalysis(alphas=[lam * d / n], l1_ratio=l1_ratio, tol=1e-9)
    reference.fit(x / sd, y)
    np.testing.assert_allclose(fit.weight[:, 0].numpy() * sd, reference.coef_[:, 0], atol=2e-3)
    zero = torch.from_numpy(reference.coef_[:, 0] == 0)
    assert torch.all(fit.weight[zero, 0] == 0) and (bool(zero.any()) or l1_ratio < 1)


def test_fixed_penalty_matches_scikit_learn_logistic_regression() -> None:
    """Two-class cross-entropy over two logits with lam/2 on both columns is logistic
    regression on their difference with penalty lam/4: scikit-learn's ``C = 2 / (n lam)``
    (summed loss, 1/2 |w|^2, unpenalised intercept)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    n, lam = 150, 0.02
    z = rng.normal(size=(n, 3))
    y = (z @ np.array([1.2, 0.0, -0.7]) + rng.logistic(size=n) > 0.3).astype(int)
    head = ClassificationHead(["a", "b"])
    labels = torch.tensor(y)
    fit = fit_penalised(
        torch.tensor(z * 5.0, dtype=torch.float32),
        lambda logits, idx: head.loss(logits, {"label": labels[idx]}),
        [str(i) for i in range(n)],
        n_outputs=2,
        l1_ratio=0.0,
        penalties=(lam,),
    )
    sd = (z * 5.0).std(axis=0)
    reference = LogisticRegression(C=2 / (n * lam), tol=1e-10).fit(z * 5.0 / sd, y)
    difference = (fit.weight[:, 1] - fit.weight[:, 0]).numpy() * sd
    np.testing.assert_allclose(difference, reference.coef_[0], atol=2e-3)
    assert float(fit.bias[1] - fit.bias[0]) == pytest.approx(reference.intercept_[0], abs=2e-3)


def test_cross_validation_keeps_signal_and_drops_noise() -> None:
    """With the default lasso, a covariate that carries the hazard gets a finite penalty
    and the largest coefficient; covariates of pure noise get a large penalty (hardly
    any coefficient)."""
    x, targets = _survival(150, np.array([1.0, 0.0, 0.0, 0.0]), seed=3)
    fit = _cox_fit(x, targets, strata=targets["event"].tolist())
    assert math.isfinite(fit.penalty)
    sd = x.std(axis=0)
    assert int(np.argmax(np.abs(fit.weight[:, 0].numpy() * sd))) == 0
    assert fit.weight[0, 0] > 0
    # the 1-SE rule: the largest penalty within one standard error of the best CV loss
    j_min = int(np.argmin(fit.cv_loss))
    chosen = fit.penalties.index(fit.penalty)
    assert fit.penalty >= fit.penalties[j_min]
    assert fit.cv_loss[chosen] <= fit.cv_loss[j_min] + fit.cv_se[j_min]
    assert all(
        fit.cv_loss[j] > fit.cv_loss[j_min] + fit.cv_se[j_min]
        for j, p in enumerate(fit.penalties)
        if p > fit.penalty
    )
    smallest = _cox_fit(x, targets, strata=targets["event"].tolist(), rule="min")
    assert smallest.penalty == fit.penalties[j_min] <= fit.penalty
    noise = np.random.default_rng(4).normal(size=x.shape)
    dropped = _cox_fit(noise, targets, strata=targets["event"].tolist())
    assert dropped.penalty >= 1.0
    assert float(dropped.weight.abs().max()) < 0.1 * float(fit.weight.abs().max())


def test_folds_keep_patients_whole_and_balance_strata() -> None:
    groups = np.array([f"P{i // 2}" for i in range(40)], dtype=object)  # two samples each
    strata = np.array([(i // 2) % 4 == 0 for i in range(40)], int)  # 5 of 20 patients
    fold = _folds(groups, strata, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    per_fold = [len(set(groups[(fold == f) & (strata == 1)])) for f in range(5)]
    assert per_fold == [1] * 5
    assert not np.array_equal(fold, _folds(groups, strata, 5, seed=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.zeros(4)}, "x must be"),
        ({"groups": ["a", "b"]}, "one entry per row"),
        ({"groups": ["a"] * 4}, "at least 2 groups"),
        ({"penalties": ()}, "penalties is empty"),
        ({"l1_ratio": 1.5}, "l1_ratio"),
        ({"rule": "2se"}, "rule"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs: dict, match: str) -> None:
    args = {
        "x": torch.zeros(4, 2),
        "loss": lambda logits, idx: logits.sum(),
        "groups": ["a", "b", "c", "d"],
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        fit_penalised(**args)
