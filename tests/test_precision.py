"""precision.round_to against ``x.to(dtype).float()`` bit for bit; LossScaler against GradScaler."""

from __future__ import annotations

import json

import pytest
import torch

from companion.precision import (
    AUTOCAST_RECORD,
    AUTOCAST_SETTINGS,
    FORMATS,
    LossScaler,
    autocast_run,
    load_autocast_record,
    round_to,
    underflow_fraction,
)

LOW = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


def _mismatches(x: torch.Tensor, dtype: torch.dtype) -> int:
    """Entries where round_to differs from PyTorch's cast in bits (both NaN counts as equal)."""
    ref = x.to(dtype).to(torch.float32)
    ours = round_to(x, dtype)
    same = (ref.view(torch.int32) == ours.view(torch.int32)) | (ref.isnan() & ours.isnan())
    return int((~same).sum())


def _grid_and_midpoints(dtype: torch.dtype, device) -> torch.Tensor:
    """Every finite value of ``dtype``, the exact midpoints between neighbours, and 1 ulp around."""
    n = 2 ** (8 * torch.empty((), dtype=dtype).element_size())
    codes = torch.arange(n, dtype=torch.int32).to(torch.int16 if n > 256 else torch.uint8)
    grid = codes.view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()                        # sorted, -0 merged into 0
    mid = (grid[1:].double() + grid[:-1].double()) / 2                  # exact ties
    mid = mid.float()
    assert bool((mid.double() == (grid[1:].double() + grid[:-1].double()) / 2).all())
    base = torch.cat([grid, -grid, mid, -mid])
    up = torch.nextafter(base, torch.tensor(float("inf")))
    down = torch.nextafter(base, torch.tensor(float("-inf")))
    return torch.cat([base, up, down]).to(device)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_to_random_bit_patterns(dtype, device):
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-2 ** 31, 2 ** 31, (200_000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32).to(device)
    assert _mismatches(x, dtype) == 0


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_to_ties_neighbours_and_subnormals(dtype, device):
    x = _grid_and_midpoints(dtype, device)
    assert _mismatches(x, dtype) == 0
    # float32 subnormals and values around the format's own subnormal range
    fmt = FORMATS[dtype]
    small = torch.logspace(-46, 0, 20_000, base=2.0) * fmt.smallest_normal
    sub = torch.arange(-5000, 5000, dtype=torch.int32).view(torch.float32)   # float32 subnormals
    assert _mismatches(torch.cat([small, -small, sub]).to(device), dtype) == 0


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_to_specials_and_overflow(dtype, device):
    fmt = FORMATS[dtype]
    big = torch.tensor([fmt.max_finite, fmt.max_finite * 1.03, fmt.max_finite * 1.2, 3e38,
                        float("inf"), 0.0, 1.0, float("nan")])
    x = torch.cat([big, -big]).to(device)
    assert _mismatches(x, dtype) == 0
    y = round_to(x, dtype)
    assert torch.isnan(y[7]) and torch.isnan(y[-1])
    assert y.view(torch.int32)[7] == 0x7FC00000
    # the sign of zero survives
    assert round_to(torch.tensor([-0.0]), dtype).view(torch.int32).item() == -2 ** 31
    overflow = y[1:5]
    if fmt.saturates:      # float8_e4m3fn in PyTorch 2.13: +-448, also for +-inf
        assert bool((overflow == fmt.max_finite).all())
    else:
        assert y[4] == float("inf") and y[-4] == float("-inf")


def test_round_to_known_values():
    x = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1e-8, 65519.0, 65520.0, 2 ** -25])
    bf = round_to(x[:2], torch.bfloat16)
    assert bf.tolist() == [1.0, 1.0 + 2 ** -6]          # ties go to the even neighbour
    h = round_to(x[2:], torch.float16)
    assert h.tolist() == [0.0, 65504.0, float("inf"), 0.0]   # underflow, max, overflow, tie->0
    assert underflow_fraction(torch.tensor([1e-8, 1.0, 0.0, -1e-9]), torch.float16) == 2 / 3
    assert underflow_fraction(torch.zeros(3), torch.float16) == 0.0


def test_round_to_bad_input():
    with pytest.raises(TypeError, match="x must have dtype torch.float32"):
        round_to(torch.ones(3, dtype=torch.float64), torch.float16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        round_to([1.0], torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        round_to(torch.ones(3), torch.int8)
    with pytest.raises(TypeError, match="dtype must be dtype"):
        round_to(torch.ones(3), "float16")


def _run(scaler, model, opt, xs, ys, poison):
    """Train a few steps; at the steps in ``poison`` one gradient is set to inf. Records."""
    scales, stepped = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in poison:
            model.weight.grad[0, 0] = float("inf") if i % 2 else float("nan")
        before = model.weight.detach().clone()
        if i % 3 == 0:
            scaler.unscale_(opt)             # explicit unscale (e.g. for clipping) on some steps
        scaler.step(opt)
        stepped.append(not torch.equal(before, model.weight.detach()))
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, stepped, model.weight.detach().clone()


def test_loss_scaler_equals_grad_scaler():
    torch.manual_seed(0)
    xs, ys = torch.randn(40, 8, 4, dtype=torch.float32), torch.randn(40, 8, 2)
    kwargs = dict(init_scale=2.0 ** 10, growth_factor=3.0, backoff_factor=0.25, growth_interval=4)
    poison = {2, 3, 9, 17, 18, 19, 30}
    results = []
    for scaler in (LossScaler(**kwargs), torch.amp.GradScaler("cpu", **kwargs)):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        results.append(_run(scaler, model, opt, xs, ys, poison))
    (s1, st1, w1), (s2, st2, w2) = results
    assert s1 == s2
    assert st1 == st2
    assert [i for i, s in enumerate(st1) if not s] == sorted(poison)
    assert torch.equal(w1, w2)
    assert len(set(s1)) > 3                  # the scale both grew and backed off


def test_loss_scaler_growth_stops_at_overflow_of_the_scale():
    s = LossScaler(init_scale=3e38, growth_factor=2.0, growth_interval=1)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(2)
    s.step(opt)
    s.update()
    assert s.get_scale() == float(torch.tensor(3e38))    # 6e38 is inf in float32: kept
    assert s.state_dict()["_growth_tracker"] == 0


def test_loss_scaler_state_dict_and_errors():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(2)
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt)
    for bad in (dict(init_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.0),
                dict(growth_interval=0)):
        with pytest.raises(ValueError):
            LossScaler(**bad)
    with pytest.raises(TypeError):
        LossScaler(growth_interval=2.5)
    with pytest.raises(TypeError, match="loss must be a floating-point"):
        s.scale(torch.ones(1, dtype=torch.int64))


def test_autocast_record_has_every_run_and_refuses_other_settings(tmp_path):
    record = load_autocast_record()
    s = AUTOCAST_SETTINGS
    assert set(record) == {(p, seed) for p in s["precisions"] for seed in s["seeds"]}
    for history in record.values():  # evaluated before the first step and after the last
        assert len(history.step_loss) == s["steps"] and len(history.val_loss) == 2
        assert history.val_loss[-1] < history.val_loss[0]
    raw = json.loads(AUTOCAST_RECORD.read_text())
    raw["settings"]["lr"] = 1.0
    (tmp_path / "r.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="re-record"):
        load_autocast_record(tmp_path / "r.json")
    with pytest.raises(ValueError, match="precision"):
        autocast_run(None, 0, "float8")
