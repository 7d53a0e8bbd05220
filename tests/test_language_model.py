"""Language-model training (companion.train), the sorting task (companion.data) and the
pretrained checkpoint (companion.pretrained)."""

import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_gpt

from companion import pretrained
from companion.data import CharCorpus, SortingTask
from companion.optim import AdamW
from companion.train import (
    default_autocast_dtype,
    exact_match_accuracy,
    fixed_windows,
    language_model_loss,
    ngram_baselines,
    train_language_model,
)

# --------------------------------------------------------------------------- the sorting task


def test_sorting_task_sequences_and_targets():
    task = SortingTask(length=5, num_values=7)
    seq = task.sequences(100, torch.Generator().manual_seed(0))
    assert seq.shape == (100, 11) and task.vocab_size == 8 and task.block_size == 10
    prompts, answers = task.split(seq)
    assert (prompts[:, -1] == task.separator).all() and (prompts[:, :-1] < 7).all()
    assert torch.equal(answers, prompts[:, :-1].sort(dim=1).values)
    x, y = task.sample(50, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (50, 10)
    assert (y[:, :5] == -1).all()
    assert torch.equal(y[:, 5:], x[:, :5].sort(dim=1).values)
    assert torch.equal(x[:, 6:], y[:, 5:-1])  # next-token alignment inside the answer
    assert task.decode([3, 1, 7, 1, 3]) == "3 1 | 1 3"


def test_sorting_task_is_seeded_and_rejects_bad_sizes():
    a = SortingTask().sequences(4, torch.Generator().manual_seed(3))
    b = SortingTask().sequences(4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="length"):
        SortingTask(length=0)
    with pytest.raises(ValueError, match="n must be"):
        SortingTask().sequences(0)


def _tiny_gpt(vocab_size, block_size, seed=0, dtype=torch.float64):
    return tiny_gpt(vocab_size, block_size, n_embd=32, seed=seed, dtype=dtype)


def test_exact_match_equals_greedy_decoding():
    task = SortingTask(length=4, num_values=5)
    model = _tiny_gpt(task.vocab_size, task.block_size)
    seq = task.sequences(200, torch.Generator().manual_seed(0))
    prompts, answers = task.split(seq)
    # make about half the rows right: set the targets to the model's own greedy output
    greedy = model.generate(prompts, task.length, temperature=0.0)[:, task.length + 1:]
    mixed = torch.where(torch.arange(200)[:, None] % 2 == 0, greedy, answers)
    x = torch.cat((prompts, mixed[:, :-1]), dim=1)
    y = torch.cat((torch.full((200, task.length), -1), mixed), dim=1)
    by_generation = (model.generate(x[:, :task.length + 1], task.length, temperature=0.0)
                     [:, task.length + 1:] == mixed).all(1).double().mean().item()
    assert exact_match_accuracy(model, x, y, batch_size=64) == by_generation
    assert 0.5 <= by_generation < 1.0


# --------------------------------------------------------------------------- losses and loops


def test_fixed_windows_tile_the_stream():
    ids = torch.arange(1000)
    x, y = fixed_windows(ids, 64)
    assert x.shape == (15, 64)
    assert torch.equal(x.flatten(), ids[:960]) and torch.equal(y, x + 1)
    xs, _ = fixed_windows(ids, 64, num_windows=4)
    assert xs.shape == (4, 64) and (xs[:, 0] % 64 == 0).all() and len(set(xs[:, 0].tolist())) == 4
    with pytest.raises(ValueError, match="num_windows"):
        fixed_windows(ids, 64, num_windows=16)
    with pytest.raises(ValueError, match="block_size"):
        fixed_windows(ids, 1000)


def test_language_model_loss_is_the_mean_over_scored_tokens():
    model = _tiny_gpt(11, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(11, (10, 16), generator=g), torch.randint(11, (10, 16), generator=g)
    y[:3, :5] = -1
    logits, _ = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item()
    assert language_model_loss(model, x, y, batch_size=3) == pytest.approx(expected, rel=1e-12)
    assert model.training


def test_language_model_loss_skips_batches_without_scored_targets():
    model = _tiny_gpt(11, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(11, (6, 16), generator=g), torch.randint(11, (6, 16), generator=g)
    y[:2] = -1  # the whole first batch of 2 rows is unscored
    logits, _ = model(x)
    expected = F.cross_entropy(logits[2:].flatten(0, 1), y[2:].flatten()).item()
    loss = language_model_loss(model, x, y, batch_size=2)
    assert math.isfinite(loss) and loss == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="no scored target"):
        language_model_loss(model, x, torch.full_like(y, -1), batch_size=2)


def _ngram_losses_by_counting(train, test, V, s):
    """The same three losses from Python counters, one prediction at a time."""
    singles, pairs = Counter(train), Counter(zip(train[:-1], train[1:]))
    followed = Counter(train[:-1])
    predictions = list(zip(test[:-1], test[1:]))
    unigram = [-math.log((singles[b] + s) / (len(train) + s * V)) for _, b in predictions]
    bigram = [-math.log((pairs[a, b] + s) / (followed[a] + s * V)) for a, b in predictions]
    return {"uniform": math.log(V), "unigram": sum(unigram) / len(unigram),
            "bigram": sum(bigram) / len(bigram)}


@pytest.mark.parametrize("smoothing", [1.0, 0.1])
def test_ngram_baselines_equal_counting(device, smoothing):
    g = torch.Generator().manual_seed(0)
    V = 7
    # a skewed stream, so that the unigram and bigram tables differ from uniform;
    # symbol 6 never occurs in training: smoothing must keep its probability > 0
    train = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 0]), 500, replacement=True,
                              generator=g)
    test = torch.randint(V, (200,), generator=g)
    ours = ngram_baselines(train.to(device), test.to(device), V, smoothing=smoothing)
    expected = _ngram_losses_by_counting(train.tolist(), test.tolist(), V, smoothing)
    assert ours.keys() == expected.keys()
    for name in expected:
        assert ours[name] == pytest.approx(expected[name], rel=1e-12), name
    # on its own training text the bigram model is better than the unigram model
    own = ngram_baselines(train, train, V, smoothing=smoothing)
    assert own["bigram"] < own["unigram"] < own["uniform"]


