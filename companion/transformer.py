"""The Transformer, from the attention formula up to a small GPT (book: chapter 4).

Read top to bottom:

1. :func:`scaled_dot_product_attention` -- ``softmax(Q K^T / sqrt(d_k) + M) V``
   :cite:p:`vaswani2017attention`, written out with the exact conventions of
   ``torch.nn.functional.scaled_dot_product_attention`` (its oracle in the tests);
   :func:`attention_weights` is the softmax part, for plotting.
2. :class:`MultiHeadAttention` -- project, split into heads, attend, merge,
   project back; the conventions and weight layout of ``torch.nn.MultiheadAttention``
   (:func:`companion.compat.load_attention_from_torch` copies one), plus a key/value cache
   (:class:`KVCache`) for generation.
3. Positions: :func:`sinusoidal_positions` (fixed) and a learned ``nn.Embedding``.
4. :class:`TransformerBlock` -- pre-LayerNorm :cite:p:`xiong2020layer`:
   ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.
5. :class:`GPTConfig` and :class:`GPT` -- a decoder-only language model in the style
   of GPT-2 :cite:p:`radford2019language` with tied input/output embeddings.

Every attention layer has two interchangeable paths: the readable one above, and a
fast one through ``F.scaled_dot_product_attention``, for which PyTorch picks a fused
kernel where one applies -- on a GPU, FlashAttention :cite:p:`dao2022flashattention`
for bf16/fp16 on recent GPUs without an explicit mask, a memory-efficient kernel
otherwise. Both give the same numbers (tested in float64), so the fast path is the
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from companion._validate import check_attention_inputs, check_float, check_int, check_tensor
from companion.sampling import filter_logits

# --------------------------------------------------------------------------- attention


def causal_mask(num_queries: int, num_keys: int, past: int = 0, device=None) -> torch.Tensor:
    """The ``(num_queries, num_keys)`` boolean mask of causal attention (True = may attend).

    Query ``i`` sits at absolute position ``past + i`` and may attend to keys
    ``0 .. past + i``. With ``past=0`` this is ``torch.ones(L, S).tril()``, the mask
    that ``is_causal=True`` means in ``F.scaled_dot_product_attention`` (aligned
    top-left); with a key/value cache of ``past`` earlier tokens the diagonal moves
    right by ``past``.
    """
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=past)


def attention_weights(query: torch.Tensor, key: torch.Tensor, attn_mask=None,
                      is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The attention weights ``softmax(Q K^T * scale + M)``, shape ``(..., L, S)``.

    ``query`` is ``(..., L, d_k)``, ``key`` is ``(..., S, d_k)``; ``scale`` defaults to
    ``1 / sqrt(d_k)``. The mask ``M`` follows ``F.scaled_dot_product_attention``: a
    boolean ``attn_mask`` says where a query *may attend* (False becomes ``-inf``), a
    float one is added to the scores, ``is_causal=True`` is :func:`causal_mask`. A query
    that may attend to nothing gets all-zero weights (as PyTorch does), not NaN.
    Each row of the result sums to 1 (or is all zero). Book: section "The formula".
    """
    check_attention_inputs(query, key, key, attn_mask, 0.0, is_causal)
    return _attention_weights(query, key, attn_mask, is_causal, scale)


def _attention_weights(query, key, attn_mask, is_causal, scale) -> torch.Tensor:
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        attn_mask = causal_mask(L, S, device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # rows where every score is -inf: softmax would give 0/0 = NaN; PyTorch gives zeros
    nothing_to_attend = scores.amax(dim=-1, keepdim=True) == float("-inf")
    weights = torch.softmax(scores.masked_fill(nothing_to_attend, 0.0), dim=-1)
    return weights.masked_fill(nothing_to_attend, 0.0)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, *,
                                 return_weights: bool = False):
    """Attention, ``softmax(Q K^T / sqrt(d_k) + M) V``, the readable way.

    Same arguments and conventions as ``torch.nn.functional.scaled_dot_product_attention``:
    ``query (..., L, d_k)``, ``key (..., S, d_k)``, ``value (..., S, d_v)`` give
    ``(..., L, d_v)``; masks as in :func:`attention_weights`; ``dropout_p`` zeroes
    weights with that probability and rescales the rest by ``1 / (1 - dropout_p)``
    (always applied, as in PyTorch: pass 0.0 in eval mode). With
    ``return_weights=True`` it returns ``(output, weights)``, the weights after dropout.
    Book: section "The formula".
    """
    check_attention_inputs(query, key, value, attn_mask, dropout_p, is_causal)
    weights = _attention_weights(query, key, attn_mask, is_causal, scale)  # (..., L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    output = weights @ value  # (..., L, d_v)
    return (output, weights) if return_weights else output


