"""Watching a served model: its Prometheus metrics and drift in its traffic (book: chapter 11).

* :func:`parse_metrics` reads the server's ``/metrics`` page with ``prometheus_client``'s
  own text parser into ``{(name, labels): value}``.
* :class:`DriftMonitor` compares a window of recent prompts with the training text on two
  signals and flags the window when either exceeds a threshold calibrated on
  in-distribution windows:

  - the **population stability index** of the character frequencies,
    ``PSI = sum_c (q_c - p_c) ln(q_c / p_c)`` (:func:`psi`; ``p`` the training
    distribution, ``q`` the window's, both smoothed; characters outside the vocabulary
    share one extra bin), a symmetric form of the Kullback-Leibler divergence;
  - the **model's own loss**, the mean cross-entropy in nats per character of the
    window's prompts (:func:`per_char_loss`): text unlike the training data surprises
    the model even when its characters are common.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from companion._optional import require
from companion._validate import check_float, check_int, check_number, check_type
from companion.transformer import GPT


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted label pairs): value}`` of a Prometheus text exposition.

    ``companion_requests_total{code="200"} 3`` becomes
    ``{("companion_requests_total", (("code", "200"),)): 3.0}``.
    """
    parser = require("prometheus_client.parser")

    check_type("text", text, str)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def char_distribution(texts: list[str], vocab: str, smoothing: float = 0.5) -> torch.Tensor:
    """Character frequencies of ``texts`` over ``vocab`` plus one bin for other characters.

    Additive (Laplace) smoothing: ``(count_c + smoothing) / (n + smoothing (V + 1))``, so
    that no bin is zero and :func:`psi` stays finite. Returns float64 ``(V + 1,)``.
    """
    check_type("texts", texts, list)
    check_float("smoothing", smoothing, low=0.0, low_open=True)
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = [index.get(ch, len(vocab)) for text in texts for ch in text]
    counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(vocab) + 1)
    counts = counts.to(torch.float64) + smoothing
    return counts / counts.sum()


