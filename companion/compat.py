"""Parity adapters: PyTorch's own attention and encoder layer, copied into the book's.

Chapter 4 checks its :class:`~companion.transformer.MultiHeadAttention` and
:class:`~companion.transformer.TransformerBlock` against ``torch.nn.MultiheadAttention``
and ``torch.nn.TransformerEncoderLayer`` by giving both the same weights. These two
functions do the copying and refuse the layouts the book's modules do not compute, so
that the modules themselves stay about the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from companion.transformer import MultiHeadAttention, TransformerBlock


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