# --------------------------------------------------------------------------- multi-head


class KVCache:
    """Keys and values of the tokens one attention layer has seen, for generation.

    Preallocated ``(B, n_head, max_len, head_dim)`` buffers and a fill level
    ``length``: each decoding step appends one token's key and value instead of
    recomputing those of the whole prefix. Book: "Generation with a key/value cache".
    """

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (batch_size, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.size(2)

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        """Store ``(B, n_head, T, head_dim)`` new keys/values; return all so far."""
        T = keys.size(2)
        if self.length + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; "
                             f"{self.length} are used and {T} more do not fit")
        self.keys[:, :, self.length:self.length + T] = keys
        self.values[:, :, self.length:self.length + T] = values
        self.length += T
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


class MultiHeadAttention(nn.Module):
    """Multi-head attention, ``Concat(head_1, ..., head_h) W^O`` with
    ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)`` :cite:p:`vaswani2017attention`.

    Batch-first: ``query (B, L, E)``, ``key`` and ``value (B, S, E)`` give ``(B, L, E)``.
    The weights are laid out like ``torch.nn.MultiheadAttention``'s -- one
    ``in_proj`` of shape ``(3E, E)`` stacking ``W^Q, W^K, W^V`` and an ``out_proj`` --
    and the masks follow *its* conventions, which are the opposite of
    :func:`scaled_dot_product_attention`'s for booleans:

    * ``key_padding_mask (B, S)``: True marks a padding key to *ignore*; float is added.
    * ``attn_mask (L, S)`` or ``(B * num_heads, L, S)``: True *forbids*; float is added.
    * ``is_causal=True``: each query sees only keys at its position or before.

    ``fast_attention=True`` runs the attention itself through
    ``F.scaled_dot_product_attention``; ``False`` through the readable
    :func:`scaled_dot_product_attention`. The weights, when asked for
    (``need_weights=True``), always come from the readable path.
    Book: section "Many heads".
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 fast_attention: bool = True, device=None, dtype=None):
        super().__init__()
        check_int("embed_dim", embed_dim, low=1)
        check_int("num_heads", num_heads, low=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                             "(each head gets embed_dim / num_heads dimensions)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.fast_attention = fast_attention
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        # the same initialisation as nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj.weight)
        if bias:
            nn.init.zeros_(self.in_proj.bias)
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, query, key, value):
        """``Q = query W^Q + b^Q`` etc.: one matrix product for self-attention."""
        if query is key and key is value:
            return self.in_proj(query).split(self.embed_dim, dim=-1)
        weights = self.in_proj.weight.chunk(3)
        biases = self.in_proj.bias.chunk(3) if self.in_proj.bias is not None else (None,) * 3
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask):
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
            if t.dim() != 3 or t.size(-1) != self.embed_dim:
                raise ValueError(f"{name} must have shape (batch, length, {self.embed_dim}), "
                                 f"got {tuple(t.shape)}")
        (B, L, _), S = query.shape, key.size(1)
        if key.shape != value.shape or key.size(0) != B:
            raise ValueError(f"key and value must both be (B={B}, S, E), got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and not (check_tensor(name, mask).dtype == torch.bool
                                         or mask.is_floating_point()):
                raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.shape not in ((L, S), (B * self.num_heads, L, S)):
                raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} or "
                                 f"(B * num_heads, L, S) = {(B * self.num_heads, L, S)}, "
                                 f"got {tuple(attn_mask.shape)}")

    def _sdpa_mask(self, B, L, S, past, key_padding_mask, attn_mask, is_causal, like):
        """All masks as one additive ``(B|1, nh|1, L, S)`` mask in sdpa's convention.

        Returns ``(mask, is_causal)`` for the attention function: a plain causal
        mask (no cache, nothing else) stays ``is_causal=True`` so that PyTorch can
        pick its fastest kernel.
        """
        parts = []
        if attn_mask is not None:
            parts.append(attn_mask if attn_mask.dim() == 2
                         else attn_mask.view(B, self.num_heads, L, S))
        if key_padding_mask is not None:
            parts.append(key_padding_mask.view(B, 1, 1, S))
        if is_causal:
            if not parts and past == 0:  # top-left, exactly sdpa's own is_causal
                return None, True
            if past + 1 < S:  # else every query may see every key: nothing to mask
                parts.append(~causal_mask(L, S, past, device=like.device))
        mask = None
        for part in parts:  # nn.MultiheadAttention's convention: True = forbidden
            if part.dtype == torch.bool:
                part = torch.zeros(part.shape, dtype=like.dtype, device=like.device
                                   ).masked_fill(part, float("-inf"))
            mask = part.to(like.dtype) if mask is None else mask + part.to(like.dtype)
        return mask, False

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None,
                is_causal: bool = False, need_weights: bool = False,
                average_attn_weights: bool = True, kv_cache: KVCache | None = None):
        """Attend from ``query (B, L, E)`` to ``key``/``value (B, S, E)``.

        Returns ``(output (B, L, E), weights)``, like ``nn.MultiheadAttention``;
        ``weights`` is ``None`` unless ``need_weights``, then ``(B, L, S)`` averaged over
        heads or ``(B, num_heads, L, S)``. With ``kv_cache`` the new keys and values are
        appended to the cache and the queries attend to everything in it (with
        ``is_causal``, query ``i`` sits at position ``past + i`` after the ``past`` cached
        ones and sees keys ``0 .. past + i``; without a cache, as in
        ``F.scaled_dot_product_attention``, query ``i`` sees keys ``0 .. i``).
        """
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        B, L, _ = query.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past and (key_padding_mask is not None or attn_mask is not None):
            raise ValueError("key_padding_mask and attn_mask cannot be combined with a "
                             "filled kv_cache (use is_causal)")
        q, k, v = (self._split_heads(x) for x in self._project(query, key, value))
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, past + S, hs)
        S = k.size(2)
        mask, causal = self._sdpa_mask(B, L, S, past, key_padding_mask, attn_mask, is_causal, q)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or not self.fast_attention:
            y, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, causal,
                                                      return_weights=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal)
        y = y.transpose(1, 2).reshape(B, L, self.embed_dim)  # (B, L, E): heads side by side
        y = self.out_proj(y)
        if not need_weights:
            return y, None
        return y, weights.mean(dim=1) if average_attn_weights else weights

# --------------------------------------------------------------------------- positions


def sinusoidal_positions(num_positions: int, dim: int, base: float = 10000.0,
                         device=None, dtype=None) -> torch.Tensor:
    """The fixed position codes of :cite:t:`vaswani2017attention`, ``(num_positions, dim)``.

    ``PE[p, 2i] = sin(p / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(p / base^(2i/dim))``:
    each pair of dimensions is a clock turning at its own speed, so that the code of
    ``p + k`` is a fixed rotation of the code of ``p``. Book: section "Positions".
    """
    if dim % 2:
        raise ValueError(f"dim must be even (sine/cosine pairs), got {dim}")
    position = torch.arange(num_positions, device=device, dtype=torch.float64)[:, None]
    frequency = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    angle = position * frequency  # (P, dim/2)
    table = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # sin, cos interleaved
    return table.to(dtype or torch.get_default_dtype())


class SinusoidalPositionalEncoding(nn.Module):
    """Position ids ``(T,)`` -> fixed codes ``(T, dim)``; no parameters.

    A drop-in for the learned ``nn.Embedding(num_positions, dim)`` of :class:`GPT`.
    """

    def __init__(self, num_positions: int, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("table", sinusoidal_positions(num_positions, dim, base),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


# --------------------------------------------------------------------------- the block


class MLP(nn.Sequential):
    """The position-wise feed-forward layer: ``Linear(d, 4d) -> GELU -> Linear(4d, d)``."""

    def __init__(self, n_embd: int, dropout: float = 0.0):
        super().__init__(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                         nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))


class TransformerBlock(nn.Module):
    """One pre-LayerNorm Transformer block, ``(B, T, C) -> (B, T, C)``.

    ``x = x + Dropout(Attn(LN_1(x)))`` then ``x = x + MLP(LN_2(x))``: each sub-layer
    reads a normalised copy of the residual stream and *adds* its result to it, so
    the stream itself is never normalised in place :cite:p:`xiong2020layer`.
    ``causal=True`` (a decoder) lets each position attend only to itself and the
    past; ``False`` (an encoder) to every position. Book: section "The block".
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, causal: bool = True,
                 fast_attention: bool = True):
        super().__init__()
        self.causal = causal
        self.attn_norm = nn.LayerNorm(n_embd)
        self.attn = MultiHeadAttention(n_embd, n_head, dropout, fast_attention=fast_attention)
        self.attn_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        attended, _ = self.attn(h, h, h, is_causal=self.causal, kv_cache=kv_cache)
        x = x + self.attn_dropout(attended)  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))

