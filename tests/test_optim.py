"""companion.optim against torch.optim (the oracle), and the chapter's helpers.

Two identical models, one driven by our optimizer and one by PyTorch's, see the same
mini-batches; parameters and every state tensor must agree to 1e-12 relative in float64,
1e-15 in complex128 (to a float32 tolerance in float32) after 200 steps, for every option
combination and both code paths (foreach and single-tensor); with a tensor lr, bit for bit.
"""

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from companion.gradnoise import (
    minibatch_gradient_variance,
    per_example_gradients,
    sampled_minibatch_gradient_variance,
)
from companion.optim import (
    SGD,
    Adam,
    AdamW,
    WarmupCosine,
    quadratic,
    rosenbrock,
    trajectory,
    warmup_cosine_schedule,
)

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ORACLE = {SGD: torch.optim.SGD, Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The tensors here are tiny: one thread is faster than two and spares a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(device, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(device, dtype)


def _batches(n, device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        yield x.to(device, dtype), torch.randint(0, 3, (16,), generator=g).to(device)


def _train(model, optimizer, batches, scheduler=None):
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_rel_close(actual, expected, rtol):
    """Elementwise within ``rtol`` relative to the tensor's scale (robust near zero)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def _assert_same(model, ref_model, opt, ref_opt, rtol):
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        _assert_rel_close(p, q, rtol)
    state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for index, ref in ref_state.items():
        assert state[index].keys() == ref.keys(), (state[index].keys(), ref.keys())
        for key, value in ref.items():
            if key == "step":
                assert state[index][key].item() == value.item()
            else:
                _assert_rel_close(state[index][key], value, rtol)


def _pair(cls, device, dtype, foreach, **hyper):
    model = _model(device, dtype)
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), foreach=foreach, **hyper)
    ref_opt = ORACLE[cls](ref_model.parameters(), foreach=foreach, **hyper)
    return model, ref_model, opt, ref_opt


def _check_against_torch(cls, device, dtype, foreach, steps=200, **hyper):
    model, ref_model, opt, ref_opt = _pair(cls, device, dtype, foreach, **hyper)
    _train(model, opt, _batches(steps, device, dtype))
    _train(ref_model, ref_opt, _batches(steps, device, dtype))
    _assert_same(model, ref_model, opt, ref_opt, RTOL[dtype])


SGD_OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n)
    for m in (0.0, 0.9) for d in (0.0, 0.3) for wd in (0.0, 0.05) for n in (False, True)
    if not (n and (m == 0 or d != 0))
]
ADAM_OPTIONS = [dict(weight_decay=wd, amsgrad=a) for wd in (0.0, 0.05) for a in (False, True)]


def _ids(options):
    return ["-".join(f"{k}={v}" for k, v in o.items()) for o in options]


# --------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=_ids(SGD_OPTIONS))
def test_sgd_matches_torch_float64(device, options, foreach):
    _check_against_torch(SGD, device, torch.float64, foreach, lr=0.05, **options)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=_ids(ADAM_OPTIONS))
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_and_adamw_match_torch_float64(device, cls, options, foreach):
    _check_against_torch(cls, device, torch.float64, foreach, lr=0.01, betas=(0.8, 0.99),
                         eps=1e-6, **options)


# A complex parameter is a pair of real ones (torch.optim's convention): the second moment
# averages the square of each part, not the complex square g * g.


def _complex_problem(seed=0):
    """Complex least squares with one real parameter beside the complex ones."""
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.complex128, generator=g))
    bias = nn.Parameter(torch.randn(3, dtype=torch.complex128, generator=g))
    gain = nn.Parameter(torch.ones(1, dtype=torch.float64))  # real: its own foreach bucket
    return nn.ParameterList([weight, bias, gain])


def _train_complex(params, optimizer, steps=200):
    weight, bias, gain = params
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, dtype=torch.complex128, generator=g)
        y = torch.randn(16, 3, dtype=torch.complex128, generator=g)
        optimizer.zero_grad()
        (gain * (x @ weight.T + bias) - y).abs().square().mean().backward()
        optimizer.step()


def _check_complex_against_torch(cls, foreach, rtol, **hyper):
    params, ref_params = _complex_problem(), _complex_problem()
    opt = cls(params, foreach=foreach, **hyper)
    ref_opt = ORACLE[cls](ref_params, foreach=foreach, **hyper)
    _train_complex(params, opt)
    _train_complex(ref_params, ref_opt)
    _assert_same(params, ref_params, opt, ref_opt, rtol)
    state = {k: v for k, v in opt.state[params[0]].items() if k != "step"}
    assert all(v.is_complex() for v in state.values())  # kept complex, as in torch


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=_ids(ADAM_OPTIONS))
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_and_adamw_match_torch_complex128(cls, options, foreach):
    """To 1e-15: torch's single-tensor Adam adds the L2 term in complex arithmetic before
    viewing the tensors as real, ours after, which can round the last bit differently."""
    _check_complex_against_torch(cls, foreach, 1e-15, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                 **options)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9, weight_decay=0.05),
                                     dict(momentum=0.9, nesterov=True)],
                         ids=["plain", "momentum-decay", "nesterov"])
def test_sgd_matches_torch_complex128(options, foreach):
    """SGD is linear in the gradient, so complex arithmetic is already per part."""
    _check_complex_against_torch(SGD, foreach, 1e-15, lr=0.01, **options)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_adam_second_moment_of_a_complex_gradient_squares_each_part(foreach):
    param = nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    param.grad = torch.tensor([3 + 4j, -1 + 2j], dtype=torch.complex128)
    opt = Adam([param], lr=0.1, betas=(0.9, 0.99), eps=0.0, foreach=foreach)
    opt.step()
    v = opt.state[param]["exp_avg_sq"]
    expected = 0.01 * (torch.view_as_real(param.grad) ** 2)  # (1 - beta2) (re^2, im^2)
    torch.testing.assert_close(torch.view_as_real(v), expected, rtol=1e-15, atol=0)
    # the first step moves each part by lr against its sign, as for a real parameter
    torch.testing.assert_close(param.detach(), torch.tensor([-0.1 - 0.1j, 0.1 - 0.1j],
                                                            dtype=torch.complex128))


# A 0-dim tensor lr, as torch.optim accepts it (e.g. to change it in place between steps).


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(momentum=0.9, weight_decay=0.05)),
    (Adam, dict(weight_decay=0.05, amsgrad=True)),
    (AdamW, dict(weight_decay=0.1)),
], ids=["sgd", "adam", "adamw"])
def test_tensor_lr_matches_torch_bit_for_bit(cls, hyper, lr_dtype, foreach):
    """Against torch's single-tensor path, which its default takes for a tensor lr
    (explicit foreach=True with a tensor lr is an error in torch.optim.Adam)."""
    models, opts, schedules = [], [], []
    for opt_cls, extra in ((cls, dict(foreach=foreach)), (ORACLE[cls], dict(foreach=False))):
        models.append(_model("cpu", torch.float64))
        opts.append(opt_cls(models[-1].parameters(), lr=torch.tensor(0.01, dtype=lr_dtype),
                            **hyper, **extra))
        schedules.append(warmup_cosine_schedule(opts[-1], 10, 100))  # changes lr in place
    for model, opt, schedule in zip(models, opts, schedules, strict=True):
        _train(model, opt, _batches(100, "cpu", torch.float64), schedule)
    assert torch.is_tensor(opts[0].param_groups[0]["lr"])
    assert opts[0].param_groups[0]["lr"].item() == opts[1].param_groups[0]["lr"].item()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_same(models[0], models[1], opts[0], opts[1], 0.0)


def _defaults(cls):
    params = inspect.signature(cls.__init__).parameters
    names = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps", "amsgrad")
    return {n: params[n].default for n in names if n in params}


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_defaults_match_torch(cls):
    ours, ref = _defaults(cls), _defaults(ORACLE[cls])
    assert len(ours) >= 5 and ours == {k: ref[k] for k in ours}
    _check_against_torch(cls, "cpu", torch.float64, True, steps=50)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    (AdamW, dict(lr=0.01)),
], ids=["sgd", "adam", "adamw"])
def test_float32_matches_torch(device, cls, hyper, foreach):
    _check_against_torch(cls, device, torch.float32, foreach, **hyper)


# --------------------------------------------------------------------------- state, groups


@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    (Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    (AdamW, dict(lr=0.01, amsgrad=True)),
], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_mid_training_continues_identically(cls, hyper):
    batches = list(_batches(200, "cpu", torch.float64))
    model = _model("cpu", torch.float64)
    opt = cls(model.parameters(), **hyper)
    _train(model, opt, batches[:100])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[100:])  # the uninterrupted run

    resumed = _model("cpu", torch.float64, seed=123)
    resumed.load_state_dict(saved_model)
    resumed_opt = cls(resumed.parameters(), **hyper)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, batches[100:])
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (Adam, dict(lr=0.01, amsgrad=True)),
    (AdamW, dict(lr=0.01, weight_decay=0.1)),
], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_state_dicts_are_interchangeable_with_torch(cls, hyper, direction):
    batches = list(_batches(120, "cpu", torch.float64))
    source_cls, target_cls = (ORACLE[cls], cls) if direction == "torch-to-ours" else (
        cls, ORACLE[cls])
    model = _model("cpu", torch.float64)
    source = source_cls(model.parameters(), **hyper)
    _train(model, source, batches[:60])
    ref_model = copy.deepcopy(model)
    target = target_cls(ref_model.parameters(), **hyper)
    target.load_state_dict(copy.deepcopy(source.state_dict()))  # loading does not copy
    _train(model, source, batches[60:])
    _train(ref_model, target, batches[60:])
    ours, theirs = (target, source) if direction == "torch-to-ours" else (source, target)
    ours_model, theirs_model = ((ref_model, model) if direction == "torch-to-ours"
                                else (model, ref_model))
    _assert_same(ours_model, theirs_model, ours, theirs, 1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(momentum=0.9)),
    (Adam, dict(amsgrad=True)),
    (AdamW, dict()),
], ids=["sgd", "adam", "adamw"])
def test_parameter_groups_with_different_lr_and_decay(device, cls, hyper, foreach):
    model = _model(device, torch.float64)
    ref_model = copy.deepcopy(model)

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.1},
                {"params": m[2].parameters(), "lr": 0.002}]

    opt = cls(groups(model), lr=0.01, foreach=foreach, **hyper)
    ref_opt = ORACLE[cls](groups(ref_model), lr=0.01, foreach=foreach, **hyper)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.002]
    _train(model, opt, _batches(200, device, torch.float64))
    _train(ref_model, ref_opt, _batches(200, device, torch.float64))
    _assert_same(model, ref_model, opt, ref_opt, 1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls, hyper", [
    (SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    (Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (AdamW, dict(lr=0.01, weight_decay=0.1)),
], ids=["sgd", "adam", "adamw"])
def test_none_grad_is_left_alone_and_late_grads_start_cleanly(cls, hyper, foreach):
    """``idle`` never gets a gradient; ``late`` gets one only from step 20 on."""
    models, opts = [], []
    for opt_cls in (cls, ORACLE[cls]):
        torch.manual_seed(0)
        params = {name: nn.Parameter(torch.randn(4, dtype=torch.float64))
                  for name in ("always", "late", "idle")}
        models.append(params)
        opts.append(opt_cls(list(params.values()), foreach=foreach, **hyper))
    idle_before = models[0]["idle"].detach().clone()
    for step in range(60):
        for params, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            loss = (params["always"] - 1.0).square().sum()
            if step >= 20:
                loss = loss + (params["late"] * math.sin(step)).sum()
            loss.backward()
            opt.step()
    assert models[0]["idle"].grad is None and torch.equal(models[0]["idle"], idle_before)
    assert models[0]["idle"] not in opts[0].state
    for name in ("always", "late"):
        _assert_rel_close(models[0][name], models[1][name], 1e-12)
    _assert_same(nn.ParameterList(models[0].values()), nn.ParameterList(models[1].values()),
                 opts[0], opts[1], 1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_sgd_never_writes_into_grad(foreach):
    model = _model("cpu", torch.float64)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, foreach=foreach)
    for x, y in _batches(3, "cpu", torch.float64):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_step_with_closure_returns_its_loss(cls):
    model = _model("cpu", torch.float64)
    opt = cls(model.parameters(), lr=0.01)
    x, y = next(_batches(1, "cpu", torch.float64))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = F.cross_entropy(model(x), y).item()
    assert opt.step(closure).item() == before
    assert F.cross_entropy(model(x), y).item() < before
    assert opt.step() is None


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    for cls in (SGD, Adam):
        with pytest.raises(TypeError, match="sparse gradient"):
            cls(embedding.parameters(), lr=0.1).step()


# --------------------------------------------------------------------------- epsilon hat


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_epsilon_hat_is_algorithm_1_with_a_step_dependent_epsilon(foreach, amsgrad):
    """Keras's placement equals torch's with eps_t = eps_hat / sqrt(1 - beta2^t)."""
    eps_hat, beta2 = 1e-3, 0.999
    model = _model("cpu", torch.float64)
    ref_model = copy.deepcopy(model)
    opt = Adam(model.parameters(), lr=0.01, eps=eps_hat, amsgrad=amsgrad, foreach=foreach,
               epsilon_hat=True)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, eps=eps_hat, amsgrad=amsgrad)
    for t, (x, y) in enumerate(_batches(200, "cpu", torch.float64), start=1):
        ref_opt.param_groups[0]["eps"] = eps_hat / (1 - beta2**t) ** 0.5
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        _assert_rel_close(p, q, 1e-12)


def test_first_adam_step_is_lr_times_sign_of_gradient():
    p = nn.Parameter(torch.tensor([3.0, -1e-3, 250.0], dtype=torch.float64))
    opt = Adam([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([2.0, -5e-6, 1e4], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.9, -1e-3 + 0.1, 249.9],
                                                        dtype=torch.float64))


# --------------------------------------------------------------------------- bad input


BAD_HYPERPARAMETERS = [
    (SGD, dict(lr=-0.1), "lr"),
    (SGD, dict(lr=0.1, momentum=-0.5), "momentum"),
    (SGD, dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (SGD, dict(lr=0.1, nesterov=True), "nesterov"),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (Adam, dict(lr=-1e-3), "lr"),
    (Adam, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (Adam, dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (Adam, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (Adam, dict(betas=(0.9, -1e-3)), r"betas\[1\]"),
    (Adam, dict(eps=-1e-8), "eps"),
    (Adam, dict(weight_decay=-0.1), "weight_decay"),
    (AdamW, dict(lr=-1.0), "lr"),
    (AdamW, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (AdamW, dict(eps=-1.0), "eps"),
    (AdamW, dict(weight_decay=-1e-2), "weight_decay"),
]


@pytest.mark.parametrize("cls, hyper, name", BAD_HYPERPARAMETERS,
                         ids=[f"{c.__name__}-{h}" for c, h, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters_raise_value_error_like_torch(cls, hyper, name):
    param = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        cls([param], **hyper)
    with pytest.raises(ValueError):
        ORACLE[cls]([param], **hyper)


@pytest.mark.parametrize("cls, hyper, error, match", [
    (SGD, dict(lr="0.1"), TypeError, "lr must be a real number"),
    (SGD, dict(lr=float("nan")), ValueError, "lr must be >= 0"),
    (SGD, dict(lr=torch.tensor([0.1])), ValueError, r"lr as a tensor must be 0-dim.*\(1,\)"),
    (Adam, dict(lr=torch.tensor(1)), TypeError, "0-dim floating-point tensor.*torch.int64"),
    (Adam, dict(lr=torch.tensor(-1e-3)), ValueError, "lr must be >= 0"),
    (AdamW, dict(lr=torch.tensor(float("nan"))), ValueError, "lr must be >= 0"),
    (Adam, dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (Adam, dict(betas=(0.9, None)), TypeError, r"betas\[1\] must be a real number"),
    (AdamW, dict(eps=True), TypeError, "eps must be a real number"),
])
def test_bad_types_and_nan(cls, hyper, error, match):
    with pytest.raises(error, match=match):
        cls([nn.Parameter(torch.zeros(2))], **hyper)


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_parameter_groups_are_checked_too(cls):
    good, bad = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.5"):
        cls([{"params": [good]}, {"params": [bad], "lr": -0.5}], lr=0.1)
    opt = cls([good], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [bad], "weight_decay": -1.0})


# --------------------------------------------------------------------------- schedule


def test_warmup_cosine_closed_form():
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.2)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)
    assert f(9) == f(10) == 1.0 and f(60) == pytest.approx(0.6) and f(110) == pytest.approx(0.2)
    assert f(500) == pytest.approx(0.2)
    values = [f(t) for t in range(120)]
    assert all(a < b for a, b in zip(values[:9], values[1:10]))        # warm-up climbs
    assert all(a >= b for a, b in zip(values[9:], values[10:]))        # then never rises
    assert WarmupCosine(0, 50)(0) == 1.0 and WarmupCosine(0, 50)(25) == pytest.approx(0.5)


def _learning_rates(make_scheduler, steps):
    """The lr of steps 0..steps of an optimizer with lr 0.3 driven by ``make_scheduler``."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return torch.tensor(lrs, dtype=torch.float64)


@pytest.mark.parametrize("warmup, total, ratio", [(10, 100, 0.0), (5, 40, 0.1), (1, 30, 0.5)])
def test_warmup_cosine_equals_torch_linear_then_cosine(warmup, total, ratio):
    ours = _learning_rates(lambda opt: warmup_cosine_schedule(opt, warmup, total, ratio), total)
    theirs = _learning_rates(lambda opt: SequentialLR(opt, [
        LinearLR(opt, start_factor=1 / warmup, total_iters=max(warmup - 1, 1)),
        CosineAnnealingLR(opt, T_max=total - warmup, eta_min=ratio * 0.3),
    ], milestones=[warmup]), total)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_no_warmup_is_cosine_annealing():
    ours = _learning_rates(lambda opt: warmup_cosine_schedule(opt, 0, 50, 0.1), 50)
    theirs = _learning_rates(lambda opt: CosineAnnealingLR(opt, T_max=50, eta_min=0.03), 50)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_schedule_state_dict_round_trip():
    opt = Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_cosine_schedule(opt, 5, 50)
    for _ in range(20):
        opt.step()
        scheduler.step()
    saved = scheduler.state_dict()
    assert saved["lr_lambdas"][0] == {"warmup_steps": 5, "total_steps": 50, "min_lr_ratio": 0.0}
    opt2 = Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler2 = warmup_cosine_schedule(opt2, 1, 2)
    scheduler2.load_state_dict(saved)
    assert scheduler2.lr_lambdas[0] == WarmupCosine(5, 50)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    opt.step()
    opt2.step()
    scheduler.step()
    scheduler2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(
        0.1 * WarmupCosine(5, 50)(21))


@pytest.mark.parametrize("kw, error, match", [
    (dict(warmup_steps=-1, total_steps=10), ValueError, "warmup_steps"),
    (dict(warmup_steps=2.5, total_steps=10), TypeError, "warmup_steps must be an int"),
    (dict(warmup_steps=2, total_steps=True), TypeError, "total_steps must be an int"),
    (dict(warmup_steps=10, total_steps=10), ValueError, "total_steps must be > warmup"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5), ValueError, "min_lr_ratio"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio="0"), TypeError, "min_lr_ratio"),
])
def test_schedule_bad_input(kw, error, match):
    opt = SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(error, match=match):
        warmup_cosine_schedule(opt, **kw)


def test_schedule_needs_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        warmup_cosine_schedule([nn.Parameter(torch.zeros(1))], 1, 10)


# --------------------------------------------------------------------------- test problems


def test_rosenbrock_and_quadratic_against_closed_forms():
    point = torch.tensor([-1.2, 0.7], dtype=torch.float64, requires_grad=True)
    rosenbrock(point).backward()
    x, y = point.detach()
    expected = torch.stack([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)])
    torch.testing.assert_close(point.grad, expected, rtol=1e-14, atol=0)
    assert rosenbrock(torch.tensor([1.0, 1.0])).item() == 0.0
    batch = torch.randn(5, 3, 2, dtype=torch.float64)
    assert rosenbrock(batch).shape == quadratic(batch).shape == (5, 3)

    angle = 0.4
    hessian = torch.autograd.functional.hessian(
        lambda z: quadratic(z, (2.0, 50.0), angle), torch.zeros(2, dtype=torch.float64))
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    expected = rotation @ torch.diag(torch.tensor([2.0, 50.0], dtype=torch.float64)) @ rotation.T
    torch.testing.assert_close(hessian, expected, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="eigenvalues"):
        quadratic(torch.zeros(2), (0.0, 1.0))


