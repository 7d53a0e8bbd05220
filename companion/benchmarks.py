"""How fast is the readable code? Each reference implementation against its oracle.

Book: Appendix, "Benchmarks". Run all rows in one process::

    python -m companion.benchmarks                 # every row, on get_device()
    python -m companion.benchmarks --device cpu --only adam
    python -m companion.benchmarks --markdown      # the table the appendix shows
    python -m companion.benchmarks --quick         # small sizes, a smoke run

A row times *ours* and the *reference* with the same procedure --
``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises CUDA),
alternating the two for several rounds -- and prints the median over the rounds of
``ratio = ours / reference`` (each round's two timings taken back to back), with its
spread: the smallest and largest round's ratio. 1.0 is parity, 2.0 means ours takes
twice as long. The table's first line names the date, the CPU, PyTorch and the thread
count. Speed is measured here, never asserted in a test: timings depend on the machine.
Where both sides compute the same result, a row's factory checks that they do before
anything is timed. Two rows start processes on 127.0.0.1 -- a second rank of a gloo
process group (chapter 8), two model servers (chapter 11) -- with timeouts, and end them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.benchmark import Timer

from companion.device import get_device


@dataclass
class Case:
    """One comparison: two zero-argument callables that do the same work.

    ``work`` (with ``work_unit``) is the amount of work per call, e.g. the
    number of tokens, so that the table can show a throughput as well. ``close``, if
    given, ends what the case started (processes, servers); :func:`run_case` calls it
    after the timing, also when the timing fails.
    """

    ours: Callable[[], object]
    reference: Callable[[], object]
    reference_name: str
    size: str
    work: float | None = None
    work_unit: str = ""
    close: Callable[[], object] | None = None


@dataclass
class Result:
    name: str
    chapter: str
    device: str
    size: str
    reference_name: str
    ours_seconds: float
    reference_seconds: float
    work: float | None = None
    work_unit: str = ""
    ratios: tuple[float, ...] = ()  # ours / reference in each round

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios (of the two medians if none were kept)."""
        if self.ratios:
            return statistics.median(self.ratios)
        return self.ours_seconds / self.reference_seconds

    @property
    def spread(self) -> tuple[float, float]:
        """The smallest and the largest round's ratio."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else (self.ratio, self.ratio)


#: (name, chapter, factory) for every benchmark, in the order they are defined.
REGISTRY: list[tuple[str, str, Callable[..., Case]]] = []


def benchmark(name: str, chapter: str):
    """Register ``factory(device, quick) -> Case`` under ``name``."""

    def register(factory):
        if any(existing == name for existing, _, _ in REGISTRY):
            raise ValueError(f"a benchmark named {name!r} is already registered")
        REGISTRY.append((name, chapter, factory))
        return factory

    return register


def time_callable(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (after one warm-up call), all CPU threads."""
    fn()  # warm-up: lazy initialisation, caches, CUDA kernels loading
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_rounds(case: Case, rounds: int = 3,
                   min_run_time: float = 0.2) -> tuple[list[float], list[float]]:
    """Seconds per call of ``case.ours`` and ``case.reference`` in each of ``rounds``
    rounds; in each round the two are timed back to back, so they see the same load."""
    ours, reference = [], []
    for _ in range(rounds):
        ours.append(time_callable(case.ours, min_run_time))
        reference.append(time_callable(case.reference, min_run_time))
    return ours, reference


def measure(case: Case, rounds: int = 3, min_run_time: float = 0.2) -> tuple[float, float]:
    """Medians over ``rounds`` alternating timings of ``case.ours`` and ``case.reference``."""
    ours, reference = measure_rounds(case, rounds, min_run_time)
    return statistics.median(ours), statistics.median(reference)


def run_case(name: str, chapter: str, case: Case, device, rounds: int = 3,
             min_run_time: float = 0.2) -> Result:
    """Time one case (then ``case.close()``, even on failure) into a :class:`Result`."""
    try:
        ours, reference = measure_rounds(case, rounds, min_run_time)
    finally:
        if case.close is not None:
            case.close()
    return Result(name, chapter, str(device), case.size, case.reference_name,
                  statistics.median(ours), statistics.median(reference), case.work,
                  case.work_unit, tuple(o / r for o, r in zip(ours, reference, strict=True)))


