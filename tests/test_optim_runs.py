"""Tests for companion.optim_runs: chapter 3's recorded grids -- the record refuses other
settings, its runs are what the code computes today (a prefix trained again matches it),
and the run functions check their arguments."""

from __future__ import annotations

import json

import pytest
import torch
from factories import digits_split

from companion import optim
from companion.optim_runs import (
    BATCH_SWEEP,
    OPTIMIZER_GRID,
    OPTIMIZER_RECORD,
    SETTINGS,
    WARMUP_GRID,
    RecordedRun,
    dead_share,
    deep_mlp,
    load_optimizer_runs,
    main,
    make_optimizer,
    record_optimizer_runs,
    small_mlp,
    sweep_grid,
    train_full_batch,
    train_optimizer_run,
    train_sweep_run,
    train_warmup_run,
)
from companion.records import write_record

#: A first epoch trained again under other CPU kernels than the recording's moves the
#: loss by up to 1e-6 (measured under the portability variants); bit for bit otherwise.
PREFIX_RTOL = 1e-5


@pytest.fixture(scope="module")
def record():
    return load_optimizer_runs()


@pytest.fixture(scope="module")
def digits():
    return digits_split()


def test_the_record_has_every_run_of_the_three_grids(record, digits):
    n = len(digits.X_train)
    assert set(record["sweep"]) == set(sweep_grid(n))
    assert list(record["long"]) == BATCH_SWEEP["long_rates"]
    assert all(run.steps == 300 for run in record["long"].values())
    assert set(record["warmup"]) == {(lr, w, s) for lr in WARMUP_GRID["peak_rates"]
                                     for w in WARMUP_GRID["warmups"]
                                     for s in WARMUP_GRID["seeds"]}
    assert set(record["optimizers"]) == {(name, s) for name in OPTIMIZER_GRID["optimizers"]
                                         for s in OPTIMIZER_GRID["seeds"]}
    for grid, epochs in (("sweep", 10), ("warmup", 10), ("optimizers", 20)):
        for run in record[grid].values():
            assert len(run.epoch_train_loss) == len(run.epoch_val_accuracy) == epochs
            assert all(0 < loss < 100 for loss in run.epoch_train_loss)  # finite, no NaN
    assert record["sweep"][1, BATCH_SWEEP["single_lr"]].steps == 10 * n
    assert all(0 <= run.dead <= 1 for run in record["warmup"].values())


def _close(fresh, recorded):
    torch.testing.assert_close(torch.tensor(fresh, dtype=torch.float64),
                               torch.tensor(recorded, dtype=torch.float64),
                               rtol=PREFIX_RTOL, atol=0)


def test_a_prefix_trained_again_matches_the_record(record, digits):
    n = len(digits.X_train)
    for b, lr in ((n, 4.0), (64, 0.5), (8, 1.0)):
        _close(train_sweep_run(b, lr, digits, epochs=1).epoch_train_loss,
               record["sweep"][b, lr].epoch_train_loss[:1])
    history, _ = train_warmup_run(3e-2, 50, 0, digits, epochs=1)
    _close(history.epoch_train_loss, record["warmup"][3e-2, 50, 0].epoch_train_loss[:1])
    for name in ("Nesterov", "AdamW + warm-up/cosine"):
        _close(train_optimizer_run(name, 0, digits, epochs=1).epoch_train_loss,
               record["optimizers"][name, 0].epoch_train_loss[:1])


def test_a_whole_full_batch_run_matches_the_record(record, digits):
    n = len(digits.X_train)
    history = train_sweep_run(n, 2.0, digits)
    _close(history.epoch_train_loss, record["sweep"][n, 2.0].epoch_train_loss)
    _close(history.epoch_val_accuracy, record["sweep"][n, 2.0].epoch_val_accuracy)
    model, history = train_full_batch(0.5, digits, epochs=30)
    _close(history.epoch_train_loss, record["long"][0.5].epoch_train_loss[:30])
    assert isinstance(model, torch.nn.Linear) and history.epoch_val_accuracy == []
    # at rate 4 the loss oscillates upwards, and other CPU kernels' rounding grows with
    # it (0.5 % by epoch 20 under AVX2+MKL): only its first epochs are compared
    _, history = train_full_batch(4.0, digits, epochs=3)
    _close(history.epoch_train_loss, record["long"][4.0].epoch_train_loss[:3])


def test_other_settings_are_refused(tmp_path):
    data = json.loads(OPTIMIZER_RECORD.read_text())
    for change in ({"epochs": 19}, {"seeds": [0, 1]}):
        settings = json.loads(json.dumps(SETTINGS))
        settings["optimizers"].update(change)
        path = tmp_path / "runs.json"
        runs = {k: data[k] for k in ("sweep_runs", "long_runs", "warmup_runs",
                                     "optimizer_runs")}
        write_record(path, data["what"], settings, **runs)
        with pytest.raises(ValueError, match="re-record it with python -m companion.optim_runs"):
            load_optimizer_runs(path)


