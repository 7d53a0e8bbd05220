"""Evaluation metrics on tensors, matched to scikit-learn (book: chapter 5, "Evaluating models").

Every function here has scikit-learn's name, arguments, defaults and edge-case behaviour
:cite:p:`pedregosa2011scikit`, and ``tests/test_metrics.py`` checks it against
scikit-learn on hundreds of random cases in float64. What differs is the machinery:

* **Inputs** are torch tensors on any device; NumPy arrays and lists are accepted too.
  Class labels are integers (or booleans, or floats with integer values); scores and
  probabilities are real numbers. Work happens on the device of the first tensor given.
* **Outputs** are Python floats for single numbers and float64 tensors on the input's
  device for arrays (integer counts stay int64).
* **Vectorised**: confusion matrices come from one ``bincount`` of ``n_classes * true +
  pred``; ROC and precision-recall curves from one sort and one cumulative sum.
  Python loops run over classes or bootstrap resamples, never over samples.
* **Warnings** follow scikit-learn: where a metric is undefined (a precision with no
  predicted positives, an AUC with one class present) and ``zero_division="warn"``, the
  value is 0.0 (or NaN for curves and AUCs) and an ``UndefinedMetricWarning`` says why
  -- scikit-learn's own class, also importable from here, so existing warning filters
  apply. Pass ``zero_division=0.0``, ``1.0`` or ``np.nan`` to choose the value silently.
* **Bad input** -- lengths that differ, NaN or infinite scores, probabilities outside
  ``[0, 1]``, a label that ``labels`` does not declare (``log_loss``, ``roc_auc_score``),
  an unknown ``pos_label`` -- raises ``ValueError`` or ``TypeError`` naming the argument.
* **Deliberate differences**: class labels are numbers (no strings); multilabel targets
  and ``multi_class="ovo"`` are not implemented; empty inputs, repeated ``labels``,
  negative sample weights and weights that sum to zero raise; probabilities are
  computed in float64 whatever their input type.

The formulas live in one module per topic, each readable top to bottom:
``classification.py`` (accuracy, the confusion matrix, precision, recall,
:math:`F_\\beta`), ``ranking.py`` (ROC and precision-recall curves and their areas),
``calibration.py`` (log loss, Brier score, reliability diagrams, temperature scaling,
perplexity) and ``resampling.py`` (the bootstrap), all in ``companion/metrics/``.
scikit-learn's edge cases -- undefined ratios, warnings, label conventions -- sit apart
in ``_sklearn.py``, and input checks in ``companion/_validate.py``. Import every function
from here: ``from companion.metrics import roc_auc_score``.

Beyond scikit-learn: :func:`calibration_bins` and :func:`expected_calibration_error`
:cite:p:`naeini2015obtaining,guo2017calibration`, :func:`fit_temperature`,
:func:`perplexity` for language models (whose mean cross-entropy on a text
:func:`companion.train.language_model_loss` measures), and :func:`bootstrap_ci`
:cite:p:`efron1979bootstrap` for the uncertainty of any metric.
"""

from __future__ import annotations

from .calibration import (
    brier_score_loss,
    calibration_bins,
    calibration_curve,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    perplexity,
)
from .classification import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    fbeta_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)
from .ranking import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from .resampling import BootstrapResult, bootstrap_ci

__all__ = [
    "accuracy_score", "confusion_matrix",
    "precision_recall_fscore_support", "fbeta_score", "f1_score", "precision_score",
    "recall_score", "roc_curve", "auc", "roc_auc_score", "precision_recall_curve",
    "average_precision_score", "log_loss", "brier_score_loss", "calibration_curve",
    "calibration_bins", "expected_calibration_error", "fit_temperature", "perplexity",
    "BootstrapResult", "bootstrap_ci",
]


def __getattr__(name: str):
    """``UndefinedMetricWarning`` (scikit-learn's class, for warning filters), imported on
    first use so that importing this package does not import scikit-learn."""
    if name == "UndefinedMetricWarning":
        from ._sklearn import undefined_metric_warning

        return undefined_metric_warning()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The public home of every name is ``companion.metrics``: the API page, doctest, pickling
# and the "notebooks do not redefine the package" test find them here.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