def run(device=None, only: str | None = None, quick: bool = False, rounds: int = 3,
        min_run_time: float = 0.2) -> list[Result]:
    """Run every registered benchmark whose name contains ``only``; return the results."""
    device = get_device(device)
    return [run_case(name, chapter, factory(device, quick), device, rounds, min_run_time)
            for name, chapter, factory in REGISTRY
            if not only or only.lower() in name.lower()]


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), else ``platform``'s guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line(rounds: int) -> str:
    """The table's first line: date (UTC), CPU model, PyTorch, threads and rounds."""
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return (f"{today}, {cpu_model()}, torch {torch.__version__}, "
            f"CPU threads: {torch.get_num_threads()}, {rounds} rounds")


def _seconds(t: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


def _rate(per_second: float) -> str:
    """A throughput with three significant digits and an SI prefix: 8.74K, 206M."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if per_second >= scale:
            return f"{per_second / scale:.3g}{prefix}"
    return f"{per_second:.3g}"


def format_table(results: list[Result], markdown: bool = False) -> str:
    """The results as an aligned text table, or a Markdown table; the ratio comes first."""
    header = ["benchmark", "ratio", "spread (min-max)", "ours", "reference", "size",
              "throughput (ours / reference)", "chapter", "device"]
    rows = []
    for r in results:
        throughput = (f"{_rate(r.work / r.ours_seconds)} / {_rate(r.work / r.reference_seconds)} "
                      f"{r.work_unit}/s" if r.work else "")
        low, high = r.spread
        rows.append([r.name, f"{r.ratio:.2f}x", f"{low:.2f}-{high:.2f}", _seconds(r.ours_seconds),
                     f"{_seconds(r.reference_seconds)} ({r.reference_name})", r.size,
                     throughput, r.chapter, r.device])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


# =========================================================================== the rows
# Each chapter registers its rows below, in its own section.

# --- Chapter 2: backpropagation ---------------------------------------------------------


@benchmark("hand-written MLP forward+backward", "2")
def _mlp_backprop(device, quick):
    """Forward, softmax cross-entropy and backward of a ReLU MLP: ours vs torch.nn + autograd.

    The hand-written backward also returns dL/d(input); the reference input requires a
    gradient too, so that both sides do the same matrix products.
    """
    from companion.backprop import MLP, SoftmaxCrossEntropy

    batch, sizes = (32, [64, 64, 10]) if quick else (256, [784, 512, 256, 10])
    torch.manual_seed(0)
    ours = MLP(sizes, device=device)
    reference = ours.to_torch()
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (batch,), device=device)
    loss_fn = SoftmaxCrossEntropy()

    def hand_written():
        loss_fn(ours(x), y)
        ours.zero_grad(set_to_none=True)
        ours.backward(loss_fn.backward())

    x_ref = x.clone().requires_grad_(True)

    def autograd():
        reference.zero_grad(set_to_none=True)
        x_ref.grad = None
        torch.nn.functional.cross_entropy(reference(x_ref), y).backward()

    return Case(hand_written, autograd, "torch.nn + autograd",
                size=f"batch {batch}, {'-'.join(map(str, sizes))}", work=batch,
                work_unit="samples")


# --- Chapter 3: optimizers --------------------------------------------------------------


def _gpt_like_parameters(device, quick: bool) -> list[torch.Tensor]:
    """Parameters (with gradients) shaped like a 2-block GPT of width 512: 10.5 M in 27 tensors."""
    d, vocab = (128, 2048) if quick else (512, 8192)
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),  # attention, LayerNorm
             (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]  # MLP, LayerNorm
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in [(vocab, d)] + 2 * block + [(d,), (d,)]:
        param = torch.randn(shape, generator=generator).to(device).requires_grad_()
        param.grad = 1e-3 * torch.randn(shape, generator=generator).to(device)
        params.append(param)
    return params


def _optimizer_step_case(name: str, device, quick: bool) -> Case:
    from companion import optim

    ours = getattr(optim, name)(_gpt_like_parameters(device, quick), lr=1e-3)
    reference = getattr(torch.optim, name)(_gpt_like_parameters(device, quick), lr=1e-3,
                                           foreach=True)
    n_params = sum(p.numel() for group in ours.param_groups for p in group["params"])
    return Case(ours.step, reference.step, f"torch.optim.{name}(foreach=True)",
                size=f"{n_params / 1e6:.1f}M params", work=n_params, work_unit="params")


@benchmark("optim: Adam step", "3")
def _adam_step(device, quick):
    return _optimizer_step_case("Adam", device, quick)


@benchmark("optim: AdamW step", "3")
def _adamw_step(device, quick):
    return _optimizer_step_case("AdamW", device, quick)


# --- Chapter 4: the Transformer ---------------------------------------------------------


def _attention_inputs(device, batch, heads, length, head_dim, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, length, head_dim, generator=g).to(device)
            .requires_grad_(requires_grad) for _ in range(3)]


@benchmark("attention fwd+bwd: readable vs F.scaled_dot_product_attention", "4")
def _bench_attention(device, quick):
    from companion.transformer import scaled_dot_product_attention

    B, H, T, D = (2, 4, 64, 32) if quick else (8, 8, 256, 64)
    q, k, v = _attention_inputs(device, B, H, T, D, requires_grad=True)

    def step(fn):
        def run():
            fn(q, k, v, is_causal=True).sum().backward()
        return run

    reference = torch.nn.functional.scaled_dot_product_attention
    return Case(step(scaled_dot_product_attention), step(reference),
                "F.scaled_dot_product_attention", f"B={B} H={H} T={T} d={D} causal",
                work=B * T, work_unit="tokens")


@benchmark("multi-head attention forward: ours vs nn.MultiheadAttention", "4")
def _bench_mha(device, quick):
    from companion.compat import load_attention_from_torch
    from companion.transformer import MultiHeadAttention, causal_mask

    B, T, E, H = (2, 64, 64, 4) if quick else (8, 256, 256, 8)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True).to(device).eval()
    ours = load_attention_from_torch(MultiHeadAttention(E, H).to(device), theirs).eval()
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(0)).to(device)
    mask = ~causal_mask(T, T, device=device)

    @torch.no_grad()
    def ours_run():
        ours(x, x, x, is_causal=True)

    @torch.no_grad()
    def theirs_run():
        theirs(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)

    return Case(ours_run, theirs_run, "nn.MultiheadAttention", f"B={B} T={T} E={E} H={H}",
                work=B * T, work_unit="tokens")


def _small_gpt(device, quick, fast_attention=True):
    from companion.transformer import GPT, GPTConfig

    size = dict(n_layer=2, n_head=2, n_embd=64) if quick else dict(n_layer=4, n_head=4,
                                                                     n_embd=128)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=103, block_size=128, fast_attention=fast_attention, **size)
    return GPT(config).to(device)


def _autocast_trainer(model, x, dtype):
    """One AdamW step of ``model(x, x)``, the forward pass under ``dtype`` autocast
    (float32 when ``dtype`` is None), as a zero-argument callable."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            _, loss = model(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@benchmark("gpt training step: readable attention vs fast path", "4")
def _bench_gpt_training(device, quick):
    from companion.train import default_autocast_dtype

    B, T = (4, 64) if quick else (32, 128)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    dtype = default_autocast_dtype(device)  # bf16 on recent GPUs, fp16 on older, none on CPU
    readable, fast = _small_gpt(device, quick, False), _small_gpt(device, quick, True)
    c = readable.config
    return Case(_autocast_trainer(readable, x, dtype), _autocast_trainer(fast, x, dtype),
                "fast path (F.sdpa)", f"L={c.n_layer} d={c.n_embd} B={B} T={T}",
                work=B * T, work_unit="tokens")


@benchmark("gpt generation: kv cache vs no cache", "4")
def _bench_generation(device, quick):
    model = _small_gpt(device, quick).eval()
    new_tokens = 32 if quick else 120
    prompt = torch.zeros(1, 8, dtype=torch.long, device=device)

    def generate(use_cache):
        return lambda: model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)

    c = model.config
    return Case(generate(True), generate(False), "no cache",
                f"L={c.n_layer} d={c.n_embd} 8+{new_tokens} tokens", work=new_tokens,
                work_unit="tokens")



