"""Training loops shared by the chapters (book: chapters 3 to 6).

:func:`train_classifier` is the plain mini-batch loop -- shuffle, forward, loss,
backward, optimizer step -- with the history every chapter plots. It takes any
``torch.optim.Optimizer`` (PyTorch's or ``companion.optim``'s) and any
``nn.Module`` that maps ``(B, features)`` to ``(B, classes)`` logits.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from companion._validate import check_int, check_xy


@dataclass
class History:
    """What :func:`train_classifier` records.

    ``step_loss`` has one entry per optimizer step; the ``epoch_*`` lists have one
    entry per epoch (validation entries only when validation data was given).
    """

    step_loss: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_train_accuracy: list[float] = field(default_factory=list)
    epoch_val_loss: list[float] = field(default_factory=list)
    epoch_val_accuracy: list[float] = field(default_factory=list)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy,
             batch_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(X, y)``, in eval mode, without gradients.

    The model's train/eval mode is restored afterwards.
    """
    check_xy(X, y)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        total_loss += loss_fn(logits, yb, reduction="sum").item()
        correct += (logits.argmax(dim=1) == yb).sum().item()
    model.train(was_training)
    return total_loss / len(X), correct / len(X)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``X`` whose arg-max logit is the label in ``y``."""
    return evaluate(model, X, y)[1]


def train_classifier(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor,
                     y: torch.Tensor, *, epochs: int, batch_size: int,
                     X_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
                     loss_fn=F.cross_entropy, scheduler=None,
                     generator: torch.Generator | None = None) -> History:
    """Mini-batch training of a classifier; returns its :class:`History`.

    Each epoch visits every row once in a random order drawn from ``generator``
    (pass a seeded ``torch.Generator`` for a repeatable order). ``scheduler``,
    if given, steps once per optimizer step. ``loss_fn(logits, targets,
    reduction=...)`` defaults to cross-entropy on logits.
    """
    check_xy(X, y)
    if (X_val is None) != (y_val is None):
        raise ValueError("give both X_val and y_val, or neither")
    if X_val is not None:
        check_xy(X_val, y_val, "X_val", "y_val")
    check_int("epochs", epochs, low=1)
    check_int("batch_size", batch_size, low=1)

    device = _device_of(model)
    X, y = X.to(device), y.to(device)
    history = History()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(X), generator=generator).to(device)
        for start in range(0, len(X), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(model(X[index]), y[index], reduction="mean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history.step_loss.append(loss.item())
        train_loss, train_acc = evaluate(model, X, y, loss_fn)
        history.epoch_train_loss.append(train_loss)
        history.epoch_train_accuracy.append(train_acc)
        if X_val is not None:
            val_loss, val_acc = evaluate(model, X_val, y_val, loss_fn)
            history.epoch_val_loss.append(val_loss)
            history.epoch_val_accuracy.append(val_acc)
    return history


# --------------------------------------------------------------------------- language models
# Chapter 4: next-token training of companion.transformer.GPT (and any model with the
# same interface: ``model(x, targets) -> (logits, loss)``).


@dataclass
class LMHistory:
    """What :func:`train_language_model` records.

    ``step_loss`` has the training-batch loss of every step; ``eval_step``,
    ``train_loss`` (empty if no training batch was given) and ``val_loss`` the losses on
    the fixed evaluation batches every ``eval_every`` steps (and after the last one).
    ``tokens_per_second`` counts the training tokens (batch x time) per second of wall
    time, evaluations excluded.
    """

    step_loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0


def fixed_windows(ids: torch.Tensor, block_size: int, num_windows: int | None = None):
    """Non-overlapping windows of a token stream: inputs and next-token targets.

    Returns ``(x, y)``, each ``(n, block_size)``, with ``y[:, t] == x[:, t + 1]``;
    the windows start at evenly spaced offsets and never overlap. ``num_windows=None``
    takes all ``(len(ids) - 1) // block_size`` whole windows: they predict every token
    once except a tail of ``(len(ids) - 1) % block_size`` (fewer than one window),
    which is left out. Deterministic: use it for evaluation.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError("ids must be a 1-D tensor of token ids")
    if block_size < 1 or block_size >= len(ids):
        raise ValueError(f"block_size must be in [1, {len(ids)}), got {block_size}")
    available = (len(ids) - 1) // block_size
    n = available if num_windows is None else num_windows
    if not 1 <= n <= available:
        raise ValueError(f"num_windows must be in [1, {available}], got {num_windows}")
    starts = torch.linspace(0, (available - 1) * block_size, n).long()
    starts = starts - starts % block_size  # on the grid of non-overlapping windows
    index = starts[:, None] + torch.arange(block_size + 1)  # (n, T+1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


