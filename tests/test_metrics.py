"""companion.metrics against scikit-learn, the oracle, on hundreds of random cases.

Each ``*_cases`` generator draws random problems with the edge cases mixed in -- ties
in scores, a single class present, all-correct and all-wrong predictions, labels that
are not 0..K-1, sample weights with zeros -- and :func:`agree` runs ours and
scikit-learn's on the same input and asserts that both return the same values (float64,
to 1e-12), raise the same kind of error, and emit the same kinds of warnings. Every
random-case test runs at three scales (:data:`SCALES`): hundreds of cases with sizes
from 1 to 1,000, where the edge cases live, then one case of each kind at 10^4 samples
and three at 10^5 (:data:`LARGE_CASES`), where cumulative sums and runs of ties are
long. ``test_large_inputs`` adds a few fixed inputs at 10^5 samples. Functions without
a scikit-learn counterpart have their own oracles: SciPy's minimiser and the zero of the
derivative for :func:`~companion.metrics.fit_temperature`, the geometric mean of the
target probabilities for :func:`~companion.metrics.perplexity`, resampling by hand for
:func:`~companion.metrics.bootstrap_ci`.
"""

from __future__ import annotations

import ast
import importlib
import math
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import gmean
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.exceptions import UndefinedMetricWarning

from companion import metrics as m

RTOL, ATOL = 1e-12, 1e-12
SIZES = (1, 2, 3, 5, 8, 20, 50, 200, 1000)
#: The random cases of every generator at a large size n, by case number c (each
#: generator's kind of case is c % 6): every kind at 10^4; at 10^5, where a case costs
#: about 0.1 s, cases 0, 3 and 5 (labels: all correct, mostly right, random; scores:
#: no ties, ties at 0.1 steps, a class balance from all-negative to all-positive).
LARGE_CASES = {10_000: range(6), 100_000: (0, 3, 5)}
#: The sizes of the random cases: drawn from SIZES (hundreds of cases), or one large n.
SCALES = [pytest.param(None, id="n<=1000"), pytest.param(10_000, id="n=10^4"),
          pytest.param(100_000, id="n=10^5")]
LABEL_SETS = ([0, 1, 2, 3, 4], [-1, 1], [3, 7, 11, 12, 20], [-5, -2, 0, 4])


# --------------------------------------------------------------------------- helpers


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.cpu().numpy()
    return x


def _check_device(x, device):
    if isinstance(x, torch.Tensor):
        assert x.device.type == torch.device(device).type, (x.device, device)
    elif isinstance(x, tuple):
        for item in x:
            _check_device(item, device)


def assert_same(ours, theirs, what=""):
    """Equal values (floats, None, arrays / tensors, tuples of them), NaN == NaN."""
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs), what
        for a, b in zip(ours, theirs):
            assert_same(a, b, what)
        return
    if theirs is None:
        assert ours is None, what
        return
    if np.ndim(theirs) == 0:
        assert isinstance(ours, float), f"{what}: expected a float, got {type(ours).__name__}"
    else:
        assert isinstance(ours, torch.Tensor), f"{what}: expected a tensor, got {type(ours)}"
        assert ours.shape == np.shape(theirs), f"{what}: shape {ours.shape} vs {np.shape(theirs)}"
    np.testing.assert_allclose(_to_numpy(ours), theirs, rtol=RTOL, atol=ATOL, equal_nan=True,
                               err_msg=what)


