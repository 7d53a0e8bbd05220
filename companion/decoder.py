"""The modern decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention, MoE.

Book: Chapter 4, "The modern decoder". Chapter 4's GPT is the 2019 block. The open
models a reader meets today (Llama 3, Qwen3, Mistral) change five parts of it:

* **RMSNorm** :cite:p:`zhang2019root`: ``y = g * x / sqrt(mean(x^2) + eps)``; no mean
  subtraction, no bias.
* **Rotary position embeddings** (RoPE) :cite:p:`su2024roformer`: rotate each pair of
  query/key coordinates ``(x_a, x_b)`` by the angle ``m * theta^(-2i/d)`` at position
  ``m``. Then ``q_m . k_n`` depends on ``m - n`` only, and no position table is learned.
* **SwiGLU** :cite:p:`shazeer2020glu`: ``down(silu(gate(x)) * up(x))``.
* **Grouped-query attention** :cite:p:`ainslie2023gqa`: ``n_kv_heads`` key/value heads,
  each shared by ``n_heads / n_kv_heads`` query heads; the KV cache shrinks by that factor.
* **QK-norm** (Qwen3): an RMSNorm over each head's query and key before RoPE.
* **Mixture of experts** :cite:p:`fedus2022switch`: a router sends each token to
  ``top_k`` of ``n_experts`` SwiGLU MLPs and mixes their outputs with softmax gates.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM``, so
:meth:`Decoder.from_hf` and :meth:`Decoder.to_hf` move a ``state_dict`` across with
no renaming beyond the ``model.`` prefix. The unit tests check every piece against
its oracle in float64 (``torch.nn.RMSNorm``, SDPA with ``enable_gqa=True``, and
``transformers``' Llama, Qwen3 and Qwen3-MoE built from random configs).

Precision: Hugging Face computes RMSNorm statistics, the RoPE tables and the router's
softmax in float32 even in a float64 model ("float32 islands"). ``float32_islands=True``
reproduces those casts (then the logits agree to about 1e-12); the default computes
everything in the input's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from companion._validate import check_float, check_int, check_tensor, check_type
from companion.records import load_record, record_main, write_record
from companion.transformer import KVCache, causal_mask

__all__ = ["RMSNorm", "rope_tables", "apply_rope", "apply_rope_complex",
           "interleaved_to_halves", "SwiGLU", "grouped_query_attention", "Attention",
           "TopKRouter", "MoE", "load_balancing_loss", "DecoderConfig", "DecoderBlock",
           "Decoder", "kv_cache_bytes_per_token"]


# --------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)`` over the last dimension.

    ``float32=True`` computes the statistics in float32 and casts back before the gain,
    as Hugging Face's ``LlamaRMSNorm`` does (in bf16 training that protects the mean of
    squares; in a float64 model it rounds to float32).
    """

    def __init__(self, dim: int, eps: float = 1e-6, float32: bool = False):
        super().__init__()
        check_int("dim", dim, low=1)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.float32 = float(eps), float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.float32:
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------- RoPE


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotation angles, each ``(T, head_dim)``.

    Pair ``i`` (of ``head_dim / 2``) turns at the frequency ``theta^(-2i / head_dim)``;
    position ``m`` turns it by ``m`` times that. Each angle appears twice, once for
    each half of the head (the split-halves layout of :func:`apply_rope`).
    """
    check_tensor("positions", positions, ndim=1)
    check_int("head_dim", head_dim, low=2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE turns pairs), got {head_dim}")
    if not (isinstance(theta, (int, float)) and theta > 1):
        raise ValueError(f"theta must be a number > 1, got {theta!r}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype,
                                             device=positions.device) / head_dim))
    angles = positions.to(dtype)[:, None] * inv_freq  # (T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., T, head_dim)``: pair ``i`` is ``(x[i], x[i + head_dim/2])``.

    This split-halves layout is the one Hugging Face's Llama uses (``rotate_half``).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def apply_rope_complex(x: torch.Tensor, positions: torch.Tensor,
                       theta: float = 10000.0) -> torch.Tensor:
    """RoPE as complex multiplication: pair ``i`` is ``(x[2i], x[2i+1])``, interleaved.

    Each pair is a complex number ``x[2i] + j x[2i+1]``, multiplied by
    ``exp(j m theta_i)``. This is the layout of Meta's original Llama code.
    """
    check_tensor("x", x, floating=True)
    if x.size(-1) % 2:
        raise ValueError(f"x's last dimension must be even, got {x.size(-1)}")
    half = x.size(-1) // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=dtype, device=x.device) * 2
                                / x.size(-1)))
    angles = positions.to(dtype)[:, None] * inv_freq  # (T, head_dim / 2)
    z = torch.view_as_complex(x.to(dtype).reshape(*x.shape[:-1], half, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z).reshape(x.shape).to(x.dtype)


def interleaved_to_halves(head_dim: int) -> torch.Tensor:
    """The permutation ``[0, 2, 4, ..., 1, 3, 5, ...]`` of a head's coordinates.

    ``apply_rope(x[..., p]) == apply_rope_complex(x)[..., p]``: the two layouts are the
    same rotation once the even coordinates are gathered into the first half. Converting
    Meta-layout query/key weights to Hugging Face's means permuting their output rows
    by ``p`` within every head.
    """
    check_int("head_dim", head_dim, low=2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


# --------------------------------------------------------------------------- SwiGLU


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: a gated MLP with three bias-free projections."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        check_int("dim", dim, low=1)
        check_int("hidden_dim", hidden_dim, low=1)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------- attention


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with ``q (B, H, T, hd)`` and ``k, v (B, H_kv, S, hd)``, ``H_kv | H``.

    Key/value head ``j`` serves query heads ``j*g .. (j+1)*g - 1`` with ``g = H / H_kv``:
    repeat each key/value head ``g`` times, then ordinary scaled dot-product attention.
    ``mask (T, S)`` is boolean, True where a query may attend.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, floating=True)
    n_heads, n_kv = q.size(1), k.size(1)
    if n_kv < 1 or n_heads % n_kv or v.size(1) != n_kv:
        raise ValueError(f"k and v must have the same number of heads, dividing q's "
                         f"{n_heads}; got k {k.size(1)} and v {v.size(1)}")
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)


class Attention(nn.Module):
    """Causal self-attention with RoPE, grouped-query heads and optional QK-norm."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c, hd = config, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, hd
        self.q_proj = nn.Linear(c.dim, c.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.n_heads * hd, c.dim, bias=False)
        if c.qk_norm:  # per head, over head_dim, before RoPE (Qwen3)
            self.q_norm = RMSNorm(hd, c.norm_eps, float32=c.float32_islands)
            self.k_norm = RMSNorm(hd, c.norm_eps, float32=c.float32_islands)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(k, v)  # (B, h_kv, past + T, hd)
        if past == 0:  # no cache: the usual causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # query i sits at position past + i
            mask = causal_mask(T, past + T, past, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------- MoE


class TopKRouter(nn.Module):
    """Route each token to ``top_k`` of ``n_experts``: softmax, then the k largest.

    Returns the router logits ``(N, E)``, the gates ``(N, k)`` and the expert ids
    ``(N, k)``. ``norm_topk_prob`` rescales the k gates to sum to one (Qwen3-MoE's
    released models do; Hugging Face's config default does not).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, norm_topk_prob: bool = True,
                 float32: bool = False):
        super().__init__()
        check_int("n_experts", n_experts, low=1)
        check_int("top_k", top_k, low=1, high=n_experts)
        self.weight = nn.Parameter(torch.zeros(n_experts, dim))
        self.top_k, self.norm_topk_prob, self.float32 = top_k, norm_topk_prob, float32

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.float() if self.float32 else logits, dim=-1)
        gates, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, gates.to(logits.dtype), experts


class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts: ``y = sum_j gate_j * expert_{e_j}(x)``.

    Each token runs only its ``top_k`` experts. After a forward pass,
    ``last_router_logits`` holds the router logits for :func:`load_balancing_loss`.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int,
                 norm_topk_prob: bool = True, float32: bool = False):
        super().__init__()
        self.gate = TopKRouter(dim, n_experts, top_k, norm_topk_prob, float32)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden_dim) for _ in range(n_experts))
        self.last_router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        logits, gates, experts = self.gate(x)
        self.last_router_logits = logits
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)  # the tokens routed to expert e
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * gates[token, slot, None])
        return y.reshape(shape)

    def tokens_per_expert(self) -> torch.Tensor:
        """How many (token, slot) assignments each expert got in the last forward pass."""
        if self.last_router_logits is None:
            raise ValueError("run a forward pass first: no router logits are stored")
        ids = torch.topk(self.last_router_logits, self.gate.top_k, dim=-1).indices
        return torch.bincount(ids.reshape(-1), minlength=len(self.experts))

    @classmethod
    def from_hf(cls, block) -> MoE:
        """Copy a ``transformers`` ``Qwen3MoeSparseMoeBlock`` (experts as 3D tensors)."""
        e_gate_up, e_down = block.experts.gate_up_proj, block.experts.down_proj
        n_experts, two_hidden, dim = e_gate_up.shape
        moe = cls(dim, two_hidden // 2, n_experts, block.gate.top_k,
                  norm_topk_prob=bool(block.gate.norm_topk_prob))
        moe.to(dtype=e_gate_up.dtype, device=e_gate_up.device)
        with torch.no_grad():
            moe.gate.weight.copy_(block.gate.weight)
            for e, expert in enumerate(moe.experts):
                gate, up = e_gate_up[e].chunk(2, dim=0)  # (hidden, d) each
                expert.gate_proj.weight.copy_(gate)
                expert.up_proj.weight.copy_(up)
                expert.down_proj.weight.copy_(e_down[e])
        return moe


def _split_experts(state: dict) -> dict:
    """Hugging Face's ``experts.gate_up_proj (E, 2h, d)`` and ``experts.down_proj (E, d, h)``
    as one ``gate_proj``, ``up_proj`` and ``down_proj`` per expert."""
    out = {}
    for key, value in state.items():
        if key.endswith("experts.gate_up_proj"):
            for e, w in enumerate(value):
                gate, up = w.chunk(2, dim=0)
                out[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                out[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif key.endswith("experts.down_proj"):
            for e, w in enumerate(value):
                out[key.replace("down_proj", f"{e}.down_proj.weight")] = w
        else:
            out[key] = value
    return out


def load_balancing_loss(router_logits, n_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e``, tokens of all layers pooled.

    ``f_e``: the fraction of tokens that chose expert ``e`` among their ``top_k`` (the
    fractions sum to ``top_k``); ``P_e``: the mean router probability of ``e``. It is
    ``top_k`` when routing is uniform and grows as load concentrates; only ``P_e``
    carries a gradient. ``router_logits``: one ``(N, E)`` tensor or a tuple, one per layer,
    whose rows are pooled before ``f`` and ``P`` are taken (as Hugging Face does).
    """
    check_int("n_experts", n_experts, low=1)
    check_int("top_k", top_k, low=1, high=n_experts)
    layers = router_logits if isinstance(router_logits, (tuple, list)) else (router_logits,)
    if not layers:
        raise ValueError("router_logits is empty")
    logits = torch.cat([check_tensor("router_logits", t, ndim=2) for t in layers])
    if logits.size(-1) != n_experts:
        raise ValueError(f"router_logits must have n_experts={n_experts} columns, "
                         f"got {logits.size(-1)}")
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    f = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(probs.dtype) / len(probs)
    return n_experts * (f * probs.mean(dim=0)).sum()


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama/Qwen3-style decoder.

    ``head_dim`` defaults to ``dim // n_heads`` (Qwen3 sets it separately).
    ``n_experts > 0`` replaces every MLP by a :class:`MoE` of that many experts.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    head_dim: int | None = None
    tie_embeddings: bool = False
    n_experts: int = 0
    top_k: int = 2
    norm_topk_prob: bool = True
    float32_islands: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                     "max_seq_len"):
            check_int(name, getattr(self, name), low=1)
        check_int("n_experts", self.n_experts, low=0)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide "
                             f"n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim} "
                                 "(or give head_dim)")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        check_int("head_dim", self.head_dim, low=2)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_experts:
            check_int("top_k", self.top_k, low=1, high=self.n_experts)
        check_type("rope_theta", self.rope_theta, (int, float))
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps, float32=c.float32_islands)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps, float32=c.float32_islands)
        if c.n_experts:
            self.mlp = MoE(c.dim, c.hidden_dim, c.n_experts, c.top_k, c.norm_topk_prob,
                           float32=c.float32_islands)
        else:
            self.mlp = SwiGLU(c.dim, c.hidden_dim)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """A Llama/Qwen3-style language model: ids ``(B, T)`` -> logits ``(B, T, V)``.

    Token embedding -> ``n_layers`` :class:`DecoderBlock` -> RMSNorm -> ``lm_head``.
    No position table: positions enter through RoPE inside attention.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        check_type("config", config, DecoderConfig)
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, float32=c.float32_islands)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # the router too, as Hugging Face does: at zero every token would tie and go to
        # the same top_k experts before training starts
        if isinstance(module, (nn.Linear, nn.Embedding, TopKRouter)):
            nn.init.normal_(module.weight, std=0.02)

    def new_kv_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty :class:`~companion.transformer.KVCache` per layer (``n_kv_heads`` wide)."""
        c, p = self.config, self.lm_head.weight
        return [KVCache(batch_size, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                        device=p.device, dtype=p.dtype) for _ in range(c.n_layers)]

    def forward(self, ids: torch.Tensor, kv_caches: list[KVCache] | None = None):
        check_tensor("ids", ids, ndim=2)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        c = self.config
        past = kv_caches[0].length if kv_caches else 0
        if past + ids.size(1) > c.max_seq_len:
            raise ValueError(f"ids reach position {past + ids.size(1)}, beyond "
                             f"max_seq_len={c.max_seq_len}")
        x = self.embed_tokens(ids)  # (B, T, d)
        positions = torch.arange(past, past + ids.size(1), device=ids.device)
        table_dtype = torch.float32 if c.float32_islands else x.dtype
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, table_dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[i] if kv_caches else None)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """The router logits of every MoE layer from the last forward pass."""
        return tuple(b.mlp.last_router_logits for b in self.layers if isinstance(b.mlp, MoE))

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_hf(cls, model, float32_islands: bool = True) -> Decoder:
        """Load a ``transformers`` ``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or
        ``Qwen3MoeForCausalLM`` (every layer sparse).

        The names match, so the ``state_dict`` moves over once ``model.`` is stripped
        (MoE experts stored as 3D tensors are split into one SwiGLU each).
        ``float32_islands`` (default True) follows Hugging Face's float32 casts.
        """
        hf = model.config
        rope = getattr(hf, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"model: only plain RoPE is supported, got {rope['rope_type']!r}")
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise ValueError("model: biases in attention or MLP are not supported")
        if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", False):
            raise ValueError("model: sliding-window attention is not supported")
        state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
        n_experts = getattr(hf, "num_experts", 0) or 0
        if n_experts:
            if getattr(hf, "mlp_only_layers", None) or hf.decoder_sparse_step != 1:
                raise ValueError("model: only MoE models whose every layer is sparse")
            state = _split_experts(state)
        config = DecoderConfig(
            vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
            hidden_dim=hf.moe_intermediate_size if n_experts else hf.intermediate_size,
            n_experts=n_experts, top_k=getattr(hf, "num_experts_per_tok", 2),
            norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),
            max_seq_len=hf.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=hf.rms_norm_eps,
            qk_norm="layers.0.self_attn.q_norm.weight" in state,
            head_dim=getattr(hf, "head_dim", None),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            float32_islands=float32_islands)
        ours = cls(config).to(dtype=model.dtype, device=model.device)
        ours.load_state_dict(state, strict=True)
        return ours

    def to_hf(self):
        """The same weights as a ``transformers`` ``LlamaForCausalLM`` (``Qwen3`` if QK-norm)."""
        import transformers

        c = self.config
        if c.n_experts:
            raise ValueError("to_hf converts dense models only (n_experts=0)")
        kind = "Qwen3" if c.qk_norm else "Llama"
        hf_config = getattr(transformers, f"{kind}Config")(
            vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            intermediate_size=c.hidden_dim, max_position_embeddings=c.max_seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            rms_norm_eps=c.norm_eps, head_dim=c.head_dim,
            tie_word_embeddings=c.tie_embeddings)
        hf = getattr(transformers, f"{kind}ForCausalLM")(hf_config)
        p = self.lm_head.weight
        hf.to(dtype=p.dtype, device=p.device)
        state = {("" if k.startswith("lm_head") else "model.") + k: v
                 for k, v in self.state_dict().items()}
        hf.load_state_dict(state, strict=True)
        return hf.eval()


