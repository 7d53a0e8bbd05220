"""companion.backprop against its oracles: torch.nn modules, torch.autograd, gradcheck.

Every hand-written forward is compared with the ``torch.nn`` module it mirrors, and every
hand-written backward with autograd through that module (float64, tight tolerances), on
the CPU and, when present, on CUDA.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion import backprop as bp
from companion import gradcheck
from companion.train import train_classifier

DTYPE = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)


def _random_shape(seed):
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(2, 17, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))


def _layers(features, device):
    """Each hand-written layer, fresh, in float64 on ``device``."""
    kw = dict(device=device, dtype=DTYPE)
    bn_eval = bp.BatchNorm1d(features, **kw)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn_eval.running_mean.uniform_(-1, 1)
        bn_eval.running_var.uniform_(0.5, 2)
        bn_eval.weight.uniform_(0.5, 1.5)
        bn_eval.bias.uniform_(-1, 1)
    return {
        "Linear": bp.Linear(features, 5, **kw),
        "Linear without bias": bp.Linear(features, 3, bias=False, **kw),
        "ReLU": bp.ReLU(),
        "Tanh": bp.Tanh(),
        "Sigmoid": bp.Sigmoid(),
        "BatchNorm1d train": bp.BatchNorm1d(features, **kw),
        "BatchNorm1d eval": bn_eval.eval(),
    }


LAYER_NAMES = list(_layers(3, "cpu"))


def _backward_through(module, x, upstream):
    """Gradients of sum(module(x) * upstream) w.r.t. x and module's parameters, by autograd."""
    x = x.clone().requires_grad_(True)
    params = list(module.parameters())
    grads = torch.autograd.grad((module(x) * upstream).sum(), [x, *params])
    return module(x.detach()), grads


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_forward_and_backward_match_torch_nn_and_autograd(name, seed, device):
    batch, features = _random_shape(seed)
    torch.manual_seed(seed)
    layer = _layers(features, device)[name]
    reference = layer.to_torch()
    x = torch.randn(batch, features, dtype=DTYPE, device=device)
    out = layer(x)
    upstream = torch.randn_like(out)
    layer.zero_grad(set_to_none=True)
    grad_x = layer.backward(upstream)
    ref_out, ref_grads = _backward_through(reference, x, upstream)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    ours = [grad_x] + [p.grad for p in layer.parameters()]
    assert len(ours) == len(ref_grads)
    for a, b in zip(ours, ref_grads, strict=True):
        assert a.device == x.device and a.dtype == DTYPE
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("name", LAYER_NAMES + ["Dropout", "MLP"])
def test_gradcheck_of_the_hand_written_backward(name, device):
    torch.manual_seed(0)
    layers = _layers(4, device) | {
        "Dropout": bp.Dropout(0.4),
        "MLP": bp.MLP([4, 6, 5, 3], "tanh", batchnorm=True, dropout=0.2, device=device,
                      dtype=DTYPE)}
    layer = layers[name]
    x = torch.randn(6, 4, dtype=DTYPE, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    f = gradcheck.as_autograd_function(layer, seed=3)
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("name", LAYER_NAMES + ["Dropout"])
def test_check_gradients_reports_tiny_errors(name, device):
    torch.manual_seed(1)
    layer = (_layers(4, device) | {"Dropout": bp.Dropout(0.5)})[name]
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(5, 4, dtype=DTYPE, device=device)
    rng = torch.get_rng_state()
    result = gradcheck.check_gradients(layer, x)
    assert result.autograd < 1e-13 and result.finite_differences < 5e-8
    assert torch.equal(torch.get_rng_state(), rng)  # the check leaves the RNG alone
    for key, value in layer.state_dict().items():   # ... and the running statistics
        assert torch.equal(value, state[key])


class _WrongTanh(bp.Tanh):
    """A plausible bug: the derivative of tanh written as 1 - y instead of 1 - y^2."""

    def backward(self, grad_output):
        return grad_output * (1 - self.output)


def test_check_gradients_catches_a_wrong_backward():
    x = torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    result = gradcheck.check_gradients(_WrongTanh(), x)
    assert result.autograd > 1e-2 and result.finite_differences > 1e-2
    params = (x.clone().requires_grad_(True),)
    assert not torch.autograd.gradcheck(gradcheck.as_autograd_function(_WrongTanh()), params,
                                        raise_exception=False)


def test_dropout_training_and_eval(device):
    torch.manual_seed(0)
    layer = bp.Dropout(0.25)
    x = torch.ones(400, 500, dtype=DTYPE, device=device)
    y = layer(x)
    zeros = (y == 0).double().mean().item()
    assert abs(zeros - 0.25) < 0.005                  # 200,000 draws: 4.5 sigma is 0.0044
    assert set(torch.unique(y).tolist()) == {0.0, 1 / 0.75}
    assert abs(y.mean().item() - 1.0) < 0.01          # inverted dropout keeps the mean
    upstream = torch.randn_like(x)
    torch.testing.assert_close(layer.backward(upstream), upstream * y, **TIGHT)
    layer.eval()
    assert torch.equal(layer(x), x) and torch.equal(layer.backward(upstream), upstream)
    assert torch.equal(bp.Dropout(0.0)(x), x)


def test_dropout_draws_the_same_mask_as_torch_on_the_cpu():
    x = torch.randn(64, 32, dtype=DTYPE)
    torch.manual_seed(5)
    ours = bp.Dropout(0.3)(x)
    torch.manual_seed(5)
    assert torch.equal(ours, F.dropout(x, 0.3, training=True))


def test_batchnorm_running_statistics_and_eval_after_training(device):
    torch.manual_seed(0)
    ours = bp.BatchNorm1d(6, momentum=0.2, device=device, dtype=DTYPE)
    theirs = ours.to_torch()
    for _ in range(5):
        x = 3 * torch.randn(8, 6, dtype=DTYPE, device=device) + 1
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TIGHT)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TIGHT)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 6, dtype=DTYPE, device=device)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
    # in eval mode a row's output does not depend on the rest of its batch
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1], **TIGHT)


