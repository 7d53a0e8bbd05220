"""companion.scale against oracles.

* Parameter counts against the same architecture assembled from ``torch.nn``
  modules (on the meta device: shapes only, no memory) and against the totals
  that the reference implementations report.
* FLOP formulas against ``torch.utils.flop_counter.FlopCounterMode``.
* Training-memory formulas against the bytes ``torch.optim`` really allocates.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from companion import scale
from companion.scale import TransformerConfig

# --------------------------------------------------------------------------- a torch.nn oracle


class SwiGLU(nn.Module):
    def __init__(self, d, f, bias):
        super().__init__()
        self.gate, self.up = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """A pre-norm Transformer block built from torch.nn parts, explicit matmul attention."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, b = cfg.d_model, cfg.bias
        d_kv = cfg.kv_heads * cfg.head_dim
        self.cfg = cfg
        norm = (lambda: nn.LayerNorm(d)) if cfg.norm == "layernorm" else (lambda: nn.RMSNorm(d))
        self.norm1, self.norm2 = norm(), norm()
        self.q, self.o = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
        self.k, self.v = nn.Linear(d, d_kv, bias=b), nn.Linear(d, d_kv, bias=b)
        if cfg.mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(d, cfg.ff_dim, bias=b), nn.GELU(),
                                     nn.Linear(cfg.ff_dim, d, bias=b))
        else:
            self.mlp = SwiGLU(d, cfg.ff_dim, b)

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        h, hd = self.cfg.n_head, self.cfg.head_dim
        group = h // self.cfg.kv_heads
        y = self.norm1(x)
        q = self.q(y).view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        k = self.k(y).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        v = self.v(y).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, h, T, T)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        norm = (lambda: nn.LayerNorm(d)) if cfg.norm == "layernorm" else (lambda: nn.RMSNorm(d))
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.n_positions, d) if cfg.n_positions else None
        self.typ = nn.Embedding(cfg.n_token_types, d) if cfg.n_token_types else None
        self.emb_norm = norm() if cfg.embedding_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = norm() if cfg.final_norm else None
        self.head = None if cfg.tied_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.pooler = nn.Linear(d, d) if cfg.pooler else None

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x @ (self.tok.weight if self.head is None else self.head.weight).T


def torch_parameter_count(cfg: TransformerConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Model(cfg).parameters())


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("cfg", scale.PUBLISHED_CONFIGS, ids=lambda c: c.name)
def test_parameter_count_equals_torch_nn(cfg):
    assert scale.parameter_count(cfg).total == torch_parameter_count(cfg)


@pytest.mark.parametrize("cfg", [c for c in scale.PUBLISHED_CONFIGS if c.checkpoint_parameters],
                         ids=lambda c: c.name)
def test_parameter_count_equals_released_checkpoint(cfg):
    assert scale.parameter_count(cfg).total == cfg.checkpoint_parameters


def test_gpt3_within_rounding_of_the_paper():
    assert scale.GPT3_175B.checkpoint_parameters is None  # never released
    counted = scale.parameter_count(scale.GPT3_175B).total
    assert abs(counted / scale.GPT3_175B.paper_parameters - 1) < 0.003  # "175.0B"


def test_papers_state_rounded_sizes():
    gpt2 = (scale.GPT2_SMALL, scale.GPT2_MEDIUM, scale.GPT2_LARGE, scale.GPT2_XL)
    for cfg in scale.PUBLISHED_CONFIGS:
        ratio = scale.parameter_count(cfg).total / cfg.paper_parameters
        if cfg in gpt2:  # the GPT-2 paper's sizes are below its released checkpoints'
            assert 1.01 < ratio < 1.07, cfg.name
        else:
            assert abs(ratio - 1) < 0.02, cfg.name


@pytest.mark.parametrize("call", [
    lambda: scale.parameter_count("GPT-2"),
    lambda: scale.kv_cache_bytes({"n_layer": 2}, 10),
    lambda: scale.forward_flops_per_token(None, 10),
])
def test_config_must_be_a_transformer_config(call):
    with pytest.raises(TypeError, match="cfg must be a TransformerConfig"):
        call()


