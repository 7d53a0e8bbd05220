"""companion.lora against Hugging Face PEFT (``LoraConfig`` / ``get_peft_model``) and the
exact identities of LoRA: same initial A from the same seed, same outputs, gradients and
optimizer step, same trainable-parameter counts, same merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import tiny_gpt
from peft import LoraConfig, get_peft_model
from torch import nn

from companion.lora import (
    LoRALinear,
    add_lora,
    count_parameters,
    lora_layers,
    lora_parameter_count,
    merge_lora,
)
from companion.transformer import GPT

TARGETS = {"attention": ["in_proj", "out_proj"], "mlp": ["mlp.0", "mlp.2"],
           "all": ["in_proj", "out_proj", "mlp.0", "mlp.2"]}


def small_gpt(device="cpu", dropout=0.0) -> GPT:
    return tiny_gpt(vocab_size=13, block_size=16, n_embd=24, dropout=dropout, device=device)


def ours_and_peft(model: nn.Module, targets, rank, alpha, dropout=0.0, seed=1):
    """The same model adapted twice, by companion.lora and by PEFT, from the same seed."""
    ours = copy.deepcopy(model)
    torch.manual_seed(seed)
    add_lora(ours, targets, rank, alpha, dropout)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft = get_peft_model(copy.deepcopy(model), config)
    return ours, peft


def peft_state(peft) -> dict[str, torch.Tensor]:
    """PEFT's state_dict under our names (no ``base_model.model.`` prefix, no adapter name)."""
    return {k.removeprefix("base_model.model.").replace(".default", ""): v
            for k, v in peft.state_dict().items()}


