"""Characters or BPE tokens? Chapter 4's GPT trained on both, compared in bits per byte
(book: chapter 4, "Tokens or characters").

A loss per token cannot compare two tokenizations: a BPE token stands for several
characters, so its loss covers more text. What both models pay for is the same held-out
*text*. With ``n_j`` the UTF-8 bytes of target token ``j``,

    bits per byte = sum_j -log2 p(token_j | context) / sum_j n_j,

summed over every predicted token of the held-out text (:func:`bits_per_byte`). For a
character model of ASCII text this is bits per character; for a tokenizer with ``b``
bytes per token it is the loss per token divided by ``b ln 2``.

Compute is matched by counting it: :func:`train_flops_per_step` counts the floating-point
operations of one training step (forward and backward, ``torch.utils.flop_counter``);
a model with a larger vocabulary pays more for its output layer per step, so it gets
proportionally fewer steps (:func:`equal_compute_steps`). Each tokenization is trained with
the recipe of ``companion.decoder.train_comparison_run`` (AdamW, warm-up, cosine decay)
at every rate of one grid with seed 0; the rate with the lowest dev loss then runs
seeds 1 and 2. ``python -m companion.tokens_vs_chars --record`` writes the runs to
``assets/tokens_vs_chars.json``; the book re-trains a cheap prefix and checks it.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ._validate import check_int, check_tensor, check_type
from .data import CharTokenizer
from .records import JOBS_OPTION, load_record, record_main, write_record
from .tokenizer import BPETokenizer

__all__ = ["TOKENS_VS_CHARS", "TOKENS_VS_CHARS_RECORD", "token_byte_lengths",
           "bits_per_byte", "train_flops_per_step", "equal_compute_steps",
           "tokenization_data", "tokenization_model", "tokenization_run",
           "record_tokens_vs_chars", "load_tokens_vs_chars", "best_learning_rates"]

#: The experiment -- chapter 4's GPT (``n_layer`` blocks of width ``n_embd``, ``block``
#: positions) on characters and on BPE tokens of ``bpe_vocab`` ids learned from the
#: training text; the character model trains ``char_steps`` steps, the others as many
#: FLOPs. Batch, warm-up, schedule and evaluation: ``companion.decoder.COMPARISON``.
TOKENS_VS_CHARS = {"kinds": ["char", "bpe512"], "bpe_vocab": {"bpe512": 512},
                   "char_steps": 400, "block": 64, "n_layer": 2, "n_head": 4,
                   "n_embd": 64, "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "seeds": [0, 1, 2],
                   "train_windows": 64}
#: Where ``python -m companion.tokens_vs_chars --record`` writes the runs.
TOKENS_VS_CHARS_RECORD = Path(__file__).resolve().parent / "assets" / "tokens_vs_chars.json"


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """``(vocab,)`` long tensor: the UTF-8 bytes each id stands for, for a
    :class:`~companion.data.CharTokenizer` or a :class:`~companion.tokenizer.BPETokenizer`."""
    check_type("tokenizer", tokenizer, (CharTokenizer, BPETokenizer))
    if isinstance(tokenizer, CharTokenizer):
        return torch.tensor([len(ch.encode("utf-8")) for ch in tokenizer.itos])
    return torch.tensor([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.n_vocab)])


@torch.no_grad()
def bits_per_byte(model, ids: torch.Tensor, byte_lengths: torch.Tensor, block: int,
                  batch_size: int = 64) -> float:
    """Bits per UTF-8 byte of ``model`` on the token stream ``ids``, cut into all its
    non-overlapping windows of ``block`` tokens (:func:`~companion.train.fixed_windows`):
    the summed cross-entropy of every predicted token, in bits, over their summed bytes
    ``byte_lengths[token]``. ``model(x)`` returns ``(logits, ...)``."""
    from .train import fixed_windows

    check_tensor("ids", ids, ndim=1)
    check_tensor("byte_lengths", byte_lengths, ndim=1)
    x, y = fixed_windows(ids, check_int("block", block, 1))   # (n, block) each
    if len(byte_lengths) <= int(ids.max()) or not bool((byte_lengths >= 1).all()):
        raise ValueError(f"byte_lengths must give each id of ids >= 1 byte, got "
                         f"{len(byte_lengths)} lengths, min {byte_lengths.min().item()}")
    step = check_int("batch_size", batch_size, 1)
    device, was_training = next(model.parameters()).device, model.training
    nats, n_bytes = 0.0, 0
    model.eval()
    try:
        for start in range(0, len(x), step):
            xb, yb = x[start:start + step], y[start:start + step]
            logits = model(xb.to(device))[0]                   # (b, block, vocab)
            nats += F.cross_entropy(logits.flatten(0, 1).double(), yb.flatten().to(device),
                                    reduction="sum").item()
            n_bytes += int(byte_lengths[yb].sum())
    finally:
        model.train(was_training)
    return nats / math.log(2) / n_bytes


def train_flops_per_step(model, batch_size: int, block: int) -> int:
    """Floating-point operations of one training step of ``model`` on a ``(batch_size,
    block)`` batch: forward and backward, as ``torch.utils.flop_counter`` counts them
    (matrix products and attention; the optimizer's elementwise update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    vocab = model.lm_head.weight.shape[0]
    x = torch.randint(vocab, (check_int("batch_size", batch_size, 1),
                              check_int("block", block, 1)))
    x = x.to(model.lm_head.weight.device)
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def equal_compute_steps(reference_steps: int, reference_flops: int, flops: int) -> int:
    """The number of steps of ``flops`` each that do the work of ``reference_steps``
    steps of ``reference_flops`` each, rounded to the nearest step."""
    check_int("reference_steps", reference_steps, 1)
    check_int("reference_flops", reference_flops, 1)
    check_int("flops", flops, 1)
    return max(1, round(reference_steps * reference_flops / flops))


@cache
def tokenization_data(kind: str):
    """``(tokenizer, train_ids, dev, val, val_ids)`` for ``kind`` (``"char"`` or a key of
    ``TOKENS_VS_CHARS["bpe_vocab"]``): the same text spans as the block comparison of
    ``companion.decoder.comparison_data`` -- training text, dev text (its last
    windows, held out) and validation text -- encoded by characters or by BPE learned
    from the training text alone. ``dev`` and ``val`` are ``(x, y)`` windows."""
    from .decoder import COMPARISON, comparison_data
    from .tokenizer import train_bpe
    from .train import fixed_windows

    check_type("kind", kind, str)
    corpus, train_chars, _, _ = comparison_data()
    if kind == "char":
        tokenizer = corpus.tokenizer
    elif kind in TOKENS_VS_CHARS["bpe_vocab"]:
        ranks = train_bpe(corpus.text[:len(train_chars)], TOKENS_VS_CHARS["bpe_vocab"][kind])
        tokenizer = BPETokenizer(ranks)
    else:
        raise ValueError(f"kind must be 'char' or one of "
                         f"{sorted(TOKENS_VS_CHARS['bpe_vocab'])}, got {kind!r}")
    spans = (corpus.text[:len(train_chars)], corpus.text[len(train_chars):len(corpus.train_ids)],
             corpus.text[len(corpus.train_ids):])              # train, dev, val text
    train_ids, dev_ids, val_ids = (torch.as_tensor(tokenizer.encode(s)) for s in spans)
    block = TOKENS_VS_CHARS["block"]
    dev = fixed_windows(dev_ids, block)
    val = fixed_windows(val_ids, block, num_windows=COMPARISON["val_windows"])
    return tokenizer, train_ids, dev, val, val_ids


def tokenization_model(kind: str):
    """A fresh chapter-4 GPT for ``kind``'s vocabulary (seed it first)."""
    from .transformer import GPT, GPTConfig

    c, tokenizer = TOKENS_VS_CHARS, tokenization_data(kind)[0]
    vocab = tokenizer.vocab_size if isinstance(tokenizer, CharTokenizer) else tokenizer.n_vocab
    return GPT(GPTConfig(vocab_size=vocab, block_size=c["block"], n_layer=c["n_layer"],
                         n_head=c["n_head"], n_embd=c["n_embd"]))


def _steps_and_flops(kind: str) -> tuple[int, int]:
    """``kind``'s training steps at equal compute and its FLOPs per step."""
    from .decoder import COMPARISON

    c, batch = TOKENS_VS_CHARS, COMPARISON["batch"]
    char_flops = train_flops_per_step(tokenization_model("char"), batch, c["block"])
    flops = train_flops_per_step(tokenization_model(kind), batch, c["block"])
    return equal_compute_steps(c["char_steps"], char_flops, flops), flops


def tokenization_run(kind: str, lr: float, seed: int, steps: int | None = None,
                     keep_model: bool = False) -> dict:
    """Train ``kind``'s model at rate ``lr`` with ``seed`` for its equal-compute number of
    steps (the schedule spans those; a smaller ``steps`` trains a prefix of the same run).

    Returns the dev and validation losses (nats per token) every ``eval_every`` steps of
    ``companion.decoder.COMPARISON``, the FLOPs per step, and the bits per byte on
    the whole validation text and on the first ``train_windows`` windows of the training
    text; with ``keep_model``, also the trained model under ``"model"``.
    """
    from .decoder import train_comparison_run

    tokenizer, train_ids, dev, val, val_ids = tokenization_data(kind)
    total, flops = _steps_and_flops(kind)
    steps = total if steps is None else check_int("steps", steps, 1, total)
    out = train_comparison_run("gpt", lr, seed, steps, (None, train_ids, dev, val),
                               make_model=lambda: tokenization_model(kind), total=total)
    model, lengths, block = out.pop("model"), token_byte_lengths(tokenizer), val[0].shape[1]
    train_head = train_ids[:TOKENS_VS_CHARS["train_windows"] * block + 1]
    run = {"kind": kind, "lr": lr, "seed": seed, "steps": steps, "total_steps": total,
           "flops_per_step": flops, **out,
           "val_bits_per_byte": bits_per_byte(model, val_ids, lengths, block),
           "train_bits_per_byte": bits_per_byte(model, train_head, lengths, block)}
    return {**run, "model": model} if keep_model else run


def _record_task(task: tuple[str, float, int]) -> dict:
    torch.set_num_threads(1)
    return tokenization_run(*task)


def best_learning_rates(runs: list[dict]) -> dict[str, float]:
    """For each kind of ``runs`` (dicts from :func:`tokenization_run`), the rate of the
    grid whose seed-0 run ends with the lowest dev loss (a diverged run never wins)."""
    check_type("runs", runs, list)
    best: dict[str, tuple[float, float]] = {}
    for run in runs:
        dev = run["dev"][-1] if math.isfinite(run["dev"][-1]) else math.inf
        if run["seed"] == 0 and dev < best.get(run["kind"], (math.inf,))[0]:
            best[run["kind"]] = (dev, run["lr"])
    return {kind: lr for kind, (_, lr) in best.items()}


def record_tokens_vs_chars(path: Path = TOKENS_VS_CHARS_RECORD, jobs: int = 1,
                           log=print) -> dict:
    """Every kind at every rate of the grid with seed 0, then the other seeds at each
    kind's best dev rate (``jobs`` runs at a time, one CPU thread each); writes JSON."""
    from concurrent.futures import ProcessPoolExecutor

    c = TOKENS_VS_CHARS
    with ProcessPoolExecutor(check_int("jobs", jobs, 1)) as pool:
        runs = list(pool.map(_record_task, [(k, lr, c["seeds"][0]) for k in c["kinds"]
                                            for lr in c["lr_grid"]]))
        best = best_learning_rates(runs)
        runs += list(pool.map(_record_task, [(k, best[k], s) for k in c["kinds"]
                                             for s in c["seeds"][1:]]))
    for run in runs:
        log({k: v for k, v in run.items() if k not in ("step", "dev", "val")})
    return write_record(path, "chapter 4's GPT on characters and on BPE tokens at equal "
                        "compute (companion.tokens_vs_chars.record_tokens_vs_chars)", c,
                        runs=runs)


def load_tokens_vs_chars(path: Path = TOKENS_VS_CHARS_RECORD) -> dict:
    """The recorded runs; ``ValueError`` if they were made with other settings than
    :data:`TOKENS_VS_CHARS`."""
    return load_record(path, TOKENS_VS_CHARS, "`python -m companion.tokens_vs_chars --record`")


def main(argv=None) -> int:
    """``python -m companion.tokens_vs_chars --record [--jobs N]``: re-record the
    comparison of chapter 4 (minutes on a CPU)."""
    return record_main("python -m companion.tokens_vs_chars",
                       {"tokens-vs-chars": record_tokens_vs_chars}, argv,
                       description=main.__doc__, options={"--jobs": JOBS_OPTION})


if __name__ == "__main__":
    main()
