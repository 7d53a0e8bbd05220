"""Size arithmetic of Transformer models: parameters, FLOPs, time and memory.

Book: Chapter 1, "What makes a model large". Every function here is a formula
from that chapter, and the unit tests check each one against an oracle: the
parameter count of the same architecture built from ``torch.nn`` modules, the
FLOPs that ``torch.utils.flop_counter`` counts, and the bytes that
``torch.optim.Adam`` really allocates.

Conventions: sizes are plain Python ints, FLOPs and bytes are ints or floats,
times are seconds. A multiply-add counts as two floating-point operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from companion._validate import check_int, check_number

# --------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int = 1) -> int:
    return check_int(name, value, low=minimum)


def _check_number(name: str, value, *, positive: bool = True, at_most: float | None = None):
    check_number(name, value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} "
                         f"number, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be <= {at_most}, got {value}")
    return value


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class TransformerConfig:
    """The hyper-parameters that fix the size of a Transformer language model.

    The defaults describe a GPT-2-style decoder: learned absolute positions,
    LayerNorm, a GELU MLP of width ``4 * d_model``, biases, and an output layer
    that shares (ties) the token-embedding matrix. Other families switch fields:
    BERT adds token-type embeddings, an embedding LayerNorm and a pooler; LLaMA
    uses RMSNorm, a SwiGLU MLP, no biases, rotary positions (no table) and an
    untied output layer; grouped-query attention sets ``n_kv_head < n_head``.

    ``checkpoint_parameters`` is the exact size of the released weights (as the Hugging
    Face ``num_parameters()`` of the checkpoint reports it), ``paper_parameters`` the
    rounded total the paper states; either is ``None`` where it does not exist.
    """

    name: str
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int | None = None
    n_positions: int = 0
    n_kv_head: int | None = None
    n_token_types: int = 0
    mlp: str = "gelu"
    norm: str = "layernorm"
    bias: bool = True
    tied_embeddings: bool = True
    embedding_norm: bool = False
    final_norm: bool = True
    pooler: bool = False
    checkpoint_parameters: int | None = None
    paper_parameters: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head"):
            _check_int(name, getattr(self, name))
        for name in ("n_positions", "n_token_types"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.d_ff is not None:
            _check_int("d_ff", self.d_ff)
        if self.d_model % self.n_head:
            raise ValueError(
                f"n_head={self.n_head} must divide d_model={self.d_model} "
                f"(each head gets d_model / n_head dimensions)"
            )
        if self.n_kv_head is not None:
            _check_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise ValueError(
                    f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                    "(grouped-query attention shares each key/value head among query heads)"
                )
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        """Dimensions per attention head, ``d_model / n_head``."""
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """Hidden width of the MLP (``d_ff``, default ``4 * d_model``)."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_head`` unless grouped-query attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a :class:`TransformerConfig`, grouped by where they live."""

    embeddings: int
    attention: int
    mlp: int
    norms: int
    head: int
    pooler: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embedding tables and the output head.

        This is the ``N`` of the scaling-law papers :cite:p:`kaplan2020scaling`.
        """
        return self.total - self.embeddings - self.head


def _check_config(cfg) -> None:
    if not isinstance(cfg, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")


def _norm_parameters(cfg: TransformerConfig) -> int:
    """LayerNorm has a gain and a bias per feature; RMSNorm only a gain."""
    return 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model


def parameter_count(cfg: TransformerConfig) -> ParameterCount:
    """Count the parameters of ``cfg`` exactly, layer by layer.

    Per block, with ``d = d_model``, ``f = ff_dim`` and ``d_kv = kv_heads * head_dim``:

    * attention: query and output projections ``2 d^2``, key and value ``2 d d_kv``
      (+ ``2 d + 2 d_kv`` biases);
    * MLP: GELU ``2 d f`` (+ ``f + d``); SwiGLU ``3 d f`` (+ ``2 f + d``);
    * two norms.

    For GPT-2 (``d_kv = d``, ``f = 4d``) a block is ``12 d^2 + 13 d``.
    """
    _check_config(cfg)
    d, f, L = cfg.d_model, cfg.ff_dim, cfg.n_layer
    d_kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0

    attention = 2 * d * d + 2 * d * d_kv + b * (2 * d + 2 * d_kv)
    if cfg.mlp == "gelu":
        mlp = 2 * d * f + b * (f + d)
    else:  # swiglu: gate, up and down projections
        mlp = 3 * d * f + b * (2 * f + d)
    norms = 2 * _norm_parameters(cfg)

    embeddings = (cfg.vocab_size + cfg.n_positions + cfg.n_token_types) * d
    if cfg.embedding_norm:
        embeddings += _norm_parameters(cfg)
    return ParameterCount(
        embeddings=embeddings,
        attention=L * attention,
        mlp=L * mlp,
        norms=L * norms + (_norm_parameters(cfg) if cfg.final_norm else 0),
        head=0 if cfg.tied_embeddings else cfg.vocab_size * d,
        pooler=d * d + d if cfg.pooler else 0,
    )


def rule_of_thumb_parameters(n_layer: int, d_model: int) -> int:
    """The ``12 L d^2`` approximation: a GPT block's weights, without embeddings."""
    return 12 * _check_int("n_layer", n_layer) * _check_int("d_model", d_model) ** 2


