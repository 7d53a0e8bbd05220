"""companion.align against its oracles: transformers' chat-template masks, TRL's DPO step,
the Bradley--Terry formula, scikit-learn's Cohen's kappa, and the chapter-11 server."""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from factories import tiny_gpt

from companion import align
from companion.data import CharTokenizer
from companion.pretrained import load_pretrained_gpt

VOCAB = ("\n !\"#%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_"
         "abcdefghijklmnopqrstuvwxyz{|}~")
U, A, S = "user", "assistant", "system"
CONVERSATIONS = [
    [{"role": U, "content": "Reverse: abc"}, {"role": A, "content": "cba"}],
    [{"role": S, "content": "Be brief."}, {"role": U, "content": "Repeat: x"},
     {"role": A, "content": "x"}, {"role": U, "content": "Count the letters: word"},
     {"role": A, "content": "4"}],
    [{"role": U, "content": "hi"}, {"role": A, "content": ""}, {"role": U, "content": "?"}],
    [{"role": A, "content": "I start."}, {"role": A, "content": "Twice."}],
]


def hf_char_tokenizer():
    return align.hf_tokenizer(VOCAB)


def encode(text):
    return torch.tensor([VOCAB.index(c) for c in text])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_masks_and_text_equal_transformers_apply_chat_template(conversation):
    tok = hf_char_tokenizer()
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    text, spans = align.render_chat(conversation)
    assert tok.decode(out["input_ids"]) == text
    assert out["assistant_masks"] == align.assistant_mask(conversation).int().tolist()
    assert len(spans) == sum(m["role"] == A for m in conversation)
    for end in (True, False):
        assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=end) \
            == align.render_chat(conversation, add_generation_prompt=end)[0]


def test_every_assistant_turn_ends_with_the_end_of_turn_marker():
    text, spans = align.render_chat(CONVERSATIONS[1])
    assert [text[a:b] for a, b in spans] == ["x\n###", "4\n###"]
    assert text.startswith("\n### System:\nBe brief.\n### User:\n")


def test_the_prompt_is_the_chapter_11_servers_chat_template():
    serve = pytest.importorskip("companion.serve")
    for conv in CONVERSATIONS[:3]:
        prompt = conv if conv[-1]["role"] != A else conv[:-1]
        assert serve.chat_template(prompt) == align.render_chat(prompt, True)[0]
    assert serve.CHAT_HEADER == align.HEADER


def test_sequence_logps_against_a_loop_and_sft_loss_against_its_mean():
    model = tiny_gpt()
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:], mask[1, 2:6], mask[2, 8] = True, True, True
    want, n = [], 0
    for b in range(3):
        total = 0.0
        for t in range(1, 9):
            if mask[b, t]:
                logp = model(ids[b:b + 1, :t])[0][0, -1].log_softmax(-1)
                total += logp[ids[b, t]].item()
                n += 1
        want.append(total)
    got = align.sequence_logps(model, ids, mask)
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(align.sft_loss(model, ids, mask), -got.sum() / n,
                               rtol=1e-12, atol=1e-12)


def test_dpo_loss_against_its_formula_and_log_2_at_the_start():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen, rejected = align.dpo_loss(pc, pr, rc, rr, beta=0.3)
    z = 0.3 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-z)).mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(chosen, 0.3 * (pc - rc), rtol=0, atol=0)
    torch.testing.assert_close(rejected, 0.3 * (pr - rr), rtol=0, atol=0)
    assert align.dpo_loss(pc, pr, pc, pr, beta=0.3)[0].item() == pytest.approx(math.log(2),
                                                                                abs=1e-15)


def test_bradley_terry_loss_against_its_formula():
    w = torch.tensor([2.0, -1.0, 0.0, 30.0], dtype=torch.float64)
    loss_ = torch.tensor([1.0, 1.0, 0.0, -30.0], dtype=torch.float64)
    want = sum(-math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
               for a, b in zip(w.tolist(), loss_.tolist())) / 4
    assert align.bradley_terry_loss(w, loss_).item() == pytest.approx(want, rel=1e-14)