def _run(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except (ValueError, TypeError, NotImplementedError) as err:
            result = err
    kinds = {w.category for w in caught if issubclass(w.category, UserWarning)
             and "deterministic" not in str(w.message)}  # PyTorch's determinism alerts
    return result, kinds


def agree(what, ours_fn, theirs_fn, device=None):
    """Run both; same exception class family, same warning categories, same values."""
    ours, our_warnings = _run(ours_fn)
    theirs, their_warnings = _run(theirs_fn)
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"{what}: scikit-learn raised {theirs!r}, we did not"
        assert isinstance(ours, ValueError) == isinstance(theirs, ValueError), (what, ours, theirs)
        return None
    assert not isinstance(ours, Exception), f"{what}: we raised {ours!r}, scikit-learn did not"
    assert our_warnings == their_warnings, f"{what}: warnings {our_warnings} vs {their_warnings}"
    assert_same(ours, theirs, what)
    if device is not None:  # the device of the first tensor given (the CPU if there is none)
        given = [*getattr(ours_fn, "args", ()), *getattr(ours_fn, "keywords", {}).values()]
        _check_device(ours, next((a.device for a in given if isinstance(a, torch.Tensor)),
                                 torch.device("cpu")))
    return ours


def _as_input(x, device, rng):
    """The same data as a tensor on ``device`` (mostly), a NumPy array or a list."""
    kind = rng.integers(0, 6)
    if kind == 0:
        return x.tolist()
    if kind == 1:
        return x
    return torch.as_tensor(x, device=device)


def _weights(rng, n):
    if rng.random() < 0.5:
        return None
    w = rng.random(n) * 3
    w[rng.random(n) < 0.2] = 0.0
    if w.sum() == 0:
        w[0] = 1.0
    return w


# --------------------------------------------------------------------------- random cases


def _plan(count, n):
    """Case numbers and a size for each: ``count`` cases with sizes drawn from SIZES
    (without ``n``), or the cases ``LARGE_CASES[n]``, all of size ``n``."""
    if n is None:
        return range(count), lambda rng, sizes=SIZES: int(rng.choice(sizes))
    return LARGE_CASES[n], lambda rng, sizes=None: n


def label_cases(seed, count=240, n=None):
    """(what, y_true, y_pred, sample_weight) with the edge cases mixed in."""
    rng = np.random.default_rng(seed)
    cases, size = _plan(count, n)
    for c in cases:
        n = size(rng)
        label_set = np.array(LABEL_SETS[c % len(LABEL_SETS)])
        k = int(rng.integers(1, len(label_set) + 1))
        classes = rng.choice(label_set, size=k, replace=False)
        y_true = rng.choice(classes, size=n)
        kind = c % 6
        if kind == 0:  # all correct
            y_pred = y_true.copy()
        elif kind == 1:  # all wrong (where possible)
            ordered = np.sort(classes)
            y_pred = np.roll(ordered, 1)[np.searchsorted(ordered, y_true)]
        elif kind == 2:  # one constant prediction
            y_pred = np.full(n, rng.choice(label_set))
        elif kind == 3:  # mostly right
            y_pred = np.where(rng.random(n) < 0.8, y_true, rng.choice(label_set, size=n))
        else:  # random, possibly labels y_true never has
            y_pred = rng.choice(label_set if kind == 4 else classes, size=n)
        yield (f"case {c} (n={n}, kind={kind}, classes={sorted(classes.tolist())})",
               y_true, y_pred, _weights(rng, n), rng)


def score_cases(seed, count=240, n=None):
    """(what, y_true with labels in {0, 1}, y_score, sample_weight) binary ranking cases."""
    rng = np.random.default_rng(seed)
    cases, size = _plan(count, n)
    for c in cases:
        n = size(rng)
        kind = c % 6
        p_pos = rng.choice([0.0, 0.05, 0.5, 0.9, 1.0]) if kind == 5 else rng.random()
        y_true = (rng.random(n) < p_pos).astype(int)
        signal = y_true * rng.random() * 2
        y_score = signal + rng.normal(size=n)
        if kind in (1, 2):  # heavy ties
            y_score = np.round(y_score * 2) / 2
        elif kind == 3:  # probabilities with ties at 0.1 steps
            y_score = np.round(1 / (1 + np.exp(-y_score)), 1)
        elif kind == 4:  # a constant score
            y_score = np.full(n, 0.3)
        yield f"case {c} (n={n}, kind={kind})", y_true, y_score, _weights(rng, n), rng


def proba_cases(seed, count=160, n=None):
    """(what, y_true, probabilities (n, K), sample_weight): multi-class probabilistic cases."""
    rng = np.random.default_rng(seed)
    cases, size = _plan(count, n)
    for c in cases:
        n = size(rng, SIZES[1:])
        k = int(rng.integers(3, 6))
        y_true = rng.integers(0, k, n)
        y_true[:k] = np.arange(k)[: min(k, n)] if n >= k else y_true[:k]
        proba = rng.dirichlet(np.full(k, rng.choice([0.2, 1.0, 5.0])), size=n)
        if c % 4 == 0:  # coarse probabilities: many ties, exact 0s and 1s
            proba = np.round(proba, 1)
            proba[:, -1] = 1 - proba[:, :-1].sum(1)
            proba = np.clip(proba, 0, 1)
        yield f"case {c} (n={n}, K={k})", y_true, proba, _weights(rng, n), rng


# --------------------------------------------------------------------------- counting metrics


def _label_subset(rng, *arrays):
    """A random ``labels=`` argument: some of the labels present and the absent 99, shuffled."""
    pool = np.unique(np.concatenate([*arrays, [99]]))
    return rng.permutation(pool)[: rng.integers(1, len(pool) + 1)]


@pytest.mark.parametrize("n", SCALES)
def test_accuracy_and_confusion_matrix(device, n):
    for what, y_true, y_pred, w, rng in label_cases(0, n=n):
        yt, yp = _as_input(y_true, device, rng), _as_input(y_pred, device, rng)
        for normalize in (True, False):
            kw = dict(normalize=normalize, sample_weight=w)
            agree(f"accuracy {what} {kw}", partial(m.accuracy_score, yt, yp, **kw),
                  partial(skm.accuracy_score, y_true, y_pred, **kw))
        labels = _label_subset(rng, y_true, y_pred) if rng.random() < 0.5 else None
        kw = dict(labels=labels, sample_weight=w,
                  normalize=rng.choice([None, "true", "pred", "all"]))
        cm = agree(f"confusion_matrix {what} {kw}", partial(m.confusion_matrix, yt, yp, **kw),
                   partial(skm.confusion_matrix, y_true, y_pred, **kw), device)
        if cm is not None and kw["normalize"] is None and w is None:
            assert cm.dtype == torch.int64


ZERO_DIVISION = ("warn", 0.0, 1.0, np.nan)


@pytest.mark.parametrize("n", SCALES)
def test_precision_recall_fscore_support(device, n):
    for what, y_true, y_pred, w, rng in label_cases(1, count=160, n=n):
        yt, yp = _as_input(y_true, device, rng), _as_input(y_pred, device, rng)
        labels = _label_subset(rng, y_true) if rng.random() < 0.3 else None
        common = dict(beta=float(rng.choice([0.0, 0.5, 1.0, 2.0, np.inf])), labels=labels,
                      sample_weight=w, zero_division=ZERO_DIVISION[rng.integers(0, 4)])
        for average in (None, "micro", "macro", "weighted", "binary"):
            pos_label = 1
            if average == "binary":
                pos_label = int(rng.choice(np.concatenate([y_true, [1]])))
            kw = dict(common, average=average, pos_label=pos_label)
            agree(f"prfs {what} {kw}", partial(m.precision_recall_fscore_support, yt, yp, **kw),
                  partial(skm.precision_recall_fscore_support, y_true, y_pred, **kw), device)


@pytest.mark.parametrize("n", SCALES)
def test_score_wrappers(device, n):
    for what, y_true, y_pred, w, rng in label_cases(2, count=80, n=n):
        yt, yp = _as_input(y_true, device, rng), _as_input(y_pred, device, rng)
        kw = dict(average=rng.choice([None, "micro", "macro", "weighted", "binary"]),
                  sample_weight=w, zero_division=ZERO_DIVISION[rng.integers(0, 4)])
        for ours, theirs in ((m.precision_score, skm.precision_score),
                             (m.recall_score, skm.recall_score), (m.f1_score, skm.f1_score)):
            agree(f"{ours.__name__} {what} {kw}", partial(ours, yt, yp, **kw),
                  partial(theirs, y_true, y_pred, **kw), device)
        agree(f"fbeta {what} {kw}", partial(m.fbeta_score, yt, yp, beta=0.5, **kw),
              partial(skm.fbeta_score, y_true, y_pred, beta=0.5, **kw), device)


def test_zero_division_policy():
    y_true, y_pred = [0, 0, 0], [0, 0, 0]  # no positive predicted, none true
    with pytest.warns(m.UndefinedMetricWarning, match="Precision is ill-defined"):
        assert m.precision_score(y_true, y_pred) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit zero_division is silent
        assert m.precision_score(y_true, y_pred, zero_division=1.0) == 1.0
        assert math.isnan(m.recall_score(y_true, y_pred, zero_division=np.nan))
        assert m.f1_score(y_true, y_pred, zero_division=0.0) == 0.0
    assert m.UndefinedMetricWarning is UndefinedMetricWarning  # scikit-learn's own class


def test_micro_average_equals_accuracy_and_f1_is_harmonic_mean():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    micro = m.precision_recall_fscore_support(y_true, y_pred, average="micro")
    assert micro[:3] == pytest.approx((m.accuracy_score(y_true, y_pred),) * 3, rel=1e-15)
    p, r, f, _ = m.precision_recall_fscore_support(y_true == 1, y_pred == 1, average="binary")
    assert f == pytest.approx(2 * p * r / (p + r), rel=1e-14)


# --------------------------------------------------------------------------- ranking metrics


@pytest.mark.parametrize("n", SCALES)
def test_roc_and_precision_recall_curves(device, n):
    for what, y_true, y_score, w, rng in score_cases(4, n=n):
        yt, ys = _as_input(y_true, device, rng), _as_input(y_score, device, rng)
        for drop in (True, False):
            kw = dict(sample_weight=w, drop_intermediate=drop)
            roc = agree(f"roc {what} {kw}", partial(m.roc_curve, yt, ys, **kw),
                        partial(skm.roc_curve, y_true, y_score, **kw), device)
            agree(f"pr curve {what} {kw}", partial(m.precision_recall_curve, yt, ys, **kw),
                  partial(skm.precision_recall_curve, y_true, y_score, **kw), device)
        if roc is not None and not torch.isnan(roc[0]).any() and not torch.isnan(roc[1]).any():
            fpr, tpr = roc[0], roc[1]
            agree(f"auc {what}", partial(m.auc, fpr, tpr),
                  partial(skm.auc, fpr.cpu().numpy(), tpr.cpu().numpy()))


def _one_class_has_zero_weight(y_true, w):
    return w is not None and len(np.unique(y_true[w != 0])) < len(np.unique(y_true))


@pytest.mark.parametrize("n", SCALES)
def test_roc_auc_and_average_precision(device, n):
    for what, y_true, y_score, w, rng in score_cases(5, n=n):
        yt, ys = _as_input(y_true, device, rng), _as_input(y_score, device, rng)
        max_fpr = None if rng.random() < 0.6 else float(rng.choice([0.1, 0.5, rng.random()]))
        if _one_class_has_zero_weight(y_true, w):
            # scikit-learn fails inside auc() here (with max_fpr); we return NaN and warn
            with pytest.warns(m.UndefinedMetricWarning, match="Only one class"):
                assert math.isnan(m.roc_auc_score(yt, ys, sample_weight=w, max_fpr=0.5))
            max_fpr = None
        kw = dict(sample_weight=w, max_fpr=max_fpr)
        agree(f"roc_auc {what} {kw}", partial(m.roc_auc_score, yt, ys, **kw),
              partial(skm.roc_auc_score, y_true, y_score, **kw))
        agree(f"average_precision {what}", partial(m.average_precision_score, yt, ys,
                                                   sample_weight=w),
              partial(skm.average_precision_score, y_true, y_score, sample_weight=w))


def test_curves_with_other_labels_and_pos_label():
    rng = np.random.default_rng(6)
    for c in range(60):
        n = int(rng.choice(SIZES[2:]))
        pair = [(-1, 1), (3, 7), (0, 1), (2, 5)][c % 4]
        y_true = rng.choice(pair, n)
        y_score = np.round(rng.normal(size=n) + (y_true == pair[1]), 1)
        pos_label = [None, pair[0], pair[1], 9][rng.integers(0, 4)]
        what = f"case {c} labels={pair} pos_label={pos_label}"
        for ours, theirs in ((m.roc_curve, skm.roc_curve),
                             (m.precision_recall_curve, skm.precision_recall_curve)):
            agree(f"{ours.__name__} {what}", partial(ours, y_true, y_score, pos_label=pos_label),
                  partial(theirs, y_true, y_score, pos_label=pos_label))
        agree(f"roc_auc {what}", partial(m.roc_auc_score, y_true, y_score),
              partial(skm.roc_auc_score, y_true, y_score))
        ap_label = 1 if pos_label is None else pos_label
        agree(f"average_precision {what}",
              partial(m.average_precision_score, y_true, y_score, pos_label=ap_label),
              partial(skm.average_precision_score, y_true, y_score, pos_label=ap_label))


@pytest.mark.parametrize("n", SCALES)
def test_multiclass_roc_auc_and_average_precision(device, n):
    for what, y_true, proba, w, rng in proba_cases(7, n=n):
        yt, pr = _as_input(y_true, device, rng), _as_input(proba, device, rng)
        average = rng.choice(["macro", "weighted", "micro", None])
        labels = np.arange(proba.shape[1]) if rng.random() < 0.3 else None
        kw = dict(multi_class="ovr", average=average, sample_weight=w, labels=labels)
        agree(f"roc_auc ovr {what} {kw}", partial(m.roc_auc_score, yt, pr, **kw),
              partial(skm.roc_auc_score, y_true, proba, **kw), device)
        kw = dict(average=average, sample_weight=w)
        agree(f"average_precision {what} {kw}", partial(m.average_precision_score, yt, pr, **kw),
              partial(skm.average_precision_score, y_true, proba, **kw), device)


def test_auc_is_the_probability_that_a_positive_outranks_a_negative():
    rng = np.random.default_rng(8)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=60) + y, 1)  # with ties
        pos, neg = s[y == 1][:, None], s[y == 0][None, :]
        mann_whitney = ((pos > neg) + 0.5 * (pos == neg)).mean()
        assert m.roc_auc_score(y, s) == pytest.approx(mann_whitney, rel=1e-12)


