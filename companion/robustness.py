"""Robustness and security of a classifier: adversarial examples, adversarial training,
gradient masking, data poisoning with a backdoor, and its detection.

Section 13b of the book. The ideas, in the order the section uses them:

* **FGSM** (:func:`fgsm`; Goodfellow et al. 2015): one step of size :math:`\\varepsilon`
  along the sign of the loss gradient,
  :math:`x' = \\operatorname{clip}(x + \\varepsilon\\,\\operatorname{sign}
  \\nabla_x \\ell(f(x), y))`.
* **PGD** (:func:`pgd`; Madry et al. 2018): ``steps`` FGSM steps of size :math:`\\alpha`,
  each followed by the projection onto the :math:`L_\\infty` ball of radius
  :math:`\\varepsilon` around :math:`x`,
  :math:`x_{t+1} = x + \\Pi_{\\|\\delta\\|_\\infty \\le \\varepsilon}\\big(
  \\operatorname{clip}(x_t + \\alpha\\,\\operatorname{sign}\\nabla_x \\ell(f(x_t), y))
  - x\\big)`.
  Both equal the Adversarial Robustness Toolbox's ``FastGradientMethod`` and
  ``ProjectedGradientDescent`` (``norm=np.inf``, no random start), step by step.
* **Adversarial training** (:func:`adversarial_train`): minimise the loss on PGD examples
  drawn with a random start, :math:`\\min_\\theta \\mathbb{E}\\max_{\\|\\delta\\|_\\infty
  \\le\\varepsilon} \\ell(f_\\theta(x+\\delta), y)`.
* **Gradient masking** (:class:`QuantizeInput`; Athalye et al. 2018): rounding the input
  to a few grey levels has a zero gradient almost everywhere, so gradient attacks stall;
  ``bpda=True`` replaces the rounding's gradient by the identity's (BPDA) and the attack
  works again.
* **Backdoors** (:func:`add_trigger`, :func:`poison`; Gu et al. 2017): a small patch on a
  fraction of the training images, relabelled to a target class, teaches the model to
  answer the target whenever the patch is present.
* **Spectral signatures** (:func:`spectral_scores`; Tran et al. 2018): within one class,
  poisoned examples stand out along the top singular vector of the centred hidden
  features; the score is the squared projection onto it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from companion import backprop as bp
from companion._validate import check_batch, check_float, check_int, check_type, check_xy
from companion.data import load_digits_split
from companion.records import load_record, write_record
from companion.train import accuracy, train_classifier

__all__ = [
    "fgsm",
    "pgd",
    "adversarial_train",
    "QuantizeInput",
    "add_trigger",
    "poison",
    "spectral_scores",
    "flag_top",
    "BOOK_SETTINGS",
    "EXPERIMENT_RECORD",
    "digits_data",
    "digits_mlp",
    "train_digits",
    "robust_accuracy",
    "attack_success_rate",
    "hidden_features",
    "detect_backdoor",
    "best_lr",
    "record_experiments",
    "load_experiments",
]


def _check_clip(clip):
    if clip is None:
        return None
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise TypeError(f"clip must be None or a pair (low, high), got {clip!r}")
    low = check_float("clip[0]", clip[0])
    high = check_float("clip[1]", clip[1])
    if not low < high:
        raise ValueError(f"clip must have low < high, got {clip!r}")
    return low, high


def _check_attack_inputs(model, x, y, eps, clip):
    check_type("model", model, nn.Module)
    check_batch("x", x)
    check_type("y", y, torch.Tensor)
    if y.shape != x.shape[:1] or y.is_floating_point():
        raise ValueError(f"y must hold one integer label per row of x ({x.shape[0]}), "
                         f"got shape {tuple(y.shape)} and dtype {y.dtype}")
    check_float("eps", eps, low=0.0)
    return _check_clip(clip)


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the mean cross-entropy with respect to the input ``x`` (eval mode)."""
    was_training = model.training
    model.eval()
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    model.train(was_training)
    return grad  # (B, ...) like x