def test_one_trl_dpo_step_gives_the_same_loss_and_weights():
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).double()
    ref, ours = copy.deepcopy(model), copy.deepcopy(model)
    pairs = [("Reverse: abc", "cba", "abc"), ("Count the letters: word", "4", "five"),
             ("Uppercase: hi", "HI", "hi there")]
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": U, "content": p}], "chosen": [{"role": A, "content": c}],
         "rejected": [{"role": A, "content": r}]} for p, c, r in pairs])
    lr, beta = 0.5, 0.1
    with tempfile.TemporaryDirectory() as d:
        args = trl.DPOConfig(output_dir=d, per_device_train_batch_size=3, max_steps=1,
                             learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, beta=beta, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                             bf16=False)  # TRL defaults to bfloat16 autocast
        trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(ref), args=args,
                                 train_dataset=data, processing_class=hf_char_tokenizer())
        trainer.train()
    trl_loss = trainer.state.log_history[0]["loss"]

    def batch(k):
        convs = [[{"role": U, "content": p[0]}, {"role": A, "content": p[k]}] for p in pairs]
        return align.pad_batch([encode(align.render_chat(c)[0]) for c in convs],
                               [align.assistant_mask(c) for c in convs])
    (chosen, cm), (rejected, rm) = batch(1), batch(2)
    with torch.no_grad():
        ref_c = align.sequence_logps(ref, chosen, cm)
        ref_r = align.sequence_logps(ref, rejected, rm)
    loss, _, _ = align.dpo_loss(align.sequence_logps(ours, chosen, cm),
                                align.sequence_logps(ours, rejected, rm), ref_c, ref_r, beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert trl_loss == pytest.approx(loss.item(), abs=1e-7)  # TRL logs a float32
    loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            p -= lr * p.grad
    moved = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    assert moved > 1e-3  # the step changed the weights
    for a, b in zip(ours.parameters(), model.parameters()):
        # TRL's fused LM head computes the log-probabilities in float32: ~2e-8 apart
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_reward_model_reads_the_last_masked_position_and_ignores_padding():
    gpt = tiny_gpt()
    rm = align.RewardModel(gpt)
    torch.nn.init.normal_(rm.head.weight)
    ids = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[False, True, True, True, False, False]])
    padded = ids.clone()
    padded[0, 4:] = 0
    torch.testing.assert_close(rm(ids, mask), rm(padded, mask), rtol=0, atol=0)
    assert rm.gpt is not gpt and rm(ids, mask).shape == (1,)
    hidden = gpt.final_norm(gpt.blocks[1](gpt.blocks[0](
        gpt.token_embedding(ids[:, :4]) + gpt.position_embedding(torch.arange(4)))))
    torch.testing.assert_close(rm(ids, mask), rm.head(hidden[:, 3]).squeeze(-1),
                               rtol=1e-12, atol=1e-12)


def test_cohen_kappa_equals_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for k, n in ((2, 50), (3, 200), (5, 17)):
        a = torch.randint(0, k, (n,), generator=g).tolist()
        b = [x if torch.rand(1, generator=g).item() < 0.6 else (x + 1) % k for x in a]
        assert align.cohen_kappa(a, b) == pytest.approx(
            sklearn_metrics.cohen_kappa_score(a, b), abs=1e-14)
    assert align.cohen_kappa([1, 1], [1, 1]) == 1.0
    assert align.cohen_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)


def test_group_relative_advantages_against_the_formula():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    adv = align.group_relative_advantages(r)
    s = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]], dtype=torch.float64)
    want[0] /= s + 1e-4
    torch.testing.assert_close(adv, want, rtol=1e-14, atol=0)