def test_auc_direction_and_errors():
    assert m.auc([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    assert m.auc([1, 0.5, 0], [1, 1, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="neither increasing nor decreasing"):
        m.auc([0, 1, 0.5], [0, 1, 1])
    with pytest.raises(ValueError, match="at least 2 points"):
        m.auc([0.5], [1])


# --------------------------------------------------------------------------- probabilities


@pytest.mark.parametrize("n", SCALES)
def test_log_loss_and_brier_score(device, n):
    for what, y_true, proba, w, rng in proba_cases(9, n=n):
        yt, pr = _as_input(y_true, device, rng), _as_input(proba, device, rng)
        agree(f"log_loss {what}", partial(m.log_loss, yt, pr, sample_weight=w),
              partial(skm.log_loss, y_true, proba, sample_weight=w))
        agree(f"brier {what}", partial(m.brier_score_loss, yt, pr, sample_weight=w),
              partial(skm.brier_score_loss, y_true, proba, sample_weight=w))
        if rng.random() < 0.3:  # probabilities that do not sum to one: both warn
            agree(f"log_loss unnormalised {what}", partial(m.log_loss, y_true, proba * 0.9),
                  partial(skm.log_loss, y_true, proba * 0.9))
        labels = rng.permutation(proba.shape[1])  # unsorted labels: both warn
        agree(f"log_loss labels {what}", partial(m.log_loss, y_true, proba, labels=labels),
              partial(skm.log_loss, y_true, proba, labels=labels))
    for what, y_true, y_score, w, rng in score_cases(10, count=120, n=n):  # binary, 1-D
        p = 1 / (1 + np.exp(-y_score))
        p[rng.random(len(p)) < 0.1] = rng.choice([0.0, 1.0])
        yt, pt = _as_input(y_true, device, rng), _as_input(p, device, rng)
        kw = dict(sample_weight=w, labels=[0, 1])
        agree(f"binary log_loss {what}", partial(m.log_loss, yt, pt, **kw),
              partial(skm.log_loss, y_true, p, **kw))
        for scale in ("auto", False):
            kw = dict(sample_weight=w, pos_label=[None, 0, 1][rng.integers(0, 3)],
                      scale_by_half=scale)
            agree(f"binary brier {what} {kw}", partial(m.brier_score_loss, yt, pt, **kw),
                  partial(skm.brier_score_loss, y_true, p, **kw))
    y37 = np.array([3, 7, 7, 3, 7])  # labels outside {0, 1}: the greater one is positive
    p37 = np.array([0.2, 0.9, 0.6, 0.4, 0.3])
    agree("brier labels 3/7", partial(m.brier_score_loss, y37, p37),
          partial(skm.brier_score_loss, y37, p37))
    agree("log_loss labels 3/7", partial(m.log_loss, y37, p37), partial(skm.log_loss, y37, p37))


def test_float32_probabilities_like_scikit_learn():
    """float32 softmax output: no spurious 'do not sum to one' warning, clipping at the
    float32 epsilon, values equal to scikit-learn's float32 computation to 1e-6."""
    g = torch.Generator().manual_seed(0)
    proba = torch.softmax(4 * torch.randn(300, 10, generator=g), dim=1)  # float32
    y = torch.randint(0, 10, (300,), generator=g)
    kw = dict(labels=list(range(10)))
    for ours, theirs in ((m.log_loss, skm.log_loss), (m.brier_score_loss, skm.brier_score_loss)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = ours(y, proba, **kw)
        assert value == pytest.approx(theirs(y.numpy(), proba.numpy(), **kw), rel=1e-6)
    certain_and_wrong = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    assert m.log_loss([1], certain_and_wrong, labels=[0, 1]) == pytest.approx(
        -math.log(torch.finfo(torch.float32).eps), rel=1e-12)


@pytest.mark.parametrize("n", SCALES)
def test_calibration_curve(device, n):
    for what, y_true, y_score, _, rng in score_cases(11, count=160, n=n):
        p = 1 / (1 + np.exp(-y_score))
        if rng.random() < 0.4:
            p = np.round(p, 1)  # values on the bin edges
        yt, pt = _as_input(y_true, device, rng), _as_input(p, device, rng)
        for strategy in ("uniform", "quantile"):
            kw = dict(n_bins=int(rng.integers(1, 21)), strategy=strategy)
            agree(f"calibration_curve {what} {kw}", partial(m.calibration_curve, yt, pt, **kw),
                  partial(sk_calibration_curve, y_true, p, **kw), device)


def _ece_oracle(hit, confidence, n_bins, strategy):
    """ECE from scikit-learn's calibration_curve and NumPy bin counts."""
    prob_true, prob_pred = sk_calibration_curve(hit, confidence, n_bins=n_bins,
                                                strategy=strategy, pos_label=1)
    if strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        edges = np.percentile(confidence, np.linspace(0, 1, n_bins + 1) * 100)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(prob_true - prob_pred)) / counts.sum())


@pytest.mark.parametrize("n", SCALES)
def test_expected_calibration_error(device, n):
    for what, y_true, proba, _, rng in proba_cases(12, count=80, n=n):
        n_bins = int(rng.integers(1, 20))
        strategy = rng.choice(["uniform", "quantile"])
        hit = (proba.argmax(1) == y_true).astype(int)
        ours = m.expected_calibration_error(torch.as_tensor(y_true, device=device),
                                            torch.as_tensor(proba, device=device),
                                            n_bins=n_bins, strategy=strategy)
        assert ours == pytest.approx(_ece_oracle(hit, proba.max(1), n_bins, strategy),
                                     rel=RTOL, abs=ATOL), what
        p1 = proba[:, 1]  # a binary reading of the same data: y == 1 against p_1
        ours = m.expected_calibration_error((y_true == 1).astype(int), p1, n_bins=n_bins,
                                            strategy=strategy)
        oracle = _ece_oracle((y_true == 1).astype(int), p1, n_bins, strategy)
        assert ours == pytest.approx(oracle, rel=RTOL, abs=ATOL), what
    y, proba = [0, 1, 2], [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.3, 0.3, 0.4]]
    acc, conf, count = m.calibration_bins(y, proba, n_bins=2)  # bins [0, 0.5], (0.5, 1]
    assert acc.tolist() == [0.5, 1.0] and conf.tolist() == [0.4, 0.9]
    assert count.tolist() == [2, 1]
    assert m.expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.1, rel=1e-14)
    assert m.expected_calibration_error([1, 0], [[0.0, 1.0], [1.0, 0.0]]) == 0.0


