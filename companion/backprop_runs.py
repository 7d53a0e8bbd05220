r"""Chapter 2's two training grids, recorded once (book: chapter 2, "Softmax applied
twice" and "Batch normalisation").

:data:`SOFTMAX_GRID`: the MLP :math:`64 \to 128 \to 64 \to 10` with ReLUs, as
``torch.nn`` modules (:func:`softmax_network`), with or without a final ``nn.Softmax``
before the cross-entropy, trained on the digits by
:func:`companion.train.train_classifier` with ``torch.optim.SGD`` for 20 epochs with
batches of 32, at five learning rates (10 runs, seed 0 for the weights and the order of
the batches). Each run keeps, besides its curves, its lowest mini-batch loss.

:data:`BN_GRID`: a sigmoid MLP :math:`64 \to 64^{\times 6} \to 10` with Xavier initial weights
(:func:`bn_network`), with or without :class:`~companion.backprop.BatchNorm1d` after
each hidden ``Linear``, trained on the digits (:func:`companion.data.load_digits_split`
in float64) by :func:`companion.backprop.train_sgd` -- the hand-written backward pass
and plain SGD, :math:`\theta \leftarrow \theta - \eta\,\nabla_\theta L` -- for 5 epochs
with batches of 32, at every learning rate and seed of :data:`BN_GRID` (18 runs). A seed
draws the initial weights (``torch.manual_seed``) and the order of the batches.

Each grid takes several seconds of CPU, more than the chapter's page may spend on one
cell, so ``python -m companion.backprop_runs --record softmax-grid`` and ``--record
bn-grid`` write them once to :data:`SOFTMAX_RECORD` and :data:`BN_RECORD`. The notebook
reads them with :func:`load_softmax_grid` and :func:`load_bn_grid`, which refuse a record
made with other settings, and trains some runs again (or their first epochs) to check
them against the record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from companion import backprop as bp
from companion._validate import check_int, check_number, check_type
from companion.data import Split, load_digits_split
from companion.optim_runs import RecordedRun
from companion.records import load_record, record_main, write_record
from companion.train import History, train_classifier

#: Where ``python -m companion.backprop_runs --record softmax-grid`` writes its grid.
SOFTMAX_RECORD = Path(__file__).parent / "assets" / "softmax_twice_grid.json"
#: Where ``python -m companion.backprop_runs --record bn-grid`` writes its grid.
BN_RECORD = Path(__file__).parent / "assets" / "batchnorm_grid.json"
COMMAND = "python -m companion.backprop_runs --record"

#: The network, the training and the rates, with and without the extra softmax.
SOFTMAX_GRID = {"sizes": [64, 128, 64, 10], "activation": "relu", "seed": 0, "epochs": 20,
                "batch_size": 32, "rates": [0.05, 0.1, 0.2, 0.5, 1.0]}

#: The network, the training and the grid (every rate x seed, with and without BatchNorm).
BN_GRID = {"sizes": [64] + [64] * 6 + [10], "activation": "sigmoid", "init": "xavier",
           "epochs": 5, "batch_size": 32, "rates": [0.01, 0.03, 0.1], "seeds": [0, 1, 2]}

#: Everything each record depends on; :func:`load_softmax_grid` and :func:`load_bn_grid`
#: check it.
DATA = "load_digits_split(dtype=torch.float64)"
SOFTMAX_SETTINGS = {"data": DATA, "grid": SOFTMAX_GRID, "optimizer": "torch.optim.SGD"}
BN_SETTINGS = {"data": DATA, "grid": BN_GRID}


@dataclass(frozen=True)
class SoftmaxRun(RecordedRun):
    """A :class:`~companion.optim_runs.RecordedRun` with its lowest mini-batch loss."""

    lowest_step_loss: float = float("nan")

    @classmethod
    def of(cls, history: History) -> SoftmaxRun:
        return cls(history.epoch_train_loss, history.epoch_val_accuracy,
                   len(history.step_loss), None, min(history.step_loss))


def softmax_network(double_softmax: bool) -> nn.Sequential:
    """The grid's float64 MLP as ``torch.nn`` modules, weights drawn after
    ``torch.manual_seed(0)`` by :class:`companion.backprop.MLP`; with ``double_softmax`` an
    ``nn.Softmax`` at the end, so that the cross-entropy receives probabilities."""
    check_type("double_softmax", double_softmax, bool)
    torch.manual_seed(SOFTMAX_GRID["seed"])
    start = bp.MLP(SOFTMAX_GRID["sizes"], SOFTMAX_GRID["activation"],
                   dtype=torch.float64).to_torch()
    return nn.Sequential(*start, nn.Softmax(dim=1)) if double_softmax else start


def train_softmax_run(double_softmax: bool, lr: float, digits: Split,
                      epochs: int | None = None) -> History:
    """One run of the softmax grid on ``digits`` (float64), or its first ``epochs``."""
    check_number("lr", lr)
    epochs = SOFTMAX_GRID["epochs"] if epochs is None else check_int("epochs", epochs,
                                                                     low=1)
    model = softmax_network(double_softmax)
    return train_classifier(model, torch.optim.SGD(model.parameters(), lr=lr),
                            digits.X_train, digits.y_train, epochs=epochs,
                            batch_size=SOFTMAX_GRID["batch_size"], X_val=digits.X_test,
                            y_val=digits.y_test,
                            generator=torch.Generator().manual_seed(SOFTMAX_GRID["seed"]))


def record_softmax_grid(path: str | Path = SOFTMAX_RECORD, log=print) -> dict:
    """Train the 10 runs on the CPU and write their curves to ``path``; returns the record."""
    digits = load_digits_split(dtype=torch.float64)
    runs = []
    for double_softmax in (False, True):
        for lr in SOFTMAX_GRID["rates"]:
            history = train_softmax_run(double_softmax, lr, digits)
            runs.append({"double_softmax": double_softmax, "lr": lr,
                         **asdict(SoftmaxRun.of(history))})
            log(f"double softmax {double_softmax}, lr {lr:g}: test accuracy "
                f"{history.epoch_val_accuracy[-1]:.3f}")
    return write_record(path, "chapter 2's softmax-applied-twice grid on the digits "
                        "(companion.backprop_runs.record_softmax_grid)", SOFTMAX_SETTINGS,
                        threads=torch.get_num_threads(), runs=runs)


def load_softmax_grid(path: str | Path = SOFTMAX_RECORD) -> dict[tuple[bool, float],
                                                                 SoftmaxRun]:
    """The recorded runs, ``{(double_softmax, lr): SoftmaxRun}``; ``ValueError`` if the
    record was made with other settings than :data:`SOFTMAX_GRID`."""
    record = load_record(path, SOFTMAX_SETTINGS, f"{COMMAND} softmax-grid")
    return {(r["double_softmax"], r["lr"]):
            SoftmaxRun(r["epoch_train_loss"], r["epoch_val_accuracy"], r["steps"], None,
                       r["lowest_step_loss"])
            for r in record["runs"]}


def bn_network(batchnorm: bool, seed: int) -> bp.MLP:
    """The grid's float64 sigmoid MLP, Xavier weights drawn after ``torch.manual_seed(seed)``."""
    check_type("batchnorm", batchnorm, bool)
    torch.manual_seed(check_int("seed", seed, low=0))
    net = bp.MLP(BN_GRID["sizes"], BN_GRID["activation"], batchnorm=batchnorm,
                 dtype=torch.float64)
    return bp.init_weights_(net, BN_GRID["init"])


