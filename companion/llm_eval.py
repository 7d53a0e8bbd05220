r"""How language models are evaluated (book: chapter 5, "Evaluating language models").

A language model is scored by the probability it gives to text, not by a label:

1. :func:`loglikelihood` -- ``log p(continuation | context) = sum_t log p(y_t | y_<t)``
   over the continuation's tokens, and whether greedy decoding would have produced it,
   with the conventions of EleutherAI's lm-evaluation-harness :cite:p:`gao2024lmeval`
   (its ``HFLM.loglikelihood`` is the oracle in the tests).
2. Multiple choice (:func:`choice_loglikelihoods`, :func:`choice_metrics`): the choice
   with the highest log-likelihood (``acc``), per character (``acc_norm``) or per UTF-8
   byte (``acc_bytes``), on a frozen set built from the book's corpus
   (:func:`build_choice_items`); :func:`lm_eval_task` hands the same items to lm-eval.
3. :func:`rolling_loglikelihood` -- perplexity of a text longer than the context:
   windows of ``max_len`` tokens moved by ``stride``, each token scored once with at
   least ``max_len - stride`` tokens before it; ``ppl = exp(-(1/N) sum_t log p_t)`` and
   bits per byte ``= -sum_t log p_t / (ln 2 * bytes)`` (:func:`bits_per_byte`), which,
   unlike a per-token perplexity, does not depend on the tokenizer.
4. :func:`pass_at_k` -- the unbiased ``pass@k = 1 - C(n-c, k) / C(n, k)`` of
   :cite:t:`chen2021evaluating`, as the stable product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``.
5. Hygiene: :func:`contamination` (n-gram overlap with the training text),
   :func:`mcnemar` and :func:`paired_difference` (two models on the same items), and
   :func:`items_needed` (how many items a difference of a given size needs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from companion._optional import require
from companion._validate import check_float, check_int, check_type
from companion.dedup import ngram_overlap
from companion.metrics.resampling import BootstrapResult, bootstrap_ci
from companion.transformer import GPT

__all__ = ["CHOICE_SET", "CHOICE_SETTINGS", "ChoiceItem", "bits_per_byte",
           "build_choice_items", "build_choice_set", "choice_loglikelihoods",
           "choice_metrics", "contamination", "encode_pair", "hf_char_tokenizer",
           "items_from_json", "items_needed", "items_to_json", "lm_eval_task",
           "load_choice_set", "loglikelihood", "loglikelihoods", "mcnemar",
           "naive_pass_at_k", "paired_difference", "pass_at_k", "rolling_loglikelihood"]

# --------------------------------------------------------------------------- log-likelihood


def _max_len(model) -> int:
    config = model.config
    return config.block_size if isinstance(model, GPT) else config.n_positions


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` ids -> ``(B, T, V)`` logits, for the book's GPT or a transformers model."""
    if isinstance(model, GPT):
        return model(ids)[0]
    return model(ids).logits


def _check_ids(name: str, ids) -> list[int]:
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    check_type(name, ids, (list, tuple))
    return [check_int(f"{name}[{k}]", i, low=0) for k, i in enumerate(ids)]


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple], max_len: int | None = None
                   ) -> list[tuple[float, bool]]:
    """:func:`loglikelihood` of each ``(context_ids, continuation_ids)``, in one batch.

    The rows are padded on the right (causal attention never looks right, so padding
    changes nothing) and run through ``model`` together.
    """
    max_len = _max_len(model) if max_len is None else check_int("max_len", max_len, low=1)
    rows, spans = [], []
    for k, (context, continuation) in enumerate(requests):
        context = _check_ids(f"requests[{k}][0]", context)
        continuation = _check_ids(f"requests[{k}][1]", continuation)
        if not context or not continuation:
            raise ValueError(f"requests[{k}]: context and continuation must each hold at least "
                             "one token (lm-eval puts an end-of-text token before an empty "
                             "context)")
        if len(continuation) > max_len:
            raise ValueError(f"requests[{k}]: the continuation has {len(continuation)} tokens, "
                             f"more than max_len={max_len}")
        # lm-eval: keep the last max_len + 1 tokens, feed all but the last
        rows.append((context + continuation)[-(max_len + 1):][:-1])
        spans.append(continuation)
    device = next(model.parameters()).device
    width = max(len(row) for row in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row)
    logprobs = torch.log_softmax(_logits(model, batch), dim=-1)  # (B, T, V)
    results = []
    for i, (row, continuation) in enumerate(zip(rows, spans)):
        scored = logprobs[i, len(row) - len(continuation):len(row)]  # (n_cont, V)
        target = torch.tensor(continuation, device=device)
        logprob = scored.gather(-1, target[:, None]).sum()
        results.append((float(logprob), bool((scored.argmax(-1) == target).all())))
    return results