def test_gpt_block_is_12d2_plus_13d():
    cfg = scale.GPT2_SMALL
    pc = scale.parameter_count(cfg)
    d = cfg.d_model
    assert (pc.attention + pc.mlp + pc.norms - 2 * d) == cfg.n_layer * (12 * d * d + 13 * d)
    # and PyTorch's own encoder layer agrees
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(d, cfg.n_head, dim_feedforward=4 * d)
    assert sum(p.numel() for p in layer.parameters()) == 12 * d * d + 13 * d


def test_non_embedding_and_rule_of_thumb():
    pc = scale.parameter_count(scale.GPT2_SMALL)
    assert pc.non_embedding == 85_056_000
    assert scale.rule_of_thumb_parameters(12, 768) == 84_934_656


@pytest.mark.parametrize("kw", [
    dict(n_kv_head=2), dict(mlp="swiglu", bias=False), dict(norm="rmsnorm", tied_embeddings=False),
    dict(n_positions=0, n_token_types=3, embedding_norm=True, pooler=True, final_norm=False),
    dict(d_ff=100, bias=False, n_kv_head=1),
], ids=str)
def test_random_variants_equal_torch_nn(kw):
    cfg = TransformerConfig("variant", vocab_size=97, n_layer=3, d_model=48, n_head=4,
                            n_positions=kw.pop("n_positions", 16), **kw)
    assert scale.parameter_count(cfg).total == torch_parameter_count(cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(n_head=5), "n_head=5 must divide d_model=48"),
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_layer=-1), "n_layer"),
    (dict(d_model=0), "d_model"),
    (dict(n_positions=-3), "n_positions"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(d_ff=0), "d_ff"),
])
def test_config_rejects_bad_values(kw, match):
    base = dict(vocab_size=10, n_layer=2, d_model=48, n_head=4)
    with pytest.raises(ValueError, match=match):
        TransformerConfig("bad", **{**base, **kw})


@pytest.mark.parametrize("kw", [dict(n_layer=2.0), dict(d_model="48"), dict(n_head=True)])
def test_config_rejects_wrong_types(kw):
    base = dict(vocab_size=10, n_layer=2, d_model=48, n_head=4)
    with pytest.raises(TypeError, match=next(iter(kw))):
        TransformerConfig("bad", **{**base, **kw})


# --------------------------------------------------------------------------- FLOPs


def test_six_n_d_is_exact_for_a_bias_free_mlp():
    torch.manual_seed(0)
    widths = [64, 128, 96, 10]
    mlp = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths, widths[1:])])
    n_params = sum(p.numel() for p in mlp.parameters())
    x = torch.randn(32, 64, requires_grad=True)  # 32 "tokens"; input gradient too
    with FlopCounterMode(display=False) as counter:
        mlp(x).square().sum().backward()
    assert counter.get_total_flops() == scale.training_flops(n_params, 32)


