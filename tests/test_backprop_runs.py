"""Tests for companion.backprop_runs: chapter 2's recorded grids -- the records refuse
other settings, their runs are what the code computes today (runs and prefixes trained
again match them), and the run functions check their arguments."""

from __future__ import annotations

import json

import pytest
import torch
from factories import assert_refused, digits_split

from companion import backprop as bp
from companion.backprop_runs import (
    BN_GRID,
    BN_RECORD,
    SOFTMAX_GRID,
    SOFTMAX_RECORD,
    SoftmaxRun,
    bn_network,
    load_bn_grid,
    load_softmax_grid,
    main,
    record_bn_grid,
    softmax_network,
    train_bn_run,
    train_softmax_run,
)
from companion.optim_runs import RecordedRun

#: float64 runs trained again on the recording's CPU kernels repeat it bit for bit. Under
#: other kernels BatchNorm amplifies rounding, by up to 1.5e-5 in 5 epochs (lr 0.1, seed 2,
#: SSE4.1 only); the runs compared here stay within 2e-13 (measured under the portability
#: variants), and the bound leaves room for other machines.
ATOL = 1e-9


@pytest.fixture(scope="module")
def digits():
    return digits_split(torch.float64)


def _close(fresh, recorded):
    torch.testing.assert_close(torch.tensor(fresh, dtype=torch.float64),
                               torch.tensor(recorded, dtype=torch.float64),
                               rtol=0, atol=ATOL)


def test_the_records_have_every_run_of_both_grids():
    softmax, bn = load_softmax_grid(), load_bn_grid()
    assert set(softmax) == {(d, lr) for d in (False, True) for lr in SOFTMAX_GRID["rates"]}
    assert set(bn) == {(b, lr, s) for b in (False, True) for lr in BN_GRID["rates"]
                       for s in BN_GRID["seeds"]}
    for runs, epochs in ((softmax, SOFTMAX_GRID["epochs"]), (bn, BN_GRID["epochs"])):
        for run in runs.values():
            assert len(run.epoch_train_loss) == len(run.epoch_val_accuracy) == epochs
            assert run.steps == epochs * 43  # 1,347 training images in batches of 32
    for run in softmax.values():  # the lowest batch loss lies below every epoch's mean
        assert 0 < run.lowest_step_loss <= min(run.epoch_train_loss)


def test_runs_and_prefixes_trained_again_match_the_records(digits):
    softmax, bn = load_softmax_grid(), load_bn_grid()
    for double_softmax, lr in ((True, 0.05), (False, 1.0)):  # lr 1 diverges: 1 epoch
        fresh = train_softmax_run(double_softmax, lr, digits, epochs=1)
        recorded = softmax[double_softmax, lr]
        _close(fresh.epoch_train_loss, recorded.epoch_train_loss[:1])
        assert fresh.epoch_val_accuracy == recorded.epoch_val_accuracy[:1]
    for key in ((False, 0.1, 1), (True, 0.01, 0)):
        net, fresh = train_bn_run(*key, digits)
        _close(fresh.epoch_train_loss, bn[key].epoch_train_loss)
        assert fresh.epoch_val_accuracy == bn[key].epoch_val_accuracy
        assert isinstance(net, bp.MLP) and len(net.linear_layers) == 7


def test_other_settings_are_refused(tmp_path):
    for load, path in ((load_softmax_grid, SOFTMAX_RECORD), (load_bn_grid, BN_RECORD)):
        record = json.loads(path.read_text())
        assert_refused(load, record,
                       lambda r: r["settings"]["grid"].update(epochs=0),
                       lambda r: r["settings"].update(data="load_digits_split()"),
                       tmp_path=tmp_path, match="re-record it with python -m "
                       "companion.backprop_runs --record")


def test_the_softmax_networks_start_from_the_chapters_weights():
    torch.manual_seed(0)
    chapters = bp.MLP([64, 128, 64, 10], "relu", dtype=torch.float64)
    right, double = softmax_network(False), softmax_network(True)
    for net in (right, double):
        for ours, theirs in zip(net.parameters(), chapters.parameters(), strict=True):
            assert torch.equal(ours, theirs)
    assert isinstance(double[-1], torch.nn.Softmax) and len(double) == len(right) + 1
    x = torch.rand(5, 64, dtype=torch.float64)
    torch.testing.assert_close(double(x), torch.softmax(right(x), dim=1), rtol=0,
                               atol=1e-15)


def test_a_softmax_run_keeps_its_lowest_batch_loss(digits):
    history = train_softmax_run(False, 0.1, digits, epochs=1)
    run = SoftmaxRun.of(history)
    assert run.lowest_step_loss == min(history.step_loss)
    assert RecordedRun.of(history) == RecordedRun(run.epoch_train_loss,
                                                  run.epoch_val_accuracy, run.steps)


def test_the_bn_network_is_the_grids(digits):
    with_bn, without = bn_network(True, 1), bn_network(False, 1)
    assert sum(isinstance(layer, bp.BatchNorm1d) for layer in with_bn.layers) == 6
    assert not any(isinstance(layer, bp.BatchNorm1d) for layer in without.layers)
    assert all(torch.equal(a.weight, b.weight)  # the same seed draws the same weights
               for a, b in zip(with_bn.linear_layers, without.linear_layers, strict=True))
    assert all(not layer.bias.any() for layer in with_bn.linear_layers)  # Xavier, bias 0


def test_the_recorder_writes_what_the_run_functions_compute(tmp_path, monkeypatch, digits):
    monkeypatch.setitem(BN_GRID, "epochs", 1)
    monkeypatch.setitem(BN_GRID, "rates", [0.1])
    monkeypatch.setitem(BN_GRID, "seeds", [1])
    path = tmp_path / "bn.json"
    assert main(["--record", "bn-grid", "--out", str(path)]) == 0
    loaded = load_bn_grid(path)
    assert list(loaded) == [(False, 0.1, 1), (True, 0.1, 1)]
    assert loaded[True, 0.1, 1] == RecordedRun.of(train_bn_run(True, 0.1, 1, digits)[1])
    other = tmp_path / "other.json"
    record_bn_grid(other, log=lambda line: None)
    assert json.loads(other.read_text())["runs"] == json.loads(path.read_text())["runs"]


@pytest.mark.parametrize("call, name, error", [
    (lambda d: softmax_network(1), "double_softmax", TypeError),
    (lambda d: train_softmax_run(False, "fast", d), "lr", TypeError),
    (lambda d: train_softmax_run(False, 0.1, d, epochs=0), "epochs", ValueError),
    (lambda d: bn_network("yes", 0), "batchnorm", TypeError),
    (lambda d: bn_network(True, -1), "seed", ValueError),
    (lambda d: train_bn_run(True, None, 0, d), "lr", TypeError),
])
def test_bad_arguments_are_named(call, name, error, digits):
    with pytest.raises(error, match=name):
        call(digits)