@benchmark("tokenizer: byte-level BPE encode, GPT-2 vocabulary", "4")
def _bpe_encode(device, quick):
    """Our Python BPE encoder (from an empty piece cache) vs tiktoken's Rust one, same
    ranks and pattern, on the frozen corpus. The device is irrelevant: both run on the CPU."""
    import tiktoken

    from companion.data import load_pydoc_text
    from companion.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, load_gpt2_ranks

    text = load_pydoc_text()[: 20_000 if quick else 200_000]
    ranks = load_gpt2_ranks()
    oracle = tiktoken.Encoding("r50k_offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                               special_tokens={ENDOFTEXT: 50256})
    return Case(lambda: BPETokenizer(ranks).encode(text), lambda: oracle.encode(text),
                "tiktoken", f"{len(text):,} characters", work=len(text.encode()),
                work_unit="bytes")


# --- Chapter 5: evaluation metrics ------------------------------------------------------


def _binary_predictions(device, quick):
    """Labels, informative float64 scores and thresholded predictions, as tensors on
    ``device`` and as the NumPy arrays scikit-learn works on."""
    n = 10_000 if quick else 1_000_000
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    score = torch.randn(n, generator=g, dtype=torch.float64) + y
    pred = (score > 0.5).long()
    tensors = tuple(t.to(device) for t in (y, score, pred))
    return n, tensors, tuple(t.numpy() for t in (y, score, pred))


@benchmark("roc_auc_score: tensors vs scikit-learn", "5")
def _bench_roc_auc(device, quick):
    from sklearn.metrics import roc_auc_score as sklearn_roc_auc_score

    from companion.metrics import roc_auc_score

    n, (y, score, _), (y_np, score_np, _) = _binary_predictions(device, quick)
    return Case(lambda: roc_auc_score(y, score), lambda: sklearn_roc_auc_score(y_np, score_np),
                "sklearn.metrics (NumPy)", f"n={n:,}", work=n, work_unit="samples")


@benchmark("f1_score: tensors vs scikit-learn", "5")
def _bench_f1(device, quick):
    from sklearn.metrics import f1_score as sklearn_f1_score

    from companion.metrics import f1_score

    n, (y, _, pred), (y_np, _, pred_np) = _binary_predictions(device, quick)
    return Case(lambda: f1_score(y, pred), lambda: sklearn_f1_score(y_np, pred_np),
                "sklearn.metrics (NumPy)", f"n={n:,}", work=n, work_unit="samples")


@benchmark("precision_recall_fscore_support: tensors vs scikit-learn", "5")
def _bench_prfs(device, quick):
    """Per-class precision, recall, F1 and support of 10 classes (three bincounts)."""
    from sklearn.metrics import precision_recall_fscore_support as sklearn_prfs

    from companion.metrics import precision_recall_fscore_support

    n = 10_000 if quick else 1_000_000
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.7, y, torch.randint(0, 10, (n,),
                                                                          generator=g))
    y_np, pred_np = y.numpy(), pred.numpy()
    y, pred = y.to(device), pred.to(device)
    return Case(lambda: precision_recall_fscore_support(y, pred),
                lambda: sklearn_prfs(y_np, pred_np), "sklearn.metrics (NumPy)",
                f"n={n:,}, 10 classes", work=n, work_unit="samples")