def kv_cache_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int,
                             bytes_per_value: float = 2) -> float:
    """KV-cache bytes one token costs: ``2 (K and V) * n_layers * n_kv_heads * head_dim``."""
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim)):
        check_int(name, value, low=1)
    if not (isinstance(bytes_per_value, (int, float)) and bytes_per_value > 0):
        raise ValueError(f"bytes_per_value must be a positive number, got {bytes_per_value!r}")
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_value



# --------------------------------------------------------------------------- old vs new block
# A recorded comparison (book: "Old block against new block"): chapter 4's GPT block and
# this decoder at the same parameter count, trained on the same characters, each at the
# learning rate from one grid that is best on held-out dev text, then three seeds.
# ``python -m companion.decoder --record block-comparison`` writes the JSON asset; the
# notebook re-trains a cheap prefix and checks it against the record.

BLOCK_COMPARISON_RECORD = Path(__file__).parent / "assets" / "block_comparison.json"
COMPARISON = {"block": 64, "batch": 16, "steps": 1500, "warmup": 100, "eval_every": 50,
              "lr_grid": (1e-3, 3e-3, 1e-2, 3e-2), "seeds": (0, 1, 2), "dev_windows": 32,
              "val_windows": 64, "dim": 64, "n_layers": 2, "n_heads": 4}