def test_flip_labels_flips_exactly_the_fraction_and_instructions_are_reproducible():
    flips = align.flip_labels(40, 0.25, seed=3)
    assert flips.sum().item() == 10 and flips.equal(align.flip_labels(40, 0.25, seed=3))
    words = align.corpus_words("The quick brown fox, a fox; jumps over the lazy dogs")
    assert words == ["brown", "dogs", "fox", "jumps", "lazy", "over", "quick", "the"]
    a, b = align.make_instructions(words, 20, seed=1), align.make_instructions(words, 20, 1)
    assert a == b and {e["task"] for e in a} <= set(align.TASKS)
    for e in a:
        assert e["messages"][1]["content"] == align.answer(e["task"], e["word"])
    assert align.answer("reverse", "abc") == "cba" and align.answer("count", "abcd") == "4"


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="messages"):
        align.render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="messages"):
        align.render_chat([])
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        align.dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        align.dpo_loss(x, x, x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        align.sequence_logps(tiny_gpt(), torch.zeros(1, 4, dtype=torch.long),
                             torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="a and b"):
        align.cohen_kappa([1], [1, 2])
    with pytest.raises(ValueError, match="rate"):
        align.flip_labels(4, 1.5, seed=0)
    with pytest.raises(ValueError, match="rewards"):
        align.group_relative_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="correct and start_correct"):
        align.win_tie_loss([True], [True, False])
    with pytest.raises(ValueError, match="runs"):
        align.choose_rate([{"lr": 1e-3}])
    with pytest.raises(TypeError, match="runs"):
        align.choose_rate({"lr": 1e-3})


def _dev_run(lr, correct, pair_acc):
    return {"lr": lr, "dev": {"correct": correct, "pair_acc": pair_acc}}


def test_choose_rate_takes_the_best_mean_dev_accuracy_then_pairs_then_the_lower_rate():
    runs = [_dev_run(1e-3, [1, 0, 0, 0], 0.5), _dev_run(1e-3, [1, 1, 0, 0], 0.5),
            _dev_run(3e-4, [1, 1, 1, 0], 0.2), _dev_run(3e-4, [0, 0, 0, 0], 0.2),
            _dev_run(1e-2, [1, 1, 0, 0], 0.9), _dev_run(1e-2, [0, 0, 0, 0], 0.9)]
    # mean dev accuracy: 1e-3 0.375, 3e-4 0.375, 1e-2 0.25; the tie goes to the pairs
    assert align.choose_rate(runs) == 1e-3
    runs[2]["dev"]["pair_acc"] = runs[3]["dev"]["pair_acc"] = 0.5
    assert align.choose_rate(runs) == 3e-4  # a full tie goes to the lower rate
    assert align.choose_rate(runs[4:]) == 1e-2


def test_win_tie_loss_counts_against_the_start_model():
    assert align.win_tie_loss([1, 0, 1, 0, 1], [0, 0, 1, 1, 0]) == (2, 2, 1)
    assert align.win_tie_loss([True] * 3, [True] * 3) == (0, 3, 0)


def test_a_tuned_model_answers_a_conversation_through_the_servers_chat_route():
    serve = pytest.importorskip("companion.serve")
    openai = pytest.importorskip("openai")
    from test_serve import InProcessServer
    model, corpus = load_pretrained_gpt("cpu")
    tok = corpus.tokenizer
    examples = align.make_instructions(align.corpus_words(corpus.text[:20000]), 64, seed=0)
    align.train_sft(model, tok, examples, steps=3, lr=1e-3, batch_size=8, seed=0)
    conversation = [{"role": U, "content": "Reverse: table"}]
    want = align.respond(model, tok, conversation, max_new_tokens=12)
    with InProcessServer(serve.create_app(model, "".join(tok.itos))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", timeout=60.0)
        out = client.chat.completions.create(model="companion-gpt", messages=conversation,
                                             max_tokens=12, temperature=0.0)
    assert out.choices[0].message.content == want
    assert isinstance(tok, CharTokenizer)


def test_dpo_training_starts_at_log_2_and_pairs_follow_the_criterion():
    tok = CharTokenizer(VOCAB)
    examples = align.make_instructions(["table", "word", "apple"], 8, seed=0)
    pairs = align.preference_pairs(examples, noise=0.25, seed=1)
    swapped = [p["chosen"] != align.answer(e["task"], e["word"])
               for p, e in zip(pairs, examples)]
    assert sum(swapped) == 2 and swapped == align.flip_labels(8, 0.25, 1).tolist()
    reference = tiny_gpt(vocab_size=len(VOCAB), block_size=64)
    losses = align.train_dpo(copy.deepcopy(reference), reference, tok, pairs, steps=2,
                             lr=1e-2, batch_size=4)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-12) and losses[1] != losses[0]