# --- Chapter 6: interpretability --------------------------------------------------------


@benchmark("integrated gradients: ours vs captum IntegratedGradients", "6")
def _bench_integrated_gradients(device, quick):
    """IG of chapter 6's digit CNN (untrained weights; the work is the same), same rule."""
    from captum.attr import IntegratedGradients

    from companion.interpret import integrated_gradients

    batch, n_steps = (8, 16) if quick else (64, 50)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ELU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ELU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10)).to(device).eval()
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    target = torch.arange(batch, device=device) % 10
    captum_ig = IntegratedGradients(model)

    def ours():
        integrated_gradients(model, x, target=target, n_steps=n_steps, method="gausslegendre")

    def reference():
        captum_ig.attribute(x, target=target, n_steps=n_steps, method="gausslegendre")

    return Case(ours, reference, "captum IntegratedGradients",
                f"B={batch} 8x8 images, n_steps={n_steps}, gausslegendre",
                work=batch * n_steps, work_unit="path points")


# --- Chapter 7: efficiency ---------------------------------------------------------------


@benchmark("int8 weight-only matvec vs float32 (ours = int8)", "7")
def _bench_int8_matvec(device, quick):
    """One token's matrix-vector product: int8 weights with per-channel scales
    (``torch._weight_int8pack_mm``, CPU) against the float32 product. Ratio < 1: int8 faster."""
    from companion.quantize import quantize

    n = 512 if quick else 4096
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, n, generator=g), torch.randn(1, n, generator=g)
    q, scale, _ = quantize(W, 8, axis=0)
    W, x, q, scale = W.to(device), x.to(device), q.to(device), scale.to(device)
    return Case(lambda: torch._weight_int8pack_mm(x, q, scale), lambda: x @ W.T,
                "float32 x @ W.T", f"{n}x{n}, batch 1", work=n * n, work_unit="weights")


