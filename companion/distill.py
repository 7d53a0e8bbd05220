"""Knowledge distillation: a student learns the teacher's softened output distribution.

Chapter 7, section "Distillation" (Hinton et al., 2015). With temperature ``T``,
``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` over the last dimension,

    L_KD = T^2 * KL(p || q) = T^2 * sum_i p_i (log p_i - log q_i),

averaged over all other positions (the batch, and the sequence for a language model).
The gradient of ``KL`` with respect to the student's logits is ``(q - p) / T``, and
``q - p`` itself shrinks roughly like ``1 / T`` once ``T`` is large, so the factor ``T^2``
keeps the gradient's size roughly independent of a large ``T`` (of the same order, not
equal: the book's chapter 7 measures it). A student is usually
trained on ``alpha * L_KD + (1 - alpha) * cross_entropy(student, labels)``.

Section 7c's experiment -- students of the pretrained GPT trained on labels only or on the
teacher, early-stopped on dev text, with a learning rate from one grid and three seeds --
is :func:`train_student` run by :func:`run_students`. Its 16 runs take longer than a page
may, so they are recorded in ``assets/distill_students.json`` by
``python -m companion.distill --record``; the page re-trains two of them and checks them
against the record (:func:`load_student_record`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_float, check_int, check_tensor
from .device import seed_everything
from .records import load_record, record_main, write_record
from .train import fixed_windows
from .transformer import GPT, GPTConfig


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over positions.

    Logits have shape ``(..., classes)``; the teacher is treated as a constant (detached).
    """
    check_tensor("student_logits", student_logits, floating=True)
    check_tensor("teacher_logits", teacher_logits, floating=True)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim == 0:
        raise ValueError(f"student_logits and teacher_logits must have the same shape (..., C), "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    T = check_float("temperature", temperature, 0.0, low_open=True)
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=-1)          # (..., C) teacher
    log_q = F.log_softmax(student_logits / T, dim=-1)                   # (..., C) student
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)                    # (...,) per position
    return T ** 2 * kl.mean()


def student_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, temperature: float = 2.0,
                 alpha: float = 0.5) -> torch.Tensor:
    """``alpha * distillation_loss + (1 - alpha) * cross_entropy(student, targets)``."""
    check_float("alpha", alpha, 0.0, 1.0)
    check_tensor("targets", targets)
    kd = distillation_loss(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]),
                         targets.reshape(-1))
    return alpha * kd + (1 - alpha) * ce


# ------------------------------------------------------------ section 7c's student runs

#: The settings of section 7c's students -- the teacher's architecture, smaller; the last
#: ``dev_windows`` windows of the training text for early stopping; the grid of rates.
STUDENT_SETTINGS = {
    "block": 64, "n_layer": 2, "n_head": 2, "n_embd": 64, "val_windows": 128,
    "dev_windows": 16, "steps": 80, "batch_size": 8, "every": 10, "patience": 3,
    "min_delta": 0.01, "learning_rates": [1e-3, 2e-3], "seeds": [0, 1, 2],
    "sizes": [32, 256], "methods": {"labels-only": 0.0, "distilled": 1.0},
}
#: Where ``python -m companion.distill --record`` writes the runs.
STUDENT_RECORD = Path(__file__).resolve().parent / "assets" / "distill_students.json"


def student_data(corpus, device, settings: dict = STUDENT_SETTINGS) -> dict:
    """The student's config and text: ``{"config", "val": (x, y), "dev": (x, y), "train_ids"}``.

    ``val``: validation windows (scores only); ``dev``: the last windows of the training
    text (early stopping); ``train_ids``: the training text before them.
    """
    block = settings["block"]
    cut = len(corpus.train_ids) - settings["dev_windows"] * block - 1
    config = GPTConfig(vocab_size=corpus.vocab_size, block_size=block,
                       n_layer=settings["n_layer"], n_head=settings["n_head"],
                       n_embd=settings["n_embd"])
    val = fixed_windows(corpus.val_ids, block, num_windows=settings["val_windows"])
    dev = fixed_windows(corpus.train_ids[cut:], block)
    return {"config": config, "val": tuple(t.to(device) for t in val),
            "dev": tuple(t.to(device) for t in dev), "train_ids": corpus.train_ids[:cut]}


@torch.no_grad()
def training_windows(teacher: nn.Module, train_ids: torch.Tensor, block: int, n: int):
    """``n`` windows of ``train_ids`` with the teacher's logits on them: ``(x, y, logits)``."""
    device = next(teacher.parameters()).device
    x, y = (t.to(device) for t in fixed_windows(train_ids, block, num_windows=n))
    return x, y, teacher.eval()(x)[0]  # logits (n, block, V)


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on the windows ``(x, y)``, in eval mode."""
    logits, _ = model.eval()(x)  # (n, T, V)
    return F.cross_entropy(logits.float().transpose(1, 2), y).item()


@torch.no_grad()
def window_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each window, ``(n,)`` on the CPU (rows to resample)."""
    logits, _ = model.eval()(x)  # (n, T, V)
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(1).cpu()


