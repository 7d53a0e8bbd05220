"""Decoding: turn next-token logits into tokens.

Book: Chapter 4, "The modern decoder", section "Decoding". Every knob is a transform
of the logits ``z (B, V)`` that removes tokens (sets their logit to ``-inf``) or
reshapes the distribution, applied in this order:

* temperature ``T``: ``z / T``; ``T < 1`` sharpens, ``T > 1`` flattens;
* top-k: keep the ``k`` largest logits (and any that tie with the ``k``-th);
* top-p (nucleus, :cite:p:`holtzman2020curious`): keep the smallest set of most
  likely tokens whose probabilities add up to at least ``p``;
* min-p: keep tokens whose probability is at least ``min_p`` times the largest.

Then :func:`sample` draws from ``softmax`` of what is left; ``temperature=0`` is greedy
decoding, handled as an arg-max because ``z / T`` overflows as ``T -> 0``. The unit tests
check :func:`filter_logits` against ``transformers``' ``TemperatureLogitsWarper`` ->
``TopKLogitsWarper`` -> ``TopPLogitsWarper`` -> ``MinPLogitsWarper`` and
:func:`apply_repetition_penalty` against ``RepetitionPenaltyLogitsProcessor``.
"""

from __future__ import annotations

import torch

from companion._validate import check_float, check_int, check_tensor, check_type

__all__ = ["filter_logits", "apply_repetition_penalty", "sample", "generate", "entropy",
           "distinct_n"]


def _check_logits(logits) -> torch.Tensor:
    check_tensor("logits", logits, ndim=2, floating=True)
    if logits.size(-1) < 1:
        raise ValueError("logits must have at least one column (the vocabulary)")
    return logits


def _top_k(z: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(z, min(k, z.size(-1))).values[..., -1:]  # (B, 1)
    return z.masked_fill(z < kth, float("-inf"))


def _top_p(z: torch.Tensor, p: float) -> torch.Tensor:
    z_sorted, order = torch.sort(z, descending=False)  # least likely first
    cum = z_sorted.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - p  # the tail whose mass is at most 1 - p
    drop[..., -1:] = False  # the most likely token always stays
    return z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _min_p(z: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(z, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return z.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed entries become ``-inf``.

    ``logits (B, V)``; returns a new ``(B, V)`` tensor. ``None`` switches a filter off.
    """
    _check_logits(logits)
    temperature = check_float("temperature", temperature, low=0.0, low_open=True)
    z = logits / temperature
    if top_k is not None:
        z = _top_k(z, check_int("top_k", top_k, low=1))
    if top_p is not None:
        z = _top_p(z, check_float("top_p", top_p, low=0.0, high=1.0, low_open=True))
    if min_p is not None:
        z = _min_p(z, check_float("min_p", min_p, low=0.0, high=1.0))
    return z


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Make every token already in ``ids (B, T)`` less likely (CTRL's penalty).

    A seen token's logit is divided by ``penalty`` if positive and multiplied by it if
    negative, once however often it occurs :cite:p:`keskar2019ctrl`.
    """
    _check_logits(logits)
    check_tensor("ids", ids, ndim=2)
    if ids.size(0) != logits.size(0):
        raise ValueError(f"ids must have the batch size of logits ({logits.size(0)}), "
                         f"got {ids.size(0)}")
    penalty = check_float("penalty", penalty, low=0.0, low_open=True)
    seen = torch.gather(logits, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, ids, seen)


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Draw one token per row of ``logits (B, V)``; returns ``(B, 1)``.

    ``temperature=0`` takes the arg-max (greedy). ``generator`` is one generator for the
    batch or a list with one per row, so each request of a server keeps its own seed.
    """
    _check_logits(logits)
    temperature = check_float("temperature", temperature, low=0.0)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits, temperature=temperature, top_k=top_k,
                                        top_p=top_p, min_p=min_p), dim=-1)
    if isinstance(generator, list):
        if len(generator) != len(probs):
            raise ValueError(f"generator must hold one generator per row ({len(probs)}), "
                             f"got {len(generator)}")
        return torch.stack([torch.multinomial(p, 1, generator=g)
                            for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)


def _max_len(model) -> int:
    config = model.config
    return getattr(config, "max_seq_len", None) or config.block_size


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, *, repetition_penalty=None,
             **sampling) -> torch.Tensor:
    """Continue ``ids (B, T)`` by ``max_new_tokens`` tokens with a key/value cache.

    ``model`` is chapter 4's :class:`~companion.transformer.GPT` or a
    :class:`~companion.decoder.Decoder`: both take ``kv_caches`` and make them with
    ``new_kv_caches``. ``sampling``: the keyword arguments of :func:`sample`.
    """
    check_tensor("ids", ids, ndim=2)
    check_int("max_new_tokens", max_new_tokens, low=0)
    if ids.size(1) < 1:
        raise ValueError("ids must hold at least one token to start from")
    if ids.size(1) + max_new_tokens > _max_len(model):
        raise ValueError(f"ids ({ids.size(1)}) + max_new_tokens ({max_new_tokens}) exceed "
                         f"the model's context of {_max_len(model)} positions")
    was_training = model.training
    model.eval()
    caches, step = model.new_kv_caches(ids.size(0)), ids
    for _ in range(max_new_tokens):
        out = model(step, kv_caches=caches)
        logits = (out[0] if isinstance(out, tuple) else out)[:, -1]  # (B, V)
        if repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, ids, repetition_penalty)
        step = sample(logits, **sampling)  # (B, 1)
        ids = torch.cat((ids, step), dim=1)
    model.train(was_training)
    return ids


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` per row; removed (``-inf``) entries count 0."""
    _check_logits(logits)
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


def distinct_n(ids, n: int = 2) -> float:
    """Fraction of distinct ``n``-grams among all ``n``-grams of a token sequence."""
    check_int("n", n, low=1)
    check_type("ids", ids, (list, tuple, torch.Tensor))
    seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        raise ValueError(f"ids must hold at least n={n} tokens, got {len(seq)}")
    return len(set(grams)) / len(grams)
