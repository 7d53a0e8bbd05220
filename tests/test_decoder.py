"""companion.decoder against its oracles, in float64.

Oracles: ``torch.nn.RMSNorm``; ``F.scaled_dot_product_attention(enable_gqa=True)``;
``transformers``' Llama and Qwen3 (rotary tables, ``apply_rotary_pos_emb``, the MLP,
whole models with and without a KV cache) and Qwen3-MoE's sparse block and
load-balancing loss, all built from small random configs (nothing is downloaded).
"""

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from companion import decoder
from companion.decoder import (
    Decoder,
    DecoderConfig,
    MoE,
    RMSNorm,
    SwiGLU,
    apply_rope,
    apply_rope_complex,
    grouped_query_attention,
    interleaved_to_halves,
    kv_cache_bytes_per_token,
    load_balancing_loss,
    rope_tables,
)
from companion.scale import LLAMA2_70B, kv_cache_bytes

F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-13}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_matches_torch(device, eps):
    x = torch.randn(3, 5, 16, generator=gen(), dtype=F64).to(device)
    ours = RMSNorm(16, eps).to(device, F64)
    ref = torch.nn.RMSNorm(16, eps=eps).to(device, F64)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), **EXACT)
    # a zero vector stays zero (eps keeps it finite), scaling x leaves y unchanged
    torch.testing.assert_close(ours(torch.zeros_like(x)), torch.zeros_like(x))
    torch.testing.assert_close(RMSNorm(16, 1e-30).to(device, F64)(7.5 * x),
                               RMSNorm(16, 1e-30).to(device, F64)(x), **EXACT)


def test_rmsnorm_float32_islands_match_hugging_face():
    x = torch.randn(4, 16, generator=gen(), dtype=F64) * 3
    ours, ref = RMSNorm(16, 1e-5, float32=True).double(), hf_llama.LlamaRMSNorm(16, 1e-5)
    ref.double()
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # without the island the float64 result differs at the level of float32 rounding
    plain = RMSNorm(16, 1e-5).double()
    plain.load_state_dict(ours.state_dict())
    gap = ((plain(x) - ours(x)) / ours(x).abs().max()).abs().max()
    assert 1e-12 < gap < 1e-6


def test_rmsnorm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(4, eps=0.0)
    with pytest.raises(TypeError, match="dim"):
        RMSNorm(4.0)


# --------------------------------------------------------------------------- RoPE


def test_rope_tables_and_rotation_match_hugging_face():
    cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    rotary = hf_llama.LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 4, 9, 16, generator=gen(), dtype=F64)
    pos = torch.arange(3, 12)
    cos_hf, sin_hf = rotary(x, pos[None])  # float32 tables cast to float64
    cos, sin = rope_tables(pos, 16, 500.0, dtype=torch.float32)
    torch.testing.assert_close(cos.double(), cos_hf[0], rtol=0, atol=0)
    torch.testing.assert_close(sin.double(), sin_hf[0], rtol=0, atol=0)
    q_hf, _ = hf_llama.apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rope(x, cos_hf[0], sin_hf[0]), q_hf, **EXACT)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_complex_and_split_halves_layouts_differ_by_a_permutation(theta):
    head_dim = 32
    x = torch.randn(2, 3, 11, head_dim, generator=gen(), dtype=F64)
    pos = torch.arange(11) * 7
    perm = interleaved_to_halves(head_dim)
    cos, sin = rope_tables(pos, head_dim, theta)
    halves = apply_rope(x[..., perm], cos, sin)
    torch.testing.assert_close(halves, apply_rope_complex(x, pos, theta)[..., perm], **EXACT)
    # without the permutation the two layouts rotate different pairs: not the same map
    assert (apply_rope(x, cos, sin) - apply_rope_complex(x, pos, theta)).abs().max() > 0.1