def train_student(config: GPTConfig, data, dev, alpha: float, lr: float, seed: int, *,
                  steps=80, batch_size=8, every=10, patience=3, min_delta=0.01):
    """AdamW on fixed windows ``data = (x, y, teacher_logits)`` with early stopping on
    ``dev = (x, y)``; ``alpha=0``: labels only, ``alpha=1``: the teacher (at T = 1).

    Returns (the student at its kept checkpoint, that checkpoint's dev loss, its step).
    """
    x, y, teacher_logits = data
    seed_everything(seed)
    student = GPT(config).to(x.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.1)
    batches = torch.Generator().manual_seed(seed)
    best, best_state, best_step = math.inf, None, 0
    for step in range(1, steps + 1):
        i = torch.randint(len(x), (batch_size,), generator=batches).to(x.device)
        logits, _ = student.train()(x[i])
        loss = student_loss(logits, teacher_logits[i], y[i], temperature=1.0, alpha=alpha)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)  # as for the teacher
        optimizer.step()
        if step % every == 0:
            dev_loss = mean_loss(student, *dev)
            if dev_loss < best - min_delta:  # an improvement: keep it
                best, best_state, best_step = dev_loss, copy.deepcopy(student.state_dict()), step
            elif step - best_step >= patience * every:  # none for `patience` checks
                break
    student.load_state_dict(best_state)
    return student.eval(), best, best_step


def run_students(teacher: nn.Module, data: dict, size: int, method: str, *,
                 settings: dict = STUDENT_SETTINGS, seeds=None, lr=None) -> dict:
    """One cell of section 7c's grid: ``size`` training windows, ``method`` from
    ``settings["methods"]``. Without ``lr``, seed 0 at each rate of the grid, the rate
    with the lower dev loss kept, then the other ``seeds`` at it; with ``lr``, only
    ``seeds`` (default: all) at that rate. Returns ``{"lr", "dev": {rate: dev loss of
    seed 0}, "steps": [kept step per seed], "windows": [per-window validation losses
    per seed], "models": [students]}``.
    """
    check_int("size", size, low=1)
    if method not in settings["methods"]:
        raise ValueError(f"method must be one of {list(settings['methods'])}, got {method!r}")
    seeds = list(settings["seeds"] if seeds is None else seeds)
    windows = training_windows(teacher, data["train_ids"], settings["block"], size)
    keys = ("steps", "batch_size", "every", "patience", "min_delta")
    kwargs = {k: settings[k] for k in keys}

    def train(rate, seed):
        return train_student(data["config"], windows, data["dev"],
                             settings["methods"][method], rate, seed, **kwargs)

    if lr is None:
        tuning = {rate: train(rate, seeds[0]) for rate in settings["learning_rates"]}
        lr = min(tuning, key=lambda rate: tuning[rate][1])  # the lower dev loss
        students = [tuning[lr]] + [train(lr, seed) for seed in seeds[1:]]
        dev = {rate: t[1] for rate, t in tuning.items()}
    else:
        students = [train(lr, seed) for seed in seeds]
        dev = {lr: students[0][1]} if seeds[0] == 0 else {}
    return {"lr": lr, "dev": dev, "steps": [s[2] for s in students],
            "windows": [window_losses(s[0], *data["val"]).tolist() for s in students],
            "models": [s[0] for s in students]}


def record_students(path: str | Path = STUDENT_RECORD, log=print) -> dict:
    """Run section 7c's whole grid on the CPU and write it to ``path`` as JSON."""
    from .pretrained import load_pretrained_gpt  # the teacher

    teacher, corpus = load_pretrained_gpt(device=torch.device("cpu"))
    data = student_data(corpus, torch.device("cpu"))
    runs = []
    for size in STUDENT_SETTINGS["sizes"]:
        for method in STUDENT_SETTINGS["methods"]:
            run = run_students(teacher, data, size, method)
            run.pop("models")
            runs.append({"size": size, "method": method, **run,
                         "dev": [[rate, loss] for rate, loss in run["dev"].items()]})
            log(f"{size} {method} {run['lr']} {run['steps']}")
    return write_record(path, "section 7c's students (companion.distill.record_students)",
                        STUDENT_SETTINGS, indent=0, runs=runs)


def load_student_record(path: str | Path = STUDENT_RECORD) -> dict:
    """The recorded grid as ``{(size, method): run}`` (see :func:`run_students`, without
    the models); refuses a record made with other settings than ``STUDENT_SETTINGS``."""
    record = load_record(path, STUDENT_SETTINGS, "python -m companion.distill --record")
    return {(run["size"], run["method"]): {**run, "dev": dict(map(tuple, run["dev"]))}
            for run in record["runs"]}


def main(argv=None) -> int:
    """``python -m companion.distill --record``: re-record section 7c's students."""
    return record_main("python -m companion.distill", {"students": record_students}, argv,
                       description=main.__doc__)


if __name__ == "__main__":
    main()
