"""Training loops shared by the chapters (book: chapters 3, 5 and 6).

:func:`train_classifier` is the plain mini-batch loop -- shuffle, forward, loss,
backward, optimizer step -- with the history every chapter plots. It takes any
``torch.optim.Optimizer`` (PyTorch's or ``companion.optim``'s) and any
``nn.Module`` that maps ``(B, features)`` to ``(B, classes)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


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


def _check_xy(X, y, name_x="X", name_y="y"):
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name_x} and {name_y} must be tensors, got "
                        f"{type(X).__name__} and {type(y).__name__}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{name_x} has {X.shape[0]} rows but {name_y} has {y.shape[0]}")
    if y.dtype != torch.long:
        raise TypeError(f"{name_y} must hold class indices of dtype torch.long, got {y.dtype}")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy,
             batch_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(X, y)``, in eval mode, without gradients.

    The model's train/eval mode is restored afterwards.
    """
    _check_xy(X, y)
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
    _check_xy(X, y)
    if (X_val is None) != (y_val is None):
        raise ValueError("give both X_val and y_val, or neither")
    if X_val is not None:
        _check_xy(X_val, y_val, "X_val", "y_val")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

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