def _assert_loss_matches(ours, reference, prediction, target):
    """Value and gradient of our loss module equal those of a torch function + autograd."""
    for reduction in ("mean", "sum"):
        loss_fn = ours(reduction)
        p = prediction.clone().requires_grad_(True)
        ref = reference(p, target, reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref, p)
        torch.testing.assert_close(loss_fn(prediction, target), ref.detach(), **TIGHT)
        torch.testing.assert_close(loss_fn.backward(), ref_grad, **TIGHT)


def test_softmax_cross_entropy_matches_torch(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, dtype=DTYPE, generator=g).to(device)
    labels = torch.randint(0, 5, (7,), generator=g).to(device)
    soft = torch.softmax(torch.randn(7, 5, dtype=DTYPE, generator=g), 1).to(device)
    for target in (labels, soft):
        _assert_loss_matches(bp.SoftmaxCrossEntropy, F.cross_entropy, logits, target)
    # the gradient is p - y, divided by the batch size
    loss_fn = bp.SoftmaxCrossEntropy()
    loss_fn(logits, labels)
    expected = (torch.softmax(logits, 1) - F.one_hot(labels, 5)) / 7
    torch.testing.assert_close(loss_fn.backward(), expected, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_cross_entropy_is_stable_at_huge_logits(dtype, device):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [1e4, 1e4, -1e4]],
                          dtype=dtype, device=device)
    labels = torch.tensor([0, 0, 1], device=device)
    loss_fn = bp.SoftmaxCrossEntropy("sum")
    loss = loss_fn(logits, labels)
    grad = loss_fn.backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # row 0 is right with certainty (0), row 1 wrong by 2e4 nats, row 2 a tie: log 2
    assert loss.item() == pytest.approx(2e4 + torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="sum"))
    expected = torch.tensor([[0, 0, 0], [-1, 1, 0], [0.5, -0.5, 0]], dtype=dtype, device=device)
    # float32 spaces numbers near 1e4 by 1e-3, so log p of the tie is only that exact
    atol = 1e-3 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grad, expected, rtol=0, atol=atol)
    z = logits.clone().requires_grad_(True)
    F.cross_entropy(z, labels, reduction="sum").backward()
    torch.testing.assert_close(grad, z.grad, rtol=0, atol=atol)