def _gpt2(name, n_layer, d_model, checkpoint, paper):
    return TransformerConfig(name, vocab_size=50257, n_layer=n_layer, d_model=d_model,
                             n_head=d_model // 64, n_positions=1024,
                             checkpoint_parameters=checkpoint, paper_parameters=paper)


def _bert(name, n_layer, d_model, checkpoint, paper):
    return TransformerConfig(name, vocab_size=30522, n_layer=n_layer, d_model=d_model,
                             n_head=d_model // 64, n_positions=512, n_token_types=2,
                             embedding_norm=True, final_norm=False, pooler=True,
                             checkpoint_parameters=checkpoint, paper_parameters=paper)


# Published configurations, with the exact size of the released weights (Hugging Face's
# ``num_parameters()`` of each checkpoint) and the rounded size the paper states. GPT-3's
# weights were never released; the GPT-2 paper's sizes are lower than its own checkpoints'.
GPT2_SMALL = _gpt2("GPT-2 small", 12, 768, 124_439_808, 117e6)
GPT2_MEDIUM = _gpt2("GPT-2 medium", 24, 1024, 354_823_168, 345e6)
GPT2_LARGE = _gpt2("GPT-2 large", 36, 1280, 774_030_080, 762e6)
GPT2_XL = _gpt2("GPT-2 XL", 48, 1600, 1_557_611_200, 1542e6)
BERT_BASE = _bert("BERT-base", 12, 768, 109_482_240, 110e6)
BERT_LARGE = _bert("BERT-large", 24, 1024, 335_141_888, 340e6)
GPT3_175B = TransformerConfig("GPT-3 175B", vocab_size=50257, n_layer=96, d_model=12288,
                              n_head=96, n_positions=2048, paper_parameters=175.0e9)
LLAMA_7B = TransformerConfig("LLaMA-7B", vocab_size=32000, n_layer=32, d_model=4096, n_head=32,
                             d_ff=11008, mlp="swiglu", norm="rmsnorm", bias=False,
                             tied_embeddings=False, checkpoint_parameters=6_738_415_616,
                             paper_parameters=6.7e9)
LLAMA2_70B = TransformerConfig("Llama-2-70B", vocab_size=32000, n_layer=80, d_model=8192,
                               n_head=64, n_kv_head=8, d_ff=28672, mlp="swiglu", norm="rmsnorm",
                               bias=False, tied_embeddings=False,
                               checkpoint_parameters=68_976_648_192, paper_parameters=70e9)