def test_rope_is_a_rotation_and_scores_depend_on_offset_only():
    head_dim = 16
    q = torch.randn(head_dim, generator=gen(1), dtype=F64)
    k = torch.randn(head_dim, generator=gen(2), dtype=F64)
    pos = torch.arange(40)
    cos, sin = rope_tables(pos, head_dim)
    qr, kr = apply_rope(q.expand(40, -1), cos, sin), apply_rope(k.expand(40, -1), cos, sin)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(40), **EXACT)
    torch.testing.assert_close(qr[0], q, **EXACT)  # position 0: no rotation
    scores = qr @ kr.T  # (40, 40): score of query at i and key at j
    for offset in (-5, 0, 3, 17):
        diag = torch.diagonal(scores, offset=-offset)  # entries with i - j == offset
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-12, atol=1e-12)
    assert scores.diagonal(0)[0] != pytest.approx(scores.diagonal(-3)[0])


def test_meta_layout_weights_need_the_permutation():
    """q/k weights in Meta's interleaved layout equal HF's once rows are permuted."""
    d, heads, hd, T = 32, 2, 16, 9
    w_meta = torch.randn(heads * hd, d, generator=gen(3), dtype=F64)
    x = torch.randn(T, d, generator=gen(4), dtype=F64)
    pos = torch.arange(T)
    rows = (torch.arange(heads)[:, None] * hd + interleaved_to_halves(hd)).reshape(-1)
    meta = apply_rope_complex((x @ w_meta.T).view(T, heads, hd).transpose(0, 1), pos)
    cos, sin = rope_tables(pos, hd)
    converted = apply_rope((x @ w_meta[rows].T).view(T, heads, hd).transpose(0, 1), cos, sin)
    wrong = apply_rope((x @ w_meta.T).view(T, heads, hd).transpose(0, 1), cos, sin)
    torch.testing.assert_close(converted @ converted.mT, meta @ meta.mT, **EXACT)
    assert ((wrong @ wrong.mT) - (meta @ meta.mT)).abs().max() > 1.0


def test_rope_rejects_bad_arguments():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_tables(torch.arange(3), 5)
    with pytest.raises(ValueError, match="theta"):
        rope_tables(torch.arange(3), 4, theta=1.0)
    with pytest.raises(ValueError, match="positions"):
        rope_tables(torch.arange(6).view(2, 3), 4)
    with pytest.raises(ValueError, match="last dimension must be even"):
        apply_rope_complex(torch.zeros(2, 3), torch.arange(2))


# --------------------------------------------------------------------------- SwiGLU, GQA


def test_swiglu_matches_hugging_face_mlp():
    cfg = tf.LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=40)
    ref = hf_llama.LlamaMLP(cfg).double()
    ours = SwiGLU(16, 40).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 16, generator=gen(), dtype=F64)
    torch.testing.assert_close(ours(x), ref(x), **EXACT)