@pytest.fixture()
def tiny_grids(monkeypatch):
    """One run per grid, one epoch each: the recorder end to end in a second."""
    monkeypatch.setitem(BATCH_SWEEP, "epochs", 1)
    monkeypatch.setitem(BATCH_SWEEP, "full_batch_rates", [1.0])
    monkeypatch.setitem(BATCH_SWEEP, "minibatch_sizes", [64])
    monkeypatch.setitem(BATCH_SWEEP, "minibatch_rates", [0.5])
    monkeypatch.setitem(BATCH_SWEEP, "single_lr", 0.25)
    monkeypatch.setitem(BATCH_SWEEP, "long_rates", [0.5])
    monkeypatch.setitem(BATCH_SWEEP, "long_epochs", 3)
    for grid, keys in ((WARMUP_GRID, {"peak_rates": [3e-2], "warmups": [10]}),
                       (OPTIMIZER_GRID, {})):
        monkeypatch.setitem(grid, "seeds", [1])
        monkeypatch.setitem(grid, "epochs", 1)
        for key, value in keys.items():
            monkeypatch.setitem(grid, key, value)
    monkeypatch.setitem(OPTIMIZER_GRID, "optimizers",
                        {"AdamW + warm-up/cosine": ["AdamW", {"lr": 3e-3,
                                                              "weight_decay": 1e-2}]})


@pytest.mark.usefixtures("tiny_grids")
def test_the_recorder_writes_what_the_run_functions_compute(tmp_path, digits):
    path = tmp_path / "runs.json"
    assert main(["--record", "grids", "--out", str(path)]) == 0
    loaded = load_optimizer_runs(path)
    n = len(digits.X_train)
    assert list(loaded["sweep"]) == [(n, 1.0), (64, 0.5), (1, 0.25)]
    assert loaded["sweep"][64, 0.5] == RecordedRun.of(train_sweep_run(64, 0.5, digits))
    assert loaded["long"][0.5] == RecordedRun.of(train_full_batch(0.5, digits)[1])
    history, dead = train_warmup_run(3e-2, 10, 1, digits)
    assert loaded["warmup"][3e-2, 10, 1] == RecordedRun.of(history, dead)
    fresh = train_optimizer_run("AdamW + warm-up/cosine", 1, digits)
    assert loaded["optimizers"]["AdamW + warm-up/cosine", 1] == RecordedRun.of(fresh)
    assert json.loads(path.read_text())["threads"] == torch.get_num_threads()
    other = tmp_path / "other.json"
    record_optimizer_runs(other, log=lambda line: None)
    assert json.loads(other.read_text())["sweep_runs"] == \
        json.loads(path.read_text())["sweep_runs"]


def test_a_short_run_is_the_start_of_the_whole_run(digits):
    """The schedule spans the whole run whatever ``epochs`` says: the first epoch of a
    one-epoch run is the first epoch of a two-epoch run, bit for bit."""
    short, _ = train_warmup_run(1e-2, 50, 2, digits, epochs=1)
    longer, _ = train_warmup_run(1e-2, 50, 2, digits, epochs=2)
    assert short.epoch_train_loss == longer.epoch_train_loss[:1]
    assert short.step_loss == longer.step_loss[:len(short.step_loss)]
    scheduled = train_optimizer_run("AdamW + warm-up/cosine", 0, digits, epochs=1)
    constant = train_optimizer_run("AdamW, constant 3e-3", 0, digits, epochs=1)
    assert scheduled.step_loss[0] == constant.step_loss[0]  # the same initial weights
    assert scheduled.step_loss[1:] != constant.step_loss[1:]  # warm-up: smaller steps


def test_models_and_optimizers():
    torch.manual_seed(0)
    model = deep_mlp(3, 16)
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert len([m for m in model if isinstance(m, torch.nn.Linear)]) == 4
    assert [tuple(p.shape) for p in small_mlp(8).parameters()] == [(8, 64), (8,), (10, 8),
                                                                   (10,)]
    opt = make_optimizer("Nesterov", small_mlp().parameters())
    assert isinstance(opt, optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_dead_share_counts_units_no_row_activates():
    model = deep_mlp(1, 4)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 1.0]))  # 0 is not active
    assert dead_share(model, torch.rand(7, 64)) == 0.75


@pytest.mark.parametrize("call, name", [
    (lambda d: train_warmup_run(0.5, 0, 0, d), "lr"),
    (lambda d: train_warmup_run(1e-2, 10, 0, d), "warmup"),
    (lambda d: train_warmup_run(1e-2, 0, -1, d), "seed"),
    (lambda d: train_warmup_run(1e-2, 0, 0, d, epochs=11), "epochs"),
    (lambda d: train_optimizer_run("Lion", 0, d), "name"),
    (lambda d: train_optimizer_run("Adam", 0, d, epochs=0), "epochs"),
    (lambda d: train_sweep_run(0, 0.1, d), "batch_size"),
    (lambda d: train_full_batch("fast", d), "lr"),
    (lambda d: train_full_batch(0.5, d, epochs=301), "epochs"),
    (lambda d: deep_mlp(0), "depth"),
])
def test_bad_arguments_are_named(call, name, digits):
    with pytest.raises((ValueError, TypeError), match=name):
        call(digits)
