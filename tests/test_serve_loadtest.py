"""companion.loadtest without a server: the Poisson schedule, the workload, the statistics."""

import math

import pytest
import torch

from companion import loadtest

TEXT = "".join(chr(32 + i % 90) for i in range(5000))


def test_poisson_schedule_has_exponential_gaps_of_mean_one_over_rate():
    times = torch.tensor(loadtest.poisson_schedule(20_000, 50.0, torch.Generator().manual_seed(0)),
                         dtype=torch.float64)
    gaps = torch.diff(times, prepend=torch.zeros(1, dtype=torch.float64))
    assert bool((gaps > 0).all())
    # mean 1/rate = 0.02 s and standard deviation 0.02 s (exponential): 4 standard errors
    torch.testing.assert_close(gaps.mean(), torch.tensor(0.02, dtype=torch.float64),
                               atol=4 * 0.02 / math.sqrt(20_000), rtol=0)
    torch.testing.assert_close(gaps.std(), torch.tensor(0.02, dtype=torch.float64),
                               atol=0.001, rtol=0)


def test_mixed_workload_lengths_and_determinism():
    work = loadtest.mixed_workload(4000, TEXT, torch.Generator().manual_seed(1))
    assert work == loadtest.mixed_workload(4000, TEXT, torch.Generator().manual_seed(1))
    lengths = [len(w["prompt"]) for w in work]
    new = [w["max_tokens"] for w in work]
    assert min(lengths) == 8 and max(lengths) == 32
    assert set(new) == set(range(2, 9)) | set(range(32, 65))
    long_fraction = sum(m >= 32 for m in new) / len(new)
    assert abs(long_fraction - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    assert all(w["prompt"] in TEXT and w["seed"] == i for i, w in enumerate(work))
    assert all(len(w["prompt"]) + w["max_tokens"] <= 96 for w in work)
    with pytest.raises(ValueError, match="text"):
        loadtest.mixed_workload(3, "short", torch.Generator())
    with pytest.raises(ValueError, match="long_fraction"):
        loadtest.mixed_workload(3, TEXT, torch.Generator(), long_fraction=1.5)


def test_load_result_statistics_count_only_answered_requests():
    r = loadtest.LoadResult(10.0, 2.0, [0.1, 0.2, 0.3, 5.0], [200, 200, 200, 429], [4, 4, 4, 0])
    assert r.n == 3 and r.tokens_per_second == 6.0
    assert r.percentile(50) == pytest.approx(0.2) and r.percentile(100) == pytest.approx(0.3)
    assert math.isnan(loadtest.LoadResult(1.0, 1.0, [1.0], [503], [0]).percentile(50))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(B <= k) for B ~ Binomial(n, p), summed exactly in float64 (the oracle)."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("n", "q"), [(10, 50), (200, 50), (600, 99), (1000, 90), (57, 25)])
def test_quantile_interval_covers_with_each_tail_at_most_half_the_rest(n, q):
    samples = [float(v) for v in torch.randperm(n, generator=torch.Generator().manual_seed(n))]
    low, high = loadtest.quantile_interval(samples, q)
    rank_low, rank_high = int(low) + 1, int(high) + 1  # samples are 0..n-1
    p = q / 100
    below = _binomial_cdf(rank_low - 1, n, p)  # P(B < l): the interval lies above
    above = 1 - _binomial_cdf(rank_high - 1, n, p)  # P(B >= u): the interval lies below
    assert below <= 0.025 and above <= 0.025
    # the ranks are the tightest: one step inward breaks a tail
    assert _binomial_cdf(rank_low, n, p) > 0.025
    assert 1 - _binomial_cdf(rank_high - 2, n, p) > 0.025


def test_quantile_interval_textbook_values_and_open_ends():
    assert loadtest.quantile_interval(list(range(10, 0, -1)), 50) == (2.0, 9.0)  # n = 10
    low, high = loadtest.quantile_interval([float(i) for i in range(200)], 99)
    assert high == math.inf and math.isfinite(low)  # 200 samples cannot close a p99
    with pytest.raises(ValueError, match="samples"):
        loadtest.quantile_interval([], 50)
    with pytest.raises(ValueError, match="q"):
        loadtest.quantile_interval([1.0], 150)