def test_trajectory_of_gradient_descent_is_the_matrix_power():
    hessian = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    path = trajectory(quadratic, (1.0, 1.0), SGD, steps=30, lr=0.15)
    assert path.shape == (31, 2)
    start = torch.tensor([1.0, 1.0], dtype=torch.float64)
    expected = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - 0.15 * hessian, 30)
    torch.testing.assert_close(path[-1], expected @ start, rtol=1e-12, atol=1e-15)
    assert torch.equal(trajectory(rosenbrock, (0.0, 0.0), torch.optim.SGD, 0, lr=1.0)[0],
                       torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        trajectory(quadratic, (1.0, 1.0), SGD, steps=-1)
    with pytest.raises(TypeError, match="steps must be an int"):
        trajectory(quadratic, (1.0, 1.0), SGD, steps=10.0)


# --------------------------------------------------------------------------- gradient noise


def _softmax_regression(device):
    torch.manual_seed(0)
    X = torch.randn(60, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (60,), device=device)
    return nn.Linear(5, 3).to(device, torch.float64), X, y


def test_per_example_gradients_against_autograd_one_by_one(device):
    model, X, y = _softmax_regression(device)
    grads = per_example_gradients(model, X, y)
    assert grads.shape == (60, 18)
    for i in (0, 17, 59):
        model.zero_grad()
        F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]).backward()
        expected = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(grads[i], expected, rtol=1e-12, atol=1e-14)
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    full = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads.mean(0), full, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="rows"):
        per_example_gradients(model, X, y[:5])


