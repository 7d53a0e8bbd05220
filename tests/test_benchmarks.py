"""companion.benchmarks: the runner and the table (speed itself is never asserted)."""

import datetime
import math
import statistics

import pytest
import torch

from companion import benchmarks
from companion.benchmarks import Case, benchmark


@pytest.fixture
def fake_row():
    calls = {"ours": 0, "reference": 0}

    @benchmark("fake row for tests", "test")
    def factory(device, quick):
        def ours():
            calls["ours"] += 1

        def reference():
            calls["reference"] += 1

        return Case(ours, reference, "noop", size="n=1", work=10, work_unit="items")

    yield calls
    benchmarks.REGISTRY[:] = [r for r in benchmarks.REGISTRY if r[0] != "fake row for tests"]


def test_run_times_both_sides_and_formats(fake_row):
    results = benchmarks.run("cpu", only="fake row", rounds=3, min_run_time=0.01)
    assert len(results) == 1
    r = results[0]
    assert r.ours_seconds > 0 and r.reference_seconds > 0
    assert len(r.ratios) == 3 and r.ratio == statistics.median(r.ratios)
    assert r.spread == (min(r.ratios), max(r.ratios))
    assert r.spread[0] <= r.ratio <= r.spread[1]
    assert fake_row["ours"] > 3 and fake_row["reference"] > 3
    text = benchmarks.format_table(results)
    assert "fake row for tests" in text and "items/s" in text
    md = benchmarks.format_table(results, markdown=True).splitlines()
    assert md[0].startswith("| benchmark | ratio | spread (min-max) |")
    assert md[1].startswith("|---|")
    low, high = r.spread
    assert f"| {r.ratio:.2f}x | {low:.2f}-{high:.2f} |" in md[2]


def test_ratio_is_the_median_round_and_spread_the_extremes():
    r = benchmarks.Result("row", "1", "cpu", "n=1", "ref", 1.0, 1.0, ratios=(1.3, 0.9, 1.1))
    assert r.ratio == 1.1 and r.spread == (0.9, 1.3)
    row = benchmarks.format_table([r], markdown=True).splitlines()[2]
    assert "| 1.10x | 0.90-1.30 |" in row


def test_close_runs_even_when_timing_fails():
    closed = []

    def boom():
        raise RuntimeError("boom")

    case = Case(boom, lambda: None, "noop", "n=1", close=lambda: closed.append(True))
    with pytest.raises(RuntimeError, match="boom"):
        benchmarks.run_case("failing", "test", case, "cpu", rounds=1, min_run_time=0.01)
    assert closed == [True]


def test_machine_line_names_date_cpu_torch_and_threads():
    line = benchmarks.machine_line(rounds=5)
    assert line.startswith(datetime.datetime.now(datetime.UTC).date().isoformat()[:4])
    assert benchmarks.cpu_model() in line and f"torch {torch.__version__}" in line
    assert f"CPU threads: {torch.get_num_threads()}" in line and "5 rounds" in line
    assert benchmarks.cpu_model().strip()


def test_duplicate_names_are_refused(fake_row):
    with pytest.raises(ValueError, match="already registered"):
        benchmark("fake row for tests", "test")(lambda device, quick: None)


def test_command_line(fake_row, capsys):
    assert benchmarks.main(["--list"]) == 0
    assert "fake row for tests" in capsys.readouterr().out
    assert benchmarks.main(["--device", "cpu", "--only", "fake row", "--quick",
                            "--rounds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == benchmarks.machine_line(2) and "ratio" in out[1]
    assert benchmarks.main(["--device", "cpu", "--only", "no such row"]) == 1
    threads = torch.get_num_threads()
    try:
        assert benchmarks.main(["--device", "cpu", "--only", "fake row", "--quick",
                                "--rounds", "1", "--threads", "1"]) == 0
        assert "CPU threads: 1" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        benchmarks.main(["--threads", "0"])


def test_table_shows_both_throughputs_with_si_prefixes():
    result = benchmarks.Result("row", "1", "cpu", "n=1", "ref", ours_seconds=2e-3,
                               reference_seconds=1e-3, work=1.5e6, work_unit="tokens")
    row = benchmarks.format_table([result], markdown=True).splitlines()[2]
    assert "| 2.00x |" in row and "| 750M / 1.5G tokens/s |" in row
    assert benchmarks._rate(999.0) == "999" and benchmarks._rate(8739.2) == "8.74K"


# --------------------------------------------------------------------------- the real rows

ROWS = [(name, chapter) for name, chapter, _ in benchmarks.REGISTRY]


@pytest.mark.parametrize("name,chapter", ROWS, ids=[name for name, _ in ROWS])
def test_every_row_runs_at_quick_size(name, chapter):
    """Each row's factory (with its own equal-work checks) and one timing round."""
    factory = next(f for n, _, f in benchmarks.REGISTRY if n == name)
    case = factory(torch.device("cpu"), True)
    r = benchmarks.run_case(name, chapter, case, "cpu", rounds=1, min_run_time=0.01)
    for value in (r.ours_seconds, r.reference_seconds, r.ratio, *r.spread):
        assert math.isfinite(value) and value > 0
    assert r.reference_name and r.size and (r.work is None or r.work > 0)


def _factory(name):
    return next(f for n, _, f in benchmarks.REGISTRY if n.startswith(name))


@pytest.mark.parametrize("module,function,row", [
    ("companion.precision", "round_to", "cast to bfloat16"),
    ("companion.quantize", "dequantize", "int8 quantize + dequantize, per-tensor"),
    ("companion.quantize", "dequantize", "int8 quantize + dequantize, per-channel"),
    ("companion.prune", "magnitude_mask", "magnitude pruning mask"),
])
def test_equal_work_checks_can_fail(monkeypatch, module, function, row):
    """A row whose two sides compute different things refuses to be timed."""
    import importlib

    target = importlib.import_module(module)
    original = getattr(target, function)

    def off_by_a_little(*args, **kwargs):
        out = original(*args, **kwargs)
        return ~out if out.dtype == torch.bool else out * (1 + 2**-6)

    monkeypatch.setattr(target, function, off_by_a_little)
    with pytest.raises(AssertionError, match="must equal"):
        _factory(row)(torch.device("cpu"), True)


def test_round_trip_check_allows_only_exact_ties():
    """torch quantizes ``w * (1 / s)``, ours ``w / s``: they may differ at exact ties only."""
    w, scale = torch.tensor([[1.5, 0.7], [-2.5, 3.0]]), torch.tensor([1.0, 1.0])
    ours = torch.tensor([[2.0, 1.0], [-2.0, 3.0]])
    assert benchmarks._same_round_trip(w, scale, ours, torch.tensor([[1.0, 1.0], [-3.0, 3.0]]))
    assert not benchmarks._same_round_trip(w, scale, ours,
                                           torch.tensor([[2.0, 0.0], [-2.0, 3.0]]))
    assert benchmarks._same_round_trip(w, torch.tensor(1.0), ours, ours)