def loglikelihood(model, context_ids, continuation_ids) -> tuple[float, bool]:
    """``(log p(continuation | context), is_greedy)`` as lm-evaluation-harness scores it.

    ``sum_t log softmax(logits)[y_t]`` over the continuation's tokens, each predicted from
    everything before it; ``is_greedy`` is True when every continuation token is the
    arg-max of its position (greedy decoding would have written it). A request longer
    than the model's context keeps only its last ``max_len + 1`` tokens, as lm-eval
    does. ``model`` is the book's :class:`~companion.transformer.GPT` or a
    ``transformers`` causal LM; ids are lists or 1-D tensors, context non-empty.
    """
    return loglikelihoods(model, [(context_ids, continuation_ids)])[0]


def hf_char_tokenizer(tokenizer, eos_token: str = "\n"):
    """A character-level ``PreTrainedTokenizerFast`` with the ids of ``tokenizer``.

    ``tokenizer`` is a :class:`~companion.data.CharTokenizer`; the result encodes every
    character to the same id (a BPE model with no merges), so that lm-eval can run the
    book's character GPT. ``eos_token`` (a character of the vocabulary) is the
    end-of-text token lm-eval puts before a text it scores from the start.
    """
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    vocab = dict(tokenizer.stoi)
    if eos_token not in vocab:
        raise ValueError(f"eos_token must be a character of the vocabulary, got {eos_token!r}")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token)


# --------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: which of ``choices`` continues ``context``."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _word_starts(text: str) -> list[int]:
    """Positions of the single spaces between two words."""
    return [i for i in range(1, len(text) - 1) if text[i] == " "
            and not text[i - 1].isspace() and not text[i + 1].isspace()]


def _span(text: str, start: int, words: int, starts: list[int], k: int) -> str:
    """``words`` words of ``text`` from the word start ``starts[k]`` (= ``start``)."""
    end = starts[k + words] if k + words < len(starts) else len(text)
    return text[start:end].split("\n")[0]


def build_choice_items(text: str, n_items: int, n_choices: int = 4, context_chars: int = 96,
                       max_words: int = 6, seed: int = 0) -> list[ChoiceItem]:
    """A deterministic multiple-choice set from ``text``.

    Each item is ``context_chars`` characters of ``text`` ending before a word; the right
    answer is the next 1 to ``max_words`` words, the others the same number of words
    or another, from elsewhere in ``text`` -- so the choices differ in length, which is
    where ``acc``, ``acc_norm`` and ``acc_bytes`` part. Choices start with their space
    and stop at a line end.
    """
    check_int("n_items", n_items, low=1)
    check_int("n_choices", n_choices, low=2)
    check_int("context_chars", context_chars, low=1)
    check_int("max_words", max_words, low=1)
    starts = [s for s in _word_starts(text) if s >= context_chars]
    if len(starts) < n_items + max_words:
        raise ValueError(f"text has {len(starts)} word starts, too few for {n_items} items")
    generator = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    items = []
    for _ in range(100 * n_items):
        if len(items) == n_items:
            break
        k = draw(len(starts) - max_words)
        context = text[starts[k] - context_chars:starts[k]]
        gold_text = _span(text, starts[k], 1 + draw(max_words), starts, k)
        choices = [gold_text]
        while len(choices) < n_choices:
            j = draw(len(starts) - max_words)
            other = _span(text, starts[j], 1 + draw(max_words), starts, j)
            if other.strip() and other not in choices:
                choices.append(other)
        if not gold_text.strip():
            continue  # the answer ends at a line end: skip an empty one
        gold = draw(n_choices)
        choices[0], choices[gold] = choices[gold], choices[0]
        items.append(ChoiceItem(context, tuple(choices), gold))
    if len(items) < n_items:
        raise ValueError(f"found only {len(items)} of n_items={n_items} items in text")
    return items