def test_ngram_baselines_reject_bad_input():
    ids = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        ngram_baselines(ids, ids, 3, smoothing=0.0)
    with pytest.raises(ValueError, match=r"eval_ids must hold ids in \[0, 3\)"):
        ngram_baselines(ids, ids + 1, 3)
    with pytest.raises(ValueError, match="train_ids must be a 1-D torch.long"):
        ngram_baselines(ids.float(), ids, 3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ngram_baselines(ids, ids[:1], 3)


def test_default_autocast_dtype(monkeypatch):
    asked = []

    def fake_bf16_support(native):
        def is_bf16_supported(including_emulation=True):
            asked.append(including_emulation)
            return native or including_emulation
        return is_bf16_supported

    assert default_autocast_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16_support(True))
    assert default_autocast_dtype("cuda") == torch.bfloat16  # Ampere and later
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16_support(False))
    assert default_autocast_dtype(torch.device("cuda")) == torch.float16  # V100, T4: emulated
    assert asked == [False, False]  # emulated bfloat16 does not count


def _one_step_update(autocast_dtype):
    task = SortingTask(length=4, num_values=5)
    model = _tiny_gpt(task.vocab_size, task.block_size, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    eval_batches = {s: task.sample(16, torch.Generator().manual_seed(i))
                    for i, s in enumerate(("train", "val"))}
    train_language_model(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         lambda: task.sample(32, g), steps=1, eval_every=1,
                         eval_batches=eval_batches, grad_clip=1.0,
                         autocast_dtype=autocast_dtype)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


def test_float16_training_scales_the_loss_and_clips_unscaled_gradients(monkeypatch):
    scalers = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self.is_enabled())

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    # with loss scaling, clipping must see the true gradients (unscale_ first): then one
    # float16 step moves the weights as a float32 step does, up to float16 rounding
    step_32, step_16 = _one_step_update(None), _one_step_update(torch.float16)
    assert scalers == [False, True]  # the loss is scaled in float16 only
    assert step_32.norm() > 0
    assert (step_16 - step_32).norm() < 1e-2 * step_32.norm()


def test_training_learns_the_sorting_task(device):
    """The book's loop with the book's optimizer (chapter 4), on the GPU when there is one."""
    task = SortingTask(length=4, num_values=5)
    model = _tiny_gpt(task.vocab_size, task.block_size, dtype=torch.float32).to(device)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    eval_batches = {s: task.sample(256, torch.Generator().manual_seed(i), device)
                    for i, s in enumerate(("train", "val"))}
    logged = []
    history = train_language_model(model, optimizer, lambda: task.sample(64, g, device),
                                   steps=200, eval_every=100, eval_batches=eval_batches,
                                   log=lambda h: logged.append(h.eval_step[-1]))
    assert history.eval_step == logged == [0, 100, 200]
    assert len(history.step_loss) == 200 and history.tokens_per_second > 0
    assert history.val_loss[-1] < 0.5 * history.val_loss[0]
    assert exact_match_accuracy(model, *eval_batches["val"]) > 0.5


