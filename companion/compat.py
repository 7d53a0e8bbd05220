"""Parity adapters: PyTorch's own attention and encoder layer, copied into the book's.

Chapter 4 checks its :class:`~companion.transformer.MultiHeadAttention` and
:class:`~companion.transformer.TransformerBlock` against ``torch.nn.MultiheadAttention``
and ``torch.nn.TransformerEncoderLayer`` by giving both the same weights. These two
functions do the copying and refuse the layouts the book's modules do not compute, so
that the modules themselves stay about the algorithm.

The same idea one level up: :func:`gpt_to_hf` and :func:`gpt_from_hf` convert the whole
GPT of chapter 4 to and from a ``transformers.GPT2LMHeadModel`` with equal logits
(:meth:`GPT.to_hf <companion.transformer.GPT.to_hf>`, :meth:`GPT.from_hf
<companion.transformer.GPT.from_hf>`), so that the Hugging Face ecosystem -- the
lm-evaluation-harness of chapter 5, TRL of chapter 12 -- runs on the book's own model.
"""

from __future__ import annotations

import torch
from torch import nn

from companion._optional import require
from companion._validate import check_type
from companion.transformer import GPT, GPTConfig, MultiHeadAttention, TransformerBlock


@torch.no_grad()
def load_attention_from_torch(ours: MultiHeadAttention,
                              mha: nn.MultiheadAttention) -> MultiHeadAttention:
    """Copy the weights of a ``torch.nn.MultiheadAttention``; returns ``ours``.

    Afterwards both give the same outputs and averaged weights for the same
    inputs (call ``mha`` with ``batch_first=True`` tensors, as ours takes).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
    if (mha.embed_dim, mha.num_heads) != (ours.embed_dim, ours.num_heads):
        raise ValueError(f"mha has embed_dim={mha.embed_dim}, num_heads={mha.num_heads}; "
                         f"ours has {ours.embed_dim}, {ours.num_heads}")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("only the standard layout is supported: kdim = vdim = embed_dim, "
                         "add_bias_kv=False, add_zero_attn=False")
    if (mha.in_proj_bias is None) != (ours.in_proj.bias is None):
        raise ValueError("mha and ours must agree on bias=True/False")
    ours.in_proj.weight.copy_(mha.in_proj_weight)
    ours.out_proj.weight.copy_(mha.out_proj.weight)
    if ours.in_proj.bias is not None:
        ours.in_proj.bias.copy_(mha.in_proj_bias)
        ours.out_proj.bias.copy_(mha.out_proj.bias)
    ours.dropout = mha.dropout
    return ours


@torch.no_grad()
def load_block_from_torch(block: TransformerBlock,
                          layer: nn.TransformerEncoderLayer) -> TransformerBlock:
    """Copy a ``torch.nn.TransformerEncoderLayer(d, h, 4 * d, activation="gelu",
    norm_first=True, batch_first=True)``; returns ``block``.

    That layer computes the same pre-LN block, so afterwards both agree (give it
    ``is_causal=True`` with the causal ``src_mask`` when ``block`` is causal).
    """
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise TypeError(f"layer must be a torch.nn.TransformerEncoderLayer, "
                        f"got {type(layer).__name__}")
    if not layer.norm_first or layer.activation_relu_or_gelu != 2:
        raise ValueError("layer must be pre-LN with GELU: norm_first=True, activation='gelu'")
    approximate = getattr(layer.activation, "approximate", "none")
    if approximate != "none":
        raise ValueError(f"layer must use the exact GELU (approximate='none') like this "
                         f"block, got approximate={approximate!r}")
    for norm in (layer.norm1, layer.norm2):
        if norm.eps != block.attn_norm.eps:
            raise ValueError(f"layer_norm_eps must be {block.attn_norm.eps}, got {norm.eps}")
    if layer.linear1.out_features != 4 * block.attn.embed_dim:
        raise ValueError(f"layer's dim_feedforward must be 4 * {block.attn.embed_dim}, "
                         f"got {layer.linear1.out_features}")
    load_attention_from_torch(block.attn, layer.self_attn)
    pairs = ((block.attn_norm, layer.norm1), (block.mlp_norm, layer.norm2),
             (block.mlp[0], layer.linear1), (block.mlp[2], layer.linear2))
    for ours, theirs in pairs:
        ours.load_state_dict(theirs.state_dict())
    return block


# --------------------------------------------------------------------------- Hugging Face
# Chapter 4's GPT is GPT-2's architecture (pre-LN blocks, learned positions, tied
# embeddings, biases everywhere, a 4d MLP) with two settings of its own: the exact GELU
# (GPT-2 uses the tanh approximation, "gelu_new") and LayerNorm eps 1e-5 (GPT-2's too).
# Both go through the config, so the converted model computes the same function.

#: transformers' name of each GELU: ``nn.GELU(approximate=...)`` -> activation_function
_HF_ACTIVATION = {"none": "gelu", "tanh": "gelu_new"}
_TORCH_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _gpt_activation(gpt) -> str:
    """The one GELU variant all blocks of ``gpt`` use, as transformers names it."""
    activations = [block.mlp[1] for block in gpt.blocks]
    kinds = {getattr(act, "approximate", type(act).__name__) for act in activations}
    if len(kinds) != 1 or not all(isinstance(act, nn.GELU) for act in activations):
        raise ValueError(f"the blocks must all use the same nn.GELU, got {sorted(kinds)}")
    return _HF_ACTIVATION[kinds.pop()]


def _gpt_layer_norm_eps(gpt) -> float:
    norms = [gpt.final_norm] + [n for b in gpt.blocks for n in (b.attn_norm, b.mlp_norm)]
    eps = {norm.eps for norm in norms}
    if len(eps) != 1:
        raise ValueError(f"all LayerNorms must share one eps to convert, got {sorted(eps)}")
    return eps.pop()


def gpt2_config_of(gpt):
    """The ``transformers.GPT2Config`` that computes what ``gpt`` computes.

    Dropout rates carry over (attention weights, residual branches, embeddings); no
    special tokens are set (the book's vocabularies have none of GPT-2's 50256).
    """
    transformers = require("transformers")
    c = gpt.config
    return transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
        n_layer=c.n_layer, n_head=c.n_head, n_inner=4 * c.n_embd,
        activation_function=_gpt_activation(gpt), layer_norm_epsilon=_gpt_layer_norm_eps(gpt),
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=True)


def _block_pairs(ours, theirs):
    """(our linear, their Conv1D) and (our norm, their norm) of one block."""
    linears = ((ours.attn.in_proj, theirs.attn.c_attn), (ours.attn.out_proj, theirs.attn.c_proj),
               (ours.mlp[0], theirs.mlp.c_fc), (ours.mlp[2], theirs.mlp.c_proj))
    norms = ((ours.attn_norm, theirs.ln_1), (ours.mlp_norm, theirs.ln_2))
    return linears, norms


@torch.no_grad()
def gpt_to_hf(gpt):
    """Chapter 4's :class:`~companion.transformer.GPT` as a ``GPT2LMHeadModel``.

    Same dtype, device and train/eval mode; equal logits (tested in float64). A
    ``Conv1D`` of transformers stores ``(in, out)``, the transpose of ``nn.Linear``;
    ``c_attn`` stacks ``W^Q, W^K, W^V`` along its output like our ``in_proj``. A
    sinusoidal position table is copied into GPT-2's learned one.
    """
    check_type("gpt", gpt, GPT)
    transformers = require("transformers")
    weight = gpt.token_embedding.weight
    hf = transformers.GPT2LMHeadModel(gpt2_config_of(gpt)).to(weight.device, weight.dtype)
    body = hf.transformer
    positions = torch.arange(gpt.config.block_size, device=weight.device)
    body.wte.weight.copy_(weight)
    body.wpe.weight.copy_(gpt.position_embedding(positions))
    for ours, theirs in zip(gpt.blocks, body.h):
        linears, norms = _block_pairs(ours, theirs)
        for linear, conv in linears:
            conv.weight.copy_(linear.weight.T)
            conv.bias.copy_(linear.bias)
        for norm, their_norm in norms:
            their_norm.load_state_dict(norm.state_dict())
    body.ln_f.load_state_dict(gpt.final_norm.state_dict())
    hf.tie_weights()
    return hf.train(gpt.training)


def _check_convertible(config) -> None:
    """Refuse the GPT-2 settings chapter 4's GPT does not compute."""
    if config.activation_function not in _TORCH_GELU:
        raise ValueError(f"activation_function must be one of {sorted(_TORCH_GELU)}, "
                         f"got {config.activation_function!r}")
    if config.n_inner not in (None, 4 * config.n_embd):
        raise ValueError(f"n_inner must be 4 * n_embd = {4 * config.n_embd}, "
                         f"got {config.n_inner}")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        raise ValueError("attention must be scaled by 1/sqrt(head_dim) only: "
                         "scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False")
    if config.add_cross_attention:
        raise ValueError("add_cross_attention=True has no counterpart in a decoder-only GPT")
    if len({config.resid_pdrop, config.embd_pdrop, config.attn_pdrop}) != 1:
        raise ValueError("resid_pdrop, embd_pdrop and attn_pdrop must be equal (one dropout "
                         f"rate), got {config.resid_pdrop}, {config.embd_pdrop}, "
                         f"{config.attn_pdrop}")


