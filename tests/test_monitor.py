"""companion.monitor: PSI against a direct formula, the loss signal against
GPT's own loss, the Prometheus parser, and the drift monitor on shifted traffic."""

import math

import pytest
import torch
from factories import tiny_gpt

from companion import monitor


def test_char_distribution_and_psi_against_the_formula():
    vocab = "abc"
    p = monitor.char_distribution(["aab", "c"], vocab, smoothing=0.5)
    expected = torch.tensor([2.5, 1.5, 1.5, 0.5], dtype=torch.float64) / 6.0
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-15)
    q = monitor.char_distribution(["ccx!"], vocab, smoothing=0.5)  # two unknown characters
    torch.testing.assert_close(q, torch.tensor([0.5, 0.5, 2.5, 2.5], dtype=torch.float64) / 6)
    direct = sum((b - a) * math.log(b / a) for a, b in zip(p.tolist(), q.tolist()))
    assert monitor.psi(p, q) == pytest.approx(direct, rel=1e-14)
    assert monitor.psi(p, p) == 0.0 and monitor.psi(p, q) == pytest.approx(monitor.psi(q, p))
    with pytest.raises(ValueError, match="positive"):
        monitor.psi(p, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        monitor.psi(p, p[:3] / p[:3].sum())
    with pytest.raises(ValueError, match="smoothing"):
        monitor.char_distribution(["a"], vocab, smoothing=0.0)


def test_per_char_loss_equals_gpt_loss():
    model = tiny_gpt(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8,
                     dtype=torch.float32).eval()
    vocab = "abcd"
    texts = ["abcdabcdab", "dcba", "ddddd", "xx"]  # one too long, two lengths, one unknown-only
    ids = [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1][-9:], [3, 2, 1, 0], [3, 3, 3, 3, 3]]
    total, count = 0.0, 0
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            _, loss = model(x[:, :-1], x[:, 1:])
        total, count = total + loss.item() * (len(row) - 1), count + len(row) - 1
    assert monitor.per_char_loss(model, texts, vocab) == pytest.approx(total / count, rel=1e-6)
    with pytest.raises(ValueError, match="two known characters"):
        monitor.per_char_loss(model, ["xy", "a"], vocab)


def test_parse_metrics_reads_prometheus_text():
    text = ("# HELP r_total Requests.\n# TYPE r_total counter\n"
            'r_total{code="200"} 3.0\nr_total{code="422"} 1.0\n'
            "# HELP g Gauge.\n# TYPE g gauge\ng 2.5\n")
    assert monitor.parse_metrics(text) == {("r_total", (("code", "200"),)): 3.0,
                                           ("r_total", (("code", "422"),)): 1.0, ("g", ()): 2.5}
    with pytest.raises(TypeError, match="text"):
        monitor.parse_metrics(b"g 1")


def test_drift_monitor_quiet_on_reference_loud_on_logs():
    from companion.pretrained import load_pretrained_gpt
    model, corpus = load_pretrained_gpt("cpu")
    vocab = "".join(corpus.tokenizer.itos)
    train, val = corpus.tokenizer.decode(corpus.train_ids), corpus.tokenizer.decode(corpus.val_ids)
    g = torch.Generator().manual_seed(0)
    m = monitor.DriftMonitor(model, vocab, train)
    with pytest.raises(ValueError, match="len\\(windows\\)"):
        m.calibrate([])
    half = len(val) // 2  # calibrate on held-out text (the model knows its training text)
    m.calibrate(monitor.text_windows(val[:half], 20, 16, 64, g))
    assert math.isfinite(m.psi_threshold) and math.isfinite(m.loss_threshold)
    quiet = [m.check(w).drift for w in monitor.text_windows(val[half:], 10, 16, 64, g)]
    loud = [m.check(monitor.log_line_prompts(16, 64, g)) for _ in range(5)]
    assert sum(quiet) <= 2 and all(r.drift for r in loud)
    assert all(r.loss > r.loss_threshold for r in loud)
    logs = monitor.log_line_prompts(3, 40, torch.Generator().manual_seed(1))
    assert all(len(line) == 40 and set(line) <= set(vocab) for line in logs)


def test_with_margin_and_judge_reuse_the_scores():
    # float64 model: the reused scores must equal a fresh calibration with that margin
    model = tiny_gpt(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8).eval()
    vocab, g = "abcd", torch.Generator().manual_seed(0)
    text = "".join("abcd"[i] for i in torch.randint(0, 3, (400,), generator=g).tolist())
    windows = monitor.text_windows(text, 5, 4, 6, g)
    m = monitor.DriftMonitor(model, vocab, text)
    with pytest.raises(ValueError, match="calibrate first"):
        m.with_margin(1.5)
    m.calibrate(windows)
    fresh = monitor.DriftMonitor(model, vocab, text).calibrate(windows, margin=1.5)
    wide = m.with_margin(1.5)
    assert (wide.psi_threshold, wide.loss_threshold) == (
        fresh.psi_threshold, fresh.loss_threshold)
    assert m.psi_threshold == 1.1 * max(s[0] for s in m.calibration_scores)  # unchanged
    assert wide.psi_threshold > m.psi_threshold and wide.loss_threshold > m.loss_threshold
    shifted = ["dddddd", "ddddda", "dddddd", "dadddd"]  # 'd' is absent from the text
    for window in [*windows, shifted]:
        report = m.check(window)
        assert wide.judge(report.psi, report.loss) == fresh.check(window)
        assert m.judge(*m.scores(window)) == report
    assert m.check(shifted).drift and not m.with_margin(1e6).check(shifted).drift
    with pytest.raises(ValueError, match="margin"):
        m.with_margin(0.5)
    with pytest.raises(TypeError, match="psi"):
        m.judge("0.1", 1.0)
    assert m.judge(math.nan, 0.0).drift and m.judge(0.0, math.nan).drift  # NaN: alarm
    assert not m.judge(m.psi_threshold, m.loss_threshold).drift  # at the threshold: quiet
    m.scores = lambda window: (math.nan, 1.0)  # a NaN score fails, not drops out of max
    with pytest.raises(ValueError, match="finite"):
        m.calibrate(windows)
