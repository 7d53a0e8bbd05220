"""companion.interpret on generated text: leave-one-token-out and IG of a continuation,
and the recorded deletion test of section 6b.

The oracles are Captum's ``LLMAttribution(FeatureAblation)`` and
``LLMGradientAttribution(LayerIntegratedGradients)`` run on the Hugging Face form of the
book's GPT (``GPT.to_hf``), with :class:`CaptumTokenizer` as their tokenizer, and loops
written out token by token. Tolerances: ``LLMAttribution`` accumulates its attributions
in float32 even on a float64 model, so we compare with it at ``atol=1e-6``; the gradient
path stays in float64 and agrees to ``1e-10``.
"""

import json

import pytest
import torch
from captum.attr import (
    FeatureAblation,
    LayerIntegratedGradients,
    LLMAttribution,
    LLMGradientAttribution,
    TextTokenInput,
)

from companion.data import CharTokenizer
from companion.interpret import (
    MATCHED_DELETION,
    MATCHED_DELETION_RECORD,
    TEXT_DELETION,
    TEXT_DELETION_RECORD,
    CaptumTokenizer,
    continuation_integrated_gradients,
    continuation_log_probs,
    deletion_study,
    deletion_windows,
    load_matched_deletion,
    load_text_deletion,
    matched_deletion,
    perturbation_curve,
    token_ablation,
)
from tests.factories import assert_refused, tiny_gpt

ALPHABET = "abcdefghij "  # 11 characters: tiny_gpt's vocabulary
PROMPT = "a big cafe h"
CONTINUATION = "id a"


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = tiny_gpt(dropout=0.0).eval()
    chars = CharTokenizer(ALPHABET)
    tokenizer = CaptumTokenizer(chars)
    prompt, continuation = chars.encode(PROMPT), chars.encode(CONTINUATION)
    return model, chars, tokenizer, prompt, continuation


def logits_of(model):
    return lambda ids: model(ids)[0]


def test_continuation_log_probs_equals_one_token_at_a_time(setting):
    model, _, _, prompt, continuation = setting
    prompts = torch.stack([prompt, prompt.flip(0)])  # (2, P)
    ours = continuation_log_probs(logits_of(model), prompts, continuation)
    for b, row in enumerate(prompts):
        for j, token in enumerate(continuation):
            ids = torch.cat([row, continuation[:j]])[None]
            expected = model(ids)[0][0, -1].log_softmax(-1)[token]
            torch.testing.assert_close(ours[b, j], expected, rtol=0, atol=1e-12)


def test_token_ablation_equals_a_loop_over_positions(setting):
    model, chars, _, prompt, continuation = setting
    space = chars.stoi[" "]
    ours = token_ablation(logits_of(model), prompt, continuation, space)
    assert ours.shape == (1 + len(continuation), len(prompt))
    intact = continuation_log_probs(logits_of(model), prompt[None], continuation)[0]
    for i in range(len(prompt)):
        ablated = prompt.clone()
        ablated[i] = space
        changed = continuation_log_probs(logits_of(model), ablated[None], continuation)[0]
        torch.testing.assert_close(ours[1:, i], intact - changed, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[0], ours[1:].sum(0), rtol=0, atol=1e-12)
    assert ours[:, prompt == space].abs().max() == 0  # replacing a space by a space