def test_mse_matches_torch(device):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 3, dtype=DTYPE, generator=g).to(device)
    _assert_loss_matches(bp.MSELoss, F.mse_loss, pred, target)


# --------------------------------------------------------------------------- loss gradients
# Central differences need nothing but the forward pass, so they referee the losses'
# hand-written backward independently of autograd. Their error is O(eps^2) from truncation
# plus the rounding of L and of x + eps, about u (|L| + |x|) / eps with u the unit roundoff
# of float64. Each case's eps keeps the truncation below that, and the tolerance is ten
# times it: 1e-9 to 2e-7 for the cases below (the largest where L is about 100).

U64 = torch.finfo(DTYPE).eps / 2


def _backward_and_finite_differences(loss_fn, prediction, target, eps=1e-6, scale=1.0):
    """``loss_fn.backward(scale)``, central differences of ``scale * L``, and the tolerance."""
    loss = loss_fn(prediction, target).item()
    analytic = loss_fn.backward(scale)  # before the evaluations below overwrite its state
    numeric = gradcheck.numerical_gradient(lambda v: scale * loss_fn(v, target), prediction,
                                           eps)
    rounding = U64 * abs(scale) * (abs(loss) + prediction.abs().max().item()) / eps
    return analytic, numeric, 10 * rounding


def _on(device, case):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in case)