def test_validation_only_evaluation_trains_the_same_steps():
    """Without a "train" batch only the validation loss is recorded; the steps are equal."""
    task = SortingTask(length=4, num_values=5)
    val = task.sample(64, torch.Generator().manual_seed(1))
    histories = []
    for eval_batches in ({"train": task.sample(64, torch.Generator()), "val": val},
                         {"val": val}):
        model = _tiny_gpt(task.vocab_size, task.block_size, dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        histories.append(train_language_model(
            model, torch.optim.AdamW(model.parameters(), lr=3e-3),
            lambda g=g: task.sample(16, g), steps=6, eval_every=3, eval_batches=eval_batches))
    both, val_only = histories
    assert val_only.train_loss == [] and len(both.train_loss) == 3
    assert val_only.step_loss == both.step_loss and val_only.val_loss == both.val_loss


def test_training_rejects_bad_arguments():
    model = _tiny_gpt(5, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    batches = {"train": None, "val": None}
    with pytest.raises(ValueError, match="steps"):
        train_language_model(model, optimizer, None, steps=0, eval_every=1, eval_batches=batches)
    with pytest.raises(ValueError, match="eval_every"):
        train_language_model(model, optimizer, None, steps=1, eval_every=0, eval_batches=batches)
    with pytest.raises(ValueError, match="eval_batches"):
        train_language_model(model, optimizer, None, steps=1, eval_every=1, eval_batches={})
    with pytest.raises(ValueError, match="eval_batches"):
        train_language_model(model, optimizer, None, steps=1, eval_every=1,
                             eval_batches={"train": None})
    with pytest.raises(TypeError, match="steps"):
        train_language_model(model, optimizer, None, steps=2.0, eval_every=1, eval_batches=batches)
    with pytest.raises(TypeError, match="eval_every"):
        train_language_model(model, optimizer, None, steps=1, eval_every="1", eval_batches=batches)


# --------------------------------------------------------------------------- the checkpoint


def test_checkpoint_round_trip(tmp_path):
    corpus = CharCorpus("a small text, just to have a vocabulary", val_fraction=0.5)
    model = _tiny_gpt(corpus.vocab_size, 8, dtype=torch.float32)
    path = pretrained.save_checkpoint(model, corpus, tmp_path / "m.pt", note="test")
    loaded, checkpoint = pretrained.load_checkpoint(path, device="cpu")
    assert not loaded.training and checkpoint["record"] == {"note": "test"}
    assert checkpoint["vocab"] == "".join(corpus.tokenizer.itos)
    assert loaded.config == model.config
    x = torch.randint(corpus.vocab_size, (2, 8))
    assert torch.equal(loaded(x)[0], model.eval()(x)[0])
    assert pretrained.sha256(path) == pretrained.sha256(path) and len(pretrained.sha256(path)) == 64


def test_the_shipped_checkpoint():
    path = pretrained.CHECKPOINT
    assert path.stat().st_size < 5e6
    model, corpus = pretrained.load_pretrained_gpt(device="cpu")
    assert not model.training and model.config.vocab_size == corpus.vocab_size
    assert model.config.block_size == pretrained.CONFIG["block_size"]
    checkpoint = torch.load(path, weights_only=True)
    # the documented checksum and validation loss are those of the file
    doc = pretrained.__doc__
    assert re.search(r"sha256 ``([0-9a-f]{64})``", doc).group(1) == pretrained.sha256(path)
    documented = float(re.search(r"validation text, .*?\):\s+([0-9.]+)", doc, re.S).group(1))
    assert documented == round(checkpoint["record"]["val_loss"], 4)
    # and evaluating the model again on the validation text confirms it; the documented
    # tail that whole windows leave out is right too
    assert abs(pretrained.validation_loss(model, corpus) - documented) < 1e-3
    tail = int(re.search(r"but the last (\d+) characters", doc).group(1))
    assert tail == (len(corpus.val_ids) - 1) % model.config.block_size


def test_the_recorded_notebook_run(tmp_path):
    """Chapter 4's recorded run: its settings, a prefix re-trained here, the loaded model."""
    model, history = pretrained.load_notebook_gpt(device="cpu")
    t = pretrained.NOTEBOOK_TRAINING
    assert len(history.step_loss) == t["steps"] and history.eval_step[-1] == t["steps"]
    assert model.config.n_embd == pretrained.NOTEBOOK_CONFIG["n_embd"] and not model.training
    corpus = CharCorpus()
    _, prefix = pretrained.train_notebook_gpt(corpus, steps=5, device="cpu")
    # the same arithmetic up to the CPU kernels' rounding (the book measures 1e-3 at most)
    torch.testing.assert_close(torch.tensor(prefix.step_loss),
                               torch.tensor(history.step_loss[:5]), rtol=0, atol=1e-3)
    windows = fixed_windows(corpus.val_ids, 64, num_windows=t["eval_windows"])
    assert abs(language_model_loss(model, *windows) - history.val_loss[-1]) < 1e-4
    checkpoint = torch.load(pretrained.NOTEBOOK_RUN, weights_only=True)
    checkpoint["record"]["settings"] = {**t, "steps": 1}
    torch.save(checkpoint, tmp_path / "run.pt")
    with pytest.raises(ValueError, match="re-record"):
        pretrained.load_notebook_gpt(tmp_path / "run.pt")