def comparison_models(vocab_size: int, block: int = COMPARISON["block"]) -> dict:
    """Chapter 4's GPT and a decoder of (nearly) the same size, as zero-argument factories.

    The decoder ties its embeddings as the GPT does, uses 2 key/value heads and a SwiGLU
    width that matches the GPT's parameter count (the GPT's position table included).
    Its RoPE can run past ``block``, so ``max_seq_len`` is four times that.
    """
    from companion.transformer import GPT, GPTConfig

    c = COMPARISON
    gpt = GPTConfig(vocab_size=vocab_size, block_size=block, n_layer=c["n_layers"],
                    n_head=c["n_heads"], n_embd=c["dim"])
    modern = DecoderConfig(vocab_size=vocab_size, dim=c["dim"], n_layers=c["n_layers"],
                           n_heads=c["n_heads"], n_kv_heads=2, hidden_dim=206,
                           max_seq_len=4 * block, tie_embeddings=True)
    return {"gpt": lambda: GPT(gpt), "modern": lambda: Decoder(modern)}


def _logits(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _mean_loss(model, x, y) -> float:
    model.eval()
    loss = F.cross_entropy(_logits(model, x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


def comparison_data():
    """Training ids, dev windows (the end of the training text) and validation windows."""
    from companion.data import CharCorpus
    from companion.train import fixed_windows

    c, corpus = COMPARISON, CharCorpus()
    cut = len(corpus.train_ids) - c["dev_windows"] * c["block"] - 1
    dev = fixed_windows(corpus.train_ids[cut:], c["block"])
    val = fixed_windows(corpus.val_ids, c["block"], num_windows=c["val_windows"])
    return corpus, corpus.train_ids[:cut], dev, val


def train_comparison_run(arm: str, lr: float, seed: int, steps: int | None = None,
                         data=None, *, make_model=None, total: int | None = None) -> dict:
    """Train one arm (``"gpt"`` or ``"modern"``) with AdamW, warm-up and cosine decay.

    Returns the dev and validation losses (nats per character) every ``eval_every`` steps.
    ``make_model`` replaces the arm's model; the schedule spans ``total`` steps (default
    the comparison's), so that a shorter ``steps`` trains a prefix of the same run.
    """
    c = COMPARISON
    steps = c["steps"] if steps is None else steps
    corpus, train_ids, dev, val = data if data is not None else comparison_data()
    torch.manual_seed(seed)
    model = (make_model or comparison_models(corpus.vocab_size)[arm])()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    total = c["steps"] if total is None else total

    def schedule(step):
        if step < c["warmup"]:
            return (step + 1) / c["warmup"]
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - c["warmup"]) / (total - c["warmup"])))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(seed)
    record = {"step": [], "dev": [], "val": []}
    for step in range(1, steps + 1):
        starts = torch.randint(len(train_ids) - c["block"] - 1, (c["batch"],), generator=g)
        windows = train_ids[starts[:, None] + torch.arange(c["block"] + 1)]
        x, y = windows[:, :-1], windows[:, 1:]
        loss = F.cross_entropy(_logits(model, x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % c["eval_every"] == 0 or step == steps:
            record["step"].append(step)
            record["dev"].append(_mean_loss(model, *dev))
            record["val"].append(_mean_loss(model, *val))
    record["model"] = model
    return record


@torch.no_grad()
def loss_by_position(model, ids: torch.Tensor, length: int, n_windows: int = 32):
    """Mean loss at each position of ``n_windows`` windows of ``length`` tokens, ``(length,)``."""
    from companion.train import fixed_windows

    x, y = fixed_windows(ids, length, num_windows=n_windows)
    model.eval()
    losses = F.cross_entropy(_logits(model, x).transpose(1, 2), y, reduction="none")
    return losses.mean(0)


def record_block_comparison(path: str | Path = BLOCK_COMPARISON_RECORD, log=print) -> dict:
    """Run the grid (seed 0, every rate, both arms), then seeds 1 and 2 at each arm's best
    dev rate; write every run's curves and the RoPE model's loss beyond its training length."""
    c, data = COMPARISON, comparison_data()
    runs = []

    def run(arm, lr, seed):
        out = train_comparison_run(arm, lr, seed, data=data)
        model = out.pop("model")
        if arm == "modern":  # positions 0 .. 2 * block - 1, trained on 0 .. block - 1
            out["val_by_position_2x"] = loss_by_position(model, data[0].val_ids,
                                                         2 * c["block"]).tolist()
        runs.append({"arm": arm, "lr": lr, "seed": seed, **out})
        log(f"{arm} lr={lr:g} seed={seed}: dev {out['dev'][-1]:.4f} val {out['val'][-1]:.4f}")

    for arm in ("gpt", "modern"):
        for lr in c["lr_grid"]:
            run(arm, lr, c["seeds"][0])
    for arm in ("gpt", "modern"):
        grid = [r for r in runs if r["arm"] == arm]
        best = min(grid, key=lambda r: r["dev"][-1] if math.isfinite(r["dev"][-1]) else math.inf)
        for seed in c["seeds"][1:]:
            run(arm, best["lr"], seed)
    return write_record(path, "chapter 4's GPT block vs the modern decoder, same parameters "
                        "and tokens (companion.decoder.record_block_comparison)", c, runs=runs)


def load_block_comparison(path: str | Path = BLOCK_COMPARISON_RECORD) -> dict:
    """The recorded comparison; raises ``ValueError`` if its settings are not the book's."""
    return load_record(path, COMPARISON, "python -m companion.decoder --record block-comparison")


# --------------------------------------------------------------------------- a scaling sweep
# Book: "Scaling laws": decoders of four widths, each trained for three token budgets (its
# own cosine schedule per budget, one learning rate for all), final validation loss each.

SCALING_SWEEP_RECORD = Path(__file__).parent / "assets" / "scaling_sweep.json"
SWEEP = {"dims": (16, 32, 48, 64), "steps": (300, 600, 1200), "lr": 1e-2, "seed": 0}


def sweep_model(vocab_size: int, dim: int):
    """A 2-layer decoder of width ``dim`` (4 heads, 2 key/value heads, MLP ``3 dim``)."""
    config = DecoderConfig(vocab_size=vocab_size, dim=dim, n_layers=2, n_heads=4,
                           n_kv_heads=2, hidden_dim=3 * dim,
                           max_seq_len=COMPARISON["block"], tie_embeddings=True)
    return lambda: Decoder(config)


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token embedding (tied to the output layer here)."""
    embedding = model.embed_tokens.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def record_scaling_sweep(path: str | Path = SCALING_SWEEP_RECORD, log=print) -> dict:
    """Train every (width, budget) pair once and write N, D and the losses to ``path``."""
    data, runs = comparison_data(), []
    tokens_per_step = COMPARISON["batch"] * COMPARISON["block"]
    for dim in SWEEP["dims"]:
        make = sweep_model(data[0].vocab_size, dim)
        for steps in SWEEP["steps"]:
            out = train_comparison_run("modern", SWEEP["lr"], SWEEP["seed"], steps, data,
                                       make_model=make, total=steps)
            n = non_embedding_parameters(out.pop("model"))
            runs.append({"dim": dim, "steps": steps, "N": n, "D": steps * tokens_per_step,
                         **out})
            log(f"dim {dim} (N={n}) steps {steps}: val {out['val'][-1]:.4f}")
    return write_record(path, "final validation losses of a sweep of decoders "
                        "(companion.decoder.record_scaling_sweep)", SWEEP, runs=runs)


def load_scaling_sweep(path: str | Path = SCALING_SWEEP_RECORD) -> dict:
    """The recorded sweep; raises ``ValueError`` if its settings are not the book's."""
    return load_record(path, SWEEP, "python -m companion.decoder --record scaling-sweep")


# --------------------------------------------------------------------------- load balancing
# A recorded experiment (book: "Mixture of experts"): a small MoE decoder trained without
# and with the auxiliary loss, three seeds each; every ``eval_every`` steps, the loss on
# held-out text and the share of routed tokens that each layer's busiest expert receives.

MOE_BALANCE_RECORD = Path(__file__).parent / "assets" / "moe_balance.json"
MOE_BALANCE = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 32,
               "n_experts": 8, "top_k": 2, "block": 32, "batch": 16, "steps": 60,
               "lr": 3e-3, "aux_weights": (0.0, 0.1), "seeds": (0, 1, 2),
               "val_windows": 32, "val_seed": 9, "eval_every": 10}


def moe_balance_config(vocab_size: int) -> DecoderConfig:
    """The experiment's decoder: 2 layers of width 32, 8 SwiGLU experts, ``top_k`` 2."""
    c = MOE_BALANCE
    return DecoderConfig(vocab_size=vocab_size, dim=c["dim"], n_layers=c["n_layers"],
                         n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"],
                         hidden_dim=c["hidden_dim"], max_seq_len=c["block"],
                         n_experts=c["n_experts"], top_k=c["top_k"])


@torch.no_grad()
def busiest_expert_share(model: Decoder, ids: torch.Tensor) -> float:
    """The share of routed tokens that each layer's busiest expert gets on ``ids (B, T)``,
    averaged over the layers (uniform routing: ``1 / n_experts``)."""
    model(ids)
    loads = torch.stack([b.mlp.tokens_per_expert() for b in model.layers]).double()  # (L, E)
    return (loads.amax(1) / loads.sum(1)).mean().item()


def train_moe_balance(aux_weight: float, seed: int, steps: int | None = None,
                      corpus=None) -> dict:
    """Train the experiment's MoE decoder on ``lm + aux_weight * load_balancing_loss``.

    Returns the validation loss (nats) and :func:`busiest_expert_share` at step 0 and
    every ``eval_every`` steps; a shorter ``steps`` trains a prefix of the same run.
    """
    from companion.data import CharCorpus
    from companion.device import seed_everything

    c = MOE_BALANCE
    check_float("aux_weight", aux_weight, low=0)
    steps = c["steps"] if steps is None else check_int("steps", steps, low=0)
    corpus = CharCorpus() if corpus is None else corpus
    val_x, val_y = corpus.get_batch("val", c["val_windows"], c["block"],
                                    generator=torch.Generator().manual_seed(c["val_seed"]))
    seed_everything(check_int("seed", seed, low=0))
    model = Decoder(moe_balance_config(corpus.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"])
    g = torch.Generator().manual_seed(seed)  # the training batches
    record = {"step": [], "val": [], "busiest": []}

    def evaluate(step):
        record["step"].append(step)
        record["val"].append(_mean_loss(model, val_x, val_y))
        record["busiest"].append(busiest_expert_share(model, val_x))

    evaluate(0)
    for step in range(1, steps + 1):
        x, y = corpus.get_batch("train", c["batch"], c["block"], generator=g)
        lm = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        aux = load_balancing_loss(model.router_logits(), c["n_experts"], c["top_k"])
        (lm + aux_weight * aux).backward()
        opt.step()
        opt.zero_grad()
        if step % c["eval_every"] == 0 or step == steps:
            evaluate(step)
    return record


def record_moe_balance(path: str | Path = MOE_BALANCE_RECORD, log=print) -> dict:
    """Train every (auxiliary weight, seed) pair once and write the curves to ``path``."""
    from companion.data import CharCorpus

    c, corpus, runs = MOE_BALANCE, CharCorpus(), []
    for aux_weight in c["aux_weights"]:
        for seed in c["seeds"]:
            out = train_moe_balance(aux_weight, seed, corpus=corpus)
            runs.append({"aux_weight": aux_weight, "seed": seed, **out})
            log(f"aux {aux_weight:g} seed {seed}: busiest {out['busiest'][0]:.3f} -> "
                f"{out['busiest'][-1]:.3f}, val {out['val'][-1]:.4f}")
    return write_record(path, "a small MoE decoder trained without and with the "
                        "load-balancing loss (companion.decoder.record_moe_balance)", c,
                        runs=runs)


def load_moe_balance(path: str | Path = MOE_BALANCE_RECORD) -> dict:
    """The recorded experiment; raises ``ValueError`` if its settings are not the book's."""
    return load_record(path, MOE_BALANCE, "python -m companion.decoder --record moe-balance")


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.decoder --record block-comparison|scaling-sweep|moe-balance
    [--out PATH]``."""
    return record_main("python -m companion.decoder",
                       {"block-comparison": record_block_comparison,
                        "scaling-sweep": record_scaling_sweep,
                        "moe-balance": record_moe_balance}, argv,
                       description="Record the chapter's long training runs.", threads=1)


if __name__ == "__main__":
    raise SystemExit(main())