@pytest.mark.parametrize("per_batch_layer", [nn.Dropout(0.5), nn.BatchNorm1d(4)])
def test_per_example_gradients_refuse_dropout_and_batchnorm_in_training_mode(
        per_batch_layer, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), per_batch_layer, nn.ReLU(), nn.Linear(4, 3))
    model = model.to(device, torch.float64)
    X = torch.randn(8, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    with pytest.raises(ValueError, match=rf"1 \({type(per_batch_layer).__name__}\) is in "
                                         r"training mode; call model.eval\(\)"):
        per_example_gradients(model, X, y)
    grads = per_example_gradients(model.eval(), X, y)  # deterministic: per-example rows
    model.zero_grad()
    F.cross_entropy(model(X[3:4]), y[3:4]).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[3], expected, rtol=1e-12, atol=1e-14)


def test_per_example_gradients_leave_out_frozen_parameters(device):
    model, X, y = _softmax_regression(device)
    model.weight.requires_grad_(False)                 # frozen, as for fine-tuning a head
    grads = per_example_gradients(model, X, y)
    assert grads.shape == (60, 3)                      # the bias only
    for i in (0, 31):
        model.zero_grad()
        F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]).backward()
        assert model.weight.grad is None
        torch.testing.assert_close(grads[i], model.bias.grad, rtol=1e-12, atol=1e-14)
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires gradients"):
        per_example_gradients(model, X, y)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        per_example_gradients(lambda x: x, X, y)


