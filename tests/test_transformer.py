"""companion.transformer against PyTorch: attention, multi-head attention, the block, GPT.

Oracles: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer(norm_first=True)`` and ``companion.scale.parameter_count``;
all comparisons in float64 with tight tolerances, on the CPU and (when present) CUDA.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.compat import load_attention_from_torch, load_block_from_torch
from companion.scale import TransformerConfig, parameter_count
from companion.transformer import (
    GPT,
    GPTConfig,
    KVCache,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    TransformerBlock,
    attention_weights,
    causal_mask,
    sample_next_token,
    scaled_dot_product_attention,
    sinusoidal_positions,
)

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def qkv(device, B=2, H=3, L=5, S=7, E=8, Ev=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, e, generator=g, dtype=F64)
               for n, e in ((L, E), (S, E), (S, Ev)))
    return q.to(device), k.to(device), v.to(device)


def random_bool_mask(shape, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True  # every query may attend somewhere
    return mask.to(device)


# --------------------------------------------------------------------------- the function


@pytest.mark.parametrize("L, S", [(5, 7), (7, 5), (6, 6), (1, 4)])
@pytest.mark.parametrize("case", ["plain", "bool", "float", "causal", "scale", "broadcast"])
def test_attention_matches_torch(device, L, S, case):
    q, k, v = qkv(device, L=L, S=S)
    kwargs = {}
    if case == "bool":
        kwargs["attn_mask"] = random_bool_mask((2, 3, L, S), device)
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, L, S, dtype=F64, device=device)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.37
    elif case == "broadcast":
        kwargs["attn_mask"] = random_bool_mask((L, S), device)
    ours = scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ours.shape == (2, 3, L, 6)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_gradients_match_torch(device):
    inputs = [t.requires_grad_() for t in qkv(device)]
    mask = torch.randn(5, 7, dtype=F64, device=device)
    grads = []
    for fn in (scaled_dot_product_attention, F.scaled_dot_product_attention):
        out = fn(*inputs, attn_mask=mask)
        grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), inputs))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_weights_sum_to_one_and_causal_is_top_left(device):
    q, k, _ = qkv(device, L=3, S=5)
    w = attention_weights(q, k, is_causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 3, dtype=F64, device=device))
    # query i sees keys 0..i: top-left alignment, as in PyTorch
    assert torch.equal(w[0, 0] > 0, causal_mask(3, 5, device=device))
    assert torch.equal(causal_mask(2, 5, past=3), torch.ones(5, 5, dtype=torch.bool).tril()[3:])
    # the 1/sqrt(d_k) scaling by hand for one entry
    expected = torch.softmax(q[0, 0, 1] @ k[0, 0, :2].T / math.sqrt(8), dim=-1)
    torch.testing.assert_close(w[0, 0, 1, :2], expected, **TOL)


def test_a_query_that_sees_nothing_gets_zeros_like_torch(device):
    q, k, v = (t.requires_grad_() for t in qkv(device, L=3, S=4))
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    mask[1] = False
    float_mask = torch.zeros(3, 4, dtype=F64, device=device).masked_fill(~mask, -math.inf)
    for m in (mask, float_mask):
        ours = scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   **TOL)
        assert ours[:, :, 1].abs().max() == 0
        grads = torch.autograd.grad(ours.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_dropout_zeroes_or_rescales_weights(device):
    torch.manual_seed(0)
    q, k, _ = qkv(device, L=6, S=6)
    identity = torch.eye(6, dtype=F64, device=device).expand(2, 3, 6, 6)  # output = weights
    out, dropped = scaled_dot_product_attention(q, k, identity, dropout_p=0.5,
                                                return_weights=True)
    torch.testing.assert_close(out, dropped, **TOL)
    full = attention_weights(q, k)
    kept = dropped != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(dropped[kept], 2 * full[kept], **TOL)
    assert torch.equal(scaled_dot_product_attention(q, k, identity, dropout_p=1.0),
                       torch.zeros_like(identity))


def test_attention_rejects_bad_input():
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match="same last dimension"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="key and value"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="attn_mask of shape"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                                     is_causal=True)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="share a dtype"):
        scaled_dot_product_attention(q.float(), k, v)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        scaled_dot_product_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="query must have shape"):
        scaled_dot_product_attention(q[0, 0, 0], k, v)


# --------------------------------------------------------------------------- multi-head


def mha_pair(device, E=12, H=3, bias=True, fast=True, seed=0):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(E, H, bias=bias, batch_first=True).to(device, F64)
    with torch.no_grad():  # non-zero biases, so that they are tested too
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiHeadAttention(E, H, bias=bias, fast_attention=fast).to(device, F64)
    return load_attention_from_torch(ours, theirs), theirs


def inputs(device, B=2, L=5, S=7, E=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, mem = torch.randn(B, L, E, generator=g, dtype=F64), torch.randn(B, S, E, generator=g,
                                                                      dtype=F64)
    return x.to(device), mem.to(device)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
@pytest.mark.parametrize("case", ["self", "cross", "padding_bool", "padding_float", "mask_2d",
                                  "mask_3d", "mask_float", "causal", "causal_and_padding",
                                  "no_bias"])
def test_mha_matches_torch(device, fast, case):
    ours, theirs = mha_pair(device, bias=case != "no_bias", fast=fast)
    x, mem = inputs(device)
    B, L, S, H = 2, 5, 7, 3
    q, kv = (x, x) if case in ("self", "causal", "causal_and_padding", "no_bias") else (x, mem)
    S = kv.size(1)
    kw = {}
    padding = torch.zeros(B, S, dtype=torch.bool, device=device)
    padding[0, -2:] = True  # the last two keys of sequence 0 are padding
    if case in ("padding_bool", "causal_and_padding"):
        kw["key_padding_mask"] = padding
    elif case == "padding_float":
        kw["key_padding_mask"] = torch.randn(B, S, dtype=F64, device=device)
    elif case == "mask_2d":
        kw["attn_mask"] = ~random_bool_mask((L, S), device)  # True = forbidden here
    elif case == "mask_3d":
        kw["attn_mask"] = ~random_bool_mask((B * H, L, S), device)
    elif case == "mask_float":
        kw["attn_mask"] = torch.randn(L, S, dtype=F64, device=device)
    causal = case.startswith("causal")
    out, w = ours(q, kv, kv, **kw, is_causal=causal, need_weights=True)
    out_fast_or_readable, no_weights = ours(q, kv, kv, **kw, is_causal=causal)
    if causal:  # torch needs the mask itself; its is_causal is only a hint
        kw |= {"attn_mask": ~causal_mask(L, S, device=device), "is_causal": True}
    ref, ref_w = theirs(q, kv, kv, **kw, need_weights=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    torch.testing.assert_close(out_fast_or_readable, ref, **TOL)
    assert no_weights is None


def test_mha_per_head_weights_match_torch(device):
    ours, theirs = mha_pair(device)
    x, mem = inputs(device)
    _, w = ours(x, mem, mem, need_weights=True, average_attn_weights=False)
    _, ref = theirs(x, mem, mem, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, 3, 5, 7)
    torch.testing.assert_close(w, ref, **TOL)


def test_mha_fast_and_readable_paths_agree_with_gradients(device):
    fast, _ = mha_pair(device, fast=True)
    readable, _ = mha_pair(device, fast=False)
    x, _ = inputs(device)
    padding = torch.zeros(2, 5, dtype=torch.bool, device=device)
    padding[1, -1] = True
    grads = []
    for model in (fast, readable):
        xi = x.clone().requires_grad_()
        out, _ = model(xi, xi, xi, key_padding_mask=padding, is_causal=True)
        params = list(model.parameters())
        grads.append((out, *torch.autograd.grad(out.pow(2).sum(), [xi, *params])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_mha_kv_cache_equals_full_causal_attention(device):
    ours, _ = mha_pair(device)
    x, _ = inputs(device, L=9)
    full, _ = ours(x, x, x, is_causal=True)
    cache = KVCache(2, 3, 16, 4, device=device, dtype=F64)
    pieces = []
    for lo, hi in ((0, 4), (4, 5), (5, 8), (8, 9)):  # a prompt, then single tokens and a chunk
        chunk = x[:, lo:hi]
        pieces.append(ours(chunk, chunk, chunk, is_causal=True, kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache.length == 9
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, 8, 4))


def test_mha_rejected_call_leaves_the_kv_cache_unchanged():
    ours, _ = mha_pair("cpu")
    x, _ = inputs("cpu")
    cache = KVCache(2, 3, 16, 4, dtype=F64)
    ours(x[:, :3], x[:, :3], x[:, :3], is_causal=True, kv_cache=cache)
    keys, values = cache.keys.clone(), cache.values.clone()
    new = x[:, 3:4]
    with pytest.raises(ValueError, match="filled kv_cache"):
        ours(new, new, new, key_padding_mask=torch.zeros(2, 1, dtype=torch.bool),
             kv_cache=cache)
    assert cache.length == 3  # the rejected call appended nothing
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
    # so the next, valid step still equals full causal attention
    step, _ = ours(new, new, new, is_causal=True, kv_cache=cache)
    full, _ = ours(x[:, :4], x[:, :4], x[:, :4], is_causal=True)
    torch.testing.assert_close(step, full[:, 3:], **TOL)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
@pytest.mark.parametrize("padding", [False, True], ids=["causal", "causal_and_padding"])
@pytest.mark.parametrize("L", [1, 2])
def test_mha_causal_without_cache_is_top_left_like_sdpa(device, fast, padding, L):
    """Without a cache, is_causal means sdpa's top-left mask for every L, also L = 1 < S."""
    ours, _ = mha_pair(device, fast=fast)
    x, mem = inputs(device, L=L, S=6)
    B, S, H, E = 2, 6, 3, 12
    kw = {}
    allowed = causal_mask(L, S, device=device)[None, None]  # (1, 1, L, S), True = may attend
    if padding:
        kw["key_padding_mask"] = torch.zeros(B, S, dtype=torch.bool, device=device)
        kw["key_padding_mask"][1, -1] = True
        allowed = allowed & ~kw["key_padding_mask"][:, None, None, :]
    out, _ = ours(x, mem, mem, is_causal=True, **kw)
    # by hand: project, split heads, PyTorch's attention with its own masks, merge, project
    W, b = ours.in_proj.weight.chunk(3), ours.in_proj.bias.chunk(3)
    q, k, v = (F.linear(t, w, bias).view(B, -1, H, E // H).transpose(1, 2)
               for t, w, bias in zip((x, mem, mem), W, b))
    if padding:
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    else:
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = ours.out_proj(heads.transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(out, expected, **TOL)


def test_mha_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        MultiHeadAttention(12, 0)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(12, 3, dropout=1.0)
    ours, theirs = mha_pair("cpu")
    x, mem = inputs("cpu")
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(x, mem, mem, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool or floating"):
        ours(x, mem, mem, key_padding_mask=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        ours(x, mem, mem, attn_mask=torch.zeros(5, 7, dtype=torch.int32))
    cache = KVCache(2, 3, 16, 4, dtype=F64)
    ours(x, x, x, is_causal=True, kv_cache=cache)
    with pytest.raises(ValueError, match="filled kv_cache"):
        ours(x[:, :1], x[:, :1], x[:, :1], attn_mask=torch.zeros(1, 1, dtype=torch.bool),
             kv_cache=cache)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ours(x, mem, mem, attn_mask=torch.zeros(7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must have shape"):
        ours(x[..., :6], mem, mem)
    with pytest.raises(ValueError, match="key and value"):
        ours(x, mem, mem[:, :3])
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        load_attention_from_torch(ours, nn.Linear(12, 12))
    with pytest.raises(ValueError, match="num_heads=4"):
        load_attention_from_torch(ours, nn.MultiheadAttention(12, 4, batch_first=True))
    with pytest.raises(ValueError, match="kdim"):
        other_layout = nn.MultiheadAttention(12, 3, kdim=5, vdim=5, batch_first=True)
        load_attention_from_torch(ours, other_layout)


# --------------------------------------------------------------------------- positions, block


def test_sinusoidal_positions_formula_and_relative_property():
    P, d = 50, 16
    pe = sinusoidal_positions(P, d, dtype=F64)
    p, i = 7, 3  # one entry of each kind by the paper's formula
    assert pe[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-12)
    assert pe[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-12)
    # the dot product of two codes depends only on their distance
    gram = pe @ pe.T
    torch.testing.assert_close(torch.diagonal(gram, offset=5),
                               torch.full((P - 5,), gram[0, 5].item(), dtype=F64), **TOL)
    torch.testing.assert_close(pe.norm(dim=1), torch.full((P,), math.sqrt(d / 2), dtype=F64))
    module = SinusoidalPositionalEncoding(P, d)
    assert len(list(module.parameters())) == 0 and module.state_dict() == {}
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positions(4, 5)


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
def test_block_matches_torch_encoder_layer(device, causal):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 64, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True).to(device, F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    block = load_block_from_torch(TransformerBlock(16, 4, causal=causal).to(device, F64), layer)
    x = torch.randn(3, 7, 16, dtype=F64, device=device)
    kw = {"src_mask": ~causal_mask(7, 7, device=device), "is_causal": True} if causal else {}
    torch.testing.assert_close(block(x), layer(x, **kw), **TOL)


def test_block_load_rejects_other_layers():
    block = TransformerBlock(16, 4)
    with pytest.raises(ValueError, match="norm_first"):
        load_block_from_torch(block, nn.TransformerEncoderLayer(16, 4, 64, batch_first=True))
    with pytest.raises(ValueError, match="dim_feedforward"):
        load_block_from_torch(block, nn.TransformerEncoderLayer(16, 4, 32, activation="gelu",
                                                         norm_first=True, batch_first=True))
    with pytest.raises(TypeError):
        load_block_from_torch(block, nn.Linear(2, 2))
    tanh_gelu = nn.TransformerEncoderLayer(16, 4, 64, activation=nn.GELU(approximate="tanh"),
                                           norm_first=True, batch_first=True)
    with pytest.raises(ValueError, match="approximate='tanh'"):
        load_block_from_torch(block, tanh_gelu)
    exact_gelu = nn.TransformerEncoderLayer(16, 4, 64, activation=nn.GELU(), norm_first=True,
                                            batch_first=True)
    # the module form of exact GELU is fine
    assert load_block_from_torch(block, exact_gelu) is block
    other_eps = nn.TransformerEncoderLayer(16, 4, 64, activation="gelu", norm_first=True,
                                           batch_first=True)
    other_eps.norm2.eps = 1e-6
    with pytest.raises(ValueError, match="layer_norm_eps"):
        load_block_from_torch(block, other_eps)


# --------------------------------------------------------------------------- GPT


def small_gpt(device, fast=True, seed=0, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": 11, "block_size": 12, "n_layer": 2, "n_head": 2,
                          "n_embd": 8, "fast_attention": fast, **kw})
    return GPT(config).to(device, F64)


def ids(device, B=3, T=9, V=11, seed=0):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def test_gpt_shapes_loss_and_tied_head(device):
    model = small_gpt(device)
    x = ids(device)
    logits, loss = model(x)
    assert logits.shape == (3, 9, 11) and loss is None
    y = ids(device, seed=1)
    _, loss = model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11), y.flatten()), **TOL)
    y[0, :4] = -1  # ignored positions
    _, loss = model(x, y)
    keep = y.flatten() != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11)[keep],
                                                     y.flatten()[keep]), **TOL)
    assert model.lm_head.weight is model.token_embedding.weight
    assert isinstance(model.blocks, nn.ModuleList) and isinstance(model.blocks[0],
                                                                  TransformerBlock)


