"""Pruning: zero the smallest weights (unstructured) or remove whole MLP neurons (structured).

Chapter 7, section "Pruning". Magnitude pruning keeps the weights with the largest
``|w|`` (Han et al., 2015): with ``n`` weights and a fraction ``amount`` to remove, the
``k = round(amount * n)`` smallest in absolute value get mask ``False`` (``True`` = keep),
exactly as ``torch.nn.utils.prune.l1_unstructured`` counts them. Layer-wise pruning ranks
each tensor on its own; global pruning ranks all tensors together
(``prune.global_unstructured``), so layers with small weights lose more.

Unstructured zeros leave the matrix shape, and the time of a dense matmul, unchanged.
Structured pruning removes whole hidden neurons of an MLP ``Linear(d, h) -> act ->
Linear(h, d)``: neuron ``j`` is scored by ``||W_in[j, :]||_2 * ||W_out[:, j]||_2`` (how much it
can carry from input to output) and the kept neurons form two smaller ``nn.Linear`` layers.

Pruning is usually followed by fine-tuning with the mask held fixed
(:func:`finetune_pruned`: after every optimizer step the pruned entries are set back to
zero). The chapter's three seeds of it (:func:`finetune_run`, ``FINETUNE_SETTINGS``) are
recorded in ``assets/prune_finetune.json`` by ``python -m companion.prune --record``; the
page re-runs seed 0 and checks it against the record (:func:`load_finetune_record`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ._validate import check_callable, check_float, check_int, check_tensor, check_type
from .device import seed_everything
from .records import load_record, record_main, write_record


def _count(amount, n: int) -> int:
    """Number of entries to prune: ``round(amount * n)`` (Python's round, as torch's prune)."""
    check_float("amount", amount, 0.0, 1.0)
    return round(float(amount) * n)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, True for all but the ``k`` smallest entries of the 1-D ``scores``."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


def magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask of ``weight``'s shape: False for the ``round(amount * numel)`` smallest ``|w|``."""
    check_tensor("weight", weight, floating=True)
    k = _count(amount, weight.numel())
    return _smallest(weight.detach().abs().flatten(), k).reshape(weight.shape)