def _nll_at_temperature(logits, y, t):
    """Mean cross-entropy of softmax(logits / t), in NumPy float64 (the oracle's objective)."""
    z = logits / t
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


# (seed, n, K, temperature the labels are drawn at, scale of the logits, dtype)
TEMPERATURE_CASES = [(0, 400, 5, 2.5, 1.0, torch.float64), (1, 30, 2, 1.0, 2.0, torch.float64),
                     (2, 3000, 10, 0.5, 1.0, torch.float32), (3, 200, 3, 4.0, 5.0, torch.float64),
                     (4, 1000, 20, 1.5, 0.3, torch.float32)]


@pytest.mark.parametrize("seed, n, k, drawn_at, scale, dtype", TEMPERATURE_CASES)
def test_fit_temperature_matches_scipy(device, seed, n, k, drawn_at, scale, dtype):
    """Ours (L-BFGS on log T) against SciPy's bounded Brent search on log T, and the
    first-order condition: dNLL/dT = mean(z_y - E_p[z]) / T^2 = 0 at the optimum, i.e. the
    true class's mean logit equals the mean logit expected under softmax(z / T)."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.multinomial(torch.softmax(logits.double() / drawn_at, 1), 1, generator=g)[:, 0]
    ours = m.fit_temperature(logits.to(device), y.to(device))
    z, labels = logits.double().numpy(), y.numpy()

    oracle = math.exp(minimize_scalar(lambda log_t: _nll_at_temperature(z, labels,
                                                                        math.exp(log_t)),
                                      bounds=(-5, 5), method="bounded",
                                      options={"xatol": 1e-10}).x)
    assert ours == pytest.approx(oracle, rel=1e-6)

    def slope(t):  # dNLL/dT
        p = torch.softmax(torch.as_tensor(z) / t, 1).numpy()
        return np.mean(z[np.arange(n), labels] - (p * z).sum(1)) / t**2

    # zero at ours, compared with the slope 0.1 % away: within ~1e-6 of the stationary point
    assert abs(slope(ours)) < 1e-3 * min(abs(slope(ours * 0.999)), abs(slope(ours * 1.001)))
    assert slope(ours * 0.999) < 0 < slope(ours * 1.001)  # falling, then rising: a minimum
    best = _nll_at_temperature(z, labels, ours)
    assert best <= min(_nll_at_temperature(z, labels, t) for t in (1.0, drawn_at))
    if n >= 400:  # enough data to recover the temperature the labels were drawn at
        assert ours == pytest.approx(drawn_at, rel=0.25)


# --------------------------------------------------------------------------- language models


@pytest.mark.parametrize("seed, n, vocab, scale", [(0, 500, 37, 1.0), (1, 1, 2, 3.0),
                                                  (2, 2000, 1000, 0.1), (3, 300, 103, 8.0)])
def test_perplexity_is_one_over_the_geometric_mean_probability(seed, n, vocab, scale):
    """exp of PyTorch's mean cross-entropy against 1 / (geometric mean of the probabilities
    given to the targets), computed by SciPy; in nats, bits and base 10."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    p_target = torch.softmax(logits, 1)[torch.arange(n), targets].numpy()
    oracle = 1 / gmean(p_target)
    ce = F.cross_entropy(logits, targets).item()  # nats per token
    assert m.perplexity(ce) == pytest.approx(oracle, rel=1e-12)
    assert m.perplexity(ce) == pytest.approx(math.exp(ce), rel=1e-14)
    assert m.perplexity(ce / math.log(2), base=2) == pytest.approx(oracle, rel=1e-12)
    assert m.perplexity(ce / math.log(10), base=10) == pytest.approx(oracle, rel=1e-12)
    ce32 = F.cross_entropy(logits.float(), targets)  # a float32 tensor is accepted too
    assert m.perplexity(ce32) == pytest.approx(oracle, rel=1e-5)


