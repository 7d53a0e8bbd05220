"""companion.train: the shared classifier loop, checked against a hand-written step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.train import History, accuracy, evaluate, train_classifier


def _blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y


def test_full_batch_epoch_equals_one_hand_written_sgd_step():
    X, y = _blobs()
    torch.manual_seed(0)
    model = nn.Linear(2, 3).double()
    reference = copy.deepcopy(model)
    train_classifier(model, torch.optim.SGD(model.parameters(), lr=0.5), X.double(), y,
                     epochs=1, batch_size=len(X))
    loss = F.cross_entropy(reference(X.double()), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, p0, g in zip(model.parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(p, p0 - 0.5 * g, rtol=0, atol=1e-14)


def test_learns_separable_blobs_and_records_history(device):
    X, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    hist = train_classifier(model, torch.optim.Adam(model.parameters(), lr=0.05), X, y,
                            epochs=5, batch_size=32, X_val=X[:50], y_val=y[:50],
                            generator=torch.Generator().manual_seed(0))
    assert isinstance(hist, History)
    assert len(hist.step_loss) == 5 * 7 and len(hist.epoch_val_accuracy) == 5
    assert hist.epoch_train_loss[-1] < hist.epoch_train_loss[0]
    assert accuracy(model, X, y) == 1.0


def test_same_generator_same_run():
    X, y = _blobs()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = nn.Linear(2, 3)
        runs.append(train_classifier(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y,
                                     epochs=2, batch_size=16,
                                     generator=torch.Generator().manual_seed(7)).step_loss)
    assert runs[0] == runs[1]


def test_scheduler_steps_once_per_batch():
    X, y = _blobs(64)
    model = nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    train_classifier(model, opt, X, y, epochs=2, batch_size=16, scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 9)


def test_evaluate_restores_training_mode_and_matches_direct_computation():
    X, y = _blobs(50)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    model.train()
    loss, acc = evaluate(model, X, y, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(X)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    # the count over the length, exactly (a float32 mean of 2/50 is not the double 0.04)
    assert acc == (logits.argmax(1) == y).sum().item() / len(y)


@pytest.mark.parametrize("kw, error, match", [
    (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "rows"),
    (dict(y=torch.zeros(10)), TypeError, "torch.long"),
    (dict(X=[[0.0, 0.0]]), TypeError, "tensors"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(X_val=torch.zeros(2, 2)), ValueError, "X_val and y_val"),
])
def test_bad_input(kw, error, match):
    model = nn.Linear(2, 3)
    args = dict(X=torch.zeros(10, 2), y=torch.zeros(10, dtype=torch.long), epochs=1,
                batch_size=4) | kw
    with pytest.raises(error, match=match):
        train_classifier(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)