def global_magnitude_masks(weights, amount: float) -> list[torch.Tensor]:
    """Keep-masks for a list of tensors ranked together by ``|w|`` (one global threshold)."""
    weights = list(weights)
    if not weights:
        raise ValueError("weights must contain at least one tensor, got an empty list")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, floating=True)
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = _smallest(scores, _count(amount, scores.numel()))
    return [m.reshape(w.shape) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


@torch.no_grad()
def apply_masks(weights, masks) -> None:
    """Zero, in place, the entries of each weight whose mask is False."""
    for w, m in zip(weights, masks, strict=True):
        w.mul_(m.to(w.dtype))


def sparsity(weights) -> float:
    """Fraction of zero entries over all the given tensors."""
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def neuron_importance(fc_in: nn.Linear, fc_out: nn.Linear) -> torch.Tensor:
    """Score of each hidden neuron: ``||W_in[j, :]||_2 * ||W_out[:, j]||_2``, shape ``(h,)``."""
    check_type("fc_in", fc_in, nn.Linear)
    check_type("fc_out", fc_out, nn.Linear)
    if fc_in.out_features != fc_out.in_features:
        raise ValueError(f"fc_in.out_features ({fc_in.out_features}) must equal "
                         f"fc_out.in_features ({fc_out.in_features})")
    return fc_in.weight.detach().norm(dim=1) * fc_out.weight.detach().norm(dim=0)


@torch.no_grad()
def prune_neurons(fc_in: nn.Linear, fc_out: nn.Linear, keep: int) -> tuple[nn.Linear, nn.Linear]:
    """Two smaller layers holding the ``keep`` most important hidden neurons (original order)."""
    scores = neuron_importance(fc_in, fc_out)
    check_int("keep", keep, 1, scores.numel())
    idx = torch.argsort(scores, descending=True, stable=True)[:keep].sort().values
    new_in = nn.Linear(fc_in.in_features, keep, bias=fc_in.bias is not None,
                       device=fc_in.weight.device, dtype=fc_in.weight.dtype)
    new_out = nn.Linear(keep, fc_out.out_features, bias=fc_out.bias is not None,
                        device=fc_out.weight.device, dtype=fc_out.weight.dtype)
    new_in.weight.copy_(fc_in.weight[idx])                      # (keep, d)
    if fc_in.bias is not None:
        new_in.bias.copy_(fc_in.bias[idx])
    new_out.weight.copy_(fc_out.weight[:, idx])                 # (d, keep)
    if fc_out.bias is not None:
        new_out.bias.copy_(fc_out.bias)
    return new_in, new_out


def prune_mlp_neurons(model: nn.Module, amount: float) -> nn.Module:
    """Remove ``round(amount * h)`` neurons from every ``Linear -> act -> Linear`` MLP in place.

    An MLP is an ``nn.Sequential`` whose items 0 and 2 are ``nn.Linear`` layers with matching
    hidden size (the chapter-4 :class:`~companion.transformer.MLP`). At least one neuron stays.
    Returns ``model``.
    """
    check_type("model", model, nn.Module)
    check_float("amount", amount, 0.0, 1.0)
    for module in model.modules():
        if (isinstance(module, nn.Sequential) and len(module) >= 3
                and isinstance(module[0], nn.Linear) and isinstance(module[2], nn.Linear)
                and module[0].out_features == module[2].in_features):
            h = module[0].out_features
            keep = max(1, h - _count(amount, h))
            module[0], module[2] = prune_neurons(module[0], module[2], keep)
    return model


# --------------------------------------------------------------- fine-tuning after pruning

#: The fine-tuning of section "Pruning". The pretrained GPT is pruned globally by
#: ``amount``, then trained for ``steps`` AdamW steps on random training windows, one run
#: per seed, and validated on ``val_windows`` fixed windows of ``block_size`` characters.
FINETUNE_SETTINGS = {"amount": 0.6, "steps": 15, "batch_size": 8, "block_size": 128,
                     "lr": 1e-3, "seeds": [0, 1, 2], "val_windows": 48}
FINETUNE_RECORD = Path(__file__).resolve().parent / "assets" / "prune_finetune.json"
FINETUNE_COMMAND = "python -m companion.prune --record"


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every ``nn.Linear`` in ``model``, in module order."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def finetune_pruned(model: nn.Module, masks, get_batch, *, steps: int, lr: float) -> list[float]:
    """Zero ``model``'s pruned linear weights, then train it in place with the mask held fixed.

    ``masks`` pair with :func:`linear_weights` (True = keep); ``model(x, y)`` returns
    ``(logits, loss)`` for ``(x, y) = get_batch()``. ``steps`` AdamW steps (rate ``lr``,
    no weight decay), after each of which the pruned entries are set back to zero.
    Returns the training loss of each step.
    """
    check_type("model", model, nn.Module)
    check_callable("get_batch", get_batch)
    check_int("steps", steps, 1)
    check_float("lr", lr, 0.0, low_open=True)
    weights = linear_weights(model)
    masks = list(masks)
    if len(masks) != len(weights):
        raise ValueError(f"masks must hold one mask per linear weight ({len(weights)}), "
                         f"got {len(masks)}")
    apply_masks(weights, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = get_batch()
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_masks(weights, masks)  # pruned weights stay zero
        losses.append(loss.item())
    return losses


def finetune_run(teacher: nn.Module, corpus, seed: int, *, settings: dict = FINETUNE_SETTINGS,
                 device="cpu") -> tuple[nn.Module, list[float]]:
    """One seed of the section's experiment: a copy of ``teacher`` on ``device`` (the CPU,
    where the record is made, by default) pruned by :func:`global_magnitude_masks` at
    ``settings["amount"]`` and fine-tuned by :func:`finetune_pruned` on
    ``corpus.get_batch("train", ...)`` windows. The seed sets the batches (their own
    generator) and the dropout (:func:`~companion.device.seed_everything`). Returns the
    fine-tuned model and its step losses.
    """
    check_int("seed", seed, 0)
    seed_everything(seed)
    model = copy.deepcopy(teacher).to(device)
    masks = global_magnitude_masks(linear_weights(model), settings["amount"])
    batches = torch.Generator().manual_seed(seed)

    def get_batch():
        return corpus.get_batch("train", settings["batch_size"], settings["block_size"],
                                generator=batches, device=device)

    losses = finetune_pruned(model, masks, get_batch, steps=settings["steps"], lr=settings["lr"])
    return model, losses


def record_finetune(path: str | Path = FINETUNE_RECORD, log=print) -> dict:
    """Run every seed of ``FINETUNE_SETTINGS`` on the CPU and write them to ``path``."""
    from .pretrained import load_pretrained_gpt  # the model the section prunes
    from .train import fixed_windows, language_model_loss

    s = FINETUNE_SETTINGS
    teacher, corpus = load_pretrained_gpt(device=torch.device("cpu"))
    val = fixed_windows(corpus.val_ids, s["block_size"], num_windows=s["val_windows"])
    runs = []
    for seed in s["seeds"]:
        model, losses = finetune_run(teacher, corpus, seed)
        runs.append({"seed": seed, "step_loss": losses,
                     "val_loss": language_model_loss(model, *val)})
        log(f"seed {seed}: validation loss {runs[-1]['val_loss']:.4f}")
    return write_record(path, "section 7b's fine-tuning after pruning "
                        "(companion.prune.record_finetune)", s, indent=0, runs=runs)


def load_finetune_record(path: str | Path = FINETUNE_RECORD) -> dict:
    """The recorded runs as ``{seed: {"step_loss": [...], "val_loss": float}}``; refuses a
    record made with other settings than ``FINETUNE_SETTINGS``."""
    record = load_record(path, FINETUNE_SETTINGS, FINETUNE_COMMAND)
    return {run["seed"]: {"step_loss": run["step_loss"], "val_loss": run["val_loss"]}
            for run in record["runs"]}


def main(argv=None) -> int:
    """``python -m companion.prune --record``: re-record the fine-tuning after pruning."""
    return record_main("python -m companion.prune", {"finetune": record_finetune}, argv,
                       description=main.__doc__, threads=1)  # as the notebooks


if __name__ == "__main__":
    raise SystemExit(main())
