"""From a text predictor to an assistant: chat templates, SFT, reward models, DPO.

Book: chapter 12, "From a text predictor to an assistant".

**Chat template.** A conversation is rendered as ``HEADER.format(role=Role) + content`` per
message (:data:`HEADER` is ``"\\n### {role}:\\n"``, the chapter-11 server's); an assistant's
turn ends with :data:`END_OF_TURN` ``"\\n###"`` -- the start of the next header, where the
server stops generating. :func:`assistant_mask` marks the assistant's content and its
end-of-turn marker: the tokens that carry the loss of supervised fine-tuning (SFT),

    L_SFT = - sum_t m_t log p(x_t | x_<t) / sum_t m_t.

:data:`CHAT_TEMPLATE` is the same template in Jinja with ``{% generation %}`` blocks, for
``transformers``' ``apply_chat_template(..., return_assistant_tokens_mask=True)``.

**Preferences.** :func:`sequence_logps` is ``log pi(y | x) = sum_t m_t log pi(x_t | x_<t)``.
A reward model (:class:`RewardModel`, the GPT with a scalar head) is trained with the
Bradley--Terry loss ``-log sigma(r(x, y_w) - r(x, y_l))`` (:func:`bradley_terry_loss`);
direct preference optimisation (Rafailov et al. 2023, :func:`dpo_loss`) minimises

    -log sigma(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),

TRL's ``loss_type="sigmoid"``. GRPO (Shao et al. 2024) replaces PPO's critic by the
group-relative advantage ``A_i = (r_i - mean(r)) / (std(r) + eps)``
(:func:`group_relative_advantages`). :func:`cohen_kappa` measures labeller agreement,
``(p_o - p_e) / (1 - p_e)``.

**Measured.** :func:`follows_format` checks an answer's form apart from its correctness
(ends its turn; the correct answer's length and character set); :func:`pair_margins`
gives a reward model's ``r(y_w) - r(y_l)`` or a policy's ``log pi(y_w) - log pi(y_l)``,
whose sign is the pairwise accuracy. :func:`record_runs` records the chapter's runs:
SFT variants, a longer SFT, and per seed and noise rate DPO and
SFT-on-chosen over one learning-rate grid (each rate chosen on :func:`dev_instructions`
by :func:`choose_rate`) and a reward model; :func:`win_tie_loss` judges a tuned model
against its SFT start.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from companion._optional import require
from companion._validate import check_float, check_int, check_tensor, check_type
from companion.data import CharTokenizer
from companion.device import seed_everything
from companion.transformer import GPT

#: A turn's header (the chapter-11 server's ``CHAT_HEADER``).
HEADER = "\n### {role}:\n"
#: The end of an assistant's turn -- the start of the next header.
END_OF_TURN = "\n###"
#: The roles a message may have.
ROLES = ("system", "user", "assistant")

#: The template in Jinja; ``{% generation %}`` marks what :func:`assistant_mask` marks.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'assistant' -%}"
    "{{ '\\n###' }}{%- endif -%}"
    "{{ ' ' + m['role'] | capitalize + ':\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{{ m['content'] + '\\n###' }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] != 'assistant' -%}{{ '\\n###' }}{%- endif -%}"
    "{{ ' Assistant:\\n' }}{%- endif -%}")


def _check_messages(messages) -> None:
    check_type("messages", messages, list)
    if not messages:
        raise ValueError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with a role in {ROLES} "
                             f"and a string content, got {m!r}")


def _header(text: str, role: str) -> str:
    """The header of ``role``'s turn after ``text`` (an ended turn already wrote "\\n###")."""
    header = HEADER.format(role=role.capitalize())
    return header[len(END_OF_TURN):] if text.endswith(END_OF_TURN) else header


def render_chat(messages: list[dict], add_generation_prompt: bool = False):
    """The text of a conversation and the ``[start, end)`` character spans of the
    assistant's turns (content + :data:`END_OF_TURN`)."""
    _check_messages(messages)
    text, spans = "", []
    for m in messages:
        text += _header(text, m["role"])
        start = len(text)
        text += m["content"]
        if m["role"] == "assistant":
            text += END_OF_TURN
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += _header(text, "assistant")
    return text, spans


