"""Adapting a pretrained language model to a new domain (book: chapter 10).

Four ways to adapt :func:`companion.pretrained.load_pretrained_gpt`'s model, from most to
fewest trainable parameters (:func:`prepare_adaptation`):

* ``"full"`` -- every parameter trains (full fine-tuning);
* ``"last_block"`` -- the last Transformer block, the final LayerNorm and the output head;
* ``"head"`` -- a linear probe: the final LayerNorm and the output head only;
* ``"lora"`` -- low-rank adapters on chosen projections (:mod:`companion.lora`), the rest
  frozen.

The output head of :class:`~companion.transformer.GPT` *is* its token embedding (tied
weights); training it would also move the input embedding. :func:`untie_head` gives the
head its own copy first, so that ``"head"`` and ``"last_block"`` change only what they say.

:func:`fine_tune` runs :func:`companion.train.train_language_model` with AdamW on batches of
the new domain, optionally mixing in a fraction of rows from the original domain (the
simplest defence against forgetting); :func:`adapt` does both on a copy of the model.
:func:`run_recipe` and :func:`select_learning_rate` compare :data:`RECIPES` fairly, each at
its own best rate of :data:`LR_GRID`; the grid is recorded once by ``python -m
companion.finetune --record lr-grid``, the other runs of sections 10b and 10c (the
:data:`VARIANTS`, adapters on a 4-bit base, more rehearsal) by ``--record adaptation``.
:func:`finetuning_memory` is chapter 1's memory arithmetic for full fine-tuning, LoRA and
QLoRA of a published model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from companion._validate import check_choice, check_float, check_int, check_type
from companion.data import CharCorpus, load_stdlib_source, map_to_vocabulary
from companion.lora import add_lora
from companion.scale import TransformerConfig, training_memory
from companion.train import LMHistory, fixed_windows, language_model_loss, train_language_model
from companion.transformer import GPT

#: The ways :func:`prepare_adaptation` knows, from most to fewest trainable parameters.
METHODS = ("full", "last_block", "head", "lora")


def untie_head(model: GPT) -> GPT:
    """Give ``model.lm_head`` its own copy of the (tied) token-embedding matrix. In place."""
    check_type("model", model, GPT)
    if model.lm_head.weight is model.token_embedding.weight:
        model.lm_head.weight = nn.Parameter(model.token_embedding.weight.detach().clone())
    return model


def prepare_adaptation(model: GPT, method: str, *, rank: int = 4, alpha: float = 8.0,
                       target_modules=("in_proj", "out_proj", "mlp.0", "mlp.2")) -> GPT:
    """Set which parameters of ``model`` train for ``method`` (one of :data:`METHODS`).

    ``rank``, ``alpha`` and ``target_modules`` apply to ``"lora"`` only (see
    :func:`companion.lora.add_lora`). In place; returns ``model``.
    """
    check_type("model", model, GPT)
    check_choice("method", method, METHODS)
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":
        return add_lora(model, list(target_modules), rank, alpha)
    untie_head(model).requires_grad_(False)
    trained = [model.final_norm, model.lm_head]
    if method == "last_block":
        trained.append(model.blocks[-1])
    for module in trained:
        module.requires_grad_(True)
    return model


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (Adam: ``m`` and ``v``).

    Counts the tensors in ``optimizer.state`` with more than one element (Adam's step
    counters are scalars); call it after a first ``step()``, when the state exists.
    """
    check_type("optimizer", optimizer, torch.optim.Optimizer)
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (no weight decay) over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter")
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  optimizer: torch.optim.Optimizer):
    """One optimizer step of ``model(x, y)``'s loss, as a zero-argument callable to time
    (:func:`companion.benchmarks.time_callable`); the same step as :func:`fine_tune`'s
    without gradient clipping. Each call trains ``model``: time a copy."""
    check_type("optimizer", optimizer, torch.optim.Optimizer)

    def step():
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@dataclass(frozen=True)
class FineTuneSettings:
    """The small budget every method gets in the chapter."""

    steps: int = 60
    batch_size: int = 8
    block_size: int = 64
    lr: float = 1e-3
    eval_every: int = 20
    eval_windows: int = 24