def test_minibatch_gradient_variance_formula_and_sampling(device):
    model, X, y = _softmax_regression(device)
    grads = per_example_gradients(model, X, y)
    total = (grads - grads.mean(0)).square().sum(1).mean().item()
    assert minibatch_gradient_variance(grads, 1) == pytest.approx(total, rel=1e-12)
    assert minibatch_gradient_variance(grads, 60) == 0.0
    generator = torch.Generator().manual_seed(0)
    for batch_size in (1, 4, 20, 45):
        exact = minibatch_gradient_variance(grads, batch_size)
        sampled = sampled_minibatch_gradient_variance(grads, batch_size, draws=20000,
                                                      generator=generator)
        assert sampled == pytest.approx(exact, rel=0.05)
    assert sampled_minibatch_gradient_variance(grads, 60, draws=3) == pytest.approx(0, abs=1e-24)
    for bad in (0, 61):
        with pytest.raises(ValueError, match="batch_size"):
            minibatch_gradient_variance(grads, bad)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        minibatch_gradient_variance(grads, 2.0)
    with pytest.raises(ValueError, match="draws"):
        sampled_minibatch_gradient_variance(grads, 2, draws=0)
    with pytest.raises(TypeError, match="draws must be an int"):
        sampled_minibatch_gradient_variance(grads, 2, draws=10.0)
    with pytest.raises(ValueError, match="2-D"):
        minibatch_gradient_variance(grads[0], 1)