def test_the_record_holds_every_run_of_the_grid():
    record = align.load_record()
    runs = record["runs"]
    sft = [r for r in runs if "method" in r]
    kinds = [r.get("kind") for r in runs]
    n_seeds, n_noise = len(align.SEEDS), len(align.PREF_SETTINGS["noise"])
    n_lr = len(align.PREF_SETTINGS["lr_grid"])
    grid = align.SFT_SETTINGS["lr_grid"]
    assert record["sft"] == align.SFT_SETTINGS and record["pref"] == align.PREF_SETTINGS
    assert len(sft) == n_seeds * (2 * len(grid["full"]) + len(grid["lora"]))
    for method, masked in (("full", True), ("full", False), ("lora", True)):
        for lr in grid[method]:  # every variant at every rate of its grid, every seed
            seeds = sorted(r["seed"] for r in sft if r["method"] == method
                           and r["masked"] == masked and r["lr"] == lr)
            assert seeds == sorted(align.SEEDS), (method, masked, lr)
    assert all("dev" in r for r in sft)  # each variant's rate is chosen on the dev prompts
    assert kinds.count("start") == kinds.count("reward") == n_seeds * n_noise
    assert kinds.count("dpo") == kinds.count("sft") == n_seeds * n_noise * n_lr
    assert kinds.count("long_sft") == n_seeds * len(align.LONG_SFT["eval_at"])
    assert all(len(r["correct"]) == 48 for r in runs if "correct" in r)
    assert all(len(r["dev"]["correct"]) == 48 for r in runs if "dev" in r)
    bad = dict(record, sft={**record["sft"], "steps": 1})
    path = Path(tempfile.mkdtemp()) / "record.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="other settings"):
        align.load_record(path)


def test_follows_format_checks_end_of_turn_length_and_characters():
    eot = align.END_OF_TURN
    assert align.follows_format("reverse", "table", "elbat" + eot + " User")
    assert align.follows_format("reverse", "table", "tabel" + eot)  # wrong but well-formed
    assert not align.follows_format("reverse", "table", "elbat and more")  # no end of turn
    assert not align.follows_format("reverse", "table", "elba" + eot)  # length
    assert not align.follows_format("upper", "table", "table" + eot)  # character set
    assert align.follows_format("count", "table", "6" + eot)
    assert not align.follows_format("count", "table", "five" + eot)
    with pytest.raises(TypeError, match="raw"):
        align.follows_format("copy", "a", None)


def test_dev_prompts_are_new_task_word_pairs_and_disjoint_from_the_test():
    _, corpus = load_pretrained_gpt("cpu")
    train, test, prefs = align.instruction_split(corpus)
    dev = align.dev_instructions(corpus)
    pairs = {(e["task"], e["word"]) for e in dev}
    assert len(dev) == len(pairs) == 48
    assert not pairs & {(e["task"], e["word"]) for e in train + prefs}
    assert not {e["word"] for e in dev} & {e["word"] for e in test}


def test_reward_model_training_lowers_the_bradley_terry_loss_and_margins_match():
    tok = CharTokenizer(VOCAB)
    examples = align.make_instructions(["table", "word", "apple", "river"], 16, seed=0)
    pairs = align.preference_pairs(examples, noise=0.0, seed=0)
    rm = align.RewardModel(tiny_gpt(vocab_size=len(VOCAB), block_size=64))
    before = align.pair_margins(rm, tok, pairs)
    assert before.abs().max().item() == 0.0  # the head starts at zero: log 2
    losses = align.train_reward(rm, tok, pairs, steps=30, lr=3e-3, batch_size=8)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-12)
    assert losses[-1] < losses[0] - 0.2
    margins = align.pair_margins(rm, tok, pairs)
    chosen = align._pair_batch(pairs, tok, "chosen", "cpu")
    rejected = align._pair_batch(pairs, tok, "rejected", "cpu")
    with torch.no_grad():
        want = rm(*chosen) - rm(*rejected)
    torch.testing.assert_close(margins, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="reward_model"):
        align.train_reward(tiny_gpt(), tok, pairs, steps=1, lr=1e-3)