def test_gpt_is_causal(device):
    model = small_gpt(device)
    x = ids(device)
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 11  # change the future only
    assert torch.equal(model(x)[0][:, :5], model(y)[0][:, :5])
    assert not torch.allclose(model(x)[0][:, 5:], model(y)[0][:, 5:])


@pytest.mark.parametrize("position_encoding", ["learned", "sinusoidal"])
def test_parameter_count_by_formula_and_by_chapter_1(position_encoding):
    L, d, V, T = 3, 24, 17, 10
    model = GPT(GPTConfig(V, T, L, 4, d, position_encoding=position_encoding))
    learned = position_encoding == "learned"
    formula = 12 * L * d * d + 13 * L * d + (V + (T if learned else 0)) * d + 2 * d
    assert model.num_parameters() == formula
    assert model.num_parameters(exclude_embeddings=True) == 12 * L * d * d + 13 * L * d + 2 * d
    chapter_1 = parameter_count(TransformerConfig("ours", V, L, d, 4, n_positions=T if learned
                                                  else 0))
    assert model.num_parameters() == chapter_1.total


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
def test_gradients_reach_every_parameter(device, fast):
    model = small_gpt(device, fast=fast, dropout=0.1)
    _, loss = model(ids(device), ids(device, seed=1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fast_and_readable_gpt_agree_in_values_and_gradients(device):
    results = []
    for fast in (True, False):
        model = small_gpt(device, fast=fast)
        logits, loss = model(ids(device), ids(device, seed=1))
        loss.backward()
        results.append((logits, *(p.grad for p in model.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_kv_cache_forward_equals_full_forward(device):
    model = small_gpt(device).eval()
    x = ids(device, T=12)
    full, _ = model(x)
    caches = model.new_kv_caches(3)
    parts = [model(x[:, lo:hi], kv_caches=caches)[0] for lo, hi in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(x[:, :1], kv_caches=caches)


@pytest.mark.parametrize("new_tokens", [5, 20], ids=["within_block", "beyond_block"])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0},
                                      {"temperature": 0.8, "top_k": 3}],
                         ids=["greedy", "sample", "top_k"])
def test_cached_generation_equals_uncached(device, new_tokens, sampling):
    model = small_gpt(device)
    prompt = ids(device, T=4)
    out = []
    for use_cache in (True, False):
        generator = torch.Generator(device=device).manual_seed(0)
        out.append(model.generate(prompt, new_tokens, generator=generator, use_cache=use_cache,
                                  **sampling))
    assert out[0].shape == (3, 4 + new_tokens)
    assert torch.equal(out[0][:, :4], prompt)
    assert torch.equal(out[0], out[1])
    assert model.training  # generate restores the mode


def test_greedy_generation_follows_the_argmax():
    model = small_gpt("cpu")
    out = model.generate(ids("cpu", T=3), 4, temperature=0.0)
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 2:].argmax(-1), out[:, 3:])


def test_sample_next_token_distribution_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=F64).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, generator=g).flatten()
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.015, rtol=0)
    top2 = sample_next_token(logits, top_k=2, generator=g)
    assert set(top2.flatten().tolist()) == {0, 1}
    cold = sample_next_token(logits, temperature=0.05, generator=g)
    assert (cold == 0).all()
    assert torch.equal(sample_next_token(logits[:2], temperature=0.0), torch.zeros(2, 1).long())
    # ties with the k-th best logit are kept (documented): top_k=1 of [1, 1, 1, 0]
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64).expand(3000, 4)
    assert set(sample_next_token(tied, top_k=1, generator=g).flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": True}, TypeError, "temperature must be a real number"),
    ({"top_k": 0}, ValueError, "top_k must be >= 1"),
    ({"top_k": 2.0}, TypeError, "top_k must be an int"),
    ({"logits": torch.zeros(4)}, ValueError, r"\(batch, vocab_size\)"),
    ({"logits": torch.zeros(2, 3, 4)}, ValueError, r"\(batch, vocab_size\)"),
    ({"logits": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "floating-point"),
    ({"logits": [[0.0, 1.0]]}, TypeError, "logits must be a torch.Tensor"),
])
def test_sample_next_token_rejects_bad_input(kwargs, error, match):
    kwargs = {"logits": torch.zeros(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        sample_next_token(**kwargs)


def test_attention_maps(device):
    model = small_gpt(device, fast=True).train()
    x = ids(device)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 9, 9)
    assert model.training
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 9, dtype=F64, device=device))
        assert (w.triu(diagonal=1) == 0).all()
    # layer 0's map is the softmax of its own queries and keys, computed by hand
    block = model.blocks[0]
    h = block.attn_norm(model.token_embedding(x) + model.position_embedding.weight[:9])
    q, k, _ = block.attn.in_proj(h).split(8, dim=-1)
    q, k = (t.view(3, 9, 2, 4).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(maps[0], F.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(
        ~causal_mask(9, 9, device=device), -math.inf), dim=-1), **TOL)