@benchmark("50 %-sparse dense matmul vs dense (ours = zeros)", "7")
def _bench_sparse_dense(device, quick):
    """Magnitude-pruned (50 % zeros) weight in a dense matmul vs the unpruned weight:
    the same dense kernel, so the ratio stays near 1. Unstructured zeros save no time."""
    from companion.prune import magnitude_mask

    n = 256 if quick else 1024
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, n, generator=g), torch.randn(256, n, generator=g)
    W_sparse = W * magnitude_mask(W, 0.5)
    W, W_sparse, x = W.to(device), W_sparse.to(device), x.to(device)
    return Case(lambda: x @ W_sparse.T, lambda: x @ W.T, "dense x @ W.T",
                f"256x{n} @ {n}x{n}", work=256 * n * n, work_unit="MACs")


@benchmark("half-width matmul (structured) vs dense (ours = pruned)", "7")
def _bench_structured(device, quick):
    """Half the output rows removed (structured pruning) vs the full dense weight: ratio
    near 0.5, because the kernel does half the multiply-adds."""
    n = 256 if quick else 1024
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, n, generator=g), torch.randn(256, n, generator=g)
    W_half = W[: n // 2].clone()
    W, W_half, x = W.to(device), W_half.to(device), x.to(device)
    return Case(lambda: x @ W_half.T, lambda: x @ W.T, "dense x @ W.T",
                f"256x{n} @ {n}x{n}", work=256 * n * n, work_unit="MACs")


@benchmark("cast to bfloat16: round_to (integer bits) vs tensor.to", "7")
def _bench_round_to(device, quick):
    """Section "Number formats": :func:`~companion.precision.round_to` rounds float32 to
    the bfloat16 grid with integer arithmetic on the bit pattern; the reference is the
    cast there and back, ``x.to(torch.bfloat16).float()``. Same result, bit for bit."""
    from companion.precision import round_to

    n = 2**12 if quick else 2**22
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)

    def cast():
        return x.to(torch.bfloat16).float()

    if not torch.equal(round_to(x, torch.bfloat16), cast()):
        raise AssertionError("round_to must equal the cast bit for bit")
    return Case(lambda: round_to(x, torch.bfloat16), cast, "x.to(bfloat16).float()",
                f"{n:,} float32", work=n, work_unit="values")


@benchmark("gpt training step: bfloat16 autocast vs float32", "7")
def _bench_autocast(device, quick):
    """Section "Training in bfloat16 on the CPU": the same step of chapter 4's GPT with
    the forward pass under bfloat16 autocast and in float32, same weights and batch."""
    B, T = (4, 64) if quick else (32, 128)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    bf16, fp32 = _small_gpt(device, quick), _small_gpt(device, quick)
    c = bf16.config
    return Case(_autocast_trainer(bf16, x, torch.bfloat16), _autocast_trainer(fp32, x, None),
                "float32", f"L={c.n_layer} d={c.n_embd} B={B} T={T}", work=B * T,
                work_unit="tokens")


def _torch_quantize(w, axis):
    """torch's own int8 round trip: a min/max observer's symmetric scales over
    [-127, 127] (ours), ``torch.quantize_per_tensor`` / ``_per_channel``, ``dequantize``."""
    import warnings

    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    kwargs = dict(dtype=torch.qint8, quant_min=-127, quant_max=127)
    observer = (MinMaxObserver(qscheme=torch.per_tensor_symmetric, **kwargs) if axis is None
                else PerChannelMinMaxObserver(axis, qscheme=torch.per_channel_symmetric,
                                              **kwargs))
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():  # torch's quantized tensors are deprecated, still exact
        warnings.simplefilter("ignore")
        if axis is None:
            q = torch.quantize_per_tensor(w, float(scale), int(zero_point), torch.qint8)
        else:
            q = torch.quantize_per_channel(w, scale, zero_point, axis, torch.qint8)
    return q.dequantize()


def _same_round_trip(w, scale, ours, theirs) -> bool:
    """Equal everywhere except at exact ties of ``w / scale`` (float32 division), where
    torch, which multiplies by ``1 / scale``, may round to the neighbouring integer."""
    ratio = w / (scale if scale.ndim == 0 else scale[:, None])
    return bool(((ours == theirs) | (ratio.remainder(1) == 0.5)).all())