def test_perplexity_of_a_uniform_choice_is_its_size():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 37, (500,), generator=g)
    uniform = F.cross_entropy(torch.zeros(500, 37, dtype=torch.float64), targets).item()
    assert m.perplexity(uniform) == pytest.approx(37, rel=1e-14)  # uniform: H = log V
    for k in (1, 2, 5, 36):  # uniform over k of the 37 tokens, the targets among them
        logits = torch.full((500, 37), -math.inf, dtype=torch.float64)
        logits[:, :k] = 0.0
        ce = F.cross_entropy(logits, targets % k).item()
        assert m.perplexity(ce) == pytest.approx(k, rel=1e-14)


# --------------------------------------------------------------------------- bootstrap


def _accuracy_difference(y, a, b):
    return m.accuracy_score(y, a) - m.accuracy_score(y, b)


def _bootstrap_cases():
    """(what, ours, oracle, arrays, n_resamples, confidence_level): ``ours`` takes tensors,
    ``oracle`` NumPy arrays (scikit-learn or NumPy), both the same metric."""
    rng = np.random.default_rng(13)
    y = rng.integers(0, 2, 80)
    s = rng.normal(size=80) + y
    yield "roc_auc", m.roc_auc_score, skm.roc_auc_score, (y, s), 200, 0.9
    y7, pred7 = rng.integers(0, 2, 7), rng.integers(0, 2, 7)
    yield "accuracy n=7", m.accuracy_score, skm.accuracy_score, (y7, pred7), 2, 0.5
    x = rng.exponential(size=1000)
    yield ("mean n=1000", lambda t: float(t.mean()), lambda a: float(a.mean()), (x,), 500,
           0.99)
    y3 = rng.integers(0, 3, 50)
    proba = rng.dirichlet(np.ones(3), size=50)  # (50, 3): resampled by rows
    yield ("log_loss (n, K)", partial(m.log_loss, labels=[0, 1, 2]),
           partial(skm.log_loss, labels=[0, 1, 2]), (y3, proba), 100, 0.95)
    y2 = rng.integers(0, 2, 200)
    a = np.where(rng.random(200) < 0.85, y2, 1 - y2)
    b = np.where(rng.random(200) < 0.05, 1 - a, a)
    yield ("paired accuracy difference", _accuracy_difference,
           lambda y, a, b: skm.accuracy_score(y, a) - skm.accuracy_score(y, b), (y2, a, b),
           300, 0.95)


