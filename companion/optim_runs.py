r"""Chapter 3's training grids, recorded once (book: chapter 3, "Gradient descent,
full-batch and stochastic", "Warm-up and cosine decay" and "Every optimizer on the same
model").

Three grids train on the digits (:func:`companion.data.load_digits_split`) with
:func:`companion.train.train_classifier`; a seed draws the initial weights and the order
of the batches:

* :data:`BATCH_SWEEP` -- softmax regression trained by SGD for 10 epochs, at every batch
  size and learning rate of its grid, :math:`\theta_{t+1} = \theta_t - \eta\,\hat g_t`
  with :math:`\hat g_t` the mean gradient of a batch of :math:`B` examples (19 runs,
  seed 0), and full-batch descent for 300 epochs at three rates;
* :data:`WARMUP_GRID` -- a 4-hidden-layer ReLU MLP (:func:`deep_mlp`) trained for 10
  epochs with batches of 64 by Adam whose learning rate follows
  :func:`~companion.optim.warmup_cosine_schedule`, for every peak rate and warm-up length
  (18 runs, seeds 0, 1, 2), keeping also the share of *dead* first-layer units at the
  end, the ReLUs that no training image activates,
  :math:`1 - \frac{1}{128}\sum_j \mathbb 1[\exists i: h_{ij} > 0]` (:func:`dead_share`);
* :data:`OPTIMIZER_GRID` -- the MLP 64 -> 128 -> 10 (:func:`small_mlp`) trained for 20
  epochs with batches of 64 by each optimizer of the chapter (24 runs, seeds 0, 1, 2).

Each run keeps its training loss and test accuracy per epoch (:class:`RecordedRun`).

Together they take about a minute of CPU, too long for the notebook, so
``python -m companion.optim_runs --record grids`` writes them once to
:data:`OPTIMIZER_RECORD`. The notebook reads them with :func:`load_optimizer_runs`, which
refuses a record made with other settings, and re-trains the first epoch of some runs
to check the record against a fresh computation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from companion import optim
from companion._validate import check_choice, check_int, check_number
from companion.data import Split, load_digits_split
from companion.records import load_record, record_main, write_record
from companion.train import History, train_classifier

#: Where ``python -m companion.optim_runs --record grids`` writes both grids.
OPTIMIZER_RECORD = Path(__file__).parent / "assets" / "optimizer_runs.json"
RECORD_COMMAND = "python -m companion.optim_runs --record grids"

#: SGD on softmax regression (``nn.Linear(64, 10)``), 10 epochs at every batch size and rate
#: of its grid (the full batch, then ``minibatch_sizes``), and once with single examples
#: at ``single_lr``; seed 0 for the weights and the order of the examples. Full-batch
#: descent also runs for ``long_epochs`` epochs at each of ``long_rates``.
BATCH_SWEEP = {"epochs": 10, "seed": 0, "full_batch_rates": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
               "minibatch_sizes": [64, 8],
               "minibatch_rates": [1 / 16, 1 / 8, 0.25, 0.5, 1.0, 2.0], "single_lr": 0.25,
               "long_rates": [0.5, 2.0, 4.0], "long_epochs": 300}

#: Adam with warm-up + cosine decay on :func:`deep_mlp`: every peak rate x warm-up x seed.
WARMUP_GRID = {"depth": 4, "width": 128, "peak_rates": [3e-3, 1e-2, 3e-2],
               "warmups": [0, 50], "seeds": [0, 1, 2], "epochs": 10, "batch_size": 64}

#: Every optimizer of the chapter on :func:`small_mlp`: ``{name: [class name in
#: companion.optim, keyword arguments]}``; ``scheduled`` lists the runs whose rate follows
#: a warm-up of ``warmup_steps`` steps and a cosine decay over the whole run.
OPTIMIZER_GRID = {
    "width": 128, "seeds": [0, 1, 2], "epochs": 20, "batch_size": 64, "warmup_steps": 20,
    "optimizers": {
        "SGD": ["SGD", {"lr": 0.1}],
        "SGD + momentum": ["SGD", {"lr": 0.01, "momentum": 0.9}],
        "Nesterov": ["SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}],
        "Adam": ["Adam", {"lr": 1e-3}],
        "AdamW": ["AdamW", {"lr": 1e-3, "weight_decay": 1e-2}],
        "AdamW + warm-up/cosine": ["AdamW", {"lr": 3e-3, "weight_decay": 1e-2}],
        # two controls: a higher rate for SGD, and the schedule's peak rate held constant
        "SGD, lr 0.3": ["SGD", {"lr": 0.3}],
        "AdamW, constant 3e-3": ["AdamW", {"lr": 3e-3, "weight_decay": 1e-2}],
    },
    "scheduled": ["AdamW + warm-up/cosine"],
}

#: Everything the record depends on; :func:`load_optimizer_runs` checks it.
SETTINGS = {"data": "load_digits_split()", "sweep": BATCH_SWEEP, "warmup": WARMUP_GRID,
            "optimizers": OPTIMIZER_GRID}


@dataclass(frozen=True)
class RecordedRun:
    """What the record keeps of one run: training loss and test accuracy per epoch, the
    number of optimizer steps, and (warm-up grid only) the dead share at the end."""

    epoch_train_loss: list[float]
    epoch_val_accuracy: list[float]
    steps: int
    dead: float | None = None

    @classmethod
    def of(cls, history: History, dead: float | None = None) -> RecordedRun:
        """The part of a :class:`~companion.train.History` that the record keeps."""
        return cls(history.epoch_train_loss, history.epoch_val_accuracy,
                   len(history.step_loss), dead)


def deep_mlp(depth: int = 4, width: int = 128) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` ReLUs on the 64 pixels, then 10 logits; no
    normalisation. Seed PyTorch first for a repeatable initialisation."""
    check_int("depth", depth, low=1)
    check_int("width", width, low=1)
    layers, fan_in = [], 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def small_mlp(width: int = 128) -> nn.Sequential:
    """The MLP ``64 -> width -> 10`` with a ReLU: :func:`deep_mlp` with one hidden layer."""
    return deep_mlp(1, width)