@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("past", [0, 4])
def test_grouped_query_attention_matches_sdpa(device, heads, kv, past):
    T, S = 5, 5 + past
    q = torch.randn(2, heads, T, 16, generator=gen(1), dtype=F64).to(device)
    k = torch.randn(2, kv, S, 16, generator=gen(2), dtype=F64).to(device)
    v = torch.randn(2, kv, S, 16, generator=gen(3), dtype=F64).to(device)
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), ref, **EXACT)
    # HF's repeat_kv is the same grouping: kv head j serves query heads j*g ... (j+1)*g-1
    torch.testing.assert_close(k.repeat_interleave(heads // kv, 1),
                               hf_llama.repeat_kv(k, heads // kv), rtol=0, atol=0)


def test_grouped_query_attention_rejects_bad_heads():
    q, k = torch.zeros(1, 6, 2, 4), torch.zeros(1, 4, 2, 4)
    with pytest.raises(ValueError, match="dividing"):
        grouped_query_attention(q, k, k)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        grouped_query_attention(q[0], k, k)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide"):
        DecoderConfig(vocab_size=8, dim=16, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8)


def test_kv_cache_bytes_per_token_for_published_configs():
    # Llama 3 8B and 70B: 32/80 layers, 8 key/value heads of 128 (Grattafiori et al. 2024)
    assert kv_cache_bytes_per_token(32, 8, 128) == 131072  # 128 KiB in bf16
    assert kv_cache_bytes_per_token(80, 8, 128) == 327680  # 320 KiB
    assert kv_cache_bytes_per_token(32, 32, 128) == 4 * 131072  # the same model with MHA
    assert kv_cache_bytes_per_token(80, 8, 128) == kv_cache_bytes(LLAMA2_70B, 1)
    with pytest.raises(ValueError, match="n_kv_heads"):
        kv_cache_bytes_per_token(32, 0, 128)
    with pytest.raises(ValueError, match="bytes_per_value"):
        kv_cache_bytes_per_token(32, 8, 128, 0)


# --------------------------------------------------------------------------- whole model


def hf_llama_model(theta=500.0, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         max_position_embeddings=64, rms_norm_eps=1e-5,
                         initializer_range=0.2, tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return tf.LlamaForCausalLM(cfg).double().eval()


def hf_qwen3_model(seed=0):
    torch.manual_seed(seed)
    cfg = tf.Qwen3Config(vocab_size=53, hidden_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=10,
                         intermediate_size=40, max_position_embeddings=64, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = tf.Qwen3ForCausalLM(cfg).double().eval()
    with torch.no_grad():  # QK-norm gains away from their initial ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("make", [hf_llama_model, lambda: hf_llama_model(1e4, tie=True),
                                  hf_qwen3_model], ids=["llama", "llama-tied", "qwen3"])
@pytest.mark.parametrize("T", [1, 7, 30])
def test_logits_equal_hugging_face(make, T):
    hf = make()
    ours = Decoder.from_hf(hf).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, T), generator=gen(T))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 0.5  # a non-trivial signal
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_qwen3_has_qk_norm_and_its_own_head_dim():
    ours = Decoder.from_hf(hf_qwen3_model())
    assert ours.config.qk_norm and ours.config.head_dim == 10
    assert not Decoder.from_hf(hf_llama_model()).config.qk_norm


@pytest.mark.parametrize("make", [hf_llama_model, hf_qwen3_model], ids=["llama", "qwen3"])
def test_incremental_decoding_with_kv_cache_equals_hugging_face(make):
    hf = make()
    ours = Decoder.from_hf(hf).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=gen(5))
    caches = ours.new_kv_caches(2)
    with torch.no_grad():
        out = hf(ids[:, :5], use_cache=True)
        torch.testing.assert_close(ours(ids[:, :5], kv_caches=caches), out.logits,
                                   rtol=1e-10, atol=1e-10)
        cache = out.cache
        for t in range(5, 12):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            step = ours(ids[:, t:t + 1], kv_caches=caches)
            torch.testing.assert_close(step, out.logits, rtol=1e-10, atol=1e-10)
        # and the cached steps equal a full forward pass of our own model
        torch.testing.assert_close(step[:, -1], ours(ids)[:, -1], **EXACT)


def test_without_float32_islands_the_gap_is_float32_rounding():
    hf = hf_llama_model()
    ids = torch.randint(0, 61, (2, 20), generator=gen())
    with torch.no_grad():
        ref = hf(ids).logits
        gap = (Decoder.from_hf(hf, float32_islands=False)(ids) - ref).abs().max().item()
    assert 1e-12 < gap < 1e-5


def test_round_trip_to_hugging_face():
    for hf in (hf_llama_model(), hf_qwen3_model()):
        ours = Decoder.from_hf(hf)
        back = ours.to_hf()
        assert type(back) is type(hf)
        for (k1, v1), (k2, v2) in zip(hf.state_dict().items(), back.state_dict().items(),
                                      strict=True):
            assert k1 == k2
            torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=gen())
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_from_hf_rejects_unsupported_models():
    hf = hf_llama_model()
    hf.config.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="plain RoPE"):
        Decoder.from_hf(hf)


def test_decoder_rejects_bad_input():
    model = Decoder(DecoderConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  hidden_dim=8, max_seq_len=6))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be an integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ids must have 2"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="config"):
        Decoder({"dim": 16})


# --------------------------------------------------------------------------- MoE