@pytest.mark.parametrize("case", list(_bootstrap_cases()), ids=lambda c: c[0])
def test_bootstrap_matches_resampling_by_hand(device, case):
    what, ours, oracle, arrays, n_resamples, level = case
    n = len(arrays[0])
    tensors = [torch.as_tensor(arrays[0], device=device), *arrays[1:]]  # mixed inputs
    result = m.bootstrap_ci(ours, *tensors, n_resamples=n_resamples, confidence_level=level,
                            generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    values = []
    for _ in range(n_resamples):
        rows = torch.randint(n, (n,), generator=g).numpy()
        values.append(oracle(*(a[rows] for a in arrays)))
    alpha = 1 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])  # linear interpolation
    assert result.low == pytest.approx(low, rel=1e-12, abs=1e-15), what
    assert result.high == pytest.approx(high, rel=1e-12, abs=1e-15), what
    assert result.estimate == pytest.approx(oracle(*arrays), rel=1e-12, abs=1e-15), what
    assert result.confidence_level == level
    assert result.distribution.device.type == device.type
    np.testing.assert_allclose(result.distribution.cpu().numpy(), values, rtol=1e-12,
                               atol=1e-15, err_msg=what)
    assert result.standard_error == pytest.approx(np.std(values, ddof=1), rel=1e-10,
                                                  abs=1e-15)