PUBLISHED_CONFIGS = (GPT2_SMALL, GPT2_MEDIUM, GPT2_LARGE, GPT2_XL, BERT_BASE, BERT_LARGE,
                     GPT3_175B, LLAMA_7B, LLAMA2_70B)


@dataclass(frozen=True)
class TrainingRun:
    """A published training run: model size ``parameters`` trained on ``tokens``."""

    name: str
    parameters: float
    tokens: float
    year: int
    citation: str

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.parameters


# Sizes and token counts as the papers report them (see the bibliography keys).
PUBLISHED_TRAINING_RUNS = (
    TrainingRun("GPT-3", 175e9, 300e9, 2020, "brown2020language"),
    TrainingRun("Gopher", 280e9, 300e9, 2021, "rae2021scaling"),
    TrainingRun("MT-NLG", 530e9, 270e9, 2022, "smith2022using"),
    TrainingRun("Chinchilla", 70e9, 1.4e12, 2022, "hoffmann2022training"),
    TrainingRun("PaLM", 540e9, 780e9, 2022, "chowdhery2022palm"),
    TrainingRun("OPT-175B", 175e9, 180e9, 2022, "zhang2022opt"),
    TrainingRun("BLOOM", 176e9, 366e9, 2022, "workshop2022bloom"),
    TrainingRun("LLaMA-7B", 6.7e9, 1.0e12, 2023, "touvron2023llama"),
    TrainingRun("LLaMA-65B", 65.2e9, 1.4e12, 2023, "touvron2023llama"),
    TrainingRun("Llama-2-7B", 7e9, 2.0e12, 2023, "touvron2023llama2"),
    TrainingRun("Llama-2-70B", 70e9, 2.0e12, 2023, "touvron2023llama2"),
    TrainingRun("Llama-3-8B", 8e9, 15e12, 2024, "grattafiori2024llama3"),
    TrainingRun("Llama-3-70B", 70e9, 15e12, 2024, "grattafiori2024llama3"),
)

# --------------------------------------------------------------------------- compute

#: Peak dense 16-bit (bf16/fp16 tensor-core) throughput in FLOP/s, from vendor datasheets.
ACCELERATOR_PEAK_FLOPS = {
    "V100": 125e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "H100 SXM": 989e12,
}

#: Tokens per parameter of a compute-optimal model :cite:p:`hoffmann2022training`.
CHINCHILLA_TOKENS_PER_PARAMETER = 20


def training_flops(n_params, n_tokens) -> float:
    """Training compute ``C = 6 N D`` in FLOPs.

    Per token and per weight the forward pass does one multiply-add (2 FLOPs),
    the backward pass two: one for the gradient of the input, one for the
    gradient of the weight (4 FLOPs). Attention scores, norms and softmax are
    left out; :func:`forward_flops_per_token` adds the attention term.
    """
    _check_number("n_params", n_params)
    _check_number("n_tokens", n_tokens)
    return 6.0 * n_params * n_tokens


def forward_flops_per_token(cfg: TransformerConfig, n_ctx: int) -> float:
    """Forward FLOPs per token, ``2 N + 2 L n_ctx d`` :cite:p:`kaplan2020scaling`.

    ``N`` is the non-embedding parameter count (one multiply-add per weight).
    The second term is attention, which Kaplan et al. list as ``2 L n_ctx d``. One way
    to read it: the scores ``Q K^T`` and the weighted sum ``A V`` each take
    ``n_ctx * d`` multiply-adds per token and layer when every position sees the whole
    context (``4 L n_ctx d`` FLOPs), and a causal position sees on average half of it.
    """
    _check_config(cfg)
    _check_int("n_ctx", n_ctx)
    return 2.0 * parameter_count(cfg).non_embedding + 2.0 * cfg.n_layer * n_ctx * cfg.d_model