def hf_moe_block(norm_topk_prob, seed=0):
    torch.manual_seed(seed)
    cfg = tf.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=6,
                            num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    block = Qwen3MoeSparseMoeBlock(cfg).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_qwen3_moe_block(norm_topk_prob):
    block = hf_moe_block(norm_topk_prob)
    ours = MoE.from_hf(block)
    ours.gate.float32 = True  # HF's router softmax is float32 even in float64
    x = torch.randn(3, 11, 16, generator=gen(), dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), block(x), **EXACT)
        logits, gates, ids = ours.gate(x.reshape(-1, 16))
        ref_logits, ref_gates, ref_ids = block.gate(x.reshape(-1, 16))
    torch.testing.assert_close(logits, ref_logits, **EXACT)
    assert torch.equal(ids, ref_ids)
    if norm_topk_prob:
        torch.testing.assert_close(gates.sum(-1), torch.ones(33, dtype=F64), rtol=1e-6, atol=0)
    counts = ours.tokens_per_expert()
    assert counts.sum() == 33 * 2 and counts.shape == (6,)


def test_load_balancing_loss_matches_hugging_face():
    logits = tuple(torch.randn(40, 6, generator=gen(s), dtype=F64) * 2 for s in range(3))
    ours = load_balancing_loss(logits, 6, 2)
    ref = load_balancing_loss_func(logits, 6, 2)  # accumulates in float32
    torch.testing.assert_close(ours, ref.double(), rtol=1e-6, atol=0)
    # uniform routing gives top_k; one favourite expert for every token gives more
    assert load_balancing_loss(torch.zeros(12, 6, dtype=F64), 6, 2) == pytest.approx(2.0)
    skewed = torch.zeros(12, 6, dtype=F64)
    skewed[:, :2] = 5.0
    assert load_balancing_loss(skewed, 6, 2) > 5.0
    with pytest.raises(ValueError, match="n_experts=5"):
        load_balancing_loss(logits, 5, 2)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(logits, 6, 7)


def test_moe_decoder_trains_and_exposes_router_logits():
    cfg = DecoderConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                        hidden_dim=12, n_experts=4, top_k=2)
    model = Decoder(cfg)
    ids = torch.randint(0, 20, (2, 8), generator=gen())
    logits = model(ids)
    router = model.router_logits()
    assert len(router) == 2 and router[0].shape == (16, 4)
    loss = F.cross_entropy(logits.reshape(-1, 20), ids.reshape(-1)) \
        + 0.01 * load_balancing_loss(router, 4, 2)
    loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_router_starts_random_not_collapsed():
    # a zero router ties every token onto the same top_k experts
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=20, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                        hidden_dim=12, n_experts=8, top_k=2)
    model = Decoder(cfg)
    weight = model.layers[0].mlp.gate.weight
    assert 0.01 < weight.std().item() < 0.03  # normal, std 0.02 like Hugging Face
    with torch.no_grad():
        model(torch.randint(0, 20, (4, 16), generator=gen()))
    load = model.layers[0].mlp.tokens_per_expert()
    assert (load > 0).sum() >= 6 and load.max() < load.sum() / 4


# --------------------------------------------------------------------------- the comparison


def test_comparison_models_have_the_same_size():
    models = {arm: make() for arm, make in decoder.comparison_models(103).items()}
    sizes = {arm: sum(p.numel() for p in m.parameters()) for arm, m in models.items()}
    assert abs(sizes["modern"] / sizes["gpt"] - 1) < 0.01
    assert models["modern"].lm_head.weight is models["modern"].embed_tokens.weight


def test_comparison_run_prefix_is_deterministic_and_the_record_checks_settings(tmp_path):
    import json

    data = decoder.comparison_data()
    a = decoder.train_comparison_run("modern", 3e-3, 0, steps=3, data=data)
    b = decoder.train_comparison_run("modern", 3e-3, 0, steps=3, data=data)
    assert a["step"] == [3] and a["val"] == b["val"]
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"settings": {"steps": 1}, "runs": []}))
    with pytest.raises(ValueError, match="re-record"):
        decoder.load_block_comparison(path)