def _step(x_adv, grad, size, clip):
    x_adv = x_adv + size * grad.sign()
    return x_adv if clip is None else x_adv.clamp(*clip)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
         clip=(0.0, 1.0)) -> torch.Tensor:
    """The fast gradient sign method: ``clip(x + eps * sign(grad_x loss))``.

    ``x`` is a batch ``(B, ...)``, ``y`` its labels ``(B,)``; ``clip=None`` leaves the
    result unclamped. Returns a detached tensor shaped like ``x``.
    """
    clip = _check_attack_inputs(model, x, y, eps, clip)
    return _step(x.detach(), _loss_gradient(model, x, y), eps, clip).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int, *, random_start: bool = False, seed: int = 0,
        clip=(0.0, 1.0)) -> torch.Tensor:
    """Projected gradient descent under L-infinity: ``steps`` signed steps of size
    ``alpha``, each clipped to ``clip`` and projected onto ``|x' - x| <= eps``.

    ``random_start`` starts from a uniform draw in the ``eps`` ball (generator seeded with
    ``seed``, drawn on the CPU so that every device starts from the same point), as in
    Madry et al.'s training. Returns a detached tensor shaped like ``x``.
    """
    clip = _check_attack_inputs(model, x, y, eps, clip)
    check_float("alpha", alpha, low=0.0, low_open=True)
    check_int("steps", steps, low=1)
    check_type("random_start", random_start, bool)
    check_int("seed", seed)
    x = x.detach()
    x_adv = x
    if random_start:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        x_adv = x + eps * noise.to(x.device)
        x_adv = x_adv if clip is None else x_adv.clamp(*clip)
    for _ in range(steps):
        x_adv = _step(x_adv, _loss_gradient(model, x_adv, y), alpha, clip)
        x_adv = x + (x_adv - x).clamp(-eps, eps)  # projection onto the eps ball
    return x_adv.detach()