def compute_optimal_tokens(n_params, tokens_per_parameter=CHINCHILLA_TOKENS_PER_PARAMETER):
    """Tokens ``D = 20 N`` for a compute-optimal model of ``n_params`` parameters."""
    _check_number("n_params", n_params)
    _check_number("tokens_per_parameter", tokens_per_parameter)
    return tokens_per_parameter * n_params


def compute_optimal_model(flops, tokens_per_parameter=CHINCHILLA_TOKENS_PER_PARAMETER):
    """Split a budget ``C`` into ``(N, D)`` with ``C = 6 N D`` and ``D = r N``.

    Solving gives ``N = sqrt(C / (6 r))`` and ``D = r N``.
    """
    _check_number("flops", flops)
    _check_number("tokens_per_parameter", tokens_per_parameter)
    n_params = math.sqrt(flops / (6.0 * tokens_per_parameter))
    return n_params, tokens_per_parameter * n_params


def training_time_seconds(flops, peak_flops_per_second, utilization, n_devices=1) -> float:
    """Wall-clock time ``T = C / (n_devices * peak * utilization)``.

    ``utilization`` is the model FLOPs utilisation (MFU): the fraction of the
    accelerators' peak that the training run turns into model FLOPs
    :cite:p:`chowdhery2022palm`. Well-tuned large runs reach about 0.4 to 0.55: 0.462
    for PaLM, 0.552 for MegaScale's 175B-parameter run on 12,288 GPUs
    :cite:p:`jiang2024megascale`.
    """
    _check_number("flops", flops)
    _check_number("peak_flops_per_second", peak_flops_per_second)
    _check_number("utilization", utilization, at_most=1.0)
    _check_int("n_devices", n_devices)
    return flops / (n_devices * peak_flops_per_second * utilization)


def model_flops_utilization(n_params, tokens_per_second_per_device, peak_flops_per_second):
    """MFU from a measured throughput: ``6 N * tokens/s / peak``."""
    _check_number("n_params", n_params)
    _check_number("tokens_per_second_per_device", tokens_per_second_per_device)
    _check_number("peak_flops_per_second", peak_flops_per_second)
    return 6.0 * n_params * tokens_per_second_per_device / peak_flops_per_second


def measure_matmul_flops(device=None, size: int = 1024, dtype=None, min_run_time: float = 0.3):
    """Achieved FLOP/s of a ``size x size`` matrix product on ``device`` (measured).

    A product of two ``n x n`` matrices is ``2 n^3`` FLOPs. The result varies
    from run to run and machine to machine; the book prints it for orientation only.
    """
    import torch
    from torch.utils.benchmark import Timer

    _check_int("size", size)
    dtype = dtype if dtype is not None else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    return 2.0 * size**3 / seconds


# --------------------------------------------------------------------------- memory

