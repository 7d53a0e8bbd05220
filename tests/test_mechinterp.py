"""Tests for companion.mechinterp: the logit lens, activation patching (against nnsight),
head ablation, induction scores, probes with control tasks and the sparse autoencoder
(against its float64 formula written out by hand)."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_gpt

from companion.mechinterp import (
    INDUCTION,
    AttentionOnlyGPT,
    SparseAutoencoder,
    ablate_heads,
    activation_patching,
    analyse_induction,
    bracket_labels,
    control_labels,
    copy_losses,
    head_groups,
    in_context_bigram_batch,
    in_context_gain,
    induction_scores,
    load_induction,
    logit_difference,
    logit_lens,
    patch_residual,
    previous_token_scores,
    probe_accuracy,
    repeated_random_tokens,
    residual_stream,
    sae_loss,
    sae_statistics,
    task_loss,
    token_losses,
    train_induction_model,
    train_sae,
)
from companion.transformer import GPTConfig


@pytest.fixture
def model():
    return tiny_gpt(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=16).eval()


def _ids(seed, shape=(2, 8), vocab=11):
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_residual_stream_shapes_and_first_entry_is_the_embedding(model):
    idx = _ids(0)
    stream = residual_stream(model, idx)
    assert stream.shape == (4, 2, 8, 16)
    embedding = model.token_embedding(idx) + model.position_embedding(torch.arange(8))
    torch.testing.assert_close(stream[0], embedding, rtol=0, atol=0)


def test_logit_lens_last_layer_is_the_model_output(model):
    idx = _ids(1)
    lens = logit_lens(model, idx)
    assert lens.shape == (4, 2, 8, 11)
    torch.testing.assert_close(lens[-1], model(idx)[0], rtol=0, atol=0)
    # an earlier layer decodes differently
    assert (lens[1] - lens[-1]).abs().max() > 1e-3


def test_patching_clean_into_clean_changes_nothing(model):
    idx = _ids(2)
    clean = residual_stream(model, idx)
    out = model(idx)[0]
    for layer in range(4):
        with patch_residual(model, layer, clean[layer], 3):
            torch.testing.assert_close(model(idx)[0], out, rtol=0, atol=0)
    scores = activation_patching(model, idx, idx, lambda logits: logit_difference(logits, 1, 2))
    torch.testing.assert_close(scores, logit_difference(out, 1, 2).mean().expand(4, 8),
                               rtol=0, atol=0)


def test_patching_the_whole_final_residual_restores_the_clean_output(model):
    clean_idx, corrupted_idx = _ids(3), _ids(4)
    clean = residual_stream(model, clean_idx)
    with patch_residual(model, 3, clean[3]):
        patched = model(corrupted_idx)[0]
    torch.testing.assert_close(patched, model(clean_idx)[0], rtol=0, atol=0)
    assert (model(corrupted_idx)[0] - patched).abs().max() > 1e-3  # the hook was removed


def test_patching_at_a_later_position_leaves_earlier_logits_alone(model):
    clean_idx, corrupted_idx = _ids(5), _ids(6)
    clean = residual_stream(model, clean_idx)
    with patch_residual(model, 1, clean[1], 5):
        patched = model(corrupted_idx)[0]
    out = model(corrupted_idx)[0]
    torch.testing.assert_close(patched[:, :5], out[:, :5], rtol=0, atol=0)
    assert (patched[:, 5:] - out[:, 5:]).abs().max() > 1e-6


def test_activation_patching_equals_nnsight(model):
    nnsight = pytest.importorskip("nnsight")
    clean_idx, corrupted_idx = _ids(7, (1, 6)), _ids(8, (1, 6))
    scores = activation_patching(model, clean_idx, corrupted_idx,
                                 lambda logits: logit_difference(logits, 3, 4))
    traced = nnsight.NNsight(model)
    sites = [*traced.blocks, traced.final_norm]
    cache = []
    for site in sites:
        with torch.no_grad():
            with traced.trace(clean_idx):
                saved = site.input.save()
        cache.append(saved)
    expected = torch.empty(4, 6, dtype=torch.float64)
    for layer, site in enumerate(sites):
        for t in range(6):
            with torch.no_grad():
                with traced.trace(corrupted_idx):
                    site.input[:, t] = cache[layer][:, t]
                    out = traced.output.save()
            expected[layer, t] = logit_difference(out[0], 3, 4).mean()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)


def test_patching_rejects_bad_input(model):
    with pytest.raises(ValueError, match="same shape"):
        activation_patching(model, _ids(0, (1, 5)), _ids(0, (1, 6)), lambda x: x.sum())
    with pytest.raises(TypeError, match="metric"):
        activation_patching(model, _ids(0), _ids(1), 3)
    with pytest.raises(ValueError, match="layer"):
        with patch_residual(model, 4, torch.zeros(2, 8, 16)):
            pass
    with pytest.raises(TypeError, match="model"):
        residual_stream(torch.nn.Linear(2, 2), _ids(0))


def test_ablating_a_head_equals_zeroing_its_value_weights(model):
    idx = _ids(9)
    with ablate_heads(model, [(1, 0)]):
        ablated = model(idx)[0]
    hs = 8
    twin = tiny_gpt(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # head 0's value rows and bias: its output is then zero
        w = twin.blocks[1].attn.in_proj.weight
        w[2 * 16:2 * 16 + hs] = 0
        twin.blocks[1].attn.in_proj.bias[2 * 16:2 * 16 + hs] = 0
    torch.testing.assert_close(ablated, twin(idx)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(idx)[0], tiny_gpt(vocab_size=11, block_size=16,
                               n_layer=3, n_head=2, n_embd=16).eval()(idx)[0])
    with pytest.raises(ValueError, match="head"):
        with ablate_heads(model, [(0, 2)]):
            pass


def test_induction_score_of_a_hand_made_attention_pattern(model):
    idx = repeated_random_tokens(3, 5, 11, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 10)
    torch.testing.assert_close(idx[:, :5], idx[:, 5:], rtol=0, atol=0)
    scores = induction_scores(model, idx, 5)
    maps = model.attention_maps(idx)
    by_hand = torch.tensor([[sum(float(maps[layer][:, h, i, i - 4].mean())
                                 for i in range(5, 10)) / 5 for h in range(2)]
                            for layer in range(3)], dtype=torch.float64)
    torch.testing.assert_close(scores, by_hand, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 \\* length"):
        induction_scores(model, idx, 4)


def test_token_losses_and_in_context_gain(model):
    idx = repeated_random_tokens(2, 4, 11, torch.Generator().manual_seed(1))
    losses = token_losses(model, idx)
    logits = model(idx[:, :-1])[0]
    expected = -torch.log_softmax(logits, -1).gather(-1, idx[:, 1:, None])[..., 0]
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
    gain = in_context_gain(model, idx, 4)
    assert gain == pytest.approx(float(losses[:, :3].mean() - losses[:, 4:].mean()))
    with pytest.raises(ValueError, match="2 \\* length"):
        in_context_gain(model, idx, 3)


def test_bracket_labels():
    assert bracket_labels("a(b(c)d)e)f").tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert bracket_labels("").numel() == 0


def test_control_labels_are_a_function_of_the_type():
    ids = torch.tensor([3, 1, 3, 2, 1, 3, 5])
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    control = control_labels(ids, labels, torch.Generator().manual_seed(0))
    for t in ids.unique():
        assert control[ids == t].unique().numel() == 1
    assert set(control.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="same shape"):
        control_labels(ids, labels[:3])


def test_probe_accuracy_separable_and_random():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] > 0).long()
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.95
    noise = torch.randint(2, (400,), generator=g)
    assert probe_accuracy(x[:200], noise[:200], x[200:], noise[200:]) < 0.7


def test_sae_forward_equals_the_float64_formula():
    torch.manual_seed(0)
    sae = SparseAutoencoder(6, 10).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    f = torch.zeros(7, 10, dtype=torch.float64)
    for n in range(7):
        for j in range(10):
            pre = sum((x[n, i] - b_dec[i]) * W_enc[i, j] for i in range(6)) + b_enc[j]
            f[n, j] = max(float(pre), 0.0)
    x_hat = torch.stack([torch.stack([sum(f[n, j] * W_dec[j, i] for j in range(10)) + b_dec[i]
                                      for i in range(6)]) for n in range(7)])
    got_hat, got_f = sae(x)
    torch.testing.assert_close(got_f, f, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_hat, x_hat, rtol=0, atol=1e-12)
    penalty = sum(float(f[n, j]) * float(W_dec[j].norm()) for n in range(7) for j in range(10))
    expected = float(((x - x_hat) ** 2).sum()) / 7 + 0.5 * penalty / 7
    with torch.no_grad():
        assert float(sae_loss(sae, x, 0.5)) == pytest.approx(expected, rel=1e-12)


def test_sae_statistics_by_hand():
    torch.manual_seed(1)
    sae = SparseAutoencoder(4, 6).double()
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([-9.0, 0, 0, 0, 0, -9.0]))  # features 0, 5 dead
    x = torch.randn(20, 4, dtype=torch.float64)
    x_hat, f = sae(x)
    rows = x.tolist()
    mean = [sum(r[i] for r in rows) / 20 for i in range(4)]
    total = sum((r[i] - mean[i]) ** 2 for r in rows for i in range(4))
    residual = sum((a - b) ** 2 for r, h in zip(rows, x_hat.tolist()) for a, b in zip(r, h))
    active = [[v > 0 for v in row] for row in f.tolist()]
    stats = sae_statistics(sae, x)
    assert stats["explained_variance"] == pytest.approx(1 - residual / total, rel=1e-12)
    assert stats["l0"] == pytest.approx(sum(map(sum, active)) / 20, rel=1e-12)
    dead = sum(not any(row[j] for row in active) for j in range(6)) / 6
    assert dead >= 2 / 6 and stats["dead_fraction"] == pytest.approx(dead, rel=1e-12)


def test_sae_trains_to_reconstruct_sparse_data():
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    codes = torch.rand(2000, 8, generator=g) * (torch.rand(2000, 8, generator=g) < 0.2)
    x = codes @ directions
    sae, losses = train_sae(x, 32, l1_coefficient=1e-3, steps=600, lr=3e-3)
    stats = sae_statistics(sae, x)
    assert losses[-1] < losses[0] / 5
    assert stats["explained_variance"] > 0.9
    assert 0 < stats["l0"] < 16
    assert 0 <= stats["dead_fraction"] < 1
    with pytest.raises(ValueError, match="activations"):
        train_sae(torch.zeros(3), 4)


# --------------------------------------------------------------------------- toy induction model


def _attention_only(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return AttentionOnlyGPT(config).double().eval()


def test_attention_only_block_is_the_residual_plus_attention():
    model = _attention_only()
    block = model.blocks[0]
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = block.attn_norm(x)
    expected = x + block.attn(h, h, h, is_causal=True)[0]
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-15)
    assert not any("mlp" in name for name, _ in model.named_parameters())
    # and the model is a GPT: the logit lens and ablation apply
    idx = _ids(3)
    torch.testing.assert_close(logit_lens(model, idx)[-1], model(idx)[0], rtol=0, atol=1e-12)


def test_in_context_bigram_batch_follows_a_per_sequence_map_and_marks_repeats():
    B, T, V, noise = 300, 40, 9, 0.25
    x, y = in_context_bigram_batch(B, T, V, noise, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    # the successor maps are the generator's first draw: one random permutation per row
    successor = torch.rand(B, V, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    mapped = (x[:, 1:] == successor.gather(1, x[:, :-1])).double().mean()
    assert abs(float(mapped) - (1 - noise + noise / V)) < 0.02
    assert len({tuple(row.tolist()) for row in successor}) > 250  # maps differ by row
    distances = set()
    for row_x, row_y, s in zip(x.tolist(), y.tolist(), successor.tolist()):
        for t in range(T - 1):  # by hand: was x_t followed by s(x_t) before t?
            before = [r for r in range(t) if row_x[r] == row_x[t] and row_x[r + 1] == s[row_x[t]]]
            predictable = bool(before) and row_x[t + 1] == s[row_x[t]]
            assert row_y[t] == (row_x[t + 1] if predictable else -1)
            if predictable:
                distances.add(t - before[-1])
        assert row_y[-1] == -1
    assert len(distances) > 20  # no fixed offset solves the task


def test_in_context_bigram_batch_edge_cases_and_bad_input():
    a = in_context_bigram_batch(4, 10, 7, 0.5, torch.Generator().manual_seed(3))
    b = in_context_bigram_batch(4, 10, 7, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, y = in_context_bigram_batch(2, 30, 3, 0.0, torch.Generator().manual_seed(1))
    # without noise, every token after the first occurrence of its predecessor is predicted
    assert bool((y[:, 3:-1] == x[:, 4:]).all())
    with pytest.raises(ValueError, match="noise"):
        in_context_bigram_batch(4, 10, 7, 1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        in_context_bigram_batch(4, 10, 1, 0.1)
    with pytest.raises(ValueError, match="seq_len"):
        in_context_bigram_batch(4, 1, 7, 0.1)
    with pytest.raises(TypeError, match="batch_size"):
        in_context_bigram_batch(4.0, 10, 7, 0.1)


def test_task_loss_is_the_loss_on_the_marked_targets(model):
    x, y = in_context_bigram_batch(3, 9, 11, 0.2, torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(x)[0]  # float64
    kept = y >= 0
    expected = -torch.log_softmax(logits, -1)[kept].gather(1, y[kept][:, None]).mean()
    assert task_loss(model, x, y) == pytest.approx(float(expected), rel=1e-12)


def test_previous_token_scores_by_hand_and_bad_input(model):
    idx = _ids(4, shape=(3, 9))
    maps = model.attention_maps(idx)
    by_hand = torch.tensor([[sum(float(maps[layer][:, h, i, i - 1].mean())
                                 for i in range(1, 9)) / 8 for h in range(2)]
                            for layer in range(3)], dtype=torch.float64)
    torch.testing.assert_close(previous_token_scores(model, idx), by_hand, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="idx"):
        previous_token_scores(model, idx[:, :1])


def test_copy_losses_are_the_terms_of_the_gain(model):
    idx = repeated_random_tokens(2, 5, 11, torch.Generator().manual_seed(2))
    first, repeat = copy_losses(model, idx, 5)
    losses = token_losses(model, idx)
    assert first == pytest.approx(float(losses[:, :4].mean()), rel=1e-12)
    assert first - repeat == pytest.approx(in_context_gain(model, idx, 5), rel=1e-12)


def test_analyse_induction_matches_the_single_functions(model):
    idx = repeated_random_tokens(2, 5, 11, torch.Generator().manual_seed(5))
    out = analyse_induction(model, idx, 5)
    torch.testing.assert_close(torch.tensor(out["induction"], dtype=torch.float64),
                               induction_scores(model, idx, 5), rtol=0, atol=1e-15)
    with ablate_heads(model, [(2, 1)]):
        assert out["ablated_gain"][2][1] == in_context_gain(model, idx, 5)
    with ablate_heads(model, [(0, 0), (0, 1)]):
        assert out["layer_ablated_gain"][0] == in_context_gain(model, idx, 5)
    assert out["gain"] == in_context_gain(model, idx, 5)
    with ablate_heads(model, out["groups"]["induction"]):
        assert out["group_ablated_gain"]["induction"] == in_context_gain(model, idx, 5)


def test_head_groups_split_by_half_the_best_score():
    induction = torch.tensor([[0.1, 0.1], [0.9, 0.5]], dtype=torch.float64)
    previous = torch.tensor([[0.8, 0.2], [0.1, 0.95]], dtype=torch.float64)
    groups = head_groups(induction, previous)  # (1, 1) is an induction head first
    assert groups == {"induction": [[1, 0], [1, 1]], "previous": [[0, 0]], "other": [[0, 1]]}
    flat = head_groups(torch.ones(2, 2), torch.ones(2, 2))  # every head ties: no others
    assert flat == {"induction": [[0, 0], [0, 1], [1, 0], [1, 1]], "previous": [],
                    "other": []}
    with pytest.raises(ValueError, match="same shape"):
        head_groups(induction, previous[:1])
    with pytest.raises(ValueError, match="induction"):
        head_groups(induction[0], previous)


def test_train_induction_model_prefix_is_deterministic():
    a = train_induction_model(0, steps=3)
    b = train_induction_model(0, steps=3)
    assert a["step"] == [3] and a["first"] == b["first"] and a["repeat"] == b["repeat"]
    assert a["task"] == b["task"] and len(a["task"]) == 1
    assert isinstance(a["model"], AttentionOnlyGPT) and not a["model"].training
    with pytest.raises(ValueError, match="steps"):
        train_induction_model(0, steps=0)


def test_the_recorded_induction_runs_have_the_books_settings():
    record = load_induction()
    assert [run["seed"] for run in record["runs"]] == list(INDUCTION["seeds"])
    for run in record["runs"]:
        assert len(run["step"]) == len(run["first"]) == len(run["repeat"]) == len(run["task"])