# --------------------------------------------------------------------------- the model


@dataclass
class GPTConfig:
    """The size of a :class:`GPT`.

    ``block_size`` is the longest context (positions 0 .. block_size - 1);
    ``fast_attention`` picks ``F.scaled_dot_product_attention`` over the readable
    path (same numbers); ``position_encoding`` is ``"learned"`` (GPT-2) or
    ``"sinusoidal"`` (the original Transformer).
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    fast_attention: bool = True
    position_encoding: str = "learned"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, getattr(self, name), low=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.position_encoding not in ("learned", "sinusoidal"):
            raise ValueError("position_encoding must be 'learned' or 'sinusoidal', "
                             f"got {self.position_encoding!r}")


#: Temperatures below this floor sample greedily (the arg-max), as ``temperature=0``
#: does: dividing by a smaller number could overflow float32 (``logits / 1e-38`` is
#: infinite, and the softmax of infinities is NaN), and at this temperature any two
#: logits 0.001 apart already differ by a factor of ``exp(100)`` in probability.
#: vLLM uses the same floor (its ``_SAMPLING_EPS``).
MIN_TEMPERATURE = 1e-5


def _check_sampling(temperature, top_k, top_p=None) -> None:
    check_float("temperature", temperature, low=0.0)
    if top_k is not None:
        check_int("top_k", top_k, low=1)
    if top_p is not None:
        check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """Draw one token id per row from ``logits (B, V)``; returns ``(B, 1)``.

    ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely ids
    if given (ids whose logit ties with the ``k``-th largest are kept too, so a few
    more than ``k`` may remain), then to the nucleus of probability ``top_p``
    :cite:p:`holtzman2020curious` if given (``top_p=1`` keeps every id). A
    ``temperature`` below :data:`MIN_TEMPERATURE`, ``0`` included, takes the arg-max
    (greedy decoding); float16 logits are divided in float32, so that no allowed
    temperature overflows. This is the one sampling step that
    :meth:`GPT.generate` and the model server share. Book: "The pretrained GPT".
    """
    check_tensor("logits", logits)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point (batch, vocab_size) tensor, "
                         f"got shape {tuple(logits.shape)} and dtype {logits.dtype}")
    _check_sampling(temperature, top_k, top_p)
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1, keepdim=True)
    if logits.dtype == torch.float16:  # 65504 is float16's largest number
        logits = logits.float()
    logits = filter_logits(logits, temperature=temperature, top_k=top_k,
                           top_p=top_p if top_p is not None and top_p < 1 else None)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


class GPT(nn.Module):
    """A decoder-only Transformer language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    token + position embedding -> ``n_layer`` causal :class:`TransformerBlock` ->
    final LayerNorm -> ``lm_head``, whose weight *is* the token embedding (tied).
    Parameters: ``12 L d^2 + 13 L d`` in the blocks, ``V d`` in the token table,
    ``T d`` in the learned position table (none with ``position_encoding="sinusoidal"``,
    whose table is fixed) and ``2 d`` in the final norm. Book: section "A small GPT".
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.n_embd)
        if c.position_encoding == "learned":
            self.position_embedding = nn.Embedding(c.block_size, c.n_embd)
        else:
            self.position_embedding = SinusoidalPositionalEncoding(c.block_size, c.n_embd)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.n_embd, c.n_head, c.dropout, causal=True,
                             fast_attention=c.fast_attention) for _ in range(c.n_layer))
        self.final_norm = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2L)
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (the tied head counts once).

        ``exclude_embeddings=True`` leaves out the token and position tables.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for m in (self.token_embedding, self.position_embedding)
                     for p in m.parameters())
        return n

    def _check_ids(self, name: str, idx, allow_ignore: bool = False) -> None:
        check_tensor(name, idx)
        if idx.dtype != torch.long:
            raise TypeError(f"{name} must be a torch.long tensor of token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, time), got {tuple(idx.shape)}")
        low = -1 if allow_ignore else 0
        # The range check reads the values: free on the CPU, but on a GPU it would make
        # every forward pass (and every decoding step) wait for the device. There an id
        # out of range fails in the embedding instead (PyTorch's device-side assert).
        if idx.device.type != "cpu":
            return
        if idx.numel() and ((idx < low) | (idx >= self.config.vocab_size)).any():
            raise ValueError(f"{name} must hold ids in [{low}, {self.config.vocab_size}), "
                             f"got values from {idx.min().item()} to {idx.max().item()}")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None):
        """Logits ``(B, T, vocab_size)`` and, given ``targets (B, T)``, the loss.

        The loss is the mean cross-entropy over all positions whose target is not
        ``-1`` (``-1`` marks a position to ignore); ``None`` without targets. With
        ``kv_caches`` (one per block, see :meth:`new_kv_caches`) ``idx`` continues the
        cached tokens: its positions start at the caches' length.
        """
        self._check_ids("idx", idx)
        B, T = idx.shape
        past = 0
        if kv_caches is not None:
            self._check_kv_caches(kv_caches, B)
            past = kv_caches[0].length
        if past + T > self.config.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size="
                             f"{self.config.block_size}; crop the input to the last "
                             f"{self.config.block_size} tokens")
        positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, C)
        x = self.embedding_dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches is not None else None)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            self._check_ids("targets", targets, allow_ignore=True)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, "
                                 f"got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def _check_kv_caches(self, kv_caches, batch_size: int) -> None:
        c = self.config
        if not isinstance(kv_caches, (list, tuple)) or \
                not all(isinstance(cache, KVCache) for cache in kv_caches):
            raise TypeError("kv_caches must be a list of KVCache (see new_kv_caches), "
                            f"got {type(kv_caches).__name__}")
        if len(kv_caches) != c.n_layer:
            raise ValueError(f"kv_caches must hold one KVCache per block ({c.n_layer}), "
                             f"got {len(kv_caches)}")
        expected = (batch_size, c.n_head, c.n_embd // c.n_head)
        for cache in kv_caches:
            shape = (cache.keys.size(0), cache.keys.size(1), cache.keys.size(3))
            if shape != expected:
                raise ValueError(f"each KVCache must be for (batch, n_head, head_dim) = "
                                 f"{expected}, got {shape}")
        if len({cache.length for cache in kv_caches}) > 1:
            raise ValueError("the KVCaches must all hold the same number of positions, got "
                             f"{[cache.length for cache in kv_caches]}")

    def new_kv_caches(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches, one per block, for ``block_size`` positions."""
        c, weight = self.config, self.token_embedding.weight
        return [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                        device=weight.device, dtype=weight.dtype) for _ in range(c.n_layer)]

    def to_hf(self):
        """This model as a ``transformers.GPT2LMHeadModel`` with equal logits.

        Same weights, dtype, device and mode; see :func:`companion.compat.gpt_to_hf`.
        Book: "LLM evaluation" (chapter 5), where lm-eval runs on the converted model.
        """
        from companion.compat import gpt_to_hf

        return gpt_to_hf(self)

    @classmethod
    def from_hf(cls, model) -> GPT:
        """A ``transformers.GPT2LMHeadModel`` as a :class:`GPT` with equal logits.

        The inverse of :meth:`to_hf`; see :func:`companion.compat.gpt_from_hf`.
        """
        from companion.compat import gpt_from_hf

        return gpt_from_hf(model)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The causal attention weights of every layer: a list of ``(B, n_head, T, T)``.

        Computed in eval mode without gradients (the mode is restored afterwards).
        """
        self._check_ids("idx", idx)
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size="
                             f"{self.config.block_size}")
        was_training = self.training
        self.eval()
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        maps = []
        for block in self.blocks:
            h = block.attn_norm(x)
            _, weights = block.attn(h, h, h, is_causal=True, need_weights=True,
                                    average_attn_weights=False)
            maps.append(weights)
            x = block(x)
        self.train(was_training)
        return maps

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, top_p: float | None = None) -> torch.Tensor:
        """Continue ``idx (B, T)`` by ``max_new_tokens`` sampled ids; returns ``(B, T + n)``.

        Each step samples from the last position's logits (:func:`sample_next_token`;
        ``temperature=0`` is greedy, ``top_p`` keeps the nucleus; ``generator`` lives
        on the model's device). With
        ``use_cache`` the prompt is run once and then one token per step through the
        key/value caches; once the text is longer than ``block_size`` the model sees
        only the last ``block_size`` tokens, and since every position then shifts, the
        cache is of no use and each step runs the whole window (exactly as without
        the cache). Runs in eval mode (restored afterwards). Book: "Generation".
        """
        self._check_ids("idx", idx)
        check_int("max_new_tokens", max_new_tokens, low=0)
        if idx.size(1) < 1:
            raise ValueError("idx must hold at least one token to start from")
        _check_sampling(temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        block_size, caches = self.config.block_size, None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if caches is None:  # prefill: the whole prompt at once
                    caches = self.new_kv_caches(idx.size(0))
                    logits, _ = self(idx, kv_caches=caches)
                else:  # one new token; its keys and values join the caches
                    logits, _ = self(idx[:, -1:], kv_caches=caches)
            else:
                logits, _ = self(idx[:, -block_size:])
            next_id = sample_next_token(logits[:, -1], temperature, top_k, generator, top_p)
            idx = torch.cat((idx, next_id), dim=1)
        self.train(was_training)
        return idx
