"""saved_tensor_bytes against tensors whose saving rules are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from companion.memory import saved_tensor_bytes


def test_linear_saves_its_input_only():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    assert saved_tensor_bytes(layer, x, module=layer) == 5 * 16 * 4
    # without module=, the weight counts too
    assert saved_tensor_bytes(layer, x) == 5 * 16 * 4 + 8 * 16 * 4


def test_shared_storage_counts_once_and_dtype_matters():
    x = torch.randn(100, requires_grad=True)
    assert saved_tensor_bytes(lambda t: t * t, x) == 400          # x saved twice, one storage
    assert saved_tensor_bytes(lambda t: t.exp(), x) == 400        # exp saves its output
    h = torch.randn(100, dtype=torch.float64, requires_grad=True)
    assert saved_tensor_bytes(lambda t: t.sin().cos(), h) == 1600
    with torch.no_grad():
        assert saved_tensor_bytes(lambda t: t.sin().cos(), h) == 0


def test_checkpoint_keeps_only_the_input():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    x = torch.randn(10, 32, requires_grad=True)
    full = saved_tensor_bytes(mlp, x, module=mlp)
    # x (input of the first Linear), h (input of GELU), GELU(h) (input of the second Linear)
    assert full == 10 * 32 * 4 + 10 * 128 * 4 + 10 * 128 * 4
    ckpt = saved_tensor_bytes(lambda t: checkpoint(mlp, t, use_reentrant=False), x, module=mlp)
    assert ckpt == 10 * 32 * 4


def test_bad_input():
    with pytest.raises(TypeError, match="fn must be callable"):
        saved_tensor_bytes(3)
    with pytest.raises(TypeError, match="module must be Module"):
        saved_tensor_bytes(lambda: None, module="x")
