"""quantize/dequantize against torch.quantize_per_tensor / quantize_per_channel, errors, packing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from companion.quantize import (
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    quantize_linear_weights,
    quantized_bytes,
    unpack_int4,
)


def _weights(seed=0, shape=(48, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], 1, generator=g) * 3 + 0.01        # channels of different ranges
    w = torch.randn(*shape, generator=g) * rows
    w[3, 5] = 25.0                                                 # an outlier
    w[7] = 0.0                                                     # an all-zero channel
    return w


def _oracle(fn, *args):
    with warnings.catch_warnings():          # torch's quantized tensors are deprecated, still exact
        warnings.simplefilter("ignore")
        return fn(*args).int_repr()


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_equals_torch(symmetric):
    for seed in range(5):
        w = _weights(seed)
        q, s, z = quantize(w, 8, symmetric=symmetric)
        assert q.dtype == (torch.int8 if symmetric else torch.uint8)
        ref = _oracle(torch.quantize_per_tensor, w, float(s), int(z),
                      torch.qint8 if symmetric else torch.quint8)
        assert torch.equal(q, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_equals_torch(symmetric, axis):
    w = _weights(1)
    q, s, z = quantize(w, 8, axis=axis, symmetric=symmetric)
    assert s.shape == (w.shape[axis],) and z.shape == (w.shape[axis],)
    ref = _oracle(torch.quantize_per_channel, w, s.double(), z, axis % 2,
                  torch.qint8 if symmetric else torch.quint8)
    assert torch.equal(q, ref)


def test_exact_ties_round_to_even_like_torch():
    w = (torch.arange(-100, 100, dtype=torch.float32) + 0.5) * 0.25   # w / s lands on .5 exactly
    w = torch.cat([w, torch.tensor([127 * 0.25])])                    # fixes max|w| / 127 = 0.25
    q, s, z = quantize(w, 8)
    assert float(s) == 0.25
    assert torch.equal(q, _oracle(torch.quantize_per_tensor, w, 0.25, 0, torch.qint8))
    assert q[100].item() == 0 and q[101].item() == 2                  # 0.5 -> 0, 1.5 -> 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mode", ["tensor", "channel", "group"])
def test_error_at_most_half_a_step(bits, symmetric, mode, device):
    w = _weights(2).to(device)
    kw = {"tensor": {}, "channel": {"axis": 0}, "group": {"group_size": 16}}[mode]
    q, s, z = quantize(w, bits, symmetric=symmetric, **kw)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    w_hat = dequantize(q, s, z, **kw)
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape
    if mode == "tensor":
        step = s.expand(w.shape)
    elif mode == "channel":
        step = s[:, None].expand(w.shape)
    else:
        step = s.repeat_interleave(16, dim=1)
    err = (w_hat.double() - w.double()).abs()
    step = step.double()
    slack = 2.0 ** -22 * w.abs().max().double()     # float32 rounding of w / s and (q - z) * s
    assert bool((err <= step / 2 + slack).all())
    assert bool((w_hat[7] == 0).all())          # the zero channel stays exactly zero
    assert torch.equal(fake_quantize(w, bits, symmetric=symmetric, **kw), w_hat)


def test_group_wise_is_per_channel_of_the_reshaped_weight():
    w = _weights(3)
    q, s, z = quantize(w, 4, group_size=8, symmetric=False)
    assert s.shape == (48, 8)
    q2, s2, z2 = quantize(w.reshape(-1, 8), 4, axis=0, symmetric=False)
    assert torch.equal(q.reshape(-1, 8), q2) and torch.equal(s.flatten(), s2)
    assert torch.equal(z.flatten(), z2)


def test_finer_granularity_has_smaller_error():
    w = _weights(4)
    errors = [(fake_quantize(w, 4, **kw) - w).pow(2).mean().item()
              for kw in ({}, {"axis": 0}, {"group_size": 16})]
    assert errors[0] > errors[1] > errors[2]


def test_quantize_linear_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.LayerNorm(4))
    ref = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    info = quantize_linear_weights(model, bits=4, group_size=8)
    assert info["linear_weights"] == 16 * 32 + 32 * 4
    assert info["bytes_float32"] == 4 * info["linear_weights"]
    assert info["bytes_quantized"] == quantized_bytes(640, 4, 64 + 16)
    for m, w in zip([m for m in model if isinstance(m, nn.Linear)], ref):
        assert torch.equal(m.weight, fake_quantize(w, 4, group_size=8))
    assert quantized_bytes(10, 4, 1) == 5 + 4 and quantized_bytes(3, 3, 1, False) == 2 + 5


@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_roundtrip(signed):
    g = torch.Generator().manual_seed(0)
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (6, 10), generator=g).to(torch.int8 if signed else torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed, signed=signed), q)
    one = pack_int4(torch.tensor([[-1, 3]], dtype=torch.int8))
    assert one.item() == 0x3F                     # -1 -> 0xF in the low nibble, 3 in the high


def test_bad_input():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="bits must be <= 8"):
        quantize(w, bits=9)
    with pytest.raises(ValueError, match="bits must be >= 2"):
        quantize(w, bits=1)
    with pytest.raises(ValueError, match="group_size must divide"):
        quantize(w, group_size=4)
    with pytest.raises(ValueError, match="not both"):
        quantize(w, axis=0, group_size=3)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(6), group_size=3)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="axis must be <= 1"):
        quantize(w, axis=2)
    with pytest.raises(TypeError, match="symmetric must be bool"):
        quantize(w, symmetric=1)
    q, s, z = quantize(w, axis=0)
    with pytest.raises(ValueError, match="must have shape"):
        dequantize(q, s, z)
    with pytest.raises(TypeError, match="q must have dtype"):
        dequantize(q.float(), s, z, axis=0)
    with pytest.raises(ValueError, match="4-bit values"):
        pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