@torch.no_grad()
def dead_share(model: nn.Sequential, X: torch.Tensor) -> float:
    """Share of the first hidden layer's ReLUs that no row of ``X`` (n, 64) activates."""
    first_layer = model[1](model[0](X))  # (n, width) after the ReLU
    return 1 - (first_layer > 0).any(dim=0).float().mean().item()


def _epochs(epochs: int | None, full: int) -> int:
    return full if epochs is None else check_int("epochs", epochs, low=1, high=full)


def _steps_per_epoch(digits: Split, batch_size: int) -> int:
    return math.ceil(len(digits.X_train) / batch_size)


def train_sweep_run(batch_size: int, lr: float, digits: Split,
                    epochs: int | None = None) -> History:
    """One run of :data:`BATCH_SWEEP`: :class:`~companion.optim.SGD` at ``lr`` on a fresh
    ``nn.Linear(64, 10)``, batches of ``batch_size``, its first ``epochs`` epochs."""
    check_int("batch_size", batch_size, low=1)
    check_number("lr", lr)
    g = BATCH_SWEEP
    torch.manual_seed(g["seed"])
    model = nn.Linear(64, 10).to(digits.X_train.device)
    return train_classifier(
        model, optim.SGD(model.parameters(), lr=lr), digits.X_train, digits.y_train,
        epochs=_epochs(epochs, g["epochs"]), batch_size=batch_size,
        X_val=digits.X_test, y_val=digits.y_test,
        generator=torch.Generator().manual_seed(g["seed"]))