def assistant_mask(messages: list[dict]) -> torch.Tensor:
    """A ``(len(text),)`` boolean mask, true on the characters of the assistant's turns."""
    text, spans = render_chat(messages)
    mask = torch.zeros(len(text), dtype=torch.bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def encode_chat(messages: list[dict], tokenizer: CharTokenizer):
    """Token ids ``(T,)`` and the assistant mask ``(T,)`` of a conversation, one token
    per character."""
    check_type("tokenizer", tokenizer, CharTokenizer)
    text, _ = render_chat(messages)
    return tokenizer.encode(text), assistant_mask(messages)


def pad_batch(sequences: list[torch.Tensor], masks: list[torch.Tensor]):
    """Right-pad to ``(B, T)``: ids padded with 0, masks with False."""
    if len(sequences) != len(masks) or not sequences:
        raise ValueError("sequences and masks must be non-empty and of the same length")
    T = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        ids[i, :len(s)], mask[i, :len(m)] = s, m
    return ids, mask


def hf_tokenizer(vocab: str):
    """A character-level ``transformers.PreTrainedTokenizerFast`` over ``vocab`` (one id
    per character, in order) with :data:`CHAT_TEMPLATE`; its last character doubles as
    the end-of-text and padding token. Built offline, for ``apply_chat_template`` and TRL."""
    check_type("vocab", vocab, str)
    if len(set(vocab)) != len(vocab) or not vocab:
        raise ValueError("vocab must be a non-empty string of distinct characters")
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    m = tokenizers.models
    tok = tokenizers.Tokenizer(m.WordLevel({c: i for i, c in enumerate(vocab)},
                                           unk_token=vocab[-1]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=CHAT_TEMPLATE, eos_token=vocab[-1],
        pad_token=vocab[-1])


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)  # the companion GPT returns (logits, loss); transformers an output
    return out.logits if hasattr(out, "logits") else out[0]


def token_logps(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T - 1)``: ``log p(ids[:, t] | ids[:, :t])`` for t = 1 .. T - 1."""
    check_tensor("ids", ids, ndim=2)
    logp = _logits(model, ids)[:, :-1].log_softmax(-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the summed log-probability of the tokens where ``mask (B, T)`` is True
    (the response), each predicted from the tokens before it. ``mask[:, 0]`` must be False."""
    check_tensor("mask", mask, ndim=2)
    if mask.shape != ids.shape:
        raise ValueError(f"mask must have the shape of ids {tuple(ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask[:, 0].any():
        raise ValueError("mask must be False at position 0 (nothing predicts it)")
    logp = token_logps(model, ids)
    return (logp * mask[:, 1:]).sum(-1)


def sft_loss(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where ``mask`` is True."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    return model(ids[:, :-1], targets)[1]


def _check_logps(**logps) -> torch.Tensor:
    shape = None
    for name, t in logps.items():
        check_tensor(name, t, ndim=1, floating=True)
        if shape is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        shape = t.shape


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, beta: float = 0.1):
    """DPO's loss (mean over pairs) and the implicit rewards ``beta * log(pi / ref)`` of
    the chosen and rejected responses (detached), as TRL's ``loss_type="sigmoid"``."""
    _check_logps(policy_chosen_logps=policy_chosen_logps,
                 policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = check_float("beta", beta, low=0.0)
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def bradley_terry_loss(chosen_rewards, rejected_rewards) -> torch.Tensor:
    """``mean(-log sigma(r_w - r_l))``: the negative log-likelihood of the choices under
    Bradley and Terry's model ``P(w beats l) = sigma(r_w - r_l)``."""
    _check_logps(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


class RewardModel(nn.Module):
    """A GPT (a copy) with a scalar head on the final hidden state of the last True
    position of ``mask``: ``(ids (B, T), mask (B, T)) -> rewards (B,)``."""

    def __init__(self, gpt: GPT):
        super().__init__()
        check_type("gpt", gpt, GPT)
        self.gpt = copy.deepcopy(gpt)
        self.head = nn.Linear(gpt.config.n_embd, 1).to(gpt.lm_head.weight)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        positions = torch.arange(ids.size(1), device=ids.device)
        x = g.token_embedding(ids) + g.position_embedding(positions)  # (B, T, C)
        for block in g.blocks:
            x = block(x)
        h = g.final_norm(x)
        last = torch.arange(ids.size(1), device=ids.device).mul(mask).argmax(1)  # (B,)
        return self.head(h[torch.arange(len(ids)), last]).squeeze(-1)


def group_relative_advantages(rewards, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages for ``rewards (G, n)`` -- n samples of each of G prompts:
    ``(r - mean) / (std + eps)`` within each group (std with Bessel's correction, as TRL)."""
    check_tensor("rewards", rewards, ndim=2, floating=True)
    if rewards.size(1) < 2:
        raise ValueError("rewards must hold at least 2 samples per group")
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return (rewards - mean) / (std + eps)


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two labellers' labels ``a`` and ``b`` (sequences of the same length):
    ``(p_o - p_e) / (1 - p_e)``; 1.0 when both use a single, same label."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be non-empty and of the same length, "
                         f"got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum(a.count(c) * b.count(c) for c in set(a) | set(b)) / n ** 2
    return 1.0 if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def flip_labels(n: int, rate: float, seed: int) -> torch.Tensor:
    """``(n,)`` bool: a noisy labeller's flips -- exactly ``round(rate * n)`` of ``n``
    pairs, chosen at random."""
    check_int("n", n, low=0)
    check_float("rate", rate, low=0.0, high=1.0)
    flips = torch.zeros(n, dtype=torch.bool)
    flips[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(rate * n)]] = True
    return flips


# --------------------------------------------------------------------------- instructions

#: The instruction tasks, each with a checkable answer.
TASKS = {"copy": "Repeat: {w}", "reverse": "Reverse: {w}", "count": "Count the letters: {w}",
         "upper": "Uppercase: {w}"}


def corpus_words(text: str, min_len: int = 3, max_len: int = 8) -> list[str]:
    """The distinct lowercase words of ``text`` of ``min_len`` .. ``max_len`` letters, sorted."""
    return sorted(set(re.findall(rf"\b[a-z]{{{min_len},{max_len}}}\b", text)))


def answer(task: str, word: str) -> str:
    """The correct answer of ``task`` on ``word``."""
    return {"copy": word, "reverse": word[::-1], "count": str(len(word)),
            "upper": word.upper()}[task]


def make_instructions(words: list[str], n: int, seed: int) -> list[dict]:
    """``n`` examples ``{"task", "word", "messages"}`` (user then assistant), drawn with
    ``random.Random(seed)``: the same list on every machine."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task, word = rng.choice(sorted(TASKS)), rng.choice(words)
        out.append({"task": task, "word": word, "messages": [
            {"role": "user", "content": TASKS[task].format(w=word)},
            {"role": "assistant", "content": answer(task, word)}]})
    return out


def generate_raw(model: GPT, tokenizer: CharTokenizer, messages: list[dict],
                 max_new_tokens: int = 16) -> str:
    """The model's greedy continuation of ``messages``' generation prompt, uncut."""
    text, _ = render_chat(messages, add_generation_prompt=True)
    prompt = tokenizer.encode(text)[None].to(model.lm_head.weight.device)
    out = model.generate(prompt, max_new_tokens, temperature=0.0)[0, prompt.size(1):]
    return tokenizer.decode(out.tolist())


def respond(model: GPT, tokenizer: CharTokenizer, messages: list[dict],
            max_new_tokens: int = 16) -> str:
    """The model's greedy answer to ``messages``, cut at :data:`END_OF_TURN`."""
    return generate_raw(model, tokenizer, messages, max_new_tokens).split(END_OF_TURN)[0]


#: The characters a well-formed answer of each task uses.
ANSWER_CHARS = {"copy": r"[a-z]+", "reverse": r"[a-z]+", "count": r"[0-9]+",
                "upper": r"[A-Z]+"}


def follows_format(task: str, word: str, raw: str) -> bool:
    """Whether the raw continuation ``raw`` is a well-formed answer, right or wrong: it
    ends its turn (:data:`END_OF_TURN`), and the answer before it has the correct
    answer's length and the task's character set (:data:`ANSWER_CHARS`)."""
    check_type("raw", raw, str)
    if END_OF_TURN not in raw:
        return False
    text = raw.split(END_OF_TURN)[0]
    return (len(text) == len(answer(task, word))
            and re.fullmatch(ANSWER_CHARS[task], text) is not None)


def accuracy(model: GPT, tokenizer: CharTokenizer, examples: list[dict]) -> float:
    """Fraction of ``examples`` whose greedy answer equals the correct one."""
    return sum(respond(model, tokenizer, e["messages"][:1]) == e["messages"][1]["content"]
               for e in examples) / len(examples)


def train_sft(model: GPT, tokenizer: CharTokenizer, examples: list[dict], steps: int,
              lr: float, batch_size: int = 16, seed: int = 0, masked: bool = True,
              on_step=None):
    """AdamW on :func:`sft_loss` (``masked=False``: the loss on every token of the
    conversation); batches drawn with ``seed``; ``on_step(k)``, if given, is called
    after step k (1-based). In place; returns the losses."""
    check_int("steps", steps, low=0)
    seed_everything(seed)
    encoded = [encode_chat(e["messages"], tokenizer) for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=lr, weight_decay=0.0)
    rng, losses = random.Random(seed), []
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, batch_size)
        ids, mask = pad_batch([s for s, _ in batch],
                              [m if masked else torch.ones_like(m) for s, m in batch])
        device = model.lm_head.weight.device
        loss = sft_loss(model, ids.to(device), mask.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            model.eval()
            on_step(len(losses))
            model.train()
    model.eval()
    return losses


def wrong_answer(task: str, word: str) -> str:
    """A plausible wrong answer: a letter short (copy), not reversed, off by one (count),
    not uppercased."""
    return {"copy": word[:-1], "reverse": word, "count": str(len(word) + 1),
            "upper": word}[task]


def preference_pairs(examples: list[dict], noise: float, seed: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` from the criterion "the answer is correct",
    as labelled by a labeller who swaps chosen and rejected on exactly ``round(noise * n)``
    of the ``n`` pairs (:func:`flip_labels`)."""
    flips = flip_labels(len(examples), noise, seed)
    pairs = []
    for e, flip in zip(examples, flips.tolist()):
        good, bad = answer(e["task"], e["word"]), wrong_answer(e["task"], e["word"])
        chosen, rejected = (bad, good) if flip else (good, bad)
        pairs.append({"prompt": e["messages"][:1], "chosen": chosen, "rejected": rejected})
    return pairs


def _pair_batch(pairs: list[dict], tokenizer: CharTokenizer, key: str, device):
    convs = [p["prompt"] + [{"role": "assistant", "content": p[key]}] for p in pairs]
    ids, mask = pad_batch(*zip(*(encode_chat(c, tokenizer) for c in convs)))
    return ids.to(device), mask.to(device)


def train_dpo(policy: GPT, reference: GPT, tokenizer: CharTokenizer, pairs: list[dict],
              steps: int, lr: float, beta: float = 0.1, batch_size: int = 8, seed: int = 0):
    """AdamW on :func:`dpo_loss` against the frozen ``reference``; batches of pairs drawn
    with ``seed``. Dropout stays off (eval mode), as TRL's ``disable_dropout``: the first
    loss is then exactly ``log 2``. Trains ``policy`` in place; returns the losses."""
    check_int("steps", steps, low=0)
    seed_everything(seed)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=lr, weight_decay=0.0)
    rng, losses, device = random.Random(seed), [], policy.lm_head.weight.device
    policy.eval()
    reference.eval()
    for _ in range(steps):
        batch = rng.sample(pairs, batch_size)
        chosen = _pair_batch(batch, tokenizer, "chosen", device)
        rejected = _pair_batch(batch, tokenizer, "rejected", device)
        with torch.no_grad():
            ref = sequence_logps(reference, *chosen), sequence_logps(reference, *rejected)
        loss, _, _ = dpo_loss(sequence_logps(policy, *chosen),
                              sequence_logps(policy, *rejected), *ref, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_reward(reward_model: RewardModel, tokenizer: CharTokenizer, pairs: list[dict],
                 steps: int, lr: float, batch_size: int = 8, seed: int = 0):
    """AdamW on :func:`bradley_terry_loss` of ``reward_model``'s scores of the chosen and
    rejected answers; dropout off, batches drawn with ``seed``. In place; the losses."""
    check_type("reward_model", reward_model, RewardModel)
    check_int("steps", steps, low=0)
    seed_everything(seed)
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=lr, weight_decay=0.0)
    rng, losses = random.Random(seed), []
    device = reward_model.head.weight.device
    reward_model.eval()
    for _ in range(steps):
        batch = rng.sample(pairs, batch_size)
        loss = bradley_terry_loss(reward_model(*_pair_batch(batch, tokenizer, "chosen", device)),
                                  reward_model(*_pair_batch(batch, tokenizer, "rejected",
                                                            device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def pair_margins(model: nn.Module, tokenizer: CharTokenizer, pairs: list[dict]):
    """``(n,)``: chosen minus rejected score of each pair -- the reward of a
    :class:`RewardModel`, or a policy's :func:`sequence_logps` of the answer."""
    device = next(model.parameters()).device
    chosen = _pair_batch(pairs, tokenizer, "chosen", device)
    rejected = _pair_batch(pairs, tokenizer, "rejected", device)
    if isinstance(model, RewardModel):
        return model(*chosen) - model(*rejected)
    return sequence_logps(model, *chosen) - sequence_logps(model, *rejected)


# --------------------------------------------------------------------------- the record

#: Where the chapter's recorded runs live.
RECORD = Path(__file__).resolve().parent / "assets" / "alignment_runs.json"
#: The chapter's budget -- SFT steps, batch and a learning-rate grid per SFT variant
#: (full: masked and unmasked; LoRA: masked), each variant's rate chosen on
#: :func:`dev_instructions` (:func:`choose_rate`); then DPO and SFT on the chosen
#: answers, one learning-rate grid for both, chosen the same way. ``start_lr`` is the
#: rate of the preference section's SFT start.
SFT_SETTINGS = {"steps": 40, "batch_size": 8,
                "lr_grid": {"full": [3e-4, 1e-3, 3e-3, 1e-2],
                            "lora": [1e-3, 3e-3, 1e-2, 3e-2]},
                "select_on": "dev"}
PREF_SETTINGS = {"steps": 20, "batch_size": 8, "beta": 0.1,
                 "lr_grid": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                 "noise": [0.0, 0.3], "start_lr": 1e-3, "select_on": "dev"}
#: The reward model (Bradley--Terry, from the SFT model) and the longer SFT runs.
REWARD_SETTINGS = {"steps": 40, "batch_size": 8, "lr": 1e-4}
LONG_SFT = {"steps": 120, "eval_at": [10, 40, 120], "lr": 1e-3, "batch_size": 8}
SEEDS = (0, 1, 2)


def instruction_split(corpus):
    """``(train, test, preference)`` instruction sets over the words of the corpus's
    training text; the test words are disjoint from the others (every other word)."""
    words = corpus_words(corpus.tokenizer.decode(corpus.train_ids.tolist()))
    train_words, test_words = words[::2], words[1::2]
    return (make_instructions(train_words, 512, seed=0),
            make_instructions(test_words, 48, seed=1),
            make_instructions(train_words, 256, seed=2))


def dev_instructions(corpus, n: int = 48) -> list[dict]:
    """``n`` development prompts for choosing learning rates: training words, but
    (task, word) pairs in neither the SFT nor the preference set; disjoint from the test."""
    train, _, prefs = instruction_split(corpus)
    seen = {(e["task"], e["word"]) for e in train + prefs}
    words = corpus_words(corpus.tokenizer.decode(corpus.train_ids.tolist()))[::2]
    fresh = [e for e in make_instructions(words, 8 * n, seed=3)
             if (e["task"], e["word"]) not in seen]
    unique = list({(e["task"], e["word"]): e for e in fresh}.values())
    return unique[:n]


def evaluate(model: GPT, tokenizer: CharTokenizer, test: list[dict], windows=None) -> dict:
    """Per-example raw greedy answers and correctness on ``test``, the policy's pairwise
    accuracy on the test's clean pairs, and the loss on the original text's ``windows``."""
    from companion.train import language_model_loss
    raw = [generate_raw(model, tokenizer, e["messages"][:1]) for e in test]
    correct = [r.split(END_OF_TURN)[0] == e["messages"][1]["content"]
               for r, e in zip(raw, test)]
    margins = pair_margins(model, tokenizer, preference_pairs(test, 0.0, 0))
    out = {"correct": correct, "raw": raw, "pair_acc": (margins > 0).float().mean().item()}
    if windows is not None:
        out["docs_loss"] = language_model_loss(model, *windows)
    return out


def choose_rate(runs: list[dict]) -> float:
    """The learning rate of ``runs`` (dicts with ``"lr"`` and a ``"dev"`` evaluation, the
    grid of one method over one or more seeds) with the highest mean dev accuracy over
    its runs, ties broken by the mean dev pairwise accuracy, then by the lower rate."""
    check_type("runs", runs, list)
    if not runs or any("lr" not in r or "dev" not in r for r in runs):
        raise ValueError("runs must be a non-empty list of dicts with 'lr' and 'dev'")
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(
            (sum(r["dev"]["correct"]) / len(r["dev"]["correct"]), r["dev"]["pair_acc"]))

    def score(lr):
        accs, pairs = zip(*by_lr[lr])
        return sum(accs) / len(accs), sum(pairs) / len(pairs), -lr

    return max(by_lr, key=score)


def win_tie_loss(correct, start_correct) -> tuple[int, int, int]:
    """Judged by the criterion on the same prompts: wins (this model correct, the start
    not), ties (both or neither correct) and losses (the reverse)."""
    a, b = [bool(x) for x in correct], [bool(x) for x in start_correct]
    if len(a) != len(b) or not a:
        raise ValueError(f"correct and start_correct must be non-empty and of the same "
                         f"length, got {len(a)} and {len(b)}")
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    return wins, len(a) - wins - losses, losses


def _setup_run():
    from companion.pretrained import load_pretrained_gpt
    from companion.train import fixed_windows
    torch.set_num_threads(1)
    model, corpus = load_pretrained_gpt("cpu")
    return model, corpus, fixed_windows(corpus.val_ids, 32, 32)


def sft_run(method: str, masked: bool, lr: float, seed: int, steps: int) -> dict:
    """SFT of the pretrained GPT (``method`` "full" or "lora", chapter 10) and its results."""
    from companion.finetune import prepare_adaptation
    model, corpus, windows = _setup_run()
    train, test, _ = instruction_split(corpus)
    torch.manual_seed(seed)
    prepare_adaptation(model, method, rank=4, alpha=8.0)
    losses = train_sft(model, corpus.tokenizer, train, steps, lr,
                       SFT_SETTINGS["batch_size"], seed, masked)
    return {"method": method, "masked": masked, "lr": lr, "seed": seed, "losses": losses,
            "dev": evaluate(model, corpus.tokenizer, dev_instructions(corpus)),
            **evaluate(model, corpus.tokenizer, test, windows)}


def _start_model(seed: int):
    start, corpus, windows = _setup_run()
    train, test, prefs = instruction_split(corpus)
    train_sft(start, corpus.tokenizer, train, SFT_SETTINGS["steps"],
              PREF_SETTINGS["start_lr"], SFT_SETTINGS["batch_size"], seed)
    return start, corpus, windows, test, prefs


def _tuned(kind, model, tok, test, dev, windows, **info):
    return {"kind": kind, **info, "dev": evaluate(model, tok, dev),
            **evaluate(model, tok, test, windows)}


def preference_runs(seed: int, noise: float, steps: int, lrs=None) -> list[dict]:
    """From the SFT model of ``seed``, on pairs labelled with ``noise``: DPO, and SFT on
    the chosen answers (the same pairs, steps, batch and learning-rate grid, ``lrs`` or
    ``PREF_SETTINGS["lr_grid"]``), each evaluated on the dev and the test prompts; and a
    reward model on the same pairs."""
    s = PREF_SETTINGS
    start, corpus, windows, test, prefs = _start_model(seed)
    tok, dev = corpus.tokenizer, dev_instructions(corpus)
    runs = [{"kind": "start", "seed": seed, "noise": noise,
             **evaluate(start, tok, test, windows)}]
    pairs = preference_pairs(prefs, noise, seed)
    sft_data = [{"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]}
                for p in pairs]
    for lr in s["lr_grid"] if lrs is None else lrs:
        info = {"noise": noise, "lr": lr, "seed": seed}
        dpo = copy.deepcopy(start)
        losses = train_dpo(dpo, start, tok, pairs, steps, lr, s["beta"], s["batch_size"], seed)
        runs.append(_tuned("dpo", dpo, tok, test, dev, windows, **info, losses=losses))
        sft = copy.deepcopy(start)
        losses = train_sft(sft, tok, sft_data, steps, lr, s["batch_size"], seed)
        runs.append(_tuned("sft", sft, tok, test, dev, windows, **info, losses=losses))
    r = REWARD_SETTINGS
    torch.manual_seed(seed)
    rm = RewardModel(start)
    losses = train_reward(rm, tok, pairs, r["steps"], r["lr"], r["batch_size"], seed)
    held_out = pair_margins(rm, tok, preference_pairs(test, 0.0, 0))
    runs.append({"kind": "reward", "noise": noise, "seed": seed, "losses": losses,
                 "margins": held_out.tolist()})
    return runs


def long_sft_run(seed: int) -> list[dict]:
    """Full, masked SFT for ``LONG_SFT["steps"]`` steps, evaluated at ``eval_at``."""
    model, corpus, windows = _setup_run()
    train, test, _ = instruction_split(corpus)
    out = []

    def on_step(k):
        if k in LONG_SFT["eval_at"]:
            out.append({"kind": "long_sft", "seed": seed, "step": k,
                        **evaluate(model, corpus.tokenizer, test, windows)})

    losses = train_sft(model, corpus.tokenizer, train, LONG_SFT["steps"], LONG_SFT["lr"],
                       LONG_SFT["batch_size"], seed, on_step=on_step)
    out[-1]["losses"] = losses
    return out


def _worker(job):
    if job[0] == "sft":
        return [sft_run(*job[1:])]
    if job[0] == "long":
        return long_sft_run(*job[1:])
    return preference_runs(*job[1:])


def _settings() -> dict:
    return {"sft": SFT_SETTINGS, "pref": PREF_SETTINGS, "reward": REWARD_SETTINGS,
            "long_sft": LONG_SFT}


def record_runs(path=RECORD, seeds=SEEDS, jobs: int = 4, parts=("sft", "pref", "long")):
    """Run the chapter's grid (minutes on one core per run) and write it as JSON; each
    finished job is also appended to ``path`` + ``.partial`` as it ends. Recording only
    some ``parts`` keeps the other parts' runs of the record at ``path``."""
    import multiprocessing
    steps = SFT_SETTINGS["steps"]
    grid = [("pref", seed, noise, PREF_SETTINGS["steps"]) for seed in seeds
            for noise in PREF_SETTINGS["noise"]] if "pref" in parts else []
    grid += [("long", seed) for seed in seeds] if "long" in parts else []
    grid += [("sft", m, masked, lr, seed, steps) for seed in seeds
             for m, lrs in SFT_SETTINGS["lr_grid"].items() for lr in lrs
             for masked in ((True, False) if m == "full" else (True,))] \
        if "sft" in parts else []
    kept = [] if set(parts) >= {"sft", "pref", "long"} else [
        r for r in json.loads(Path(path).read_text())["runs"]
        if _part(r) not in parts]
    partial, runs = Path(str(path) + ".partial"), []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for out in pool.imap_unordered(_worker, grid, chunksize=1):
            runs += out
            with partial.open("a") as f:
                f.write(json.dumps(out, separators=(",", ":")) + "\n")
    runs = sorted(kept + runs, key=lambda r: json.dumps(r, sort_keys=True))
    record = {"what": "companion.align.record_runs", "torch": torch.__version__,
              "threads": 1, **_settings(), "runs": runs}
    Path(path).write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def _part(run: dict) -> str:
    if "method" in run:
        return "sft"
    return "long" if run["kind"] == "long_sft" else "pref"


def load_record(path=RECORD) -> dict:
    """The recorded runs; refuses a record made with other settings."""
    record = json.loads(Path(path).read_text())
    if any(record.get(k) != v for k, v in _settings().items()):
        raise ValueError(f"{path} was recorded with other settings; re-run record_runs()")
    return record


if __name__ == "__main__":
    record_runs()