def psi(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Population stability index ``sum (actual - expected) * ln(actual / expected)`` (>= 0)."""
    for name, p in (("expected", expected), ("actual", actual)):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or not (p > 0).all():
            raise ValueError(f"{name} must be a 1-D tensor of positive probabilities")
    if expected.shape != actual.shape:
        raise ValueError(f"expected and actual must have the same shape, got "
                         f"{tuple(expected.shape)} and {tuple(actual.shape)}")
    return float(((actual - expected) * torch.log(actual / expected)).sum())


@torch.no_grad()
def per_char_loss(model: GPT, texts: list[str], vocab: str) -> float:
    """Mean cross-entropy (nats per predicted character) of ``model`` on ``texts``.

    Each text is cut to its last ``block_size + 1`` characters; characters outside
    ``vocab`` are dropped (they have no id). Texts of equal length go through the model
    as one batch.
    """
    check_type("model", model, GPT)
    index = {ch: i for i, ch in enumerate(vocab)}
    device = model.token_embedding.weight.device
    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = [index[ch] for ch in text if ch in index][-(model.config.block_size + 1):]
        if len(ids) >= 2:
            by_length.setdefault(len(ids), []).append(ids)
    if not by_length:
        raise ValueError("texts must hold at least one text with two known characters")
    total, count = 0.0, 0
    for rows in by_length.values():
        ids = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T + 1)
        logits, _ = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return total / count


@dataclass
class DriftReport:
    """One window's scores, the thresholds and the verdict."""

    psi: float
    loss: float
    psi_threshold: float
    loss_threshold: float

    @property
    def drift(self) -> bool:
        """Either score above its threshold; a NaN score counts as drift (it is not below)."""
        return not (self.psi <= self.psi_threshold and self.loss <= self.loss_threshold)


class DriftMonitor:
    """Flags windows of prompts whose characters or loss differ from the training text.

    ``reference`` is the training text (its character distribution is ``p``).
    :meth:`calibrate` scores in-distribution windows and sets each threshold to the
    largest score seen times ``margin``; :meth:`check` scores a window and compares.
    The scores do not depend on the thresholds: :meth:`with_margin` and :meth:`judge`
    apply other thresholds to scores already computed, without a forward pass.
    """

    def __init__(self, model: GPT, vocab: str, reference: str):
        check_type("model", model, GPT)
        check_type("vocab", vocab, str)
        check_type("reference", reference, str)
        self.model, self.vocab = model.eval(), vocab
        self.expected = char_distribution([reference], vocab)
        self.calibration_scores: list[tuple[float, float]] = []
        self.psi_threshold = math.inf
        self.loss_threshold = math.inf

    def scores(self, window: list[str]) -> tuple[float, float]:
        """``(PSI of the window's characters, the model's loss on it in nats/char)``."""
        return (psi(self.expected, char_distribution(window, self.vocab)),
                per_char_loss(self.model, window, self.vocab))

    def calibrate(self, windows: list[list[str]], margin: float = 1.1) -> DriftMonitor:
        """Thresholds = ``margin`` x the largest PSI and loss over in-distribution ``windows``
        (their scores are kept in ``calibration_scores``)."""
        check_float("margin", margin, low=1.0)
        check_int("len(windows)", len(windows), low=1)
        self.calibration_scores = [self.scores(w) for w in windows]
        self._set_thresholds(margin)
        return self

    def with_margin(self, margin: float) -> DriftMonitor:
        """A copy calibrated on the same windows with another ``margin``: the kept
        calibration scores, new thresholds (no forward pass)."""
        check_float("margin", margin, low=1.0)
        if not self.calibration_scores:
            raise ValueError("with_margin needs a calibrated monitor: call calibrate first")
        other = copy.copy(self)
        other._set_thresholds(margin)
        return other

    def _set_thresholds(self, margin: float) -> None:
        largest = torch.tensor(self.calibration_scores, dtype=torch.float64).amax(0)  # (2,)
        if not torch.isfinite(largest).all():  # amax keeps a NaN, max() would drop it
            raise ValueError(f"the calibration scores must be finite, got largest {largest}")
        self.psi_threshold, self.loss_threshold = (margin * largest).tolist()

    def judge(self, psi: float, loss: float) -> DriftReport:
        """The report of a window with these scores against this monitor's thresholds."""
        return DriftReport(check_number("psi", psi), check_number("loss", loss),
                           self.psi_threshold, self.loss_threshold)

    def check(self, window: list[str]) -> DriftReport:
        """Score ``window`` against the calibrated thresholds."""
        return self.judge(*self.scores(window))


def text_windows(text: str, num_windows: int, prompts_per_window: int, prompt_chars: int,
                 generator: torch.Generator) -> list[list[str]]:
    """Windows of prompts cut from random places of ``text`` (in-distribution traffic)."""
    for name, value in (("num_windows", num_windows), ("prompts_per_window", prompts_per_window),
                        ("prompt_chars", prompt_chars)):
        check_int(name, value, low=1)
    if len(text) <= prompt_chars:
        raise ValueError(f"text must be longer than prompt_chars={prompt_chars}")
    starts = torch.randint(0, len(text) - prompt_chars, (num_windows, prompts_per_window),
                           generator=generator)
    return [[text[s:s + prompt_chars] for s in row.tolist()] for row in starts]


def log_line_prompts(n: int, prompt_chars: int, generator: torch.Generator) -> list[str]:
    """``n`` synthetic server-log lines (timestamps, levels, hex ids), ``prompt_chars`` long:
    shifted traffic made of characters the model knows, in an order it has never seen."""
    check_int("n", n, low=1)
    check_int("prompt_chars", prompt_chars, low=1)
    levels = ("INFO", "WARN", "ERROR", "DEBUG")

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator))

    lines = []
    for _ in range(n):
        line = ""
        while len(line) < prompt_chars:
            line += (f"2026-{1 + draw(12):02d}-{1 + draw(28):02d}T{draw(24):02d}:"
                     f"{draw(60):02d}:{draw(60):02d}Z {levels[draw(4)]} "
                     f"req={draw(16**6):06x} ms={draw(2000)} ")
        lines.append(line[:prompt_chars])
    return lines
