"""Pruning masks against torch.nn.utils.prune; structured neuron pruning against a masked MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from companion.prune import (
    apply_masks,
    global_magnitude_masks,
    magnitude_mask,
    neuron_importance,
    prune_mlp_neurons,
    prune_neurons,
    sparsity,
)
from companion.transformer import MLP

AMOUNTS = [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 1.0]


@pytest.mark.parametrize("amount", AMOUNTS)
def test_magnitude_mask_equals_l1_unstructured(amount, device):
    torch.manual_seed(0)
    for shape in [(7, 9), (33,), (4, 5, 6)]:
        layer = nn.Linear(1, 1)
        layer.weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
        torch_prune.l1_unstructured(layer, "weight", amount=amount)
        ours = magnitude_mask(layer.weight_orig.detach().to(device), amount)
        assert ours.dtype == torch.bool and ours.shape == shape
        assert torch.equal(ours.cpu(), layer.weight_mask.bool())


@pytest.mark.parametrize("amount", AMOUNTS)
def test_global_masks_equal_global_unstructured(amount):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.mul_(0.1)                    # a layer of small weights loses more
    weights = [m.weight.detach().clone() for m in model]
    torch_prune.global_unstructured([(m, "weight") for m in model],
                                    pruning_method=torch_prune.L1Unstructured, amount=amount)
    ours = global_magnitude_masks(weights, amount)
    for m, mask in zip(model, ours):
        assert torch.equal(mask, m.weight_mask.bool())
    total = sum(w.numel() for w in weights)
    assert sum(int((~m).sum()) for m in ours) == round(amount * total)
    if 0 < amount < 1:
        per_layer = [float((~m).float().mean()) for m in ours]
        assert per_layer[1] > per_layer[0]


def test_ties_prune_exactly_k():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, 0.5, -0.5])
    mask = magnitude_mask(w, 0.5)
    assert int((~mask).sum()) == 3 and not mask[4] and not mask[5] and mask[3]


def test_apply_masks_and_sparsity():
    w = [torch.randn(4, 4), torch.randn(8)]
    masks = global_magnitude_masks(w, 0.25)
    apply_masks(w, masks)
    assert sparsity(w) == 6 / 24
    assert sparsity([]) == 0.0


def test_prune_neurons_equals_masking_the_hidden_units():
    torch.manual_seed(2)
    mlp = MLP(8).double()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    scores = neuron_importance(mlp[0], mlp[2])
    ref_scores = mlp[0].weight.norm(dim=1) * mlp[2].weight.norm(dim=0)
    assert torch.allclose(scores, ref_scores, rtol=0, atol=1e-15)
    keep = 20
    kept = torch.zeros(32, dtype=torch.bool)
    kept[scores.topk(keep).indices] = True
    with torch.no_grad():                               # oracle: zero the dropped neurons
        masked = MLP(8).double()
        masked.load_state_dict(mlp.state_dict())
        masked[0].weight[~kept] = 0
        masked[0].bias[~kept] = 0
        expected = masked(x)
    small = prune_mlp_neurons(mlp, 1 - keep / 32)
    assert small is mlp and mlp[0].out_features == keep and mlp[2].in_features == keep
    assert mlp[0].weight.dtype == torch.float64
    assert torch.allclose(mlp(x), expected, rtol=0, atol=1e-12)
    new_in, new_out = prune_neurons(mlp[0], mlp[2], 1)
    assert new_in.weight.shape == (1, 8) and new_out.weight.shape == (8, 1)


def test_bad_input():
    w = torch.randn(3, 3)
    for amount in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="amount"):
            magnitude_mask(w, amount)
    with pytest.raises(TypeError, match="amount must be"):
        magnitude_mask(w, "half")
    with pytest.raises(TypeError, match="floating-point"):
        magnitude_mask(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="at least one tensor"):
        global_magnitude_masks([], 0.5)
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        global_magnitude_masks([w, [1.0]], 0.5)
    with pytest.raises(ValueError, match="must equal"):
        neuron_importance(nn.Linear(2, 3), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="keep must be <= 3"):
        prune_neurons(nn.Linear(2, 3), nn.Linear(3, 2), 4)
    with pytest.raises(ValueError, match="amount must be <= 1.0"):
        prune_mlp_neurons(MLP(4), 2.0)
