"""companion.finetune: which parameters each adaptation trains, optimizer-state bytes as
torch.optim.AdamW allocates them, rehearsal batches, and the at-scale memory arithmetic."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from factories import assert_refused, tiny_gpt

from companion.data import CharCorpus
from companion.finetune import (
    ADAPTATION_RECORD,
    BOOK_SETTINGS,
    HALF_DOCS_RUN,
    LR_GRID,
    LR_GRID_RECORD,
    QLORA_BITS_PER_PARAMETER,
    QUANTIZED_RUN,
    RECIPES,
    SCRATCH_RECORD,
    VARIANTS,
    FineTuneSettings,
    adapt,
    adaptation_settings,
    domain_loss,
    fine_tune,
    finetuning_memory,
    load_adaptation_record,
    load_code_corpus,
    load_lr_grid_record,
    load_scratch_record,
    lora_shapes,
    make_optimizer,
    optimizer_state_bytes,
    prepare_adaptation,
    run_recipe,
    select_learning_rate,
    steps_to_reach,
    train_from_scratch,
    training_step,
    untie_head,
)
from companion.lora import count_parameters
from companion.scale import LLAMA2_70B, LLAMA_7B
from companion.train import LMHistory, fixed_windows, language_model_loss
from companion.transformer import GPT

D, V, L = 16, 7, 2


def small_gpt() -> GPT:
    return tiny_gpt(vocab_size=V, block_size=8, n_layer=L, n_embd=D, dtype=torch.float32)


def test_untie_head_keeps_outputs_and_separates_the_matrices():
    model = small_gpt()
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
    counts = {method: count_parameters(prepare_adaptation(small_gpt(), method))
              for method in ("full", "last_block", "head")}
    assert counts["full"] == small_gpt().num_parameters()
    assert counts["head"] == V * D + 2 * D  # untied head + final LayerNorm
    assert counts["last_block"] == counts["head"] + block
    lora = prepare_adaptation(small_gpt(), "lora", rank=2, target_modules=["in_proj"])
    assert count_parameters(lora) == L * 2 * (D + 3 * D)
    head = prepare_adaptation(small_gpt(), "head")
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        "final_norm.weight", "final_norm.bias", "lm_head.weight"}
    with pytest.raises(ValueError, match="method"):
        prepare_adaptation(small_gpt(), "adapters")


@pytest.mark.parametrize("method", ["full", "head", "lora"])
def test_optimizer_state_bytes_are_adams_two_moments(method):
    model = prepare_adaptation(small_gpt(), method)
    optimizer = make_optimizer(model, 1e-3)
    assert optimizer_state_bytes(optimizer) == 0
    x = torch.randint(V, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 2 * 4 * count_parameters(model)


def test_fine_tune_trains_only_the_chosen_parameters_and_mixes_rows():
    corpus = CharCorpus("abcdefg" * 40)
    original = CharCorpus("gfedcba" * 40, tokenizer=corpus.tokenizer)
    model = prepare_adaptation(small_gpt(), "head")
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


def test_training_step_is_one_adamw_step_of_fine_tune_without_clipping():
    x = torch.randint(V, (3, 8), generator=torch.Generator().manual_seed(1))
    ours, reference = small_gpt(), small_gpt()
    step = training_step(ours, x, x, make_optimizer(ours, 1e-2))
    step()
    step()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        optimizer.zero_grad()
        reference(x, x)[1].backward()
        optimizer.step()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(TypeError, match="optimizer"):
        training_step(ours, x, x, None)


def test_train_from_scratch_is_seeded_and_matches_a_manual_run():
    corpus = CharCorpus("abcdefg" * 40)
    config = small_gpt().config
    settings = FineTuneSettings(steps=4, batch_size=2, block_size=8, eval_every=2,
                                eval_windows=2)
    model, history = train_from_scratch(config, corpus, settings, seed=3)
    torch.manual_seed(3)
    manual = GPT(config)
    assert fine_tune(manual, corpus, settings, seed=3).val_loss == history.val_loss
    assert train_from_scratch(config, corpus, settings, seed=3)[1].val_loss == history.val_loss
    assert train_from_scratch(config, corpus, settings, seed=4)[1].val_loss != history.val_loss
    with pytest.raises(ValueError, match="seed"):
        train_from_scratch(config, corpus, settings, seed=-1)


def test_code_corpus_uses_the_given_vocabulary():
    from companion.data import CharTokenizer

    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?\n")
    corpus, replaced = load_code_corpus(tokenizer)
    assert corpus.tokenizer is tokenizer and corpus.vocab_size == len(tokenizer.itos)
    assert replaced > 0 and len(corpus.train_ids) + len(corpus.val_ids) == 253_978


def test_scratch_record_is_the_book_settings_and_starts_where_a_fresh_model_does(tmp_path):
    record = load_scratch_record()
    assert sorted(record) == [0, 1, 2]
    first = list(range(0, BOOK_SETTINGS.steps + 1, BOOK_SETTINGS.eval_every))
    for history in record.values():
        assert history.eval_step[:len(first)] == first
        assert len(history.eval_step) == len(history.val_loss) > 100
        # an untrained model predicts about uniformly over the 103 characters: ln 103
        assert abs(history.val_loss[0] - torch.log(torch.tensor(103.0)).item()) < 0.2
    changed = json.loads(SCRATCH_RECORD.read_text())
    changed["settings"]["lr"] = 3e-3
    path = tmp_path / "record.json"
    path.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="re-record"):
        load_scratch_record(path)


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


@pytest.fixture
def two_domains():
    """A tiny 'code' corpus, a 'documentation' corpus, settings, a GPT and its weights."""
    corpus = CharCorpus("abcdefg" * 40)
    original = CharCorpus("gfedcba" * 40, tokenizer=corpus.tokenizer)
    settings = FineTuneSettings(steps=4, batch_size=4, block_size=8, eval_every=2,
                                eval_windows=2)
    model = small_gpt()
    return corpus, original, settings, model, copy.deepcopy(model.state_dict())


def test_run_recipe_is_fine_tune_of_the_recipe_and_measures_both_domains(two_domains):
    corpus, original, settings, model, pretrained = two_domains
    for recipe, (method, options, mix) in RECIPES.items():
        net, losses = run_recipe(model, corpus, original, recipe, 1e-2, seed=1,
                                 settings=settings)
        torch.manual_seed(1)
        manual = prepare_adaptation(copy.deepcopy(model), method, **options)
        history = fine_tune(manual, corpus, replace(settings, lr=1e-2), seed=1,
                            original=original if mix else None, mix_fraction=mix)
        assert losses["code_loss"] == history.val_loss[-1], recipe
        assert losses["val_loss"] == history.val_loss, recipe
        windows = fixed_windows(original.ids("val"), 8, 2)
        assert losses["docs_loss"] == domain_loss(net, original, settings), recipe
        assert losses["docs_loss"] == language_model_loss(manual, *windows), recipe
        assert losses["docs_loss"] == language_model_loss(net, *windows), recipe
    for key, value in model.state_dict().items():  # the pretrained model is not touched
        assert torch.equal(value, pretrained[key]), key
    with pytest.raises(ValueError, match="recipe"):
        run_recipe(model, corpus, original, "adapters", 1e-2, seed=0, settings=settings)
    with pytest.raises(ValueError, match="lr"):
        run_recipe(model, corpus, original, "full", 0.0, seed=0, settings=settings)


def test_adapt_is_prepare_adaptation_then_fine_tune_on_a_copy(two_domains):
    corpus, original, settings, model, pretrained = two_domains
    net, history = adapt(model, corpus, "lora", 1e-2, 2, settings,
                         options={"rank": 2, "alpha": 4.0}, original=original,
                         mix_fraction=0.5)
    torch.manual_seed(2)
    manual = prepare_adaptation(copy.deepcopy(model), "lora", rank=2, alpha=4.0)
    expected = fine_tune(manual, corpus, replace(settings, lr=1e-2), seed=2,
                         original=original, mix_fraction=0.5)
    assert history.val_loss == expected.val_loss and history.eval_step == [0, 2, 4]
    for (name, p), q in zip(net.named_parameters(), manual.parameters()):
        assert torch.equal(p, q), name
    for key, value in model.state_dict().items():  # the model itself is not touched
        assert torch.equal(value, pretrained[key]), key
    short = adapt(model, corpus, "lora", 1e-2, 2, replace(settings, steps=2),
                  options={"rank": 2, "alpha": 4.0}, original=original, mix_fraction=0.5)
    assert short[1].val_loss == history.val_loss[:2]  # a prefix of the longer run
    with pytest.raises(ValueError, match="lr"):
        adapt(model, corpus, "full", -1e-3, 0, settings)
    with pytest.raises(ValueError, match="seed"):
        adapt(model, corpus, "full", 1e-3, -1, settings)
    with pytest.raises(ValueError, match="method"):
        adapt(model, corpus, "adapters", 1e-3, 0, settings)


def test_domain_loss_is_the_loss_on_fixed_validation_windows():
    corpus = CharCorpus("abcdefg" * 60)
    model = small_gpt()
    settings = FineTuneSettings(block_size=8, eval_windows=3)
    windows = fixed_windows(corpus.ids("val"), 8, 3)
    assert domain_loss(model, corpus, settings) == language_model_loss(model, *windows)


def test_select_learning_rate_takes_the_lowest_mean_and_skips_diverged_rates():
    losses = {1e-4: [2.0, 2.2], 1e-3: [2.05, 2.05], 1e-2: [1.0, float("nan")]}
    assert select_learning_rate(losses) == 1e-3
    assert select_learning_rate({3e-4: [2.5]}) == 3e-4
    with pytest.raises(ValueError, match="finite"):
        select_learning_rate({1e-3: [float("inf")]})
    with pytest.raises(ValueError, match="finite"):
        select_learning_rate({})
    with pytest.raises(TypeError, match="code_loss"):
        select_learning_rate([(1e-3, [2.0])])


def test_lr_grid_record_is_complete_and_refuses_other_settings(tmp_path):
    runs = load_lr_grid_record()
    record = json.loads(LR_GRID_RECORD.read_text())
    assert record["threads"] == 1 and record["seeds"] == [0, 1, 2]
    assert len(runs) == len(RECIPES) * len(LR_GRID) * 3
    assert all(math.isfinite(v["code_loss"]) and math.isfinite(v["docs_loss"])
               for v in runs.values())
    n_points = BOOK_SETTINGS.steps // BOOK_SETTINGS.eval_every + 1
    for run in runs.values():  # the curve ends at the final loss ...
        assert len(run["val_loss"]) == n_points and run["val_loss"][-1] == run["code_loss"]
    # ... and starts at the pretrained model's loss, the same for every run
    assert len({run["val_loss"][0] for run in runs.values()}) == 1
    changes = (lambda r: r["settings"].update(steps=60),
               lambda r: r.update(lr_grid=[1e-3]),
               lambda r: r["recipes"]["LoRA r=4"][1].update(rank=8),
               lambda r: r["runs"].pop())
    assert_refused(load_lr_grid_record, record, *changes, tmp_path=tmp_path)


def test_adaptation_record_is_complete_and_refuses_other_settings(tmp_path):
    grid = load_lr_grid_record()
    runs = load_adaptation_record(grid=grid)
    settings = adaptation_settings(grid)
    assert settings["quantized"]["lr"] == 3e-3  # LoRA's best rate in the grid
    assert settings["half_docs"]["lr"] == 3e-4  # rehearsal's best rate in the grid
    assert sorted(runs) == sorted([(name, 0) for name in VARIANTS]
                                  + [(QUANTIZED_RUN, seed) for seed in (0, 1, 2)]
                                  + [(HALF_DOCS_RUN, seed) for seed in (0, 1, 2)])
    start = next(iter(grid.values()))["val_loss"][0]
    for (name, _), run in runs.items():  # before any step: the pretrained model, or
        if name == QUANTIZED_RUN:  # its rounding to 4 bits, a little worse
            assert start < run["val_loss"][0] < start + 0.01
        else:
            assert run["val_loss"][0] == start
        assert run["code_loss"] == run["val_loss"][-1] < start
        assert math.isfinite(run["docs_loss"])
    # a grid that selects another rate for LoRA refuses the record
    other = copy.deepcopy(grid)
    for seed in (0, 1, 2):
        other["LoRA r=4", 1e-3, seed]["code_loss"] = 0.0
    with pytest.raises(ValueError, match="re-record"):
        load_adaptation_record(grid=other)
    record = json.loads(ADAPTATION_RECORD.read_text())
    changes = (lambda r: r["settings"]["fine_tune"].update(steps=60),
               lambda r: r["settings"]["variants"].pop("LoRA r=1"),
               lambda r: r["settings"]["quantized"].update(bits=8),
               lambda r: r["settings"]["half_docs"].update(mix_fraction=0.25),
               lambda r: r["runs"].pop())
    assert_refused(lambda path: load_adaptation_record(path, grid=grid), record, *changes,
                   tmp_path=tmp_path)