def test_gpt_rejects_bad_input():
    model = small_gpt("cpu")
    with pytest.raises(ValueError, match="exceeds block_size=12"):
        model(ids("cpu", T=13))
    with pytest.raises(TypeError, match="torch.long"):
        model(ids("cpu").float())
    with pytest.raises(ValueError, match=r"ids in \[0, 11\)"):
        model(ids("cpu") + 5)
    with pytest.raises(ValueError, match="shape"):
        model(ids("cpu")[0])
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(ids("cpu"), ids("cpu", T=8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids("cpu"), -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids("cpu"), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids("cpu"), 2, top_k=0)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.attention_maps(ids("cpu", T=13))
    with pytest.raises(ValueError, match=r"one KVCache per block \(2\), got 1"):
        model(ids("cpu"), kv_caches=model.new_kv_caches(3)[:1])
    with pytest.raises(ValueError, match=r"one KVCache per block \(2\), got 0"):
        model(ids("cpu"), kv_caches=[])
    with pytest.raises(ValueError, match=r"\(batch, n_head, head_dim\) = \(3, 2, 4\)"):
        model(ids("cpu"), kv_caches=model.new_kv_caches(2))
    with pytest.raises(TypeError, match="list of KVCache"):
        model(ids("cpu"), kv_caches=[None, None])
    uneven = model.new_kv_caches(3)
    model.blocks[0].attn(*(torch.zeros(3, 2, 8, dtype=F64),) * 3, is_causal=True,
                         kv_cache=uneven[0])
    with pytest.raises(ValueError, match="same number of positions"):
        model(ids("cpu"), kv_caches=uneven)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(10, 8, 2, 3, 16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        GPTConfig(10, 0, 2, 2, 16)
    with pytest.raises(ValueError, match="position_encoding"):
        GPTConfig(10, 8, 2, 2, 16, position_encoding="rotary")
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"vocab_size": 10})


@pytest.mark.cuda
def test_bf16_autocast_on_cuda_is_close_to_float32():
    model = small_gpt("cuda").float()
    x = ids("cuda")
    reference, _ = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
