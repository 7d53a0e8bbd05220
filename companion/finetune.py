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
simplest defence against forgetting). :func:`finetuning_memory` is chapter 1's memory
arithmetic for full fine-tuning, LoRA and QLoRA of a published model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from companion._validate import check_choice, check_float, check_int, check_type
from companion.data import CharCorpus
from companion.lora import add_lora
from companion.scale import TransformerConfig, training_memory
from companion.train import LMHistory, fixed_windows, train_language_model
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


@dataclass(frozen=True)
class FineTuneSettings:
    """The small budget every method gets in the chapter."""

    steps: int = 60
    batch_size: int = 8
    block_size: int = 64
    lr: float = 1e-3
    eval_every: int = 20
    eval_windows: int = 24


def fine_tune(model: GPT, corpus: CharCorpus, settings: FineTuneSettings = FineTuneSettings(),
              *, seed: int = 0, original: CharCorpus | None = None,
              mix_fraction: float = 0.0) -> LMHistory:
    """Train ``model``'s trainable parameters on ``corpus`` (next-character prediction).

    Each step draws ``settings.batch_size`` random windows; with ``original`` and
    ``mix_fraction > 0``, that fraction of the rows comes from ``original``'s training
    text instead (rehearsal). The loss is recorded every ``eval_every`` steps on
    ``eval_windows`` fixed validation windows of ``corpus`` (and, under ``"train"``, of
    its training text). Seeded by ``seed``; returns the :class:`~companion.train.LMHistory`.
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

    eval_batches = {split: fixed_windows(corpus.ids(split), s.block_size, s.eval_windows)
                    for split in ("train", "val")}
    optimizer = make_optimizer(model, s.lr)
    return train_language_model(model, optimizer, get_batch, steps=s.steps,
                                eval_every=s.eval_every, eval_batches=eval_batches,
                                grad_clip=1.0, autocast_dtype=None)


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