def _quantize_case(quick, axis):
    """Section "Quantization": :func:`~companion.quantize.quantize` then
    :func:`~companion.quantize.dequantize` (scales included) against torch's round trip,
    on the CPU (torch's quantized tensors are CPU tensors); equal outputs are checked."""
    from companion.quantize import dequantize, quantize

    n = 64 if quick else 2048
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0))

    def ours():
        return dequantize(*quantize(w, 8, axis=axis), axis=axis)

    scale = quantize(w, 8, axis=axis)[1]
    if not _same_round_trip(w, scale, ours(), _torch_quantize(w, axis)):
        raise AssertionError("quantize + dequantize must equal torch's round trip")
    kind = "tensor" if axis is None else "channel"
    return Case(ours, lambda: _torch_quantize(w, axis), f"torch.quantize_per_{kind}",
                f"{n}x{n} fp32, int8 per-{kind}, CPU", work=n * n, work_unit="weights")


@benchmark("int8 quantize + dequantize, per-tensor: ours vs torch", "7")
def _bench_quantize_tensor(device, quick):
    return _quantize_case(quick, None)


@benchmark("int8 quantize + dequantize, per-channel: ours vs torch", "7")
def _bench_quantize_channel(device, quick):
    return _quantize_case(quick, 0)


@benchmark("magnitude pruning mask: ours vs torch.nn.utils.prune", "7")
def _bench_prune_mask(device, quick):
    """Section "Pruning": the keep-mask of the 50 % smallest |w|,
    :func:`~companion.prune.magnitude_mask` (one stable sort) against
    ``prune.L1Unstructured.compute_mask`` (what ``l1_unstructured`` calls; a top-k)."""
    from torch.nn.utils import prune as torch_prune

    from companion.prune import magnitude_mask

    n = 64 if quick else 2048
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)
    method, ones = torch_prune.L1Unstructured(amount=0.5), torch.ones_like(w)

    def reference():
        return method.compute_mask(w, default_mask=ones)

    if not torch.equal(magnitude_mask(w, 0.5), reference().bool()):
        raise AssertionError("magnitude_mask must equal l1_unstructured's mask")
    return Case(lambda: magnitude_mask(w, 0.5), reference, "prune.L1Unstructured",
                f"{n}x{n}, amount 0.5", work=n * n, work_unit="weights")


# --- Chapter 8: distributed training ----------------------------------------------------


@benchmark("ring all-reduce, 8 simulated ranks: simulation vs one torch.sum", "8")
def _bench_ring_all_reduce(device, quick):
    """The ring simulation of companion.distributed (14 sends of 1/8 of the tensor per
    rank, each a separate small operation) against summing the 8 tensors in one call:
    the price of showing every message. Real collectives are timed by their processes."""
    from companion.distributed import ring_all_reduce

    numel = 2**12 if quick else 2**20
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(numel, generator=g).to(device) for _ in range(8)]
    stacked = torch.stack(tensors)
    return Case(lambda: ring_all_reduce(tensors), lambda: stacked.sum(0), "torch.sum",
                f"8 x {numel} fp32", work=8 * numel * 4, work_unit="bytes")


#: Seconds a rank of the DDP row waits for its peer before failing (never hangs).
DDP_TIMEOUT = 120.0


def _ddp_batch(quick, rank=None):
    """The row's global batch of token ids, or rank ``rank``'s half of it."""
    B, T = (4, 32) if quick else (16, 128)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0))
    return x if rank is None else x.tensor_split(2)[rank]


def _ddp_join(rank: int, store, threads: int, quick: bool):
    """Join the two-rank gloo group on ``store``; return this rank's DDP model and its
    training step (:func:`_finetune_step`) on its half of the batch."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=DDP_TIMEOUT))
    model = torch.nn.parallel.DistributedDataParallel(_small_gpt("cpu", quick))
    return model, _finetune_step(model, _ddp_batch(quick, rank))


def _ddp_peer(port: int, quick: bool, threads: int) -> None:
    """Rank 1, in its own process: a DDP step each time rank 0 broadcasts 1, until 0."""
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False,
                          timeout=datetime.timedelta(seconds=DDP_TIMEOUT))
    try:
        _, step = _ddp_join(1, store, threads, quick)
        go = torch.ones(1)
        while True:
            dist.broadcast(go, src=0)
            if go.item() != 1:
                break
            step()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_ddp_peer(quick: bool):
    """Rank 0 here, rank 1 in a new process (127.0.0.1, a port the OS picks); returns
    rank 0's model and step, and a ``close`` that stops the peer and leaves the group."""
    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise RuntimeError("the DDP row needs this process outside any process group")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=DDP_TIMEOUT))
    threads = torch.get_num_threads()
    peer = mp.get_context("forkserver").Process(target=_ddp_peer, daemon=True,
                                                args=(store.port, quick, threads))
    peer.start()

    def close():
        try:
            if dist.is_initialized():
                dist.broadcast(torch.zeros(1), src=0)  # the peer's loop ends
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            peer.join(timeout=10)
            if peer.is_alive():
                peer.kill()
                peer.join()

    try:
        return (*_ddp_join(0, store, threads, quick), close)
    except BaseException:
        close()
        raise