#: The budget of every run in sections 10b and 10c of the book -- 40 AdamW steps of 8
#: windows of 32 characters, evaluated every 10 steps on 32 fixed windows.
BOOK_SETTINGS = FineTuneSettings(steps=40, batch_size=8, block_size=32, lr=1e-3,
                                 eval_every=10, eval_windows=32)


def load_code_corpus(tokenizer) -> tuple[CharCorpus, int]:
    """Chapter 10's second domain on the pretrained model's ids.

    :func:`companion.data.load_stdlib_source` mapped onto ``tokenizer``'s vocabulary
    (:func:`companion.data.map_to_vocabulary`). Returns the corpus and the number of
    characters replaced.
    """
    text, replaced = map_to_vocabulary(load_stdlib_source(), tokenizer.itos)
    return CharCorpus(text, tokenizer=tokenizer), replaced


def fine_tune(model: GPT, corpus: CharCorpus, settings: FineTuneSettings = FineTuneSettings(),
              *, seed: int = 0, original: CharCorpus | None = None,
              mix_fraction: float = 0.0) -> LMHistory:
    """Train ``model``'s trainable parameters on ``corpus`` (next-character prediction).

    Each step draws ``settings.batch_size`` random windows; with ``original`` and
    ``mix_fraction > 0``, that fraction of the rows comes from ``original``'s training
    text instead (rehearsal). The loss is recorded every ``eval_every`` steps on
    ``eval_windows`` fixed validation windows of ``corpus`` (only there: the book reads no
    training-text loss). Seeded by ``seed``; returns the :class:`~companion.train.LMHistory`.
    """
    s = settings
    check_int("seed", seed, low=0)
    check_float("mix_fraction", mix_fraction, low=0.0, high=1.0, high_open=True)
    if mix_fraction > 0 and original is None:
        raise ValueError("mix_fraction > 0 needs the original corpus (original=)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n_original = round(mix_fraction * s.batch_size)

    def get_batch():
        x, y = corpus.get_batch("train", s.batch_size - n_original, s.block_size, generator)
        if n_original:
            xo, yo = original.get_batch("train", n_original, s.block_size, generator)
            x, y = torch.cat((x, xo)), torch.cat((y, yo))
        return x.to(device), y.to(device)

    eval_batches = {"val": fixed_windows(corpus.ids("val"), s.block_size, s.eval_windows)}
    optimizer = make_optimizer(model, s.lr)
    return train_language_model(model, optimizer, get_batch, steps=s.steps,
                                eval_every=s.eval_every, eval_batches=eval_batches,
                                grad_clip=1.0, autocast_dtype=None)


def train_from_scratch(config, corpus: CharCorpus, settings: FineTuneSettings = BOOK_SETTINGS,
                       *, seed: int = 0, device=None) -> tuple[GPT, LMHistory]:
    """A fresh :class:`~companion.transformer.GPT` of ``config``, initialised after
    ``torch.manual_seed(seed)`` and trained by :func:`fine_tune` with ``seed``.

    The baseline of "what pre-training buys": the same architecture, data and budget, no
    pretrained weights. Returns the model and its history.
    """
    check_int("seed", seed, low=0)
    torch.manual_seed(seed)
    model = GPT(config).to(device or "cpu")
    return model, fine_tune(model, corpus, settings, seed=seed)


def steps_to_reach(history: LMHistory, target: float) -> int | None:
    """The first evaluated step whose validation loss is ``<= target`` (``None``: never)."""
    for step, loss in zip(history.eval_step, history.val_loss):
        if loss <= target:
            return step
    return None


# --------------------------------------------------------------------------- at scale

#: Bits per frozen weight in QLoRA -- 4-bit NormalFloat plus double-quantised block
#: constants, 0.127 bits per parameter :cite:p:`dettmers2023qlora`.
QLORA_BITS_PER_PARAMETER = 4 + 8 / 64 + 32 / (64 * 256)


def lora_shapes(cfg: TransformerConfig, targets=("q", "k", "v", "o")) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of each adapted projection of ``cfg``, all layers.

    ``"q"``, ``"o"``: ``d x d``; ``"k"``, ``"v"``: ``d x (kv_heads * head_dim)`` (smaller
    with grouped-query attention); ``"mlp"``: the MLP's matrices (three with SwiGLU).
    """
    check_type("cfg", cfg, TransformerConfig)
    d, d_kv, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.ff_dim
    per_layer = {"q": [(d, d)], "o": [(d, d)], "k": [(d, d_kv)], "v": [(d, d_kv)],
                 "mlp": [(d, f), (f, d)] + ([(d, f)] if cfg.mlp == "swiglu" else [])}
    for target in targets:
        check_choice("targets", target, per_layer)
    return [shape for t in targets for shape in per_layer[t]] * cfg.n_layer


def finetuning_memory(n_params, method: str, n_trainable=0) -> float:
    """Bytes of weights, gradients and Adam states to fine-tune ``n_params`` parameters.

    * ``"full"``: mixed-precision Adam on every parameter, 16 bytes each
      (:func:`companion.scale.training_memory`);
    * ``"lora"``: the frozen model in 16-bit (2 bytes each) plus ``n_trainable`` adapter
      parameters trained in float32 with Adam (16 bytes each);
    * ``"qlora"``: the same with the frozen model in 4-bit NormalFloat,
      :data:`QLORA_BITS_PER_PARAMETER` bits each :cite:p:`dettmers2023qlora`.

    Activations, the CUDA context and fragmentation come on top (not counted).
    """
    check_choice("method", method, ("full", "lora", "qlora"))
    if method != "full" and not (isinstance(n_trainable, (int, float)) and n_trainable >= 1):
        raise ValueError(f"n_trainable must be >= 1 for method={method!r}, got {n_trainable!r}")
    if method == "full":
        return training_memory(n_params, "mixed", "adam").total
    frozen = 2.0 if method == "lora" else QLORA_BITS_PER_PARAMETER / 8
    return frozen * n_params + training_memory(n_trainable, "fp32", "adam").total


# --------------------------------------------------------------- the long scratch record

#: The recorded long from-scratch runs on the code (see :func:`record_scratch_runs`).
SCRATCH_RECORD = Path(__file__).resolve().parent / "assets" / "scratch_on_code.json"


def _scratch_worker(job: tuple[int, int]) -> dict:
    seed, steps = job
    from companion.pretrained import load_pretrained_gpt

    torch.set_num_threads(1)
    pretrained, pydoc = load_pretrained_gpt("cpu")
    corpus, _ = load_code_corpus(pydoc.tokenizer)
    start = time.perf_counter()
    _, history = train_from_scratch(pretrained.config, corpus,
                                    replace(BOOK_SETTINGS, steps=steps), seed=seed)
    return {"seed": seed, "seconds": round(time.perf_counter() - start, 1),
            "eval_step": history.eval_step, "val_loss": history.val_loss}


def record_scratch_runs(steps: int, seeds=(0, 1, 2), jobs: int = 1,
                        path: str | Path = SCRATCH_RECORD) -> dict:
    """Train from scratch on the code for ``steps`` steps per seed and write the curves.

    Each run is :func:`train_from_scratch` with :data:`BOOK_SETTINGS` but ``steps`` steps,
    on one CPU thread (``jobs`` runs in parallel processes). A run takes about 50 ms per
    step on one core, minutes in all -- too long for a notebook -- so the book reads the
    record (:func:`load_scratch_record`) and re-computes its first
    :data:`BOOK_SETTINGS` ``.steps`` steps to check it. Returns what was written.
    """
    import multiprocessing

    check_int("steps", steps, low=BOOK_SETTINGS.steps)
    check_int("jobs", jobs, low=1)
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        runs = pool.map(_scratch_worker, [(seed, steps) for seed in seeds])
    record = {"what": "validation loss on the code, training from scratch "
                      "(companion.finetune.record_scratch_runs)",
              "torch": torch.__version__, "threads": 1,
              "settings": asdict(replace(BOOK_SETTINGS, steps=steps)),
              "runs": runs}
    Path(path).write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def load_scratch_record(path: str | Path = SCRATCH_RECORD) -> dict[int, LMHistory]:
    """The recorded from-scratch runs: ``{seed: LMHistory}`` (``eval_step``, ``val_loss``).

    Raises ``ValueError`` if the record was made with other settings than
    :data:`BOOK_SETTINGS` (apart from the number of steps).
    """
    record = json.loads(Path(path).read_text())
    settings = FineTuneSettings(**record["settings"])
    if replace(settings, steps=BOOK_SETTINGS.steps) != BOOK_SETTINGS:
        raise ValueError(f"{path} was recorded with {settings}, not the book's "
                         f"{BOOK_SETTINGS} (apart from steps): re-record it")
    return {run["seed"]: LMHistory(eval_step=run["eval_step"], val_loss=run["val_loss"])
            for run in record["runs"]}


# ------------------------------------------------- the learning-rate grid of section 10c

#: The learning rates every recipe of :data:`RECIPES` is trained with.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

#: The recipes that section 10c compares, as ``name -> (method, prepare_adaptation options,
#: mix_fraction)``; the mixed rows come from the documentation the model was trained on.
RECIPES = {"full": ("full", {}, 0.0),
           "LoRA r=4": ("lora", {"rank": 4, "alpha": 8.0}, 0.0),
           "full, 25% docs": ("full", {}, 0.25)}

#: Where the recorded grid lies (every recipe at every learning rate, three seeds; see
#: :func:`record_lr_grid`).
LR_GRID_RECORD = Path(__file__).resolve().parent / "assets" / "lr_grid_on_code.json"


def adapt(model: GPT, corpus: CharCorpus, method: str, lr: float, seed: int,
          settings: FineTuneSettings = BOOK_SETTINGS, *, options: dict | None = None,
          original: CharCorpus | None = None, mix_fraction: float = 0.0
          ) -> tuple[GPT, LMHistory]:
    """Adapt a copy of ``model`` to ``corpus`` by ``method`` (:func:`prepare_adaptation`
    with ``options``) at ``lr``: :func:`fine_tune` with ``settings`` but the rate.

    The LoRA matrices and dropout masks come from ``torch.manual_seed(seed)``, the batches
    from ``seed``; ``original`` and ``mix_fraction`` as in :func:`fine_tune`. Returns the
    adapted copy and its :class:`~companion.train.LMHistory`; ``model`` is not touched.
    """
    check_float("lr", lr, low=0.0, low_open=True)
    check_int("seed", seed, low=0)
    torch.manual_seed(seed)  # the LoRA A's and the dropout masks
    net = prepare_adaptation(copy.deepcopy(model), method, **(options or {}))
    return net, fine_tune(net, corpus, replace(settings, lr=lr), seed=seed,
                          original=original, mix_fraction=mix_fraction)


def domain_loss(model: GPT, corpus: CharCorpus, settings: FineTuneSettings = BOOK_SETTINGS
                ) -> float:
    """``model``'s loss on ``settings.eval_windows`` fixed validation windows of
    ``settings.block_size`` characters of ``corpus`` (the protocol of :func:`fine_tune`)."""
    windows = fixed_windows(corpus.ids("val"), settings.block_size, settings.eval_windows)
    return language_model_loss(model, *windows)


def run_recipe(model: GPT, corpus: CharCorpus, original: CharCorpus, recipe: str, lr: float,
               seed: int, settings: FineTuneSettings = BOOK_SETTINGS) -> tuple[GPT, dict]:
    """Adapt a copy of ``model`` to ``corpus`` by :data:`RECIPES` ``[recipe]`` at ``lr``
    (:func:`adapt`).

    Returns the adapted copy and its losses: ``"code_loss"``, the final one on
    ``corpus``'s validation windows, ``"docs_loss"`` on as many windows of ``original``'s
    validation text (:func:`domain_loss`), and ``"val_loss"``, the validation curve on
    ``corpus`` (every ``settings.eval_every`` steps).
    """
    check_choice("recipe", recipe, RECIPES)
    method, options, mix = RECIPES[recipe]
    net, history = adapt(model, corpus, method, lr, seed, settings, options=options,
                         original=original if mix else None, mix_fraction=mix)
    return net, {"code_loss": history.val_loss[-1],
                 "docs_loss": domain_loss(net, original, settings),
                 "val_loss": history.val_loss}


def select_learning_rate(code_loss: dict[float, list[float]]) -> float:
    """The learning rate whose mean validation loss on the new domain over the seeds is
    lowest: ``code_loss`` maps each learning rate to its losses, one per seed.

    Section 10c's selection rule, fixed before looking at forgetting: each recipe is
    reported at the rate this returns for it, whatever it forgets there. A rate with a
    non-finite loss (a diverged run) is never selected.
    """
    check_type("code_loss", code_loss, dict)
    means = {lr: sum(losses) / len(losses) for lr, losses in code_loss.items() if losses}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    if not finite:
        raise ValueError(f"no learning rate has a finite mean loss: {means}")
    return min(finite, key=finite.get)


_GRID_DATA: dict = {}


def _grid_worker(job: tuple[str, float, int]) -> dict:
    recipe, lr, seed = job
    from companion.pretrained import load_pretrained_gpt

    torch.set_num_threads(1)
    if not _GRID_DATA:  # once per worker process
        model, pydoc = load_pretrained_gpt("cpu")
        _GRID_DATA.update(model=model, pydoc=pydoc,
                          code=load_code_corpus(pydoc.tokenizer)[0])
    start = time.process_time()
    _, losses = run_recipe(_GRID_DATA["model"], _GRID_DATA["code"], _GRID_DATA["pydoc"],
                           recipe, lr, seed)
    return {"recipe": recipe, "lr": lr, "seed": seed,
            "cpu_seconds": round(time.process_time() - start, 1), **losses}


def _grid_header(seeds) -> dict:
    return {"settings": asdict(replace(BOOK_SETTINGS, lr=None)), "lr_grid": list(LR_GRID),
            "recipes": {name: [m, o, mix] for name, (m, o, mix) in RECIPES.items()},
            "seeds": list(seeds)}


def record_lr_grid(seeds=(0, 1, 2), jobs: int = 1, path: str | Path = LR_GRID_RECORD) -> dict:
    """Run every recipe of :data:`RECIPES` at every rate of :data:`LR_GRID` for each seed
    (:func:`run_recipe`, :data:`BOOK_SETTINGS` but the rate) and write the final losses
    and the validation curves on the code.

    One CPU thread per run, ``jobs`` runs in parallel processes; a run takes one to two
    seconds of CPU time (stored as ``cpu_seconds``), the grid of 45 runs minutes on a
    busy machine -- more than a notebook may spend, so sections 10b and 10c read the
    record (:func:`load_lr_grid_record`) and re-train the first steps of seed 0 of the
    runs they report, to check the curves. Returns
    what was written.
    """
    import multiprocessing

    check_int("jobs", jobs, low=1)
    grid = [(recipe, lr, seed) for recipe in RECIPES for lr in LR_GRID for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        runs = pool.map(_grid_worker, grid)
    record = {"what": "final validation losses on the code and on the documentation "
                      "(companion.finetune.record_lr_grid)",
              "torch": torch.__version__, "threads": 1, **_grid_header(seeds), "runs": runs}
    Path(path).write_text(json.dumps(record, indent=0) + "\n")
    return record


def load_lr_grid_record(path: str | Path = LR_GRID_RECORD) -> dict[tuple[str, float, int], dict]:
    """The recorded grid: ``{(recipe, lr, seed): {"code_loss": ..., "docs_loss": ...,
    "val_loss": [...]}}`` (:func:`run_recipe`'s losses).

    Raises ``ValueError`` if the record was made with other settings than
    :data:`BOOK_SETTINGS` (apart from the rate), another :data:`LR_GRID` or other
    :data:`RECIPES`, or if a run is missing.
    """
    record = json.loads(Path(path).read_text())
    expected = json.loads(json.dumps(_grid_header(record["seeds"])))
    got = {key: record[key] for key in expected}
    if got != expected:
        raise ValueError(f"{path} was recorded with {got}, not the book's {expected}: "
                         "re-record it (python -m companion.finetune --record lr-grid)")
    runs = {(run["recipe"], run["lr"], run["seed"]):
            {key: run[key] for key in ("code_loss", "docs_loss", "val_loss")}
            for run in record["runs"]}
    missing = [(r, lr, s) for r in RECIPES for lr in LR_GRID for s in record["seeds"]
               if (r, lr, s) not in runs]
    if missing:
        raise ValueError(f"{path} lacks the runs {missing}: re-record it")
    return runs


# ------------------------------------------ the other recorded runs of sections 10b, 10c

#: Section 10b's other ways to adapt, as ``name -> (method, prepare_adaptation options)``,
#: each at :data:`BOOK_SETTINGS`' rate with seed 0 (full fine-tuning and LoRA r=4 at that
#: rate are runs of the learning-rate grid).
VARIANTS = {"linear probe": ("head", {}),
            "last block": ("last_block", {}),
            "LoRA r=1": ("lora", {"rank": 1, "alpha": 2.0}),
            "LoRA r=16": ("lora", {"rank": 16, "alpha": 32.0})}

#: The options of section 10c's rounded base, for
#: :func:`companion.quantize.quantize_linear_weights`.
QUANTIZED_BASE = {"bits": 4, "group_size": 32}

#: The name of section 10c's runs of LoRA r=4 on the rounded base in the record.
QUANTIZED_RUN = "LoRA r=4, 4-bit base"

#: The name of section 10c's runs of full fine-tuning with half of each batch from the
#: documentation (its rehearsal exercise), at the rate selected for ``"full, 25% docs"``.
HALF_DOCS_RUN = "full, 50% docs"

#: Where :func:`record_adaptation_runs` writes.
ADAPTATION_RECORD = Path(__file__).resolve().parent / "assets" / "adaptation_runs.json"

_ADAPTATION_COMMAND = "python -m companion.finetune --record adaptation"


def adaptation_settings(grid: dict | None = None) -> dict:
    """What :func:`record_adaptation_runs` runs: :data:`VARIANTS` with seed 0; LoRA r=4
    on the rounded base (:data:`QUANTIZED_BASE`) with seeds 0 to 2 at the rate that
    :func:`select_learning_rate` picks for LoRA from ``grid`` (default: the recorded
    grid, :func:`load_lr_grid_record`); and full fine-tuning with half of each batch from
    the documentation (:data:`HALF_DOCS_RUN`), seeds 0 to 2, at the rate it picks for
    ``"full, 25% docs"``."""
    grid = load_lr_grid_record() if grid is None else grid
    seeds = sorted({seed for _, _, seed in grid})

    def best(recipe):
        return select_learning_rate({lr: [grid[(recipe, lr, s)]["code_loss"]
                                          for s in seeds] for lr in LR_GRID})
    method, options, _ = RECIPES["LoRA r=4"]
    return {"fine_tune": asdict(BOOK_SETTINGS),
            "variants": {name: [m, o] for name, (m, o) in VARIANTS.items()},
            "variant_seeds": [0],
            "quantized": {"method": method, "options": options, "lr": best("LoRA r=4"),
                          **QUANTIZED_BASE, "seeds": [0, 1, 2]},
            "half_docs": {"mix_fraction": 0.5, "lr": best("full, 25% docs"),
                          "seeds": [0, 1, 2]}}


def _adaptation_jobs(settings: dict):
    """``(name, seed, method, options, lr, quantized, mix_fraction)`` of every run."""
    for name, (method, options) in settings["variants"].items():
        for seed in settings["variant_seeds"]:
            yield name, seed, method, options, BOOK_SETTINGS.lr, False, 0.0
    q, half = settings["quantized"], settings["half_docs"]
    for seed in q["seeds"]:
        yield QUANTIZED_RUN, seed, q["method"], q["options"], q["lr"], True, 0.0
    for seed in half["seeds"]:
        yield HALF_DOCS_RUN, seed, "full", {}, half["lr"], False, half["mix_fraction"]


def record_adaptation_runs(path: str | Path = ADAPTATION_RECORD, log=None) -> dict:
    """Run :func:`adaptation_settings`' runs (:func:`adapt`, one CPU thread) and write
    each one's validation curve on the code and final loss on the documentation.

    Ten runs of a few seconds each: more than sections 10b and 10c may spend, so they
    read the record (:func:`load_adaptation_record`) and re-train the first steps of
    seed 0 to check it. Returns what was written.
    """
    from companion.pretrained import load_pretrained_gpt
    from companion.quantize import quantize_linear_weights
    from companion.records import write_record

    torch.set_num_threads(1)
    settings = adaptation_settings()
    model, pydoc = load_pretrained_gpt("cpu")
    code = load_code_corpus(pydoc.tokenizer)[0]
    rounded = copy.deepcopy(model)
    quantize_linear_weights(rounded, **QUANTIZED_BASE)
    runs = []
    for name, seed, method, options, lr, quantized, mix in _adaptation_jobs(settings):
        start = time.process_time()
        net, history = adapt(rounded if quantized else model, code, method, lr, seed,
                             options=options, original=pydoc if mix else None,
                             mix_fraction=mix)
        runs.append({"name": name, "seed": seed, "val_loss": history.val_loss,
                     "docs_loss": domain_loss(net, pydoc),
                     "cpu_seconds": round(time.process_time() - start, 1)})
        if log is not None:
            log(f"{name:22s} seed {seed}: {runs[-1]['cpu_seconds']:.1f} s CPU, code "
                f"{history.val_loss[-1]:.3f}, docs {runs[-1]['docs_loss']:.3f}")
    return write_record(path, "validation curves on the code and final losses on the "
                        "documentation (companion.finetune.record_adaptation_runs)",
                        settings, threads=1, runs=runs)


def load_adaptation_record(path: str | Path = ADAPTATION_RECORD,
                           grid: dict | None = None) -> dict[tuple[str, int], dict]:
    """The runs of :func:`record_adaptation_runs`: ``{(name, seed): {"val_loss": [...],
    "code_loss": ..., "docs_loss": ...}}``.

    Raises ``ValueError`` if the record was made with other settings than
    :func:`adaptation_settings` ``(grid)`` -- another budget, other variants, or a
    learning-rate grid that selects another rate for LoRA -- or if a run is missing.
    """
    from companion.records import load_record

    settings = adaptation_settings(grid)
    record = load_record(path, settings, _ADAPTATION_COMMAND)
    runs = {(run["name"], run["seed"]): {"val_loss": run["val_loss"],
                                         "code_loss": run["val_loss"][-1],
                                         "docs_loss": run["docs_loss"]}
            for run in record["runs"]}
    missing = [(n, s) for n, s, *_ in _adaptation_jobs(settings) if (n, s) not in runs]
    if missing:
        raise ValueError(f"{path} lacks the runs {missing}: re-record it with "
                         f"{_ADAPTATION_COMMAND}")
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.finetune [--record scratch|lr-grid|adaptation]``: re-record
    :data:`SCRATCH_RECORD` (``--steps N``, the default), :data:`LR_GRID_RECORD` or
    :data:`ADAPTATION_RECORD` (after the grid: it runs at the rate the grid selects)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--record", choices=("scratch", "lr-grid", "adaptation"),
                        default="scratch")
    parser.add_argument("--steps", type=int, default=8000)  # the shipped scratch record
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.record == "adaptation":
        record_adaptation_runs(args.out or ADAPTATION_RECORD, log=print)
        return 0
    if args.record == "lr-grid":
        record = record_lr_grid(args.seeds, args.jobs, args.out or LR_GRID_RECORD)
        for run in record["runs"]:
            print(f"{run['recipe']:15s} lr {run['lr']:.0e} seed {run['seed']}: "
                  f"{run['cpu_seconds']:.1f} s CPU, code {run['code_loss']:.3f}, "
                  f"docs {run['docs_loss']:.3f}")
        return 0
    record = record_scratch_runs(args.steps, args.seeds, args.jobs, args.out or SCRATCH_RECORD)
    for run in record["runs"]:
        print(f"seed {run['seed']}: {run['seconds']:.0f} s, final validation loss "
              f"{run['val_loss'][-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