#: Bytes per stored number for the formats the book uses.
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of training state, by kind (activations are separate)."""

    weights: float
    gradients: float
    optimizer_states: float
    master_weights: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.master_weights


_OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2}


def training_memory(n_params, precision: str = "fp32", optimizer: str = "adam") -> MemoryBreakdown:
    """Memory for weights, gradients and optimizer states during training.

    ``precision="fp32"``: 4-byte weights and gradients, and 4 bytes per optimizer
    state (Adam keeps two: ``m`` and ``v``), so 16 bytes per parameter.
    ``precision="mixed"``: 16-bit weights and gradients for the arithmetic, plus an
    fp32 master copy of the weights and fp32 optimizer states
    :cite:p:`micikevicius2018mixed,rajbhandari2020zero` -- 2 + 2 + 4 + 8 = 16 bytes
    per parameter with Adam as well: mixed precision saves activation memory and
    time, not the memory of the training state.
    """
    _check_number("n_params", n_params)
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZER_STATES)}, got {optimizer!r}")
    states = _OPTIMIZER_STATES[optimizer]
    if precision == "fp32":
        return MemoryBreakdown(4.0 * n_params, 4.0 * n_params, 4.0 * states * n_params)
    if precision == "mixed":
        return MemoryBreakdown(2.0 * n_params, 2.0 * n_params, 4.0 * states * n_params,
                               master_weights=4.0 * n_params)
    raise ValueError(f"precision must be 'fp32' or 'mixed', got {precision!r}")


def weight_memory(n_params, dtype: str = "fp16") -> float:
    """Bytes to hold ``n_params`` weights in ``dtype`` (inference)."""
    _check_number("n_params", n_params)
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_VALUE)}, got {dtype!r}")
    return BYTES_PER_VALUE[dtype] * n_params


def activation_memory_per_layer(seq_len: int, batch_size: int, d_model: int, n_head: int) -> float:
    """Activation bytes one GPT block keeps for the backward pass.

    ``s b h (34 + 5 a s / h)`` with 16-bit activations, dropout masks and no
    recomputation :cite:p:`korthikanti2022reducing`; ``s`` sequence length, ``b``
    batch, ``h`` width, ``a`` heads. The ``5 a s / h`` part is the attention
    matrix, which grows with the square of the sequence length.
    """
    s, b = _check_int("seq_len", seq_len), _check_int("batch_size", batch_size)
    h, a = _check_int("d_model", d_model), _check_int("n_head", n_head)
    return s * b * h * (34 + 5 * a * s / h)


def kv_cache_bytes(cfg: TransformerConfig, seq_len: int, batch_size: int = 1,
                   dtype: str = "fp16") -> float:
    """Bytes of the key/value cache that generation keeps: ``2 L b s d_kv`` values."""
    _check_config(cfg)
    s, b = _check_int("seq_len", seq_len), _check_int("batch_size", batch_size)
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_VALUE)}, got {dtype!r}")
    d_kv = cfg.kv_heads * cfg.head_dim
    return 2 * cfg.n_layer * b * s * d_kv * BYTES_PER_VALUE[dtype]


# --------------------------------------------------------------------------- formatting

_COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
_BYTE_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def format_count(n, digits: int = 1) -> str:
    """``124439808 -> '124.4M'``; ``1.75e11 -> '175.0B'``."""
    _check_number("n", n, positive=False)
    for size, suffix in _COUNT_UNITS:
        if n >= size:
            return f"{n / size:.{digits}f}{suffix}"
    return f"{n:.0f}"


def format_bytes(n, digits: int = 1) -> str:
    """``2**31 -> '2.0 GiB'`` (binary units, as ``nvidia-smi`` and PyTorch report)."""
    _check_number("n", n, positive=False)
    for size, suffix in _BYTE_UNITS:
        if n >= size:
            return f"{n / size:.{digits}f} {suffix}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------- scaling laws


@dataclass(frozen=True)
class ScalingLaw:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` :cite:p:`hoffmann2022training`.

    ``E`` is the loss of an ideal model on the data (its entropy), the second term the
    shortfall of a finite model of ``N`` parameters, the third that of ``D`` tokens.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params, n_tokens):
        """The predicted loss at ``N = n_params`` and ``D = n_tokens`` (arrays broadcast)."""
        import numpy as np

        n, d = np.asarray(n_params, dtype=float), np.asarray(n_tokens, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


#: Chinchilla's fit (approach 3, equation 10 of :cite:t:`hoffmann2022training`).
CHINCHILLA_LAW = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
#: Kaplan et al.'s single-variable exponents, ``L(N) ~ N^-0.076`` and
#: ``L(D) ~ D^-0.095`` :cite:p:`kaplan2020scaling`.
KAPLAN_EXPONENTS = {"alpha_N": 0.076, "alpha_D": 0.095}


def _huber_objective(theta, log_n, log_d, log_loss, delta):
    """Sum of Huber losses of ``LSE(a - alpha log N, b - beta log D, e) - log L``, and its
    gradient in ``theta = (a, b, e, alpha, beta)`` with ``A = e^a``, ``B = e^b``, ``E = e^e``."""
    import numpy as np

    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(axis=0))
    w /= w.sum(axis=0)  # d lse / d term
    r = lse - log_loss
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
    return value, grad


def _grid_values(starts, log_n, log_d, log_loss, delta):
    """The Huber objective at every row of ``starts (S, 5)`` at once."""
    import numpy as np

    a, b, e, alpha, beta = (starts[:, j:j + 1] for j in range(5))  # (S, 1) each
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape)
                      + 0 * log_n])
    r = np.logaddexp.reduce(terms, axis=0) - log_loss  # (S, runs)
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)


def _fit_once(log_n, log_d, log_loss, delta, starts, n_refine=8):
    import numpy as np
    from scipy.optimize import minimize

    values = _grid_values(starts, log_n, log_d, log_loss, delta)
    best = None
    for i in np.argsort(values)[:n_refine]:  # refine the best grid points
        res = minimize(_huber_objective, starts[i], args=(log_n, log_d, log_loss, delta),
                       jac=True, method="L-BFGS-B",
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = (float(v) for v in best.x)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def fit_scaling_law(n_params, n_tokens, loss, *, delta: float = 1e-3,
                    n_bootstrap: int = 0, seed: int = 0):
    """Fit :class:`ScalingLaw` to measured runs as Chinchilla's approach 3 does.

    Minimises the Huber loss (``delta=1e-3``) between ``log L`` and the log of the
    predicted loss, over ``log A, log B, log E, alpha, beta``, with L-BFGS started from
    the 8 best points of the paper's grid of initialisations (the paper starts from all
    of them; here the objective is evaluated on the whole grid and only the best are
    refined). With ``n_bootstrap > 0`` the runs are resampled with replacement that many
    times and refitted (from the full-data optimum); returns
    ``(law, bootstrap_laws)`` then, else ``law``.
    """
    import numpy as np

    n, d, y = (np.asarray(v, dtype=float).ravel() for v in (n_params, n_tokens, loss))
    if not (n.shape == d.shape == y.shape):
        raise ValueError(f"n_params, n_tokens and loss must have the same length, got "
                         f"{n.size}, {d.size} and {y.size}")
    if n.size < 5:
        raise ValueError(f"loss must hold at least 5 runs to fit 5 parameters, got {n.size}")
    for name, v in (("n_params", n), ("n_tokens", d), ("loss", y)):
        if not (np.isfinite(v).all() and (v > 0).all()):
            raise ValueError(f"{name} must hold finite positive numbers")
    _check_number("delta", delta)
    _check_int("n_bootstrap", n_bootstrap, minimum=0)
    grid = np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5), np.arange(0, 26, 5)
    starts = np.array([[a, b, e, al, be] for a in grid[2] for b in grid[2]
                       for e in grid[1] for al in grid[0] for be in grid[0]])
    logs = np.log(n), np.log(d), np.log(y)
    law = _fit_once(*logs, delta, starts)
    if not n_bootstrap:
        return law
    # each refit starts from the full-data optimum
    best = np.array([[math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta]])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        i = rng.integers(0, n.size, n.size)
        boot.append(_fit_once(logs[0][i], logs[1][i], logs[2][i], delta, best, n_refine=1))
    return law, boot


def compute_optimal(flops, law: ScalingLaw):
    """The ``(N*, D*)`` that minimise ``law.loss(N, D)`` subject to ``6 N D = flops``.

    Setting the derivative along the constraint to zero gives
    ``N* = G (C/6)^(beta/(alpha+beta))`` and ``D* = (C/6)^(alpha/(alpha+beta)) / G`` with
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
    """
    _check_number("flops", flops)
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"law must be a ScalingLaw, got {type(law).__name__}")
    s = law.alpha + law.beta
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / s)
    return g * (flops / 6) ** (law.beta / s), (flops / 6) ** (law.alpha / s) / g