def train_full_batch(lr: float, digits: Split,
                     epochs: int | None = None) -> tuple[nn.Linear, History]:
    """Full-batch gradient descent of :data:`BATCH_SWEEP` at ``lr``, ``long_epochs`` (or
    ``epochs``) steps, without validation: ``(model, history)``. The order of the rows,
    which only changes how the mean rounds, comes from PyTorch's global generator."""
    check_number("lr", lr)
    g = BATCH_SWEEP
    torch.manual_seed(g["seed"])
    model = nn.Linear(64, 10).to(digits.X_train.device)
    history = train_classifier(
        model, optim.SGD(model.parameters(), lr=lr), digits.X_train, digits.y_train,
        epochs=_epochs(epochs, g["long_epochs"]), batch_size=len(digits.X_train))
    return model, history


def sweep_grid(n_train: int) -> list[tuple[int, float]]:
    """The ``(batch size, lr)`` pairs of :data:`BATCH_SWEEP`, the full batch being
    ``n_train`` examples, then single examples at ``single_lr``."""
    g = BATCH_SWEEP
    grid = [(n_train, lr) for lr in g["full_batch_rates"]]
    grid += [(b, lr) for b in g["minibatch_sizes"] for lr in g["minibatch_rates"]]
    return grid + [(1, g["single_lr"])]


def train_warmup_run(lr: float, warmup: int, seed: int, digits: Split,
                     epochs: int | None = None) -> tuple[History, float]:
    """One run of :data:`WARMUP_GRID` (its first ``epochs`` epochs; the schedule always
    spans the whole run): ``(history, dead share of the first layer at the end)``."""
    g = WARMUP_GRID
    check_choice("lr", lr, g["peak_rates"])
    check_choice("warmup", warmup, g["warmups"])
    check_int("seed", seed, low=0)
    total = g["epochs"] * _steps_per_epoch(digits, g["batch_size"])
    device = digits.X_train.device
    torch.manual_seed(seed)
    model = deep_mlp(g["depth"], g["width"]).to(device)
    adam = optim.Adam(model.parameters(), lr=lr)
    history = train_classifier(
        model, adam, digits.X_train, digits.y_train,
        epochs=_epochs(epochs, g["epochs"]), batch_size=g["batch_size"],
        X_val=digits.X_test, y_val=digits.y_test,
        scheduler=optim.warmup_cosine_schedule(adam, warmup, total),
        generator=torch.Generator().manual_seed(seed))
    return history, dead_share(model, digits.X_train)


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    """The optimizer called ``name`` in :data:`OPTIMIZER_GRID`, on ``params``."""
    check_choice("name", name, OPTIMIZER_GRID["optimizers"])
    cls, hyper = OPTIMIZER_GRID["optimizers"][name]
    return getattr(optim, cls)(params, **hyper)


def train_optimizer_run(name: str, seed: int, digits: Split,
                        epochs: int | None = None) -> History:
    """One run of :data:`OPTIMIZER_GRID`, its first ``epochs`` epochs (a schedule always
    spans the whole run)."""
    g = OPTIMIZER_GRID
    check_int("seed", seed, low=0)
    torch.manual_seed(seed)
    model = small_mlp(g["width"]).to(digits.X_train.device)
    opt = make_optimizer(name, model.parameters())
    total = g["epochs"] * _steps_per_epoch(digits, g["batch_size"])
    schedule = (optim.warmup_cosine_schedule(opt, g["warmup_steps"], total)
                if name in g["scheduled"] else None)
    return train_classifier(
        model, opt, digits.X_train, digits.y_train,
        epochs=_epochs(epochs, g["epochs"]), batch_size=g["batch_size"],
        X_val=digits.X_test, y_val=digits.y_test, scheduler=schedule,
        generator=torch.Generator().manual_seed(seed))