@pytest.mark.parametrize("cls, single, vectorised", [
    (SGD, "sgd_single_tensor", "sgd_foreach"),
    (Adam, "adam_single_tensor", "adam_foreach"),
    (AdamW, "adam_single_tensor", "adam_foreach"),
])
def test_foreach_flag_selects_the_code_path(monkeypatch, cls, single, vectorised):
    import companion.optim as module

    calls = []

    def spy(name):
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return recorded

    for name in (single, vectorised):
        monkeypatch.setattr(module, name, spy(name))
    for foreach, expected in ((True, vectorised), (False, single)):
        calls.clear()
        param = nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        cls([param], lr=0.1, foreach=foreach).step()
        assert calls == [expected]
    # a tensor lr: Adam's foreach path takes floats only, so it falls back, as torch does
    calls.clear()
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    cls([param], lr=torch.tensor(0.1), foreach=True).step()
    assert calls == [vectorised if cls is SGD else single]


# ------------------------------------------- the two code paths against each other
def _twin_inputs(seed, complex_too=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (1,), (2, 2, 2)]
    dtype = torch.complex128 if complex_too else torch.float64
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
             for _ in range(6)]  # six steps of gradients
    return params, grads


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.3, 0.01, False),
    (0.9, 0.0, 0.01, True)])