def test_bootstrap_standard_error_of_accuracy_is_binomial():
    rng = np.random.default_rng(14)
    correct = rng.random(2000) < 0.8
    result = m.bootstrap_ci(lambda c: c.double().mean(), torch.as_tensor(correct),
                            n_resamples=1000, generator=torch.Generator().manual_seed(0))
    p = correct.mean()
    assert result.standard_error == pytest.approx(math.sqrt(p * (1 - p) / 2000), rel=0.1)
    assert result.low < p < result.high


def test_paired_bootstrap_of_a_difference():
    rng = np.random.default_rng(15)
    y = rng.integers(0, 2, 200)
    a = np.where(rng.random(200) < 0.85, y, 1 - y)
    b = np.where(rng.random(200) < 0.05, 1 - a, a)  # b differs from a on a few rows

    paired = m.bootstrap_ci(_accuracy_difference, y, a, b,
                            generator=torch.Generator().manual_seed(0))
    assert paired.estimate == pytest.approx(skm.accuracy_score(y, a) - skm.accuracy_score(y, b))
    assert paired.low <= paired.estimate <= paired.high


# --------------------------------------------------------------------------- large inputs


def test_large_inputs(device):
    rng = np.random.default_rng(16)
    n = 100_000
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + y, 2)  # about 1,000 distinct scores
    p = 1 / (1 + np.exp(-s))
    y_pred = (s > 0.5).astype(int)
    w = rng.random(n)
    y10 = rng.integers(0, 10, n)
    pred10 = np.where(rng.random(n) < 0.7, y10, rng.integers(0, 10, n))
    yt, st, pt, predt, y10t = (torch.as_tensor(a, device=device) for a in (y, s, p, y_pred, y10))
    cases = [
        ("accuracy_score", (yt, predt), (y, y_pred), {}),
        ("f1_score", (yt, predt), (y, y_pred), dict(sample_weight=w)),
        ("confusion_matrix", (yt, predt), (y, y_pred), {}),
        ("precision_recall_fscore_support", (y10t, pred10), (y10, pred10), dict(average="macro")),
        ("roc_curve", (yt, st), (y, s), {}),
        ("roc_auc_score", (yt, st), (y, s), {}),
        ("roc_auc_score", (yt, st), (y, s), dict(sample_weight=w)),
        ("average_precision_score", (yt, st), (y, s), {}),
        ("precision_recall_curve", (yt, st), (y, s), {}),
        ("log_loss", (yt, pt), (y, p), {}),
        ("brier_score_loss", (yt, pt), (y, p), {}),
    ]
    for name, ours, theirs, kw in cases:
        agree(f"large {name} {kw}", partial(getattr(m, name), *ours, **kw),
              partial(getattr(skm, name), *theirs, **kw), device)
    kw = dict(n_bins=10, strategy="quantile")
    agree("large calibration_curve", partial(m.calibration_curve, yt, pt, **kw),
          partial(sk_calibration_curve, y, p, **kw), device)


# --------------------------------------------------------------------------- bad input