def _batches_in_eval_mode(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Yield ``(x, y)`` batches on the model's device, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def language_model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` on ``(x, y)``.

    ``model(x, y)`` must return ``(logits, mean_loss)``; positions whose target is
    ``-1`` are ignored (a batch without any scored target is skipped; if no target at
    all is scored, a ``ValueError`` is raised). Eval mode, no gradients; the mode is
    restored afterwards.
    """
    total, count = 0.0, 0
    for xb, yb in _batches_in_eval_mode(model, x, y, batch_size):
        n = int((yb != -1).sum())
        if n == 0:  # the mean loss of such a batch is 0 / 0
            continue
        _, loss = model(xb, yb)
        total, count = total + loss.item() * n, count + n
    if count == 0:
        raise ValueError("y has no scored target (every target is -1): the loss is undefined")
    return total / count


def default_autocast_dtype(device) -> torch.dtype | None:
    """The mixed-precision dtype :func:`train_language_model` uses on ``device``.

    bfloat16 on a CUDA GPU that computes it natively (compute capability 8.0 and
    later: A100, H100, RTX 30xx ...); float16 on older CUDA GPUs (V100, T4), where
    bfloat16 is emulated and slow; ``None`` (float32, no autocast) on other devices.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    on_device = torch.cuda.device(device.index) if device.index is not None else nullcontext()
    with on_device:  # is_bf16_supported asks the current device
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def train_language_model(model: nn.Module, optimizer: torch.optim.Optimizer, get_batch, *,
                         steps: int, eval_every: int, eval_batches: dict, scheduler=None,
                         grad_clip: float | None = 1.0,
                         autocast_dtype: torch.dtype | None = None, log=None) -> LMHistory:
    """Next-token training: ``steps`` optimizer steps on batches from ``get_batch()``.

    ``get_batch()`` returns ``(x, y)`` id tensors ``(B, T)``; ``model(x, y)`` returns
    ``(logits, loss)``. Every ``eval_every`` steps (and at the end) the loss on
    ``eval_batches = {"train": (x, y), "val": (x, y)}`` -- fixed batches, e.g. from
    :func:`fixed_windows` -- is recorded (without ``"train"``, only the validation
    loss). Gradients are clipped to norm ``grad_clip``.
    ``autocast_dtype`` runs the forward pass in mixed precision; the weights stay
    float32. The default (:func:`default_autocast_dtype`) is bfloat16 on GPUs that
    support it natively, float16 on older CUDA GPUs and none elsewhere; with float16
    the loss is scaled (``torch.amp.GradScaler``) so that small gradients do not
    underflow. ``log(history)``, if given, is called after each evaluation (e.g. to
    print progress).
    """
    check_int("steps", steps, low=1)
    check_int("eval_every", eval_every, low=1)
    if set(eval_batches) not in ({"train", "val"}, {"val"}):
        raise ValueError("eval_batches must have the key 'val' and may have 'train', "
                         f"got {set(eval_batches)}")
    device = _device_of(model)
    if autocast_dtype is None:
        autocast_dtype = default_autocast_dtype(device)
    # float16 has a narrow exponent range: scale the loss, unscale before clipping
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    history, seconds, tokens = LMHistory(), 0.0, 0

    def record(step):
        history.eval_step.append(step)
        if "train" in eval_batches:
            history.train_loss.append(language_model_loss(model, *eval_batches["train"]))
        history.val_loss.append(language_model_loss(model, *eval_batches["val"]))
        history.tokens_per_second = tokens / seconds if seconds else 0.0
        if log is not None:
            log(history)

    model.train()
    for step in range(steps):
        if step % eval_every == 0:
            record(step)
            model.train()
        start = time.perf_counter()
        x, y = get_batch()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skips the step if a gradient overflowed (float16 only)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        history.step_loss.append(loss.item())  # .item() waits for the GPU: fair timing
        seconds += time.perf_counter() - start
        tokens += x.numel()
    record(steps)
    return history


def ngram_baselines(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int, *,
                    smoothing: float = 1.0) -> dict[str, float]:
    """Losses of three models without a network, in nats per token on ``eval_ids``.

    Each model is fitted by counting on ``train_ids`` and scores the same
    ``len(eval_ids) - 1`` predictions, token ``t + 1`` of ``eval_ids`` from token ``t``:

    * ``"uniform"``: every token equally likely, ``ln V``;
    * ``"unigram"``: ``p(b) = (n(b) + s) / (N + s V)``, the token frequencies;
    * ``"bigram"``: ``p(b | a) = (n(a, b) + s) / (n(a) + s V)``, the frequencies of the
      token that follows ``a`` -- a strong baseline with one token of context.

    ``n`` counts in ``train_ids`` (``n(a)``: how often ``a`` is followed by a token);
    ``s = smoothing`` is added to every count (``1.0``: add-one, Laplace) so that a
    pair never seen in training does not get probability 0. Book: chapters 4 and 5.
    """
    for name, ids in (("train_ids", train_ids), ("eval_ids", eval_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a 1-D torch.long tensor of token ids")
        if len(ids) < 2:
            raise ValueError(f"{name} must hold at least 2 tokens, got {len(ids)}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"{name} must hold ids in [0, {vocab_size}), got values from "
                             f"{ids.min().item()} to {ids.max().item()}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing!r}")
    V, train_ids = vocab_size, train_ids.to(eval_ids.device)
    unigram = torch.bincount(train_ids, minlength=V).double() + smoothing  # (V,)
    pairs = torch.bincount(train_ids[:-1] * V + train_ids[1:], minlength=V * V)
    bigram = pairs.double().reshape(V, V) + smoothing  # (V, V): row a, column b
    previous, target = eval_ids[:-1], eval_ids[1:]
    unigram_log_p = (unigram / unigram.sum()).log()
    bigram_log_p = (bigram / bigram.sum(dim=1, keepdim=True)).log()
    return {"uniform": math.log(V),
            "unigram": -unigram_log_p[target].mean().item(),
            "bigram": -bigram_log_p[previous, target].mean().item()}


@torch.no_grad()
def exact_match_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         batch_size: int = 1024) -> float:
    """Fraction of rows of ``(x, y)`` whose every scored target is the arg-max prediction.

    ``model(x)`` returns ``(logits, _)``; targets ``-1`` are not scored. With teacher
    forcing this equals the exact-match accuracy of greedy decoding: greedy decoding
    reproduces the whole answer if and only if every answer token is the arg-max given
    the correct tokens before it. Eval mode; the mode is restored afterwards.
    """
    correct = 0
    for xb, yb in _batches_in_eval_mode(model, x, y, batch_size):
        prediction = model(xb)[0].argmax(dim=-1)  # (B, T)
        correct += ((prediction == yb) | (yb == -1)).all(dim=1).sum().item()
    return correct / len(x)
