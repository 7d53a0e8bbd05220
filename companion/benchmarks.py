"""How fast is the readable code? Each reference implementation against its oracle.

Book: Appendix, "Benchmarks". Run all rows in one process::

    python -m companion.benchmarks                 # every row, on get_device()
    python -m companion.benchmarks --device cpu --only adam
    python -m companion.benchmarks --markdown      # the table the appendix shows
    python -m companion.benchmarks --quick         # small sizes, a smoke run

A row times *ours* and the *reference* with the same procedure --
``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises CUDA),
alternating the two for several rounds and taking medians -- and prints
``ratio = ours / reference``: 1.0 is parity, 2.0 means ours takes twice as long.
Speed is measured here, never asserted in a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

from companion.device import get_device


@dataclass
class Case:
    """One comparison: two zero-argument callables that do the same work.

    ``work`` (with ``work_unit``) is the amount of work per call, e.g. the
    number of tokens, so that the table can show a throughput as well.
    """

    ours: Callable[[], object]
    reference: Callable[[], object]
    reference_name: str
    size: str
    work: float | None = None
    work_unit: str = ""


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

    @property
    def ratio(self) -> float:
        return self.ours_seconds / self.reference_seconds


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


def measure(case: Case, rounds: int = 3, min_run_time: float = 0.2) -> tuple[float, float]:
    """Medians over ``rounds`` alternating timings of ``case.ours`` and ``case.reference``."""
    ours, reference = [], []
    for _ in range(rounds):
        ours.append(time_callable(case.ours, min_run_time))
        reference.append(time_callable(case.reference, min_run_time))
    return statistics.median(ours), statistics.median(reference)


def run(device=None, only: str | None = None, quick: bool = False, rounds: int = 3,
        min_run_time: float = 0.2) -> list[Result]:
    """Run every registered benchmark whose name contains ``only``; return the results."""
    device = get_device(device)
    results = []
    for name, chapter, factory in REGISTRY:
        if only and only.lower() not in name.lower():
            continue
        case = factory(device, quick)
        ours, reference = measure(case, rounds=rounds, min_run_time=min_run_time)
        results.append(Result(name, chapter, str(device), case.size, case.reference_name,
                              ours, reference, case.work, case.work_unit))
    return results


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
    header = ["benchmark", "ratio", "ours", "reference", "size",
              "throughput (ours / reference)", "chapter", "device"]
    rows = []
    for r in results:
        throughput = (f"{_rate(r.work / r.ours_seconds)} / {_rate(r.work / r.reference_seconds)} "
                      f"{r.work_unit}/s" if r.work else "")
        rows.append([r.name, f"{r.ratio:.2f}x", _seconds(r.ours_seconds),
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


@benchmark("gpt training step: readable attention vs fast path", "4")
def _bench_gpt_training(device, quick):
    from companion.train import default_autocast_dtype

    B, T = (4, 64) if quick else (32, 128)
    x = torch.randint(103, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    dtype = default_autocast_dtype(device)  # bf16 on recent GPUs, fp16 on older, none on CPU

    def trainer(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                _, loss = model(x, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    readable, fast = _small_gpt(device, quick, False), _small_gpt(device, quick, True)
    c = readable.config
    return Case(trainer(readable), trainer(fast), "fast path (F.sdpa)",
                f"L={c.n_layer} d={c.n_embd} B={B} T={T}", work=B * T, work_unit="tokens")


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
    print(f"torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")
    if args.markdown:
        print()  # a Markdown table needs a blank line before it
    print(format_table(results, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