BAD_INPUT = [
    (m.accuracy_score, ([0, 1, 1], [0, 1]), {}, ValueError, "different lengths"),
    (m.accuracy_score, ([], []), {}, ValueError, "empty"),
    (m.accuracy_score, ([0, 1], [0.5, 1]), {}, ValueError, "non-integer"),
    (m.accuracy_score, ([[0, 1]], [[0, 1]]), {}, ValueError, "1-D"),
    (m.accuracy_score, (["a", "b"], ["a", "b"]), {}, TypeError, "numbers"),
    (m.accuracy_score, ({0, 1}, [0, 1]), {}, TypeError, "torch.Tensor"),
    (m.accuracy_score, ([0, 1], [0, 1]), {"sample_weight": [1, -1]}, ValueError, "non-negative"),
    (m.accuracy_score, ([0, 1], [0, 1]), {"sample_weight": [1]}, ValueError, "sample_weight"),
    (m.confusion_matrix, ([0, 1], [0, 1]), {"labels": [5]}, ValueError, "at least one label"),
    (m.confusion_matrix, ([0, 1], [0, 1]), {"labels": [0, 0]}, ValueError, "repeat"),
    (m.confusion_matrix, ([0, 1], [0, 1]), {"normalize": "rows"}, ValueError, "normalize"),
    (m.f1_score, ([0, 1, 2], [0, 1, 2]), {}, ValueError, "average='binary'"),
    (m.f1_score, ([0, 1], [0, 1]), {"pos_label": 2}, ValueError, "pos_label=2"),
    (m.f1_score, ([0, 1], [0, 1]), {"pos_label": "yes"}, TypeError, "pos_label"),
    (m.f1_score, ([0, 1], [0, 1]), {"average": "samples"}, ValueError, "average"),
    (m.f1_score, ([0, 1], [0, 1]), {"zero_division": 0.5}, ValueError, "zero_division"),
    (m.fbeta_score, ([0, 1], [0, 1]), {"beta": -1}, ValueError, "beta"),
    (m.roc_curve, ([0, 1], [0.5, math.nan]), {}, ValueError, "NaN"),
    (m.roc_curve, ([0, 1], [0.5, math.inf]), {}, ValueError, "infinity"),
    (m.roc_curve, ([0, 2], [0.1, 0.4]), {}, ValueError, "pos_label"),
    (m.roc_curve, ([0, 1, 2], [0.1, 0.4, 0.3]), {}, ValueError, "3 classes"),
    (m.roc_auc_score, ([0, 1, 2], [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]]), {}, ValueError,
     "multi_class"),
    (m.roc_auc_score, ([0, 1, 2], [[0.5, 0.6, 0], [0, 1, 0], [0, 0, 1]]),
     {"multi_class": "ovr"}, ValueError, "sum to one"),
    (m.roc_auc_score, ([0, 1, 3], np.eye(3)), {"multi_class": "ovr", "labels": [0, 1, 2]},
     ValueError, "not in labels"),
    (m.roc_auc_score, ([0, 1, 2], np.eye(3)), {"multi_class": "ovo"}, NotImplementedError, "ovo"),
    (m.roc_auc_score, ([0, 1], [0.5, 0.2]), {"max_fpr": 0}, ValueError, "max_fpr"),
    (m.average_precision_score, ([0, 2], [0.3, 0.1]), {}, ValueError, "pos_label=1"),
    (m.log_loss, ([0, 1], [0.2, 1.5]), {}, ValueError, "greater than 1"),
    (m.log_loss, ([0, 1], [-0.2, 0.5]), {}, ValueError, "lower than 0"),
    (m.log_loss, ([0, 1], [0.2, math.nan]), {}, ValueError, "NaN"),
    (m.log_loss, ([0, 0], [0.2, 0.4]), {}, ValueError, "only one label"),
    (m.log_loss, ([0, 1, 2], [0.2, 0.4, 0.1]), {}, ValueError, "columns"),
    (m.log_loss, ([0, 1, 5], np.eye(3)), {"labels": [0, 1, 2]}, ValueError, r"\[5\] not in"),
    (m.brier_score_loss, ([0, 1, 2], [0.2, 0.4, 0.1]), {}, ValueError, "binary"),
    (m.brier_score_loss, ([0, 1], [0.2, 1.4]), {}, ValueError, "greater than 1"),
    (m.brier_score_loss, ([0, 1], [0.2, 0.4]), {"scale_by_half": "yes"}, ValueError, "scale"),
    (m.calibration_curve, ([0, 1], [0.2, 1.4]), {}, ValueError, "outside"),
    (m.calibration_curve, ([0, 1], [0.2, 0.4]), {"n_bins": 0}, ValueError, "n_bins"),
    (m.calibration_curve, ([0, 1], [0.2, 0.4]), {"strategy": "even"}, ValueError, "strategy"),
    (m.expected_calibration_error, ([0, 3], [[0.5, 0.5], [0.1, 0.9]]), {}, ValueError,
     "class indices"),
    (m.fit_temperature, ([[0.1, 0.2]], [2]), {}, ValueError, "class indices"),
    (m.perplexity, (math.nan,), {}, ValueError, "finite"),
    (m.perplexity, (-1.0,), {}, ValueError, ">= 0"),
    (m.perplexity, (1.0,), {"base": 1.0}, ValueError, "base"),
    (m.bootstrap_ci, (m.accuracy_score, [0, 1], [0, 1]), {"n_resamples": 1}, ValueError,
     "n_resamples"),
    (m.bootstrap_ci, (m.accuracy_score, [0, 1], [0, 1]), {"confidence_level": 1.0}, ValueError,
     "confidence_level"),
    (m.bootstrap_ci, (m.accuracy_score, [0, 1], [0, 1, 1]), {}, ValueError, "different lengths"),
]


@pytest.mark.parametrize("fn, args, kwargs, error, match", BAD_INPUT,
                         ids=[f"{b[0].__name__}-{b[4]}" for b in BAD_INPUT])
def test_bad_input(fn, args, kwargs, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            fn(*args, **kwargs)


def test_bootstrap_refuses_undefined_resamples():
    y, s = [0, 0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.9]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="undefined"):
            m.bootstrap_ci(m.roc_auc_score, y, s, n_resamples=50,
                           generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- layout


TOPICS = ("classification", "ranking", "calibration", "resampling")


def test_every_public_name_lives_in_one_topic_module_and_is_exported_here():
    owners = {}
    for topic in TOPICS:
        module = importlib.import_module(f"companion.metrics.{topic}")
        for name in module.__all__:
            owners.setdefault(name, []).append(topic)
            assert getattr(m, name) is getattr(module, name), name
    assert sorted(owners) == sorted(m.__all__)
    assert all(len(topics) == 1 for topics in owners.values()), owners
    # the public home (API page, pickling, doctest) is companion.metrics
    assert {getattr(m, name).__module__ for name in m.__all__} == {"companion.metrics"}
    assert m.UndefinedMetricWarning is UndefinedMetricWarning


@pytest.mark.parametrize("path", sorted(Path(m.__file__).parent.glob("*.py")),
                         ids=lambda p: p.name)
def test_no_module_imports_a_private_name(path):
    """Shared helpers live in private modules under public names (``_common``,
    ``_sklearn``, ``companion._validate``); no module reaches into another's ``_name``."""
    private = [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_")]
    assert not private, private


def test_formulas_are_short():
    """The functions chapter 5 shows stay short: at most 40 lines of code, docstring aside."""
    long = []
    for topic in TOPICS:
        path = Path(m.__file__).parent / f"{topic}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                doc = node.body[0] if isinstance(node.body[0], ast.Expr) else None
                lines = node.end_lineno - node.lineno + 1
                lines -= 0 if doc is None else doc.end_lineno - doc.lineno + 1
                if lines > 40:
                    long.append(f"{topic}.{node.name}: {lines} lines")
    assert not long, long