def _softmax_cross_entropy_cases():
    """(logits, target, eps): random, a batch of 1, one-hot extremes, huge logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, dtype=DTYPE, generator=g)
    labels = torch.randint(0, 5, (7,), generator=g)
    soft = torch.softmax(torch.randn(7, 5, dtype=DTYPE, generator=g), 1)
    # right with certainty, wrong with certainty (twice), undecided: p rounds to 0 or 1
    extreme = torch.tensor([[40.0, 0, 0], [0, 40.0, 0], [0, 0, -40.0], [0, 0, 0]], dtype=DTYPE)
    extreme_labels = torch.tensor([0, 2, 2, 1])
    huge = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [1e4, 1e4, -1e4]], dtype=DTYPE)
    return {
        "random, labels": (logits, labels, 1e-6),
        "random, probabilities": (logits, soft, 1e-6),
        "batch of 1": (logits[:1], labels[:1], 1e-6),
        "batch of 1, one class": (logits[:1, :1], torch.tensor([0]), 1e-6),
        "one-hot extremes, labels": (extreme, extreme_labels, 1e-6),
        "one-hot extremes, one-hot rows": (
            extreme, F.one_hot(extreme_labels, 3).to(DTYPE), 1e-6),
        "one-hot extremes, zero target entries": (  # none on the most likely class
            extreme, torch.tensor([[0, 0.5, 0.5], [1, 0, 0], [0.25, 0, 0.75], [0, 0, 1]],
                                  dtype=DTYPE), 1e-6),
        # logits near 1e3, where float64 numbers lie 1.1e-13 apart: a larger step
        "logits shifted by 1e3": (logits + 1e3, labels, 1e-4),
        # logits of 1e4: each row is saturated (L linear in the logits there) or a tie,
        # L = softplus(z0 - z1) at 0, whose odd derivatives above the first vanish: a
        # large step adds no truncation error
        "huge logits": (huge, torch.tensor([0, 0, 1]), 1e-2),
    }


SOFTMAX_CASES = _softmax_cross_entropy_cases()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_cross_entropy_backward_matches_finite_differences(case, reduction, device):
    logits, target, eps = _on(device, SOFTMAX_CASES[case])
    analytic, numeric, tolerance = _backward_and_finite_differences(
        bp.SoftmaxCrossEntropy(reduction), logits, target, eps)
    assert torch.isfinite(analytic).all() and tolerance < 2e-7
    torch.testing.assert_close(analytic, numeric, rtol=0, atol=tolerance)
    # each row's gradient sums to zero: the loss does not change when a row's logits shift
    torch.testing.assert_close(analytic.sum(dim=1), torch.zeros_like(analytic[:, 0]),
                               rtol=0, atol=1e-12)


def _mse_cases():
    """(prediction, target, eps): random, a batch of 1, a perfect fit, large errors."""
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 6, 3, dtype=DTYPE, generator=g)
    return {
        "random": (prediction, target, 1e-6),
        "batch of 1": (prediction[:1], target[:1], 1e-6),
        "one element": (prediction[0, :1], target[0, :1], 1e-6),
        "perfect fit": (target, target.clone(), 1e-6),  # the gradient is exactly zero
        # errors of 1e3 and L of 1e6: a quadratic's central difference is exact at any
        # step, so eps = 1 leaves only the rounding
        "large errors": (1e3 * prediction, target, 1.0),
    }


MSE_CASES = _mse_cases()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(MSE_CASES))
def test_mse_backward_matches_finite_differences(case, reduction, device):
    prediction, target, eps = _on(device, MSE_CASES[case])
    analytic, numeric, tolerance = _backward_and_finite_differences(
        bp.MSELoss(reduction), prediction, target, eps)
    assert analytic.shape == prediction.shape and tolerance < 1e-7
    torch.testing.assert_close(analytic, numeric, rtol=0, atol=tolerance)
    if case == "perfect fit":
        assert torch.equal(analytic, torch.zeros_like(analytic))


@pytest.mark.parametrize("loss_fn, cases", [(bp.SoftmaxCrossEntropy, SOFTMAX_CASES),
                                            (bp.MSELoss, MSE_CASES)])
def test_loss_backward_scales_with_grad_output(loss_fn, cases, device):
    prediction, target, _ = _on(device, cases["batch of 1"])
    analytic, numeric, tolerance = _backward_and_finite_differences(
        loss_fn(), prediction, target, scale=-2.5)
    torch.testing.assert_close(analytic, numeric, rtol=0, atol=tolerance)


def test_mlp_gradients_match_torch_nn_and_autograd(device):
    torch.manual_seed(0)
    mlp = bp.MLP([10, 16, 12, 4], "tanh", batchnorm=True, device=device, dtype=DTYPE)
    assert [type(layer).__name__ for layer in mlp.layers] == [
        "Linear", "BatchNorm1d", "Tanh", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    reference = mlp.to_torch()
    x = torch.randn(9, 10, dtype=DTYPE, device=device)
    y = torch.randint(0, 4, (9,), device=device)
    loss_fn = bp.SoftmaxCrossEntropy()
    loss = loss_fn(mlp(x), y)
    mlp.backward(loss_fn.backward())
    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **TIGHT)
    for (name, ours), theirs in zip(mlp.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **TIGHT, msg=name)


def test_to_torch_copies_state_and_draws_no_random_numbers():
    torch.manual_seed(0)
    mlp = bp.MLP([5, 4, 3], batchnorm=True, dropout=0.2, dtype=DTYPE)
    mlp(torch.randn(6, 5, dtype=DTYPE))  # move the running statistics
    state = torch.get_rng_state()
    reference = mlp.to_torch()
    assert torch.equal(torch.get_rng_state(), state)
    theirs = reference.state_dict()
    assert theirs.pop("1.num_batches_tracked") == 0
    assert theirs.keys() == {k.removeprefix("layers.") for k in mlp.state_dict()}
    for key, value in mlp.state_dict().items():
        assert torch.equal(theirs[key.removeprefix("layers.")], value)


def test_gradients_accumulate_until_zero_grad():
    torch.manual_seed(0)
    layer = bp.Linear(3, 2, dtype=DTYPE)
    x, g = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    layer(x)
    layer.backward(g)
    once = layer.weight.grad.clone()
    layer.backward(g)
    torch.testing.assert_close(layer.weight.grad, 2 * once, **TIGHT)
    layer.zero_grad()
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_sgd_step_equals_torch_optim_sgd():
    torch.manual_seed(0)
    mlp = bp.MLP([5, 4, 3], dtype=DTYPE)
    reference = mlp.to_torch()
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = bp.SoftmaxCrossEntropy()
    loss_fn(mlp(x), y)
    mlp.backward(loss_fn.backward())
    mlp.sgd_step(0.3)
    F.cross_entropy(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.3).step()
    for ours, theirs in zip(mlp.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.detach(), **TIGHT)


def test_train_sgd_follows_train_classifier_with_torch_optim(device):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    X = (torch.eye(3, 4, dtype=DTYPE)[y] * 2 + torch.randn(90, 4, dtype=DTYPE, generator=g))
    X, y = X.to(device), y.to(device)
    torch.manual_seed(0)
    ours = bp.MLP([4, 8, 3], device=device, dtype=DTYPE)
    theirs = ours.to_torch()
    kw = dict(epochs=3, batch_size=16, X_val=X[:30], y_val=y[:30])
    hist = bp.train_sgd(ours, X, y, lr=0.2, generator=torch.Generator().manual_seed(1), **kw)
    ref = train_classifier(theirs, torch.optim.SGD(theirs.parameters(), lr=0.2), X, y,
                           generator=torch.Generator().manual_seed(1), **kw)
    assert len(hist.step_loss) == 3 * 6 and len(hist.epoch_val_accuracy) == 3
    torch.testing.assert_close(torch.tensor(hist.step_loss), torch.tensor(ref.step_loss),
                               rtol=0, atol=1e-12)
    assert hist.epoch_val_accuracy == ref.epoch_val_accuracy
    assert hist.step_loss[-1] < hist.step_loss[0]


def test_initialisers_draw_like_torch_nn_init():
    for ours, theirs in [
        (bp.xavier_uniform_, lambda w, generator: nn.init.xavier_uniform_(w, generator=generator)),
        (bp.xavier_normal_, lambda w, generator: nn.init.xavier_normal_(w, generator=generator)),
        (bp.he_uniform_, lambda w, generator: nn.init.kaiming_uniform_(
            w, nonlinearity="relu", generator=generator)),
        (bp.he_normal_, lambda w, generator: nn.init.kaiming_normal_(
            w, nonlinearity="relu", generator=generator)),
    ]:
        a = ours(torch.empty(300, 200, dtype=DTYPE), generator=torch.Generator().manual_seed(0))
        b = theirs(torch.empty(300, 200, dtype=DTYPE), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    # the variances the docstrings promise, on 60,000 draws
    w = torch.empty(300, 200, dtype=DTYPE)
    assert bp.xavier_normal_(w).var().item() == pytest.approx(2 / 500, rel=0.02)
    assert bp.he_uniform_(w).var().item() == pytest.approx(2 / 200, rel=0.02)


def test_linear_initialises_like_torch_nn_linear():
    torch.manual_seed(3)
    ours = bp.Linear(20, 7, dtype=DTYPE)
    torch.manual_seed(3)
    theirs = nn.Linear(20, 7, dtype=DTYPE)
    torch.testing.assert_close(ours.weight, theirs.weight.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(ours.bias, theirs.bias.detach(), rtol=1e-14, atol=0)


def test_init_weights_schemes():
    g = torch.Generator().manual_seed(0)
    mlp = bp.MLP([400, 300, 300, 10], dtype=DTYPE)
    bp.init_weights_(mlp, "normal", std=0.5, generator=g)
    first = mlp.linear_layers[0]
    assert first.weight.std().item() == pytest.approx(0.5, rel=0.01)
    assert torch.all(first.bias == 0)
    bp.init_weights_(mlp, "he", generator=g)
    assert first.weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.01)
    bp.init_weights_(mlp, "xavier", generator=g)
    assert mlp.linear_layers[1].weight.std().item() == pytest.approx((2 / 600) ** 0.5, rel=0.01)


def test_runs_in_float32_and_converts_with_to(device):
    torch.manual_seed(0)
    mlp = bp.MLP([6, 5, 2], "sigmoid", dropout=0.1).to(device)
    x = torch.randn(4, 6, device=device)
    loss_fn = bp.SoftmaxCrossEntropy()
    loss_fn(mlp(x), torch.tensor([0, 1, 1, 0], device=device))
    grad_x = mlp.backward(loss_fn.backward())
    assert grad_x.dtype == torch.float32 and grad_x.device.type == torch.device(device).type
    assert all(p.grad is not None for p in mlp.parameters())


def test_numerical_gradient_of_a_known_function():
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DTYPE)
    grad = gradcheck.numerical_gradient(lambda v: (v ** 3).sum(), x)
    torch.testing.assert_close(grad, 3 * x ** 2, rtol=0, atol=1e-8)


def test_numerical_gradient_of_a_non_contiguous_input():
    x = torch.randn(3, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(0)).T
    assert not x.is_contiguous()
    weights = torch.arange(12, dtype=DTYPE).view(4, 3)    # a different slope per element
    grad = gradcheck.numerical_gradient(lambda v: (weights * v ** 2).sum(), x)
    assert grad.shape == x.shape
    torch.testing.assert_close(grad, 2 * weights * x, rtol=0, atol=1e-8)
    assert not x.is_contiguous()                            # the caller's tensor is untouched


@pytest.mark.parametrize("kw, error, match", [
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=-1e-6), ValueError, "eps must be > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be > 0"),
    (dict(eps="1e-6"), TypeError, "eps must be a real number"),
    (dict(f=lambda v: v ** 2), ValueError, r"scalar, got a tensor of shape \(2, 2\)"),
    (dict(f=lambda v: "loss"), TypeError, "scalar tensor or a real number"),
    (dict(x=torch.ones(2, 2, dtype=torch.long)), TypeError, "floating-point"),
])
def test_numerical_gradient_bad_input(kw, error, match):
    args = dict(f=lambda v: v.sum(), x=torch.ones(2, 2, dtype=DTYPE)) | kw
    with pytest.raises(error, match=match):
        gradcheck.numerical_gradient(**args)


def test_numerical_gradient_accepts_one_element_tensors_and_numbers():
    x = torch.tensor([0.5, -1.5], dtype=DTYPE)
    for f in (lambda v: v.square().sum().reshape(1, 1), lambda v: v.square().sum().item()):
        torch.testing.assert_close(gradcheck.numerical_gradient(f, x), 2 * x, rtol=0,
                                   atol=1e-8)


class _ForgetsTheBias(bp.Linear):
    """A plausible bug: the backward pass never writes the bias gradient."""

    def backward(self, grad_output):
        grad_x = super().backward(grad_output)
        self.bias.grad = None
        return grad_x


class _UnusedParameter(bp.Tanh):
    """A layer with a parameter its output does not depend on."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3, dtype=DTYPE), requires_grad=False)