@torch.no_grad()
def gpt_from_hf(model):
    """A ``GPT2LMHeadModel`` as chapter 4's :class:`~companion.transformer.GPT`.

    The inverse of :func:`gpt_to_hf` (learned positions; GELU and LayerNorm eps
    taken from the config). Refuses untied heads and the settings the GPT does not
    compute (``_check_convertible``); a pretrained GPT-2 (``gelu_new``) converts.
    """
    transformers = require("transformers")
    check_type("model", model, transformers.GPT2LMHeadModel)
    c, body = model.config, model.transformer
    _check_convertible(c)
    if not torch.equal(model.lm_head.weight, body.wte.weight) or model.lm_head.bias is not None:
        raise ValueError("model's lm_head must be tied to its token embedding (wte), "
                         "as in GPT-2 and the book's GPT")
    weight = body.wte.weight
    gpt = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                        n_head=c.n_head, n_embd=c.n_embd, dropout=float(c.resid_pdrop)))
    gpt.to(weight.device, weight.dtype)
    gpt.token_embedding.weight.copy_(weight)
    gpt.position_embedding.weight.copy_(body.wpe.weight)
    for ours, theirs in zip(gpt.blocks, body.h):
        ours.mlp[1] = nn.GELU(approximate=_TORCH_GELU[c.activation_function])
        linears, norms = _block_pairs(ours, theirs)
        for linear, conv in linears:
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        for norm, their_norm in norms:
            norm.eps = c.layer_norm_epsilon
            norm.load_state_dict(their_norm.state_dict())
    gpt.final_norm.eps = c.layer_norm_epsilon
    gpt.final_norm.load_state_dict(body.ln_f.state_dict())
    return gpt.train(model.training)
