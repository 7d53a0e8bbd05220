"""Chapter 4's GPT <-> transformers' GPT2LMHeadModel: equal logits both ways (float64)."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_gpt
from torch import nn

from companion.compat import gpt2_config_of, gpt_from_hf, gpt_to_hf
from companion.transformer import GPT

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 0.0, "atol": 1e-10}


def _ids(vocab_size: int, shape=(3, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _hf_gpt2(seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    defaults = {"vocab_size": 13, "n_positions": 12, "n_embd": 12, "n_layer": 2, "n_head": 3}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**defaults, **config}))
    with torch.no_grad():  # GPT-2 starts with zero biases and unit norms: perturb them all
        for name, p in model.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("config", [
    {}, {"n_layer": 3, "n_head": 4, "n_embd": 32}, {"n_layer": 1, "n_head": 1},
    {"position_encoding": "sinusoidal"}, {"vocab_size": 2, "block_size": 5}])
def test_to_hf_gives_equal_logits(config):
    gpt = tiny_gpt(**config).eval()
    _perturb(gpt)
    hf = gpt.to_hf()
    ids = _ids(gpt.config.vocab_size, (3, gpt.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt(ids)[0], **TOL)
        # a shorter input, and a single token
        torch.testing.assert_close(hf(ids[:, :3]).logits, gpt(ids[:, :3])[0], **TOL)
        torch.testing.assert_close(hf(ids[:1, :1]).logits, gpt(ids[:1, :1])[0], **TOL)
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, as ours
    assert hf.dtype == torch.float64 and not hf.training


@torch.no_grad()
def _perturb(gpt: GPT) -> None:
    """Give the zero biases and unit norms of a fresh GPT random values."""
    for name, p in gpt.named_parameters():
        if "bias" in name or "norm" in name:
            p.add_(0.1 * torch.randn_like(p))


def test_hf_loss_equals_ours_on_the_shifted_targets():
    gpt = tiny_gpt().eval()
    ids = _ids(11)
    with torch.no_grad():
        ours = gpt(ids[:, :-1], targets=ids[:, 1:])[1]  # ours does not shift
        theirs = gpt.to_hf()(ids, labels=ids).loss  # transformers shifts inside
    # transformers computes its loss in float32 whatever the model's dtype
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-6, atol=0.0)


def test_gradients_agree():
    gpt = tiny_gpt()
    hf = gpt.to_hf()
    ids = _ids(11)
    gpt(ids[:, :-1], targets=ids[:, 1:])[1].backward()
    # transformers' own loss is float32: take the float64 cross-entropy of its logits
    logits = hf(ids).logits[:, :-1]
    nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    torch.testing.assert_close(hf.transformer.h[0].attn.c_attn.weight.grad,
                               gpt.blocks[0].attn.in_proj.weight.grad.T, **TOL)
    torch.testing.assert_close(hf.transformer.wte.weight.grad,
                               gpt.token_embedding.weight.grad, **TOL)


def test_round_trip_is_exact():
    gpt = tiny_gpt()
    _perturb(gpt)
    back = GPT.from_hf(gpt.to_hf())
    assert back.config == gpt.config
    ours, theirs = gpt.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert back.lm_head.weight is back.token_embedding.weight


def test_from_hf_takes_gpt2_settings_from_the_config():
    """A GPT-2 with its own GELU (tanh) and eps converts to equal logits and back."""
    hf = _hf_gpt2(activation_function="gelu_new", layer_norm_epsilon=1e-3)
    gpt = GPT.from_hf(hf)
    ids = _ids(13, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gpt(ids)[0], hf(ids).logits, **TOL)
        torch.testing.assert_close(gpt.to_hf()(ids).logits, hf(ids).logits, **TOL)
    assert gpt.blocks[0].mlp[1].approximate == "tanh" and gpt.final_norm.eps == 1e-3
    assert gpt.to_hf().config.activation_function == "gelu_new"


def test_the_exact_gelu_matters():
    """GPT-2's default tanh GELU is not ours: the config must say "gelu" to be equal."""
    gpt = tiny_gpt().eval()
    config = gpt2_config_of(gpt)
    assert config.activation_function == "gelu" and config.layer_norm_epsilon == 1e-5
    hf = gpt.to_hf()
    hf.config.activation_function = "gelu_new"
    for block in hf.transformer.h:
        block.mlp.act = transformers.activations.ACT2FN["gelu_new"]
    ids = _ids(11)
    with torch.no_grad():
        gap = (hf(ids).logits - gpt(ids)[0]).abs().max().item()
    assert gap > 1e3 * TOL["atol"]  # far outside the tolerance the other tests use


def test_mode_dtype_and_dropout_carry_over():
    gpt = tiny_gpt(dropout=0.25, dtype=torch.float32).train()
    hf = gpt.to_hf()
    assert hf.training and hf.dtype == torch.float32
    assert (hf.config.attn_pdrop, hf.config.resid_pdrop, hf.config.embd_pdrop) == (0.25,) * 3
    back = GPT.from_hf(hf.eval())
    assert back.config.dropout == 0.25 and not back.training
    assert back.token_embedding.weight.dtype == torch.float32


def test_greedy_generation_agrees():
    gpt = tiny_gpt().eval()
    prompt = _ids(11, (2, 4))
    ours = gpt.generate(prompt, 8, temperature=0.0)
    theirs = gpt.to_hf().generate(prompt, max_new_tokens=8, do_sample=False,
                                  attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="gpt"):
        gpt_to_hf(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        gpt_from_hf(tiny_gpt())
    with pytest.raises(TypeError, match="model"):
        GPT.from_hf(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8,
                                                                   n_head=2)))
    gpt = tiny_gpt()
    gpt.blocks[0].mlp_norm.eps = 1e-6
    with pytest.raises(ValueError, match="eps"):
        gpt.to_hf()
    gpt = tiny_gpt()
    gpt.blocks[1].mlp[1] = nn.ReLU()
    with pytest.raises(ValueError, match="GELU"):
        gpt.to_hf()


@pytest.mark.parametrize("config, match", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 20}, "n_inner"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn"),
    ({"scale_attn_weights": False}, "scale_attn"),
    ({"attn_pdrop": 0.0}, "pdrop"),
])
def test_from_hf_refuses_what_the_gpt_does_not_compute(config, match):
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(_hf_gpt2(**config))


def test_from_hf_refuses_an_untied_head():
    hf = _hf_gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="tied"):
        GPT.from_hf(hf)