def record_optimizer_runs(path: str | Path = OPTIMIZER_RECORD, log=print) -> dict:
    """Train both grids on the CPU and write their curves to ``path``; returns the record."""
    digits = load_digits_split()
    sweep_runs, warmup_runs, optimizer_runs = [], [], []
    for batch_size, lr in sweep_grid(len(digits.X_train)):
        history = train_sweep_run(batch_size, lr, digits)
        sweep_runs.append({"batch_size": batch_size, "lr": lr,
                           **asdict(RecordedRun.of(history))})
        log(f"batch sweep: B = {batch_size}, lr {lr:g}: loss "
            f"{history.epoch_train_loss[-1]:.4f}")
    long_runs = []
    for lr in BATCH_SWEEP["long_rates"]:
        _, history = train_full_batch(lr, digits)
        long_runs.append({"lr": lr, **asdict(RecordedRun.of(history))})
        log(f"full batch, {len(history.step_loss)} epochs, lr {lr:g}: loss "
            f"{history.epoch_train_loss[-1]:.4f}")
    for lr in WARMUP_GRID["peak_rates"]:
        for warmup in WARMUP_GRID["warmups"]:
            for seed in WARMUP_GRID["seeds"]:
                history, dead = train_warmup_run(lr, warmup, seed, digits)
                warmup_runs.append({"lr": lr, "warmup": warmup, "seed": seed,
                                    **asdict(RecordedRun.of(history, dead))})
                log(f"warm-up grid: lr {lr:g}, warm-up {warmup}, seed {seed}: loss "
                    f"{history.epoch_train_loss[-1]:.4f}, dead {dead:.3f}")
    for seed in OPTIMIZER_GRID["seeds"]:
        for name in OPTIMIZER_GRID["optimizers"]:
            history = train_optimizer_run(name, seed, digits)
            optimizer_runs.append({"name": name, "seed": seed,
                                   **asdict(RecordedRun.of(history))})
            log(f"optimizer grid: {name}, seed {seed}: loss "
                f"{history.epoch_train_loss[-1]:.4f}")
    return write_record(path, "chapter 3's batch-size sweep, warm-up grid and optimizer "
                        "grid on the digits (companion.optim_runs.record_optimizer_runs)",
                        SETTINGS, threads=torch.get_num_threads(),
                        n_train=len(digits.X_train), sweep_runs=sweep_runs,
                        long_runs=long_runs, warmup_runs=warmup_runs, optimizer_runs=optimizer_runs)


def _run(record: dict) -> RecordedRun:
    return RecordedRun(*(record[f] for f in ("epoch_train_loss", "epoch_val_accuracy",
                                             "steps", "dead")))


def load_optimizer_runs(path: str | Path = OPTIMIZER_RECORD) -> dict:
    """The recorded grids, each a dict of :class:`RecordedRun`: ``{"sweep": {(batch
    size, lr): run}, "long": {lr: full-batch run}, "warmup": {(peak lr, warm-up steps,
    seed): run}, "optimizers": {(name, seed): run}}``. ``ValueError`` if the record was
    made with other settings than :data:`BATCH_SWEEP`, :data:`WARMUP_GRID` and
    :data:`OPTIMIZER_GRID`."""
    record = load_record(path, SETTINGS, RECORD_COMMAND)
    return {
        "sweep": {(r["batch_size"], r["lr"]): _run(r) for r in record["sweep_runs"]},
        "long": {r["lr"]: _run(r) for r in record["long_runs"]},
        "warmup": {(r["lr"], r["warmup"], r["seed"]): _run(r)
                   for r in record["warmup_runs"]},
        "optimizers": {(r["name"], r["seed"]): _run(r) for r in record["optimizer_runs"]},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.optim_runs --record grids [--out PATH]``."""
    return record_main("python -m companion.optim_runs",
                       {"grids": record_optimizer_runs}, argv,
                       description="Record chapter 3's training grids.", threads=1)


__all__ = ["OPTIMIZER_RECORD", "BATCH_SWEEP", "WARMUP_GRID", "OPTIMIZER_GRID", "SETTINGS",
           "RecordedRun", "train_sweep_run", "train_full_batch", "sweep_grid", "deep_mlp",
           "small_mlp", "dead_share", "train_warmup_run", "make_optimizer",
           "train_optimizer_run", "record_optimizer_runs", "load_optimizer_runs"]

if __name__ == "__main__":
    raise SystemExit(main())