@benchmark("DDP training step, 2 processes (gloo) vs 1 process, same global batch", "8")
def _bench_ddp(device, quick):
    """Section "Data parallelism" for real: chapter 4's GPT, one AdamW step on a global
    batch split over two processes on 127.0.0.1 (DDP all-reduces the gradients), against
    one process stepping on the whole batch. Each process has the reference's threads.
    Equal work: after one step both hold the same mean gradient over the global batch."""
    model, ddp_step, close = _start_ddp_peer(quick)
    try:
        single = _small_gpt("cpu", quick)
        x = _ddp_batch(quick)
        single_step = _finetune_step(single, x)

        def ours():
            dist.broadcast(torch.ones(1), src=0)  # the peer takes its step too
            ddp_step()

        ours(), single_step()
        for (name, a), b in zip(model.module.named_parameters(), single.parameters(),
                                strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    except BaseException:
        close()
        raise
    c = single.config
    return Case(ours, single_step, "1 process, whole batch",
                f"L={c.n_layer} d={c.n_embd} B={len(x)} T={x.shape[1]}, CPU",
                work=x.numel(), work_unit="tokens", close=close)


# --- Chapter 10: fine-tuning -----------------------------------------------------------


def _finetune_step(model, x):
    """One AdamW step on ``model``'s trainable parameters, as a zero-argument callable."""
    from companion.finetune import make_optimizer, training_step

    return training_step(model, x, x, make_optimizer(model, 1e-3))


def _finetune_case(device, quick, method):
    """A training step of the chapter-4-sized GPT adapted by ``method``, against full
    fine-tuning of the same model: the ratio is the step time relative to full."""
    from companion.finetune import prepare_adaptation

    B, T = (4, 64) if quick else (8, 64)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    full = _small_gpt(device, quick)
    adapted = prepare_adaptation(_small_gpt(device, quick), method)
    c = full.config
    return Case(_finetune_step(adapted, x), _finetune_step(full, x), "full fine-tuning",
                f"L={c.n_layer} d={c.n_embd} B={B} T={T}", work=B * T, work_unit="tokens")


@benchmark("fine-tuning step: LoRA r=4 (attention + MLP) vs full", "10")
def _bench_lora_vs_full(device, quick):
    return _finetune_case(device, quick, "lora")


@benchmark("fine-tuning step: linear probe vs full", "10")
def _bench_probe_vs_full(device, quick):
    return _finetune_case(device, quick, "head")


@benchmark("LoRA training step: ours vs peft get_peft_model", "10")
def _bench_lora_vs_peft(device, quick):
    from peft import LoraConfig, get_peft_model

    from companion.lora import add_lora

    B, T = (4, 64) if quick else (8, 64)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    targets = ["in_proj", "out_proj", "mlp.0", "mlp.2"]
    ours = add_lora(_small_gpt(device, quick), targets, rank=4, alpha=8)
    peft = get_peft_model(_small_gpt(device, quick),
                          LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    c = ours.config
    return Case(_finetune_step(ours, x), _finetune_step(peft, x), "peft LoRA",
                f"L={c.n_layer} d={c.n_embd} r=4 B={B} T={T}", work=B * T, work_unit="tokens")


# --- Chapter 11: deployment ------------------------------------------------------------


@benchmark("gpt forward: onnx runtime vs eager pytorch", "11")
def _bench_onnx_runtime(device, quick):
    """Logits of chapter 4's GPT shape, ONNX Runtime (CPU, as many intra-op threads as
    torch has) against eager PyTorch on the CPU. Both sides always run on the CPU."""
    import tempfile
    from pathlib import Path

    from companion import export

    model = _small_gpt("cpu", quick).eval()
    B, T = (2, 32) if quick else (8, 128)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = export.export_onnx(export.export_program(model), Path(folder) / "gpt.onnx")
        session = export.onnx_session(path, threads=torch.get_num_threads())

    def eager():
        with torch.no_grad():
            model(x)

    c = model.config
    return Case(lambda: export.onnx_logits(session, x), eager, "eager pytorch (cpu)",
                f"L={c.n_layer} d={c.n_embd} B={B} T={T}, CPU", work=B * T, work_unit="tokens")


def _burst(url: str, payloads: list[dict]) -> list[int]:
    """Send ``payloads`` all at once (chapter 11's :func:`~companion.loadtest.open_loop`
    at 10^4 requests/s, 60 s timeout each); the completion tokens, or an error."""
    import asyncio

    from companion.loadtest import open_loop

    result = asyncio.run(open_loop(url, payloads, rate=1e4, timeout=60.0))
    if result.n != len(payloads):
        raise RuntimeError(f"{url}: status codes {result.status_codes}, expected all 200")
    return result.completion_tokens


def _start_servers(batch_sizes: list[int]):
    """One ``python -m companion.serve`` per ``max_batch_size`` (continuous batching) on
    127.0.0.1, each with torch's thread count, started side by side; returns them."""
    from companion import serve

    servers = [serve.ServerProcess(serve.Limits(max_batch_size=b),
                                   threads=torch.get_num_threads(), startup_timeout=300.0)
               for b in batch_sizes]
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


@benchmark("served tokens/s: batching (16 sequences) vs one sequence at a time", "11")
def _bench_serving(device, quick):
    """Section "Why batching helps": the same burst of mixed-length completion requests
    over real HTTP to the model server with continuous batching of up to 16 sequences
    and with ``max_batch_size=1`` (no batching), on the CPU. Equal work: both servers
    answer every request with the same number of completion tokens."""
    from companion.data import CharCorpus
    from companion.loadtest import mixed_workload

    corpus = CharCorpus()
    text = corpus.tokenizer.decode(corpus.val_ids)
    payloads = mixed_workload(4 if quick else 32, text, torch.Generator().manual_seed(0))
    servers = _start_servers([16, 1])

    def close():
        for s in servers:
            s.__exit__()

    try:
        batched, single = (_burst(s.url, payloads) for s in servers)
        if batched != single:
            raise AssertionError(f"completion tokens differ: {batched} vs {single}")
    except BaseException:
        close()
        raise
    return Case(lambda: _burst(servers[0].url, payloads),
                lambda: _burst(servers[1].url, payloads), "max_batch_size=1",
                f"{len(payloads)} requests at once, pretrained GPT, CPU", work=sum(batched),
                work_unit="tokens", close=close)


# --- Chapter 9: privacy ----------------------------------------------------------------


@benchmark("per-sample gradients: torch.func vs opacus GradSampleModule", "9")
def _bench_per_sample_gradients(device, quick):
    """Per-example gradients of a two-layer MLP on a batch of digits-sized inputs."""
    import warnings

    from opacus import GradSampleModule

    from companion.privacy import per_sample_gradients

    batch, hidden = (16, 32) if quick else (256, 256)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10)).to(device)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    x = torch.rand(batch, 64, generator=torch.Generator().manual_seed(0)).to(device)
    y = (torch.arange(batch) % 10).to(device)
    loss = torch.nn.functional.cross_entropy

    def ours():
        per_sample_gradients(model, loss, x, y)

    def reference():
        gsm.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the inputs do not require gradients
            loss(gsm(x), y).backward()

    return Case(ours, reference, "opacus GradSampleModule",
                f"B={batch}, MLP 64-{hidden}-10", work=batch, work_unit="examples")


# =========================================================================== command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: get_device())")
    parser.add_argument("--only", default=None, help="run only rows whose name contains this")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (default: PyTorch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.list:
        for name, chapter, _ in REGISTRY:
            print(f"{chapter:>10}  {name}")
        return 0
    results = run(args.device, args.only, args.quick, rounds=args.rounds,
                  min_run_time=0.05 if args.quick else 0.2)
    if not results:
        print("no benchmark matched", file=sys.stderr)
        return 1
    print(machine_line(args.rounds))
    if args.markdown:
        print()  # a Markdown table needs a blank line before it
    print(format_table(results, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