def adversarial_train(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor,
                      y: torch.Tensor, *, epochs: int, batch_size: int, eps: float,
                      alpha: float, steps: int,
                      generator: torch.Generator | None = None) -> list[float]:
    """Madry et al.'s adversarial training: each mini-batch is replaced by its PGD
    examples (random start) before the optimizer step. Returns the step losses.

    The order of the rows and the random starts come from ``generator``, so that a seeded
    generator gives a repeatable run; otherwise the loop is
    :func:`~companion.train.train_classifier`'s.
    """
    check_type("model", model, nn.Module)
    check_type("optimizer", optimizer, torch.optim.Optimizer)
    check_xy(X, y)
    check_int("epochs", epochs, low=1)
    check_int("batch_size", batch_size, low=1)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator).to(X.device)
        for start in range(0, len(X), batch_size):
            index = order[start:start + batch_size]
            seed = int(torch.randint(2**31, (1,), generator=generator))
            x_adv = pgd(model, X[index], y[index], eps, alpha, steps,
                        random_start=True, seed=seed)
            model.train()
            loss = F.cross_entropy(model(x_adv), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


class _RoundStraightThrough(torch.autograd.Function):
    """Rounding whose backward pass is the identity's (BPDA, Athalye et al. 2018)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class QuantizeInput(nn.Module):
    """A preprocessing "defence": round each input to ``levels`` grey levels in
    ``[0, 1]``, ``round(x (levels - 1)) / (levels - 1)``.

    ``torch.round`` has a zero gradient, so gradient attacks on ``QuantizeInput`` followed
    by a model see no signal: the gradient is masked, not the model robust. With
    ``bpda=True`` the backward pass treats the rounding as the identity, which is the
    attack that sees through it.
    """

    def __init__(self, levels: int = 2, *, bpda: bool = False):
        super().__init__()
        self.levels = check_int("levels", levels, low=2)
        check_type("bpda", bpda, bool)
        self.bpda = bpda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x * (self.levels - 1)
        rounded = _RoundStraightThrough.apply(scaled) if self.bpda else torch.round(scaled)
        return rounded / (self.levels - 1)


def add_trigger(x: torch.Tensor, *, size: int = 2, value: float = 1.0,
                side: int = 8) -> torch.Tensor:
    """A copy of the flat images ``x`` ``(B, side * side)`` with a ``size x size`` square
    of ``value`` in the bottom-right corner: the backdoor's trigger."""
    check_batch("x", x)
    side = check_int("side", side, low=1)
    size = check_int("size", size, low=1, high=side)
    if x.shape[1:] != (side * side,):
        raise ValueError(f"x must have shape (B, {side * side}), got {tuple(x.shape)}")
    images = x.reshape(-1, side, side).clone()
    images[:, side - size:, side - size:] = check_float("value", value)
    return images.reshape(x.shape)


def poison(X: torch.Tensor, y: torch.Tensor, fraction: float, target: int, *,
           generator: torch.Generator | None = None, **trigger):
    """Gu et al.'s BadNets poisoning: stamp the trigger on a random ``fraction`` of the
    rows whose label is not ``target`` and relabel them ``target``.

    Returns ``(X_poisoned, y_poisoned, index)``, ``index`` the poisoned rows (sorted);
    ``**trigger`` goes to :func:`add_trigger`.
    """
    check_xy(X, y)
    check_float("fraction", fraction, low=0.0, high=1.0)
    target = check_int("target", target, low=0)
    candidates = (y != target).nonzero().flatten()
    n = math.floor(fraction * len(X))
    if n > len(candidates):
        raise ValueError(f"fraction {fraction} asks for {n} rows, only "
                         f"{len(candidates)} are not of class {target}")
    order = torch.randperm(len(candidates), generator=generator).to(candidates.device)
    index = candidates[order[:n]].sort().values
    X, y = X.clone(), y.clone()
    X[index] = add_trigger(X[index], **trigger) if n else X[index]
    y[index] = target
    return X, y, index


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s outlier score of each row of ``features`` ``(n, d)`` (one class):
    the squared projection of the centred row onto the top right singular vector."""
    check_batch("features", features)
    if features.dim() != 2:
        raise ValueError(f"features must have shape (n, d), got {tuple(features.shape)}")
    centred = features - features.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2  # (n,)


def flag_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A boolean mask of the ``ceil(fraction * n)`` highest ``scores``: the rows that a
    defender removes (Tran et al. remove 1.5 times the expected poisoned fraction)."""
    check_type("scores", scores, torch.Tensor)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (n,), got {tuple(scores.shape)}")
    check_float("fraction", fraction, low=0.0, high=1.0)
    k = math.ceil(round(fraction * len(scores), 9))  # 0.3 * 20 may round to 6.0000001
    mask = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    mask[scores.argsort(descending=True)[:k]] = True
    return mask


# ------------------------------------------------- the experiments of section 13b

#: Settings of every model the section trains -- chapter 2's MLP (64-128-64-10, ReLU) with
#: Adam, one budget for all (epochs, batch size, the learning-rate grid), PGD-5 at
#: ``eps`` for adversarial training, PGD-10 with ``alpha = eps / 4`` for evaluation.
BOOK_SETTINGS = {"sizes": [64, 128, 64, 10], "epochs": 15, "batch_size": 32,
                 "lr_grid": [1e-3, 3e-3, 1e-2, 3e-2], "eps": 0.1, "train_alpha": 0.025,
                 "train_steps": 5, "eval_steps": 10, "n_val": 270, "levels": 4,
                 "eps_grid": [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2],
                 "fractions": [0.0, 0.005, 0.01, 0.02, 0.05, 0.1], "target": 0,
                 "seeds": [0, 1, 2]}

#: Where :func:`record_experiments` writes its results.
EXPERIMENT_RECORD = Path(__file__).resolve().parent / "assets" / "robustness_runs.json"


def digits_data(n_val: int = BOOK_SETTINGS["n_val"]) -> dict[str, torch.Tensor]:
    """Chapter 2's digits split (float32) with the last ``n_val`` of a fixed permutation
    of the training rows held out to choose the learning rate: keys ``X_train``,
    ``y_train``, ``X_val``, ``y_val``, ``X_test``, ``y_test``."""
    split = load_digits_split()
    order = torch.randperm(len(split.X_train), generator=torch.Generator().manual_seed(0))
    fit, val = order[:-n_val], order[-n_val:]
    return {"X_train": split.X_train[fit], "y_train": split.y_train[fit],
            "X_val": split.X_train[val], "y_val": split.y_train[val],
            "X_test": split.X_test, "y_test": split.y_test}


def digits_mlp(seed: int, sizes=BOOK_SETTINGS["sizes"], *, levels: int | None = None):
    """Chapter 2's MLP as ``torch.nn.Sequential``, drawn as chapter 2 draws it (float64
    after ``manual_seed(seed)``) and cast to float32; ``levels`` puts a
    :class:`QuantizeInput` in front."""
    torch.manual_seed(seed)
    model = bp.MLP(list(sizes), "relu", dtype=torch.float64).to_torch().float()
    return model if levels is None else nn.Sequential(QuantizeInput(levels), model)


def train_digits(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, lr: float,
                 seed: int, adversarial: bool = False, epochs: int | None = None,
                 settings: dict = BOOK_SETTINGS) -> list[float]:
    """Train ``model`` in place with Adam at ``lr`` for the book's budget (``epochs``
    overrides it), the order of rows drawn from ``seed``; ``adversarial=True`` trains on
    PGD examples (:func:`adversarial_train`). Returns the step losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    budget = dict(epochs=epochs or settings["epochs"], batch_size=settings["batch_size"],
                  generator=generator)
    if adversarial:
        return adversarial_train(model, optimizer, X, y, eps=settings["eps"],
                                 alpha=settings["train_alpha"],
                                 steps=settings["train_steps"], **budget)
    return train_classifier(model, optimizer, X, y, **budget).step_loss


def robust_accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, eps: float, *,
                    steps: int = BOOK_SETTINGS["eval_steps"],
                    surrogate: nn.Module | None = None) -> float:
    """Accuracy of ``model`` on PGD examples (``steps`` steps of ``eps / 4``) crafted on
    ``surrogate`` (default: ``model`` itself; another model makes a transfer attack)."""
    if check_float("eps", eps, low=0.0) == 0:
        return accuracy(model, X, y)
    x_adv = pgd(surrogate or model, X, y, eps, eps / 4, steps)
    return accuracy(model, x_adv, y)


def attack_success_rate(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                        target: int, **trigger) -> float:
    """Fraction of the rows not of class ``target`` that the model assigns to ``target``
    once the trigger (``**trigger`` goes to :func:`add_trigger`) is stamped on them."""
    check_xy(X, y)
    target = check_int("target", target, low=0)
    keep = y != target
    stamped = add_trigger(X[keep], **trigger)
    with torch.no_grad():
        return (model.eval()(stamped).argmax(1) == target).double().mean().item()


def hidden_features(model: nn.Sequential, X: torch.Tensor) -> torch.Tensor:
    """The activations before the last linear layer ``(n, d)``: what spectral signatures
    look at."""
    with torch.no_grad():
        return model.eval()[:-1](X)


def detect_backdoor(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor,
                    poisoned: torch.Tensor, target: int, fraction: float,
                    low_fpr: float = 0.05) -> dict:
    """Spectral signatures on the training rows labelled ``target``.

    Flags the ``1.5 * fraction * n`` highest scores (Tran et al.'s removal budget, ``n``
    the training rows) and returns the detection rate (poisoned rows flagged / poisoned
    rows) and the false-alarm rate (clean rows flagged / clean rows of that class); and,
    threshold-free, ``tpr_at_low_fpr``: the fraction of poisoned rows that score above
    every clean row but a ``low_fpr`` fraction of them.
    """
    check_xy(X, y)
    check_float("low_fpr", low_fpr, low=0.0, high=1.0, high_open=True)
    rows = (y == target).nonzero().flatten()
    is_poisoned = torch.isin(rows, poisoned)
    if is_poisoned.all() or not is_poisoned.any():
        raise ValueError(f"the rows labelled {target} must hold both poisoned and clean "
                         f"rows, got {int(is_poisoned.sum())} poisoned of {len(rows)}")
    scores = spectral_scores(hidden_features(model, X[rows]).double())
    flagged = flag_top(scores, min(1.0, 1.5 * fraction * len(X) / len(rows)))
    detected = (flagged & is_poisoned).sum().item() / is_poisoned.sum().item()
    false_alarms = (flagged & ~is_poisoned).sum().item() / (~is_poisoned).sum().item()
    clean = scores[~is_poisoned].sort(descending=True).values
    threshold = clean[math.floor(low_fpr * len(clean))]  # at most low_fpr of clean above
    tpr = (scores[is_poisoned] > threshold).double().mean().item()
    return {"detection_rate": detected, "false_alarm_rate": false_alarms,
            "tpr_at_low_fpr": tpr}


def _grid_run(job: tuple[bool, float, int]) -> dict:
    adversarial, lr, seed = job
    torch.set_num_threads(1)
    s, d = BOOK_SETTINGS, digits_data()
    model = digits_mlp(seed)
    losses = train_digits(model, d["X_train"], d["y_train"], lr=lr, seed=seed,
                          adversarial=adversarial)
    return {"adversarial": adversarial, "lr": lr, "seed": seed,
            "first_epoch_loss": losses[:math.ceil(len(d["X_train"]) / s["batch_size"])],
            "val_clean": accuracy(model, d["X_val"], d["y_val"]),
            "val_robust": robust_accuracy(model, d["X_val"], d["y_val"], s["eps"]),
            "test": {str(eps): robust_accuracy(model, d["X_test"], d["y_test"], eps)
                     for eps in s["eps_grid"]}}


def _masking_run(job: tuple[float, int]) -> dict:
    lr, seed = job
    torch.set_num_threads(1)
    s, d = BOOK_SETTINGS, digits_data()
    surrogate, masked = digits_mlp(seed), digits_mlp(seed, levels=s["levels"])
    for model in (surrogate, masked):
        train_digits(model, d["X_train"], d["y_train"], lr=lr, seed=seed)
    bpda = nn.Sequential(QuantizeInput(s["levels"], bpda=True), masked[1])
    X, y = d["X_test"], d["y_test"]
    return {"seed": seed, **{f"{name} {eps}": robust_accuracy(masked, X, y, eps,
                                                              surrogate=attacker)
                             for eps in s["eps_grid"]
                             for name, attacker in (("direct", masked), ("BPDA", bpda),
                                                    ("transfer", surrogate))}}


def _backdoor_run(job: tuple[float, float, int]) -> dict:
    lr, fraction, seed = job
    torch.set_num_threads(1)
    s, d = BOOK_SETTINGS, digits_data()
    X, y, index = poison(d["X_train"], d["y_train"], fraction, s["target"],
                         generator=torch.Generator().manual_seed(seed))
    model = digits_mlp(seed)
    train_digits(model, X, y, lr=lr, seed=seed)
    run = {"fraction": fraction, "seed": seed, "n_poisoned": len(index),
           "clean": accuracy(model, d["X_test"], d["y_test"]),
           "attack_success": attack_success_rate(model, d["X_test"], d["y_test"],
                                                 s["target"])}
    if len(index):
        run.update(detect_backdoor(model, X, y, index, s["target"], fraction))
    return run


def best_lr(runs: list[dict], adversarial: bool) -> float:
    """The learning rate of the grid with the best mean validation score over seeds:
    clean accuracy for the standard model, robust accuracy for the adversarial one (each
    method is tuned for what it is for)."""
    key = "val_robust" if adversarial else "val_clean"
    means = {}
    for run in runs:
        if run["adversarial"] == adversarial:
            means.setdefault(run["lr"], []).append(run[key])
    return max(means, key=lambda lr: sum(means[lr]) / len(means[lr]))


def record_experiments(jobs: int = 1, path: str | Path = EXPERIMENT_RECORD) -> dict:
    """Run section 13b's experiments with :data:`BOOK_SETTINGS` and write them as JSON:
    the learning-rate grid of standard and adversarial training, gradient masking and the
    backdoor at the standard model's best rate, every seed, one CPU thread per run
    (``jobs`` runs in parallel processes). Minutes in all; the book reads the record and
    re-computes seed 0's cheap parts to check it."""
    import multiprocessing

    check_int("jobs", jobs, low=1)
    s = BOOK_SETTINGS
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        grid = pool.map(_grid_run, [(adv, lr, seed) for adv in (False, True)
                                    for lr in s["lr_grid"] for seed in s["seeds"]])
        lr = best_lr(grid, adversarial=False)
        masking = pool.map(_masking_run, [(lr, seed) for seed in s["seeds"]])
        backdoor = pool.map(_backdoor_run, [(lr, f, seed) for f in s["fractions"]
                                            for seed in s["seeds"]])
    return write_record(path, "section 13b's experiments "
                        "(companion.robustness.record_experiments)", s, indent=1, threads=1,
                        grid=grid, masking=masking, backdoor=backdoor)


def load_experiments(path: str | Path = EXPERIMENT_RECORD) -> dict:
    """The record of :func:`record_experiments`; raises ``ValueError`` if it was made with
    other settings than :data:`BOOK_SETTINGS`."""
    return load_record(path, BOOK_SETTINGS, "python -m companion.robustness --record [jobs]")


if __name__ == "__main__":  # python -m companion.robustness --record [jobs]
    import sys

    if sys.argv[1:2] == ["--record"]:
        record_experiments(jobs=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
