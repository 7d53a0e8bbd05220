"""Pruning masks against torch.nn.utils.prune; structured neuron pruning against a masked MLP."""

from __future__ import annotations

import json

import pytest
import torch
from factories import assert_refused, tiny_gpt
from torch import nn
from torch.nn.utils import prune as torch_prune

from companion.data import CharCorpus
from companion.prune import (
    FINETUNE_RECORD,
    FINETUNE_SETTINGS,
    apply_masks,
    finetune_pruned,
    finetune_run,
    global_magnitude_masks,
    linear_weights,
    load_finetune_record,
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


# ------------------------------------------------------------- fine-tuning after pruning

def _batches(vocab: int, block: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)

    def get_batch():
        ids = torch.randint(vocab, (4, block + 1), generator=generator)
        return ids[:, :-1], ids[:, 1:]

    return get_batch


def test_finetune_pruned_equals_torch_prune_reparametrization():
    """Oracle: torch.nn.utils.prune keeps weight = weight_orig * mask and AdamW trains
    weight_orig, whose pruned entries get zero gradient (so Adam never moves them); the
    kept entries see the same gradients as ours, so the effective weights agree."""
    ours, oracle = tiny_gpt(dropout=0.1), tiny_gpt(dropout=0.1)
    # the head stays whole: its weight is the token embedding, which torch's
    # re-parametrization would untie
    layers = [m for m in ours.modules() if isinstance(m, nn.Linear)]
    body = [m.weight for m in layers if m is not ours.lm_head]
    body_masks = iter(global_magnitude_masks(body, 0.5))
    masks = [torch.ones_like(m.weight, dtype=torch.bool) if m is ours.lm_head
             else next(body_masks) for m in layers]
    torch.manual_seed(5)
    losses = finetune_pruned(ours, masks, _batches(11, 16), steps=6, lr=1e-2)
    layers = [m for m in oracle.modules() if isinstance(m, nn.Linear)]
    for layer, mask in zip(layers, masks):
        if layer is not oracle.lm_head:
            torch_prune.custom_from_mask(layer, "weight", mask)
    oracle.train()
    torch.manual_seed(5)  # the same dropout
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=1e-2, weight_decay=0.0)
    get_batch, expected = _batches(11, 16), []
    for _ in range(6):
        _, loss = oracle(*get_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected),
                               rtol=0, atol=1e-12)
    for w, layer in zip(linear_weights(ours), layers):  # weight = weight_orig * mask
        effective = getattr(layer, "weight_orig", layer.weight) * getattr(layer, "weight_mask", 1)
        torch.testing.assert_close(w, effective, rtol=0, atol=1e-12)
    assert sparsity(body) == pytest.approx(0.5, abs=1e-3)
    assert losses[-1] < losses[0]


def test_finetune_run_is_seeded_and_keeps_the_sparsity():
    corpus = CharCorpus()
    teacher = tiny_gpt(corpus.vocab_size, 16, dtype=torch.float32, dropout=0.1)
    settings = {**FINETUNE_SETTINGS, "steps": 3, "batch_size": 2, "block_size": 16}
    model, losses = finetune_run(teacher, corpus, 1, settings=settings)
    again, repeated = finetune_run(teacher, corpus, 1, settings=settings)
    _, other = finetune_run(teacher, corpus, 2, settings=settings)
    assert len(losses) == 3 and losses == repeated and losses != other
    assert sparsity(linear_weights(model)) == pytest.approx(0.6, abs=1e-3)
    assert sparsity(linear_weights(teacher)) == 0.0  # the teacher is left as it was
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_finetune_record_matches_settings(tmp_path):
    record = load_finetune_record()
    assert sorted(record) == FINETUNE_SETTINGS["seeds"]
    for run in record.values():
        assert len(run["step_loss"]) == FINETUNE_SETTINGS["steps"]
        assert 1.0 < run["val_loss"] < run["step_loss"][0]
    raw = json.loads(FINETUNE_RECORD.read_text())
    assert_refused(load_finetune_record, raw,
                   lambda r: r["settings"].update(steps=1),
                   lambda r: r["settings"].update(seeds=[0, 1]), tmp_path=tmp_path)


def test_finetune_bad_input():
    model = tiny_gpt()
    masks = global_magnitude_masks(linear_weights(model), 0.5)
    get_batch = _batches(11, 16)
    with pytest.raises(ValueError, match="masks must hold one mask per linear weight"):
        finetune_pruned(model, masks[:-1], get_batch, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        finetune_pruned(model, masks, get_batch, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        finetune_pruned(model, masks, get_batch, steps=1, lr=0.0)
    with pytest.raises(TypeError, match="get_batch"):
        finetune_pruned(model, masks, None, steps=1, lr=1e-3)
    with pytest.raises(TypeError, match="model"):
        finetune_pruned("gpt", masks, get_batch, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="seed"):
        finetune_run(model, CharCorpus(), -1)