def test_check_gradients_treats_a_missing_gradient_as_zero():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=DTYPE)
    layer = _ForgetsTheBias(4, 3, dtype=DTYPE)
    upstream = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    result = gradcheck.check_gradients(layer, x, upstream)  # a report, not a TypeError
    bias_gradient = upstream.sum(0).abs().max().item()     # what the bug leaves out
    assert result.autograd == pytest.approx(bias_gradient, rel=1e-12)
    assert result.finite_differences == pytest.approx(bias_gradient, rel=1e-6)
    # a parameter the loss does not depend on has gradient zero: nothing to report
    result = gradcheck.check_gradients(_UnusedParameter(), x[:, :3])
    assert result.autograd < 1e-13 and result.finite_differences < 1e-8


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, error, match", [
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3), torch.tensor([0, 1, 2])),
     ValueError, r"shape \(4,\)"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0])),
     TypeError, "torch.long"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3), torch.tensor([0, 1, 2, 1],
                                                                       dtype=torch.int32)),
     TypeError, "torch.long"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3), torch.tensor([0, 1, 3, 1])),
     ValueError, r"in \[0, 3\)"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3), torch.rand(4, 2)),
     TypeError, "probabilities"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4), torch.tensor([0, 1, 2, 1])),
     ValueError, "logits"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.arange(6).view(2, 3), torch.tensor([0, 1])),
     TypeError, "floating-point"),
    (lambda: bp.SoftmaxCrossEntropy("none"), ValueError, "reduction"),
    (lambda: bp.MSELoss()(torch.randn(3), torch.randn(4)), ValueError, "same shape"),
    (lambda: bp.MSELoss()(torch.randn(3), [1.0, 2.0, 3.0]), TypeError, "target"),
    (lambda: bp.Linear(3, 2)(torch.randn(4, 5)), ValueError, r"\(batch, 3\)"),
    (lambda: bp.Linear(3, 2)(torch.randn(4, 3, dtype=DTYPE)), TypeError, "float64"),
    (lambda: bp.Linear(3, 2)([[1.0, 2.0, 3.0]]), TypeError, "torch.Tensor"),
    (lambda: bp.Linear(0, 2), ValueError, "in_features"),
    (lambda: bp.Linear(3.0, 2), TypeError, "in_features must be an int"),
    (lambda: bp.Linear(3, True), TypeError, "out_features must be an int"),
    (lambda: bp.BatchNorm1d(3.0), TypeError, "num_features must be an int"),
    (lambda: bp.BatchNorm1d(0), ValueError, "num_features must be >= 1"),
    (lambda: bp.BatchNorm1d(3, eps="1e-5"), TypeError, "eps must be a real number"),
    (lambda: bp.BatchNorm1d(3, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: bp.BatchNorm1d(3, momentum=None), TypeError, "momentum must be a real"),
    (lambda: bp.Dropout(True), TypeError, "p must be a real number"),
    (lambda: bp.Dropout("0.5"), TypeError, "p must be a real number"),
    (lambda: bp.Dropout(float("nan")), ValueError, r"\[0, 1\)"),
    (lambda: bp.xavier_normal_([[1.0, 2.0]]), TypeError, "torch.Tensor"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3, device="meta"),
                                      torch.tensor([0, 1, 2, 1])),
     TypeError, "target is on cpu, expected meta"),
    (lambda: bp.SoftmaxCrossEntropy()(torch.randn(4, 3, device="meta"), torch.rand(4, 3)),
     TypeError, "target is on cpu, expected meta"),
    (lambda: bp.Linear(3, 2).backward(torch.randn(4, 2)), RuntimeError, "before forward"),
    (lambda: bp.SoftmaxCrossEntropy().backward(), RuntimeError, "before forward"),
    (lambda: bp.MSELoss().backward(), RuntimeError, "before forward"),
    (lambda: bp.BatchNorm1d(3)(torch.randn(1, 3)), ValueError, "at least 2"),
    (lambda: bp.BatchNorm1d(3, momentum=2.0), ValueError, "momentum"),
    (lambda: bp.Dropout(1.0), ValueError, r"\[0, 1\)"),
    (lambda: bp.MLP([4, 3], "gelu"), ValueError, "activation"),
    (lambda: bp.MLP([4]), ValueError, "sizes"),
    (lambda: bp.Sequential(nn.Linear(2, 2)), TypeError, "Layer"),
    (lambda: bp.init_weights_(bp.MLP([3, 2]), "normal"), ValueError, "std"),
    (lambda: bp.init_weights_(bp.MLP([3, 2]), "lecun"), ValueError, "scheme"),
    (lambda: bp.xavier_normal_(torch.empty(3)), ValueError, "2-D"),
    (lambda: bp.MLP([3, 2]).sgd_step(0.0), ValueError, "lr"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_grad_output_of_the_wrong_shape():
    layer = bp.Tanh()
    layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        layer.backward(torch.randn(3, 4))
    with pytest.raises(TypeError, match="grad_output"):
        layer.backward(1.0)


def test_train_sgd_bad_input():
    mlp = bp.MLP([2, 3])
    X, y = torch.randn(5, 2), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="epochs"):
        bp.train_sgd(mlp, X, y, epochs=0, batch_size=2, lr=0.1)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        bp.train_sgd(mlp, X, y, epochs=1, batch_size=2.0, lr=0.1)
    with pytest.raises(TypeError, match="torch.long"):
        bp.train_sgd(mlp, X, y.float(), epochs=1, batch_size=2, lr=0.1)
    with pytest.raises(ValueError, match="X_val and y_val"):
        bp.train_sgd(mlp, X, y, epochs=1, batch_size=2, lr=0.1, X_val=X)