@pytest.mark.parametrize("forward_in_tokens", [False, True])
def test_token_ablation_equals_captum_llm_attribution(setting, forward_in_tokens):
    model, chars, tokenizer, prompt, continuation = setting
    hf = model.to_hf()
    text = TextTokenInput(PROMPT, tokenizer, baselines=" ")
    result = LLMAttribution(FeatureAblation(hf), tokenizer).attribute(
        text, target=continuation, use_cached_outputs=False,
        forward_in_tokens=forward_in_tokens)
    ours = token_ablation(logits_of(model), prompt, continuation, chars.stoi[" "])
    assert result.output_tokens == list(CONTINUATION.replace(" ", ""))[:2] + [""] + ["a"]
    torch.testing.assert_close(result.seq_attr.double(), ours[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.token_attr.double(), ours[1:], rtol=0, atol=1e-6)


def test_captum_generates_the_greedy_continuation(setting):
    model, chars, tokenizer, prompt, _ = setting
    hf = model.to_hf()
    greedy = model.generate(prompt[None], 4, temperature=0)[0, len(prompt):]
    text = TextTokenInput(PROMPT, tokenizer, baselines=" ")
    generated = LLMAttribution(FeatureAblation(hf), tokenizer).attribute(
        text, gen_args={"max_new_tokens": 4, "do_sample": False},
        use_cached_outputs=False)
    given = LLMAttribution(FeatureAblation(hf), tokenizer).attribute(
        text, target=greedy, use_cached_outputs=False)
    assert generated.output_tokens == given.output_tokens
    torch.testing.assert_close(generated.token_attr, given.token_attr, rtol=0, atol=0)


def test_continuation_ig_equals_captum_llm_gradient_attribution(setting):
    model, chars, tokenizer, prompt, continuation = setting
    hf = model.to_hf()
    text = TextTokenInput(PROMPT, tokenizer, baselines=" ")
    lig = LayerIntegratedGradients(hf, hf.transformer.wte)
    result = LLMGradientAttribution(lig, tokenizer).attribute(
        text, target=continuation, n_steps=16)
    ours = continuation_integrated_gradients(
        logits_of(model), model.token_embedding, prompt, continuation, chars.stoi[" "],
        n_steps=16)
    assert ours.shape == (len(continuation), len(prompt))
    torch.testing.assert_close(result.token_attr, ours, rtol=0, atol=1e-10)


def test_continuation_ig_is_complete(setting):
    model, chars, _, prompt, continuation = setting
    space = chars.stoi[" "]
    ours = continuation_integrated_gradients(
        logits_of(model), model.token_embedding, prompt, continuation, space, n_steps=64)
    spaces = torch.full_like(prompt, space)
    gap = (continuation_log_probs(logits_of(model), prompt[None], continuation)
           - continuation_log_probs(logits_of(model), spaces[None], continuation))[0]
    assert gap.abs().max() > 1e-2  # a gap to split
    torch.testing.assert_close(ours.sum(1), gap.detach(), rtol=0, atol=1e-10)


def test_captum_tokenizer_speaks_hugging_face(setting):
    _, chars, tokenizer, _, _ = setting
    # the vocabulary is sorted: " " is 0, "a" is 1, ..., "j" is 10
    assert tokenizer.encode("ab c", return_tensors="pt").tolist() == [[1, 2, 0, 3]]
    assert tokenizer.encode("ab c", add_special_tokens=False) == [1, 2, 0, 3]
    assert tokenizer.decode(torch.tensor([1, 0, 2])) == "a b"
    assert tokenizer("ab", return_offsets_mapping=True) == {
        "input_ids": [1, 2], "offset_mapping": [(0, 1), (1, 2)]}
    assert tokenizer.convert_ids_to_tokens(torch.tensor([0, 1])) == [" ", "a"]
    assert tokenizer.convert_tokens_to_ids([" ", "j"]) == [0, 10]


def test_bad_inputs_are_named(setting):
    model, _, _, prompt, continuation = setting
    f = logits_of(model)
    with pytest.raises(TypeError, match="prompt"):
        token_ablation(f, prompt.double(), continuation, 0)
    with pytest.raises(ValueError, match="prompt"):
        token_ablation(f, prompt[None], continuation, 0)
    with pytest.raises(ValueError, match="continuation"):
        token_ablation(f, prompt, continuation[:0], 0)
    with pytest.raises(TypeError, match="baseline"):
        token_ablation(f, prompt, continuation, 1.5)
    with pytest.raises(ValueError, match="prompts"):
        continuation_log_probs(f, prompt, continuation)
    with pytest.raises(TypeError, match="logits_func"):
        continuation_log_probs(None, prompt[None], continuation)
    with pytest.raises(TypeError, match="baseline"):
        continuation_integrated_gradients(f, model.token_embedding, prompt, continuation,
                                          "x")
    with pytest.raises(TypeError, match="tokenizer"):
        CaptumTokenizer("abc")


def test_deletion_windows_and_study():
    validation = torch.arange(200) % 7  # id 0 plays the space
    sample, texts = deletion_windows(validation, 0, n_windows=3, length=8, n_draws=2)
    assert sample.shape == (3, 8) and [t.shape for t in texts] == [(3, 8), (3, 8)]
    assert sample[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert all((t != 0).all() for t in texts)
    model = tiny_gpt(vocab_size=7, dropout=0.0).eval()

    def probabilities(ids):
        return model(ids)[0][:, -1].softmax(-1)

    orderings = {"recency": torch.arange(8.0).expand(3, 8), "random": torch.rand(3, 8)}
    target = torch.tensor([1, 2, 3])
    study = deletion_study(probabilities, sample, orderings, target,
                           {"spaces": 0, "random": texts[0]}, n_points=5)
    expected = perturbation_curve(probabilities, sample, orderings["random"], target,
                                  baselines=texts[0], n_points=5)
    torch.testing.assert_close(study["random"]["random"].scores, expected.scores,
                               rtol=0, atol=0)
    assert study["spaces"]["recency"].scores.shape == (3, 5)


def test_text_deletion_record_loads_and_checks_its_settings(tmp_path):
    ig, study = load_text_deletion()
    s = TEXT_DELETION
    assert ig.shape == (s["n_windows"], s["length"])
    assert set(study) == {"spaces"} | {f"random {k}" for k in range(s["n_draws"])}
    curve = study["spaces"]["IG"]
    assert curve.scores.shape == (s["n_windows"], s["n_points"])
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1
    assert_refused(load_text_deletion, json.loads(TEXT_DELETION_RECORD.read_text()),
                   lambda r: r["settings"].update(n_steps=16), tmp_path=tmp_path)


def test_matched_deletion_is_captums_ig_against_the_replacement_and_its_curve():
    model = tiny_gpt(vocab_size=7, dropout=0.0).eval().double()
    draws = torch.Generator().manual_seed(0)
    ids = torch.randint(7, (3, 8), generator=draws)
    replacement = torch.randint(1, 7, (3, 8), generator=draws)
    target = torch.tensor([1, 2, 3])

    def next_logits(x):
        return model(x)[0][:, -1]

    ig, curve = matched_deletion(next_logits, model.token_embedding, ids, replacement,
                                 target, n_steps=8, n_points=5)
    theirs = LayerIntegratedGradients(next_logits, model.token_embedding).attribute(
        ids, replacement, target=target, n_steps=8, method="gausslegendre").sum(-1)
    # Captum's Gauss-Legendre nodes and weights are float32: 1e-8 of the largest value
    torch.testing.assert_close(ig, theirs, rtol=0, atol=1e-6 * ig.abs().max().item())
    reference = LayerIntegratedGradients(next_logits, model.token_embedding)
    assert not torch.equal(ig, reference.attribute(ids, target=target, n_steps=8).sum(-1))
    expected = perturbation_curve(lambda x: next_logits(x).softmax(-1), ids, ig,
                                  target, baselines=replacement, n_points=5)
    torch.testing.assert_close(curve.scores, expected.scores, rtol=0, atol=1e-12)
    assert curve.scores.shape == (3, 5)
    # replacing every character by the replacement leaves the replacement's prediction
    final = next_logits(replacement).softmax(-1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(curve.scores[:, -1], final.detach(), rtol=0, atol=1e-12)


def test_matched_deletion_record_loads_and_checks_its_settings(tmp_path):
    ig, curve = load_matched_deletion()
    s = MATCHED_DELETION
    assert ig.shape == (s["n_windows"], s["length"]) and torch.isfinite(ig).all()
    assert curve.scores.shape == (s["n_windows"], s["n_points"])
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1
    assert_refused(load_matched_deletion, json.loads(MATCHED_DELETION_RECORD.read_text()),
                   lambda r: r["settings"].update(n_steps=32), tmp_path=tmp_path)