def train_bn_run(batchnorm: bool, lr: float, seed: int, digits: Split):
    """One run of the grid on ``digits`` (float64): returns ``(network, history)``."""
    check_number("lr", lr)
    net = bn_network(batchnorm, seed)
    history = bp.train_sgd(net, digits.X_train, digits.y_train, epochs=BN_GRID["epochs"],
                           batch_size=BN_GRID["batch_size"], lr=lr, X_val=digits.X_test,
                           y_val=digits.y_test,
                           generator=torch.Generator().manual_seed(seed))
    return net, history


def record_bn_grid(path: str | Path = BN_RECORD, log=print) -> dict:
    """Train the 18 runs on the CPU and write their curves to ``path``; returns the record."""
    digits = load_digits_split(dtype=torch.float64)
    runs = []
    for batchnorm in (False, True):
        for lr in BN_GRID["rates"]:
            for seed in BN_GRID["seeds"]:
                _, history = train_bn_run(batchnorm, lr, seed, digits)
                runs.append({"batchnorm": batchnorm, "lr": lr, "seed": seed,
                             **asdict(RecordedRun.of(history))})
                log(f"batchnorm {batchnorm}, lr {lr:g}, seed {seed}: test accuracy "
                    f"{history.epoch_val_accuracy[-1]:.3f}")
    return write_record(path, "chapter 2's batch-normalisation grid on the digits "
                        "(companion.backprop_runs.record_bn_grid)", BN_SETTINGS,
                        threads=torch.get_num_threads(), runs=runs)


def load_bn_grid(path: str | Path = BN_RECORD) -> dict[tuple[bool, float, int], RecordedRun]:
    """The recorded runs, ``{(batchnorm, lr, seed): RecordedRun}``; ``ValueError`` if the
    record was made with other settings than :data:`BN_GRID`."""
    record = load_record(path, BN_SETTINGS, f"{COMMAND} bn-grid")
    return {(r["batchnorm"], r["lr"], r["seed"]):
            RecordedRun(r["epoch_train_loss"], r["epoch_val_accuracy"], r["steps"])
            for r in record["runs"]}


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.backprop_runs --record softmax-grid|bn-grid [--out PATH]``."""
    return record_main("python -m companion.backprop_runs",
                       {"softmax-grid": record_softmax_grid, "bn-grid": record_bn_grid},
                       argv, description="Record chapter 2's training grids.", threads=1)


__all__ = ["SOFTMAX_RECORD", "BN_RECORD", "SOFTMAX_GRID", "BN_GRID", "SOFTMAX_SETTINGS",
           "BN_SETTINGS", "SoftmaxRun", "softmax_network", "train_softmax_run",
           "record_softmax_grid", "load_softmax_grid", "bn_network", "train_bn_run",
           "record_bn_grid", "load_bn_grid"]

if __name__ == "__main__":
    raise SystemExit(main())