def choice_loglikelihoods(model, encode: Callable[[str], list[int]],
                          items: Sequence[ChoiceItem], batch_size: int = 64
                          ) -> list[list[float]]:
    """The log-likelihood of every choice of every item, ``[[ll_choice, ...], ...]``.

    ``encode`` maps a string to token ids; each (context, choice) is cut into tokens by
    :func:`encode_pair`, as lm-eval does for a causal model; ``batch_size`` requests
    of similar length (lm-eval also sorts them, longest first) run through the model at
    a time, so that little of a batch is padding.
    """
    check_int("batch_size", batch_size, low=1)
    requests = [encode_pair(encode, item.context, choice)
                for item in items for choice in item.choices]
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    flat = [0.0] * len(requests)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        for i, (ll, _) in zip(chunk, loglikelihoods(model, [requests[i] for i in chunk])):
            flat[i] = ll
    results, start = [], 0
    for item in items:
        results.append(flat[start:start + len(item.choices)])
        start += len(item.choices)
    return results


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval cuts a request for a causal model.

    Trailing whitespace of the context moves to the continuation (and so is scored);
    then ``context + continuation`` is encoded whole and split after the context's own
    tokens, so a tokenizer that merges across the boundary is handled.
    """
    if not context:
        raise ValueError("context must not be empty")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = list(encode(context + continuation)), list(encode(context))
    return head, whole[len(head):]


def choice_metrics(lls: Sequence[Sequence[float]], items: Sequence[ChoiceItem]
                   ) -> dict[str, torch.Tensor]:
    """Per-item correctness (1.0/0.0) under the three scoring rules of lm-eval.

    ``acc``: the arg-max of the log-likelihoods; ``acc_norm``: of the log-likelihood per
    character of the choice; ``acc_bytes``: per UTF-8 byte. Ties go to the first choice
    (``np.argmax``). The mean of each tensor is lm-eval's metric of that name.
    """
    if len(lls) != len(items):
        raise ValueError(f"lls has {len(lls)} rows for {len(items)} items")
    out = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for k, (row, item) in enumerate(zip(lls, items)):
        ll = torch.tensor(row, dtype=torch.float64)
        if ll.shape != (len(item.choices),) or not bool(ll.isfinite().all()):
            raise ValueError(f"lls[{k}] must hold one finite log-likelihood per choice "
                             f"({len(item.choices)}), got {row}")
        chars = torch.tensor([len(c) for c in item.choices], dtype=torch.float64)
        nbytes = torch.tensor([len(c.encode("utf-8")) for c in item.choices],
                              dtype=torch.float64)
        for name, score in (("acc", ll), ("acc_norm", ll / chars), ("acc_bytes", ll / nbytes)):
            out[name].append(float(int(score.argmax()) == item.gold))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def lm_eval_task(items: Sequence[ChoiceItem], name: str = "pydoc_choice") -> dict:
    """An lm-evaluation-harness task config for ``items``, runnable offline.

    Pass it in ``tasks=[...]`` to ``lm_eval.simple_evaluate``: the documents come from
    memory (``custom_dataset``), the choice follows the context directly
    (``target_delimiter=""``), and the metrics are ``acc``, ``acc_norm``, ``acc_bytes``.
    """
    docs = [{"context": it.context, "choices": list(it.choices), "gold": it.gold}
            for it in items]

    def dataset(**_):
        datasets = require("datasets")
        return {"test": datasets.Dataset.from_list(docs)}

    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
               for m in ("acc", "acc_norm", "acc_bytes")]
    return {"task": name, "custom_dataset": dataset, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": lambda doc: doc["context"],
            "doc_to_choice": lambda doc: doc["choices"], "doc_to_target": lambda doc: doc["gold"],
            "target_delimiter": "", "num_fewshot": 0, "metric_list": metrics}


#: Where the frozen multiple-choice set of chapter 5 lies, made by :func:`build_choice_items`
#: on the validation part of the pretrained GPT's corpus with :data:`CHOICE_SETTINGS`.
CHOICE_SET = Path(__file__).resolve().parent / "assets" / "pydoc_choice.json"
#: How the set is built -- items, choices per item, characters of context, words per
#: choice and the seed.
CHOICE_SETTINGS = {"n_items": 200, "n_choices": 4, "context_chars": 64, "max_words": 6,
                   "seed": 0}


def load_choice_set(path: str | Path = CHOICE_SET) -> list[ChoiceItem]:
    """The frozen multiple-choice items (``python -m companion.llm_eval`` rebuilds them)."""
    return items_from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def build_choice_set() -> list[ChoiceItem]:
    """:func:`build_choice_items` on the validation text of ``CharCorpus()``."""
    from companion.data import CharCorpus

    corpus = CharCorpus()
    return build_choice_items(corpus.text[len(corpus.train_ids):], **CHOICE_SETTINGS)


def items_to_json(items: Sequence[ChoiceItem]) -> list[dict]:
    """``items`` as JSON-ready dicts (to freeze a set as an asset)."""
    return [{**asdict(it), "choices": list(it.choices)} for it in items]


def items_from_json(rows: Sequence[dict]) -> list[ChoiceItem]:
    """The inverse of :func:`items_to_json`."""
    return [ChoiceItem(r["context"], tuple(r["choices"]), int(r["gold"])) for r in rows]


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def rolling_loglikelihood(model, ids, max_len: int | None = None, stride: int | None = None,
                          batch_size: int = 64) -> torch.Tensor:
    """``log p(ids[t] | ids[<t])`` for ``t = 1 .. N``, by sliding windows; ``(N,)``.

    ``ids[0]`` is only context (an end-of-text token, as lm-eval puts first). The first
    window is ``ids[0:max_len]``; each next one ends ``stride`` tokens later (the last at
    the end of the text) and is ``max_len`` long, and scores only its tokens not yet
    scored -- each token once, with at least ``max_len - stride`` tokens of context.
    ``stride = max_len`` (the default) gives disjoint windows, lm-eval's
    ``loglikelihood_rolling``; a text that fits is one full pass whatever the stride.
    """
    ids = torch.as_tensor(_check_ids("ids", ids), dtype=torch.long)
    max_len = _max_len(model) if max_len is None else check_int("max_len", max_len, low=1)
    stride = max_len if stride is None else check_int("stride", stride, low=1, high=max_len)
    check_int("batch_size", batch_size, low=1)
    n = len(ids) - 1
    if n < 1:
        raise ValueError("ids must hold at least two tokens: a first one and one to score")
    ends, scored = [], 0  # window inputs ids[end - max_len:end] score ids[scored+1 .. end]
    while scored < n:
        end = min(max_len if not ends else scored + stride, n)
        ends.append((end, end - scored))
        scored = end
    device = next(model.parameters()).device
    pieces = []
    for first in range(0, len(ends), batch_size):
        chunk = ends[first:first + batch_size]
        width = min(max_len, chunk[-1][0])
        inputs = torch.stack([ids[end - width:end] for end, _ in chunk]).to(device)
        logprobs = torch.log_softmax(_logits(model, inputs), dim=-1)  # (B, width, V)
        for row, (end, new) in zip(logprobs, chunk):
            start = end - width
            targets = ids[end - new + 1:end + 1].to(device)
            pieces.append(row[end - new - start:end - start].gather(-1, targets[:, None])[:, 0])
    return torch.cat(pieces)


def bits_per_byte(logprobs, n_bytes: int) -> float:
    """``-sum(logprobs) / (ln 2 * n_bytes)``: the text's code length per UTF-8 byte.

    Unlike the per-token perplexity ``exp(-mean(logprobs))``, it does not depend on how
    the text was cut into tokens (lm-eval's ``bits_per_byte``).
    """
    check_int("n_bytes", n_bytes, low=1)
    return -float(torch.as_tensor(logprobs, dtype=torch.float64).sum()) / (math.log(2) * n_bytes)


# --------------------------------------------------------------------------- pass@k


def _check_nck(n, c, k) -> None:
    check_int("n", n, low=1)
    check_int("c", c, low=0, high=n)
    check_int("k", k, low=1, high=n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of :cite:t:`chen2021evaluating` from ``c`` correct of ``n``.

    ``1 - C(n - c, k) / C(n, k)``: the probability that ``k`` of the ``n`` samples drawn
    without replacement hold at least one correct one; computed as
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the huge binomials.
    """
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def naive_pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - (1 - c/n)^k``: plugs the sample rate into pass@k -- biased (too low)."""
    _check_nck(n, c, k)
    return 1.0 - (1.0 - c / n) ** k


# --------------------------------------------------------------------------- hygiene


def contamination(train_docs: list[str], items: Sequence[ChoiceItem], n: int = 8
                  ) -> list[float]:
    """For each item, the fraction of the word ``n``-grams of its context and right
    answer that occur in ``train_docs`` (:func:`companion.dedup.ngram_overlap`)."""
    return ngram_overlap(train_docs, [it.context + it.choices[it.gold] for it in items], n)


def _correct_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape or not len(a):
        raise ValueError(f"a and b must be non-empty and of one length, got {len(a)}, {len(b)}")
    for name, t in (("a", a), ("b", b)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold 0/1 correctness per item")
    return a, b


def mcnemar(a, b) -> tuple[int, int, float]:
    """Exact McNemar test of two models' per-item correctness ``a``, ``b`` (0/1).

    Only the discordant items count: ``n01`` (``a`` wrong, ``b`` right) and ``n10``.
    Under "equally good" each is a fair coin, so the two-sided p-value is
    ``min(1, 2 P(Binomial(n01 + n10, 1/2) <= min(n01, n10)))``. Returns
    ``(n01, n10, p_value)``.
    """
    a, b = _correct_pair(a, b)
    n01, n10 = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    m, low = n01 + n10, min(n01, n10)
    tail = sum(math.comb(m, i) for i in range(low + 1)) / 2 ** m
    return n01, n10, min(1.0, 2 * tail)


def paired_difference(a, b, n_resamples: int = 2000, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap interval of ``mean(b) - mean(a)`` on the same items
    (chapter 5's :func:`~companion.metrics.bootstrap_ci`)."""
    a, b = _correct_pair(a, b)
    return bootstrap_ci(lambda x, y: float(y.mean() - x.mean()), a, b,
                        n_resamples=n_resamples,
                        generator=torch.Generator().manual_seed(seed))


def items_needed(delta: float, discordant: float, alpha: float = 0.05,
                 power: float = 0.8) -> int:
    """Items a paired test needs to detect an accuracy difference ``delta``.

    Normal approximation to McNemar's test :cite:p:`connor1987sample`: with a fraction
    ``discordant`` of items on which the two models disagree,
    ``n = (z_{1-alpha/2} sqrt(q) + z_power sqrt(q - delta^2))^2 / delta^2``, ``q =
    discordant``. Two models that agree more need fewer items for the same ``delta``.
    """
    check_float("delta", delta, low=0.0, high=1.0, low_open=True)
    check_float("discordant", discordant, low=delta, high=1.0)
    check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    check_float("power", power, low=0.0, high=1.0, low_open=True, high_open=True)
    normal = torch.distributions.Normal(0.0, 1.0)
    z_a = float(normal.icdf(torch.tensor(1 - alpha / 2, dtype=torch.float64)))
    z_b = float(normal.icdf(torch.tensor(power, dtype=torch.float64)))
    root = z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - delta ** 2)
    return math.ceil(root ** 2 / delta ** 2)


if __name__ == "__main__":  # python -m companion.llm_eval: re-freeze the choice set
    CHOICE_SET.write_text(json.dumps(items_to_json(build_choice_set()), ensure_ascii=False,
                                     indent=1) + "\n", encoding="utf-8")
    print(f"wrote {CHOICE_SET}")
