"""companion.benchmarks: the runner and the table (speed itself is never asserted)."""

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
    results = benchmarks.run("cpu", only="fake row", rounds=2, min_run_time=0.01)
    assert len(results) == 1
    r = results[0]
    assert r.ours_seconds > 0 and r.reference_seconds > 0
    assert r.ratio == r.ours_seconds / r.reference_seconds
    assert fake_row["ours"] > 2 and fake_row["reference"] > 2
    text = benchmarks.format_table(results)
    assert "fake row for tests" in text and "items/s" in text
    md = benchmarks.format_table(results, markdown=True).splitlines()
    assert md[0].startswith("| benchmark |") and md[1].startswith("|---|")


def test_duplicate_names_are_refused(fake_row):
    with pytest.raises(ValueError, match="already registered"):
        benchmark("fake row for tests", "test")(lambda device, quick: None)


def test_command_line(fake_row, capsys):
    assert benchmarks.main(["--list"]) == 0
    assert "fake row for tests" in capsys.readouterr().out
    assert benchmarks.main(["--device", "cpu", "--only", "fake row", "--quick",
                            "--rounds", "1"]) == 0
    assert "ratio" in capsys.readouterr().out
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