def test_sgd_foreach_equals_single_tensor(seed, momentum, dampening, weight_decay,
                                          nesterov):
    """The vectorised step is the loop's step, compared directly (not only via torch)."""
    from companion.optim import sgd_foreach, sgd_single_tensor
    params, grads = _twin_inputs(seed)
    twins = {fn: ([p.clone() for p in params], [None] * len(params))
             for fn in (sgd_single_tensor, sgd_foreach)}
    hyper = dict(lr=0.05, momentum=momentum, dampening=dampening,
                 weight_decay=weight_decay, nesterov=nesterov)
    for step_grads in grads:
        for fn, (ps, bufs) in twins.items():
            fn(ps, [g.clone() for g in step_grads], bufs, **hyper)
    (p1, b1), (p2, b2) = twins.values()
    for a, b in zip(p1 + [x for x in b1 if x is not None],
                    p2 + [x for x in b2 if x is not None], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("complex_too", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("weight_decay,amsgrad,decoupled,epsilon_hat", [
    (0.0, False, False, False), (0.01, False, False, False),
    (0.01, True, True, False), (0.0, False, True, True), (0.05, True, False, True)])
def test_adam_foreach_equals_single_tensor(seed, complex_too, weight_decay, amsgrad,
                                           decoupled, epsilon_hat):
    from companion.optim import adam_foreach, adam_single_tensor
    params, grads = _twin_inputs(seed, complex_too)

    def state():
        ps = [p.clone() for p in params]
        return (ps, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                [torch.zeros_like(p) for p in ps],
                [torch.tensor(0.0, dtype=torch.float64) for _ in ps])

    twins = {fn: state() for fn in (adam_single_tensor, adam_foreach)}
    hyper = dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=weight_decay,
                 amsgrad=amsgrad, decoupled_weight_decay=decoupled,
                 epsilon_hat=epsilon_hat)
    for step_grads in grads:
        for fn, st in twins.items():
            fn(st[0], [g.clone() for g in step_grads], *st[1:], **hyper)
    one, two = twins.values()
    for a_list, b_list in zip(one, two, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-300)