def test_config_rejects_bad_values_naming_the_argument():
    base = dict(vocab_size=8, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=8)
    for change, name in (({"dim": 18}, "n_heads=4 must divide dim=18"),
                         ({"head_dim": 5}, "head_dim must be even"),
                         ({"rope_theta": 1.0}, "rope_theta"),
                         ({"n_experts": 4, "top_k": 5}, "top_k"),
                         ({"vocab_size": 0}, "vocab_size")):
        with pytest.raises(ValueError, match=name):
            DecoderConfig(**{**base, **change})
    with pytest.raises(TypeError, match="rope_theta"):
        DecoderConfig(**base, rope_theta="big")


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_model_logits_and_aux_loss_equal_hugging_face(norm_topk_prob):
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=47, hidden_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                            norm_topk_prob=norm_topk_prob, max_position_embeddings=64,
                            initializer_range=0.2, experts_implementation="eager")
    hf = tf.Qwen3MoeForCausalLM(cfg).double().eval()  # grouped_mm has no float64
    ours = Decoder.from_hf(hf).eval()
    assert ours.config.n_experts == 6 and ours.config.norm_topk_prob == norm_topk_prob
    ids = torch.randint(0, 47, (2, 13), generator=gen())
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        logits = ours(ids)
    torch.testing.assert_close(logits, out.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours.router_logits(), out.router_logits, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    torch.testing.assert_close(load_balancing_loss(ours.router_logits(), 6, 2),
                               out.aux_loss.double(), rtol=1e-6, atol=0)


def test_scaling_sweep_helpers(tmp_path):
    import json

    model = decoder.sweep_model(103, 16)()
    total = sum(p.numel() for p in model.parameters())
    assert decoder.non_embedding_parameters(model) == total - 103 * 16
    record = decoder.load_scaling_sweep()
    assert len(record["runs"]) == len(decoder.SWEEP["dims"]) * len(decoder.SWEEP["steps"])
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"settings": {"lr": 1.0}, "runs": []}))
    with pytest.raises(ValueError, match="re-record"):
        decoder.load_scaling_sweep(path)


# --------------------------------------------------------------------------- load balancing


def test_busiest_expert_share_counts_the_routed_tokens():
    torch.manual_seed(0)
    model = Decoder(decoder.moe_balance_config(20))
    ids = torch.randint(0, 20, (4, 16), generator=gen())
    share = decoder.busiest_expert_share(model, ids)
    shares = []
    for logits in model.router_logits():  # (64, 8) per layer
        chosen = torch.topk(logits, 2, dim=-1).indices.reshape(-1).tolist()
        shares.append(max(chosen.count(e) for e in range(8)) / len(chosen))
    assert share == pytest.approx(sum(shares) / len(shares), rel=1e-12)
    assert 1 / 8 <= share <= 1 / 2


def test_moe_balance_prefix_is_deterministic_and_matches_the_record(tmp_path):
    from factories import assert_refused

    a = decoder.train_moe_balance(0.1, 0, steps=10)
    b = decoder.train_moe_balance(0.1, 0, steps=10)
    assert a["step"] == [0, 10] and a == b
    record = decoder.load_moe_balance()
    c = decoder.MOE_BALANCE
    assert [(r["aux_weight"], r["seed"]) for r in record["runs"]] == \
        [(w, s) for w in c["aux_weights"] for s in c["seeds"]]
    stored = next(r for r in record["runs"] if r["aux_weight"] == 0.1 and r["seed"] == 0)
    assert stored["step"] == list(range(0, c["steps"] + 1, c["eval_every"]))
    # float32 training: 0 on the recording's kernels, 4.8e-7 under the default and
    # avx2-mkl variants; switching the auxiliary loss off moves step 10 by 2.4e-3 (loss)
    for key in ("val", "busiest"):
        assert a[key] == pytest.approx(stored[key][:2], rel=0, abs=1e-4)
    assert_refused(decoder.load_moe_balance, record,
                   lambda r: r["settings"].update(steps=61),
                   lambda r: r["settings"].update(aux_weights=[0.0, 0.01]),
                   tmp_path=tmp_path)


def test_train_moe_balance_rejects_bad_arguments():
    for kwargs, name in (({"aux_weight": -0.1, "seed": 0}, "aux_weight"),
                         ({"aux_weight": 0.1, "seed": -1}, "seed"),
                         ({"aux_weight": 0.1, "seed": 0, "steps": -1}, "steps")):
        with pytest.raises(ValueError, match=name):
            decoder.train_moe_balance(**kwargs)