def test_forward_flops_per_token_matches_counter():
    cfg = TransformerConfig("tiny", vocab_size=50, n_layer=2, d_model=64, n_head=4,
                            n_positions=32, bias=False, norm="rmsnorm")
    T, B = 32, 2
    torch.manual_seed(0)
    model = Model(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    # The counter counts the full T x T attention matrices (4 L T d per token) and the
    # tied output layer; Kaplan's formula counts half the attention (causal average)
    # and no output layer, and adds 2 FLOPs per norm weight that the counter ignores.
    full_attention_extra = 2 * cfg.n_layer * T * cfg.d_model
    output_layer = 2 * cfg.vocab_size * cfg.d_model
    norm_weights = scale.parameter_count(cfg).norms
    expected = scale.forward_flops_per_token(cfg, T) + full_attention_extra + output_layer
    assert counted == expected - 2 * norm_weights


def test_gpt3_training_compute_matches_the_paper():
    n = scale.parameter_count(scale.GPT3_175B).total
    assert scale.training_flops(n, 300e9) == pytest.approx(3.14e23, rel=0.005)


def test_compute_optimal_split_inverts_6nd():
    n, d = scale.compute_optimal_model(5.76e23)
    assert d == pytest.approx(20 * n)
    assert scale.training_flops(n, d) == pytest.approx(5.76e23)
    assert scale.compute_optimal_tokens(70e9) == 1.4e12


def test_training_time_and_mfu_are_inverse():
    # LLaMA-65B: 380 tokens/s/GPU on A100s (Touvron et al. 2023)
    mfu = scale.model_flops_utilization(65.2e9, 380, scale.ACCELERATOR_PEAK_FLOPS["A100"])
    assert mfu == pytest.approx(0.4765, abs=1e-4)
    flops = scale.training_flops(65.2e9, 1.4e12)
    seconds = scale.training_time_seconds(flops, 312e12, mfu, n_devices=2048)
    assert seconds == pytest.approx(1.4e12 / (380 * 2048))
    assert 20 < seconds / 86400 < 22  # "approximately 21 days"


@pytest.mark.parametrize("call, match", [
    (lambda: scale.training_flops(-1, 10), "n_params"),
    (lambda: scale.training_flops(1, float("nan")), "n_tokens"),
    (lambda: scale.training_time_seconds(1e20, 1e12, 1.5), "utilization"),
    (lambda: scale.training_time_seconds(1e20, 1e12, 0.5, n_devices=0), "n_devices"),
    (lambda: scale.compute_optimal_model(0), "flops"),
    (lambda: scale.forward_flops_per_token(scale.GPT2_SMALL, 0), "n_ctx"),
    (lambda: scale.rule_of_thumb_parameters(0, 10), "n_layer"),
])
def test_compute_functions_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_compute_functions_reject_wrong_types():
    with pytest.raises(TypeError, match="n_params"):
        scale.training_flops("1e9", 1)


# --------------------------------------------------------------------------- memory


def _allocated_training_bytes(optimizer_factory) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    optimizer = optimizer_factory(model.parameters())
    model(torch.randn(16, 32)).square().mean().backward()
    optimizer.step()
    params = list(model.parameters())
    state_bytes = sum(
        t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step"
    )
    return (sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params) + state_bytes,
            sum(p.numel() for p in params))


@pytest.mark.parametrize("name, factory", [
    ("adam", lambda p: torch.optim.Adam(p)),
    ("sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
])
def test_fp32_training_memory_equals_allocated_bytes(name, factory):
    allocated, n_params = _allocated_training_bytes(factory)
    assert scale.training_memory(n_params, "fp32", name).total == allocated


def test_mixed_precision_adam_is_still_16_bytes_per_parameter():
    mem = scale.training_memory(1000, "mixed", "adam")
    assert (mem.weights, mem.gradients, mem.master_weights, mem.optimizer_states) == (
        2000, 2000, 4000, 8000)
    assert mem.total == scale.training_memory(1000, "fp32", "adam").total == 16_000


def test_kv_cache_equals_cache_tensors():
    cfg = scale.LLAMA2_70B
    B, T = 3, 100
    with torch.device("meta"):
        cache = [torch.empty(B, cfg.kv_heads, T, cfg.head_dim, dtype=torch.float16)
                 for _ in range(2 * cfg.n_layer)]  # a K and a V per layer
    assert scale.kv_cache_bytes(cfg, T, B) == sum(t.nbytes for t in cache)


def test_activation_memory_formula():
    # s b h (34 + 5 a s / h): GPT-3, s=2048, b=1 -> 2048 * 12288 * (34 + 80) bytes per layer
    assert scale.activation_memory_per_layer(2048, 1, 12288, 96) == 2048 * 12288 * 114


def test_weight_memory_and_formats():
    assert scale.weight_memory(7e9, "int4") == 3.5e9
    assert scale.format_count(124_439_808) == "124.4M"
    assert scale.format_count(175e9) == "175.0B"
    assert scale.format_count(12) == "12"
    assert scale.format_bytes(2**31) == "2.0 GiB"
    assert scale.format_bytes(512) == "512 B"


@pytest.mark.parametrize("call, match", [
    (lambda: scale.training_memory(10, "fp8"), "precision"),
    (lambda: scale.training_memory(10, "fp32", "lion"), "optimizer"),
    (lambda: scale.weight_memory(10, "fp64"), "dtype"),
    (lambda: scale.kv_cache_bytes(scale.GPT2_SMALL, 0), "seq_len"),
    (lambda: scale.activation_memory_per_layer(10, 1, 64, -4), "n_head"),
])
def test_memory_functions_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_measured_matmul_flops_is_a_positive_rate():
    rate = scale.measure_matmul_flops("cpu", size=64, min_run_time=0.01)
    assert math.isfinite(rate) and rate > 0
    with pytest.raises(ValueError, match="size"):
        scale.measure_matmul_flops("cpu", size=0)


# --------------------------------------------------------------------------- scaling laws


def _synthetic_runs(law, noise=0.0, seed=0):
    import numpy as np

    n, d = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6))
    n, d = n.ravel(), d.ravel()
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, loss


