r"""The uncertainty of any metric: percentile bootstrap confidence intervals
(book: chapter 5, "How sure are we? Bootstrap confidence intervals").

Resample the rows with replacement, evaluate the metric on each resample, and read the
interval off the quantiles of those values :cite:p:`efron1979bootstrap`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from companion._validate import as_tensor, check_same_length, device_of, float_dtype

__all__ = ["BootstrapResult", "bootstrap_ci"]


@dataclass(frozen=True)
class BootstrapResult:
    """A metric's value and its bootstrap confidence interval (:func:`bootstrap_ci`).

    ``distribution`` holds the metric on each resample, a ``(n_resamples,)`` tensor on
    the inputs' device.
    """

    estimate: float
    low: float
    high: float
    confidence_level: float
    distribution: torch.Tensor

    @property
    def standard_error(self) -> float:
        """Standard deviation of the bootstrap distribution."""
        return float(self.distribution.std())


def bootstrap_ci(metric: Callable[..., float], *arrays, n_resamples: int = 1000,
                 confidence_level: float = 0.95,
                 generator: torch.Generator | None = None) -> BootstrapResult:
    r"""Percentile bootstrap confidence interval of ``metric(*arrays)``.

    Draw ``n_resamples`` samples of the ``n`` rows with replacement -- the same rows from
    every array, so that pairs such as (labels, scores of model A, scores of model B)
    stay together -- evaluate the metric on each, and report the
    :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles of those values
    (:math:`\alpha = 1 -` ``confidence_level``), interpolated as ``np.percentile`` does
    :cite:p:`efron1979bootstrap`.
    For a difference between two models, pass a metric that returns the difference:
    the interval is then *paired* -- both models are scored on the same resampled rows,
    so the correlation between their errors is accounted for. When the two models'
    results are positively correlated (as on a shared test set they usually are), the
    paired interval is narrower than one built from two separate intervals.
    ``generator`` (a CPU ``torch.Generator``) makes the resamples repeatable.
    """
    if not arrays:
        raise ValueError("give at least one array to resample")
    if not isinstance(n_resamples, int) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an int >= 2, got {n_resamples!r}")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    device = device_of(*arrays)
    tensors = [as_tensor(f"arrays[{k}]", a, device) for k, a in enumerate(arrays)]
    n = check_same_length(**{f"arrays[{k}]": t for k, t in enumerate(tensors)})
    if n == 0:
        raise ValueError("the arrays are empty")
    values = []
    for _ in range(n_resamples):
        rows = torch.randint(n, (n,), generator=generator).to(device)
        values.append(float(metric(*(t[rows] for t in tensors))))
    distribution = torch.tensor(values, dtype=torch.float64)
    if torch.isnan(distribution).any():
        raise ValueError(f"metric is undefined (NaN) on {int(torch.isnan(distribution).sum())} "
                         "of the resamples; the sample is too small for this metric")
    alpha = 1 - confidence_level
    low, high = torch.quantile(distribution, torch.tensor([alpha / 2, 1 - alpha / 2],
                                                          dtype=torch.float64))
    return BootstrapResult(float(metric(*tensors)), float(low), float(high), confidence_level,
                           distribution.to(device, float_dtype(device)))
