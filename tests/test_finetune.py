"""companion.finetune: which parameters each adaptation trains, optimizer-state bytes as
torch.optim.AdamW allocates them, rehearsal batches, and the at-scale memory arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from companion.data import CharCorpus
from companion.finetune import (
    QLORA_BITS_PER_PARAMETER,
    FineTuneSettings,
    fine_tune,
    finetuning_memory,
    lora_shapes,
    make_optimizer,
    optimizer_state_bytes,
    prepare_adaptation,
    steps_to_reach,
    untie_head,
)
from companion.lora import count_parameters
from companion.scale import LLAMA2_70B, LLAMA_7B
from companion.train import LMHistory
from companion.transformer import GPT, GPTConfig

D, V, L = 16, 7, 2


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=L, n_head=2, n_embd=D, dropout=0.0))


def test_untie_head_keeps_outputs_and_separates_the_matrices():
    model = tiny_gpt()
    x = torch.randint(V, (2, 8))
    before = model(x)[0]
    untie_head(model)
    assert model.lm_head.weight is not model.token_embedding.weight
    assert torch.equal(model(x)[0], before)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, model.token_embedding.weight)


def test_each_method_trains_what_it_says():
    block = 12 * D * D + 13 * D  # one Transformer block
    counts = {method: count_parameters(prepare_adaptation(tiny_gpt(), method))
              for method in ("full", "last_block", "head")}
    assert counts["full"] == tiny_gpt().num_parameters()
    assert counts["head"] == V * D + 2 * D  # untied head + final LayerNorm
    assert counts["last_block"] == counts["head"] + block
    lora = prepare_adaptation(tiny_gpt(), "lora", rank=2, target_modules=["in_proj"])
    assert count_parameters(lora) == L * 2 * (D + 3 * D)
    head = prepare_adaptation(tiny_gpt(), "head")
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        "final_norm.weight", "final_norm.bias", "lm_head.weight"}
    with pytest.raises(ValueError, match="method"):
        prepare_adaptation(tiny_gpt(), "adapters")


@pytest.mark.parametrize("method", ["full", "head", "lora"])
def test_optimizer_state_bytes_are_adams_two_moments(method):
    model = prepare_adaptation(tiny_gpt(), method)
    optimizer = make_optimizer(model, 1e-3)
    assert optimizer_state_bytes(optimizer) == 0
    x = torch.randint(V, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 2 * 4 * count_parameters(model)


def test_fine_tune_trains_only_the_chosen_parameters_and_mixes_rows():
    corpus = CharCorpus("abcdefg" * 40)
    original = CharCorpus("gfedcba" * 40, tokenizer=corpus.tokenizer)
    model = prepare_adaptation(tiny_gpt(), "head")
    frozen = copy.deepcopy(model.blocks.state_dict())
    settings = FineTuneSettings(steps=6, batch_size=4, block_size=8, eval_every=3,
                                eval_windows=2)
    history = fine_tune(model, corpus, settings, seed=0, original=original, mix_fraction=0.5)
    assert history.eval_step == [0, 3, 6] and len(history.step_loss) == 6
    assert history.val_loss[-1] < history.val_loss[0]
    for key, value in model.blocks.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    with pytest.raises(ValueError, match="original"):
        fine_tune(model, corpus, settings, mix_fraction=0.5)
    with pytest.raises(ValueError, match="mix_fraction"):
        fine_tune(model, corpus, settings, original=original, mix_fraction=1.0)


def test_steps_to_reach():
    history = LMHistory(eval_step=[0, 10, 20], val_loss=[3.0, 2.0, 1.5])
    assert steps_to_reach(history, 2.0) == 10
    assert steps_to_reach(history, 1.0) is None


def test_lora_shapes_and_memory_arithmetic():
    shapes = lora_shapes(LLAMA_7B)
    assert len(shapes) == 4 * 32 and shapes[0] == (4096, 4096)
    assert sum(16 * (a + b) for a, b in shapes) == 16 * 8192 * 4 * 32
    gqa = lora_shapes(LLAMA2_70B, ("k",))
    assert gqa[0] == (8192, 1024)  # 8 key/value heads of 128
    assert len(lora_shapes(LLAMA_7B, ("mlp",))) == 3 * 32  # SwiGLU has three matrices
    n = LLAMA_7B.checkpoint_parameters
    assert finetuning_memory(n, "full") == 16 * n
    assert finetuning_memory(n, "lora", 1000) == 2 * n + 16 * 1000
    assert finetuning_memory(n, "qlora", 1000) == pytest.approx(
        n * QLORA_BITS_PER_PARAMETER / 8 + 16 * 1000)
    assert QLORA_BITS_PER_PARAMETER - 4 == pytest.approx(0.127, abs=1e-3)
    with pytest.raises(ValueError, match="n_trainable"):
        finetuning_memory(n, "lora")
    with pytest.raises(ValueError, match="targets"):
        lora_shapes(LLAMA_7B, ("query",))