def test_fit_scaling_law_recovers_known_parameters():
    true = scale.ScalingLaw(E=1.8, A=400.0, B=410.0, alpha=0.34, beta=0.28)
    law = scale.fit_scaling_law(*_synthetic_runs(true))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(true, name), rel=1e-6)


def test_fit_scaling_law_with_noise_brackets_the_truth():
    import numpy as np

    true = scale.ScalingLaw(E=1.8, A=400.0, B=410.0, alpha=0.34, beta=0.28)
    law, boot = scale.fit_scaling_law(*_synthetic_runs(true, noise=0.003), n_bootstrap=40)
    assert len(boot) == 40
    for name in ("alpha", "beta"):
        lo, hi = np.percentile([getattr(b, name) for b in boot], [2.5, 97.5])
        assert hi - lo < 0.1
        assert abs(getattr(law, name) - getattr(true, name)) < 0.05


def test_compute_optimal_matches_numerical_minimisation():
    from scipy.optimize import minimize_scalar

    for law in (scale.CHINCHILLA_LAW, scale.ScalingLaw(2.0, 50.0, 900.0, 0.5, 0.3)):
        for flops in (1e18, 5.76e23):
            n_opt, d_opt = scale.compute_optimal(flops, law)
            assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)
            def loss_at(x, law=law, flops=flops):
                return law.loss(math.exp(x), flops / (6 * math.exp(x)))

            res = minimize_scalar(loss_at, bounds=(math.log(1e3), math.log(1e15)),
                                  method="bounded", options={"xatol": 1e-10})
            assert math.exp(res.x) == pytest.approx(n_opt, rel=1e-4)
    # the optimum grows as C^(beta / (alpha + beta)) in N
    a = scale.CHINCHILLA_LAW.beta / (scale.CHINCHILLA_LAW.alpha + scale.CHINCHILLA_LAW.beta)
    ratio = scale.compute_optimal(1e22, scale.CHINCHILLA_LAW)[0] / \
        scale.compute_optimal(1e20, scale.CHINCHILLA_LAW)[0]
    assert ratio == pytest.approx(100**a, rel=1e-12)


def test_scaling_law_functions_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        scale.fit_scaling_law([1e6] * 6, [1e8] * 5, [3.0] * 6)
    with pytest.raises(ValueError, match="at least 5 runs"):
        scale.fit_scaling_law([1e6] * 4, [1e8] * 4, [3.0] * 4)
    with pytest.raises(ValueError, match="loss must hold finite positive"):
        scale.fit_scaling_law([1e6] * 6, [1e8] * 6, [3.0] * 5 + [float("nan")])
    with pytest.raises(TypeError, match="law"):
        scale.compute_optimal(1e20, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="flops"):
        scale.compute_optimal(-1.0, scale.CHINCHILLA_LAW)