def randomise_b(ours, peft, seed=2):
    """Give B non-zero values (the same in both) so that the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    peft_modules = dict(peft.named_modules())
    for name, layer in lora_layers(ours):
        b = torch.randn(layer.lora_B.weight.shape, generator=g, dtype=torch.float64) * 0.1
        with torch.no_grad():
            layer.lora_B.weight.copy_(b)
            peft_modules[f"base_model.model.{name}"].lora_B["default"].weight.copy_(b)


def batch(model, device, n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randint(cfg.vocab_size, (n, cfg.block_size), generator=g).to(device)
    y = torch.randint(cfg.vocab_size, (n, cfg.block_size), generator=g).to(device)
    return x, y


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_same_initial_adapters_and_unchanged_model_as_peft(targets, rank):
    model = small_gpt()
    ours, peft = ours_and_peft(model, targets, rank, alpha=2 * rank)
    ps, os_ = peft_state(peft), ours.state_dict()
    assert set(ps) == set(os_)
    for key, value in os_.items():
        assert torch.equal(value, ps[key]), key  # A drawn identically, B = 0, base unchanged
    x, _ = batch(model, "cpu")
    assert torch.equal(ours(x)[0], model(x)[0])  # B = 0: the model starts exactly unchanged


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("rank", [1, 8])
def test_trainable_parameters_equal_formula_and_peft(targets, rank):
    model = small_gpt()
    ours, peft = ours_and_peft(model, targets, rank, alpha=16)
    shapes = [(m.in_features, m.out_features) for _, m in lora_layers(ours)]
    expected = lora_parameter_count(shapes, rank)
    assert count_parameters(ours) == expected == peft.get_nb_trainable_parameters()[0]
    assert count_parameters(ours, trainable_only=False) == peft.get_nb_trainable_parameters()[1]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n.removeprefix("base_model.model.").replace(".default", "")
                         for n, p in peft.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS.keys())
def test_outputs_gradients_and_one_step_equal_peft(targets, device):
    model = small_gpt(device)
    ours, peft = ours_and_peft(model, targets, rank=4, alpha=8)
    randomise_b(ours, peft)
    x, y = batch(model, device)
    logits_ours, loss_ours = ours(x, y)
    logits_peft, loss_peft = peft(x, y)
    torch.testing.assert_close(logits_ours, logits_peft, rtol=0, atol=1e-13)
    assert not torch.allclose(logits_ours, model(x)[0])  # the update is really there
    loss_ours.backward()
    loss_peft.backward()
    peft_params = dict(peft.named_parameters())
    ours_params = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    for name, p in ours_params:
        q = peft_params["base_model.model." + name.replace("lora_A.", "lora_A.default.")
                        .replace("lora_B.", "lora_B.default.")]
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-13)
    opt_ours = torch.optim.AdamW([p for _, p in ours_params], lr=1e-2)
    opt_peft = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    opt_ours.step()
    opt_peft.step()
    ps = peft_state(peft)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ps[key], rtol=0, atol=1e-13)
    torch.testing.assert_close(ours(x)[0], peft(x)[0], rtol=0, atol=1e-13)


def test_dropout_draws_as_peft():
    model = small_gpt()
    ours, peft = ours_and_peft(model, TARGETS["all"], rank=4, alpha=8, dropout=0.25)
    randomise_b(ours, peft)
    x, _ = batch(model, "cpu")
    ours.train()
    peft.train()
    torch.manual_seed(5)
    out_ours = ours(x)[0]
    torch.manual_seed(5)
    out_peft = peft(x)[0]
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=1e-13)
    ours.eval()
    assert not torch.allclose(out_ours, ours(x)[0])  # dropout did act in training mode


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS.keys())
def test_merge_equals_unmerged_and_peft_merged_weights(targets):
    model = small_gpt()
    ours, peft = ours_and_peft(model, targets, rank=4, alpha=8)
    randomise_b(ours, peft)
    x, _ = batch(model, "cpu")
    unmerged = ours(x)[0]
    merged = merge_lora(ours)
    assert not lora_layers(merged)
    assert all(type(merged.get_submodule(n)) is nn.Linear
               for n, _ in model.named_modules() if any(n.endswith(t) for t in targets))
    assert (merged(x)[0] - unmerged).abs().max() < 1e-12
    reference = peft.merge_and_unload()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-15)


def test_merge_unmerge_in_place_as_peft():
    model = small_gpt()
    ours, peft = ours_and_peft(model, TARGETS["all"], rank=2, alpha=3)
    randomise_b(ours, peft)
    x, _ = batch(model, "cpu")
    before = ours(x)[0]
    for _, layer in lora_layers(ours):
        layer.merge()
    peft.merge_adapter()
    ps = peft_state(peft)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ps[key], rtol=0, atol=1e-15)
    assert (ours(x)[0] - before).abs().max() < 1e-12
    for (name, layer), (_, original) in zip(lora_layers(ours), lora_layers(copy.deepcopy(ours))):
        layer.unmerge()
        base = model.get_submodule(name)
        assert (layer.base_layer.weight - base.weight).abs().max() < 1e-15
        assert not torch.equal(original.base_layer.weight, base.weight)  # it was merged


def test_plain_modules_and_layer_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ours, peft = ours_and_peft(net, ["0", "2"], rank=3, alpha=6)
    randomise_b(ours, peft)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peft(x), rtol=0, atol=1e-14)
    layer = ours[0]
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    a, b, w, bias = (layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight,
                     layer.base_layer.bias)
    formula = x @ w.T + bias + (6 / 3) * x @ a.T @ b.T  # the equation of the docstring
    torch.testing.assert_close(layer(x), formula, rtol=0, atol=1e-14)
    assert count_parameters(ours) == 3 * (5 + 7) + 3 * (7 + 3)


def test_bad_input_raises_clearly():
    model = small_gpt()
    with pytest.raises(ValueError, match="rank"):
        add_lora(copy.deepcopy(model), "in_proj", 0, 1.0)
    with pytest.raises(TypeError, match="rank"):
        add_lora(copy.deepcopy(model), "in_proj", 2.0, 1.0)
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            add_lora(copy.deepcopy(model), "in_proj", 2, alpha)
    with pytest.raises(ValueError, match="'q_proj' matches no module"):
        add_lora(copy.deepcopy(model), ["in_proj", "q_proj"], 2, 1.0)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(copy.deepcopy(model), [], 2, 1.0)
    with pytest.raises(TypeError, match="attn_norm.*LayerNorm"):
        add_lora(copy.deepcopy(model), "attn_norm", 2, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(3, 3), 1, 1.0, dropout=1.0)
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(3, 3, 1), 1, 1.0)
    adapted = add_lora(copy.deepcopy(model), "in_proj", 2, 1.0)
    with pytest.raises(TypeError, match="LoRALinear"):  # adding LoRA twice
        add_lora(adapted, "in_proj", 2, 1.0)
    layer = lora_layers(adapted)[0][1]
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    merged = merge_lora(adapted)
    with pytest.raises(ValueError, match="merged already"):
        merge_lora(merged)
