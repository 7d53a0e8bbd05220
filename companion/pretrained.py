"""A small GPT pretrained on Python's own documentation (book: chapters 4, 5 and 6).

:func:`load_pretrained_gpt` returns the model and the corpus it was trained on::

    from companion.pretrained import load_pretrained_gpt
    model, corpus = load_pretrained_gpt()          # eval mode, on get_device()
    prompt = corpus.tokenizer.encode("The ")[None]
    print(corpus.tokenizer.decode(model.generate(prompt, 200, top_k=10)[0]))

The model is a character-level :class:`~companion.transformer.GPT` (:data:`CONFIG`:
4 layers, 4 heads, width 128, context 128 characters, 0.82 M parameters) trained on
the first 90 % of ``companion.data.CharCorpus()`` with the settings in
:data:`TRAINING`. Its checkpoint ships with the package as ``assets/gpt_pydoc_char.pt``
(3.3 MB: a dict of the config fields, the ``state_dict``, the vocabulary string and the
training record, read with ``torch.load(..., weights_only=True)``). It was made with ::

    python -m companion.pretrained

which re-trains it from scratch on one CPU thread -- seeded, so with the same PyTorch
build it writes the same bytes (the archive embeds the file name: compare files named
``gpt_pydoc_char.pt``) -- and prints its validation loss and the file's SHA-256. The
run that produced the shipped file (torch 2.13.0, one thread, 44 minutes on a busy
shared 2-core CPU; a second run took 23 minutes and wrote the same bytes;
``--threads`` and ``--device cuda`` go faster but change the bytes) printed:

* validation loss (the validation text, in whole 128-character windows -- all of it
  but the last 40 characters): 1.1513 nats per character (training windows: 0.97);
* sha256 ``7d995363af4c4d710bbd19a2fb688c9789f46eee4582b3eec4b785b9aa03f49e``.

Chapter 4 first trains a smaller "notebook GPT" (:data:`NOTEBOOK_CONFIG`, 300 steps of
:data:`NOTEBOOK_TRAINING`, :func:`train_notebook_gpt`). Its run is recorded in
``assets/notebook_gpt_run.pt`` by ``python -m companion.pretrained --notebook-run``; the
page trains its first steps and checks them against the record (:func:`load_notebook_gpt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

from companion.data import CharCorpus
from companion.device import get_device, seed_everything
from companion.optim import AdamW, warmup_cosine_schedule
from companion.records import check_settings
from companion.train import (
    LMHistory,
    fixed_windows,
    language_model_loss,
    train_language_model,
)
from companion.transformer import GPT, GPTConfig

#: Where the checkpoint lives inside the package.
CHECKPOINT = Path(__file__).resolve().parent / "assets" / "gpt_pydoc_char.pt"

#: Model size (``vocab_size`` comes from the corpus).
CONFIG = {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.1}

#: The training settings (chapter 3's :class:`~companion.optim.AdamW`, with weight decay on
#: matrices only; warm-up, then cosine).
TRAINING = {"seed": 0, "steps": 2500, "batch_size": 32, "learning_rate": 2e-3,
            "warmup_steps": 100, "weight_decay": 0.1, "betas": (0.9, 0.99), "grad_clip": 1.0}


def sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def validation_loss(model: GPT, corpus: CharCorpus) -> float:
    """Mean cross-entropy (nats per character) over ``corpus``'s validation text, cut
    into whole windows of the model's ``block_size`` by :func:`~companion.train.fixed_windows`:
    every character is predicted once, except a tail shorter than one window."""
    return language_model_loss(model, *fixed_windows(corpus.val_ids, model.config.block_size))


def train_pretrained(steps: int = TRAINING["steps"], device=None, log=print):
    """Train the pretrained model from scratch; returns ``(model, corpus, history)``."""
    t = TRAINING
    seed_everything(t["seed"])
    device = get_device(device)
    corpus = CharCorpus()
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, **CONFIG)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                       {"params": no_decay, "weight_decay": 0.0}],
                      lr=t["learning_rate"], betas=t["betas"])
    scheduler = warmup_cosine_schedule(optimizer, min(t["warmup_steps"], steps // 10), steps,
                                       min_lr_ratio=0.1)
    generator = torch.Generator().manual_seed(t["seed"])
    block = CONFIG["block_size"]

    def get_batch():
        return corpus.get_batch("train", t["batch_size"], block, generator, device)

    eval_batches = {split: fixed_windows(corpus.ids(split), block, num_windows=64)
                    for split in ("train", "val")}

    def progress(h):
        log(f"step {h.eval_step[-1]:5d}  train {h.train_loss[-1]:.4f}  val {h.val_loss[-1]:.4f}"
            f"  ({h.tokens_per_second:,.0f} tokens/s)")

    history = train_language_model(model, optimizer, get_batch, steps=steps,
                                   eval_every=max(1, steps // 10), eval_batches=eval_batches,
                                   scheduler=scheduler, grad_clip=t["grad_clip"], log=progress)
    model.eval()
    return model, corpus, history


def save_checkpoint(model: GPT, corpus: CharCorpus, path: str | Path = CHECKPOINT,
                    **record) -> Path:
    """Write ``model`` and the corpus vocabulary to ``path`` (weights as float32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": state,
                "vocab": "".join(corpus.tokenizer.itos), "record": record}, path)
    return path


def load_checkpoint(path: str | Path = CHECKPOINT, device=None) -> tuple[GPT, dict]:
    """Load the checkpoint at ``path``: the model (eval mode, on ``device``) and the dict.

    The model is a :class:`~companion.transformer.GPT`; the dict holds ``config``,
    ``state_dict``, ``vocab`` and ``record`` (how it was trained).
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(get_device(device)).eval(), checkpoint


def load_pretrained_gpt(device=None) -> tuple[GPT, CharCorpus]:
    """The pretrained GPT and the corpus it was trained on, ``(model, corpus)``.

    The model is in eval mode, on ``device`` (default: :func:`~companion.device.get_device`).
    The corpus is ``CharCorpus()`` -- the frozen pydoc text (``assets/pydoc_topics.txt``)
    with the default 10 % validation split -- whose vocabulary is the checkpoint's on
    every machine and every Python release.
    """
    if not CHECKPOINT.exists():
        raise FileNotFoundError(f"no checkpoint at {CHECKPOINT}; create it with "
                                "`python -m companion.pretrained`")
    model, checkpoint = load_checkpoint(CHECKPOINT, device)
    corpus = CharCorpus()
    if "".join(corpus.tokenizer.itos) != checkpoint["vocab"]:
        raise ValueError("the corpus has a different character set than the checkpoint's; "
                         "re-train with `python -m companion.pretrained`")
    return model, corpus


# ------------------------------------------------- chapter 4's first run: the notebook GPT

#: The notebook GPT -- 2 blocks of width 64, 4 heads, 64 characters (``vocab_size``: the corpus').
NOTEBOOK_CONFIG = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}
#: Its training -- AdamW (decay on every parameter), warm-up then cosine to a tenth.
NOTEBOOK_TRAINING = {"seed": 0, "steps": 300, "batch_size": 32, "learning_rate": 5e-3,
                     "weight_decay": 0.1, "warmup_steps": 30, "min_lr_ratio": 0.1,
                     "eval_every": 50, "eval_windows": 32}
#: Where ``python -m companion.pretrained --notebook-run`` records the whole run.
NOTEBOOK_RUN = CHECKPOINT.parent / "notebook_gpt_run.pt"


def train_notebook_gpt(corpus: CharCorpus, steps: int = NOTEBOOK_TRAINING["steps"],
                       device=None) -> tuple[GPT, LMHistory]:
    """The first ``steps`` steps of chapter 4's run; returns ``(model, history)``.

    The schedule spans the whole run whatever ``steps`` is, so a shorter call is the
    run's prefix. Every ``eval_every`` steps the loss on ``eval_windows`` fixed windows
    of the training and of the validation text is recorded.
    """
    t = NOTEBOOK_TRAINING
    seed_everything(t["seed"])
    device = get_device(device)
    config = GPTConfig(vocab_size=corpus.vocab_size, **NOTEBOOK_CONFIG)
    model = GPT(config).to(device)
    optimizer = AdamW(model.parameters(), lr=t["learning_rate"],
                      weight_decay=t["weight_decay"])
    scheduler = warmup_cosine_schedule(optimizer, t["warmup_steps"], t["steps"],
                                       min_lr_ratio=t["min_lr_ratio"])
    batches = torch.Generator().manual_seed(t["seed"])
    eval_batches = {
        split: fixed_windows(corpus.ids(split), config.block_size, t["eval_windows"])
        for split in ("train", "val")
    }
    history = train_language_model(
        model,
        optimizer,
        lambda: corpus.get_batch("train", t["batch_size"], config.block_size, batches, device),
        steps=steps,
        eval_every=t["eval_every"],
        eval_batches=eval_batches,
        scheduler=scheduler,
    )
    return model, history


def record_notebook_gpt(path: str | Path = NOTEBOOK_RUN) -> Path:
    """Train the notebook GPT's whole run on the CPU and save it with its history."""
    corpus = CharCorpus()
    model, history = train_notebook_gpt(corpus, device="cpu")
    return save_checkpoint(model, corpus, path, settings=NOTEBOOK_TRAINING,
                           torch_version=str(torch.__version__),
                           **dataclasses.asdict(history))


def load_notebook_gpt(path: str | Path = NOTEBOOK_RUN, device=None) -> tuple[GPT, LMHistory]:
    """The recorded notebook GPT after its whole run (eval mode) and the run's history.

    Raises ``ValueError`` if it was recorded with other settings than ``NOTEBOOK_TRAINING``.
    """
    model, checkpoint = load_checkpoint(path, device)
    record = checkpoint["record"]
    check_settings(Path(path).name, record["settings"], NOTEBOOK_TRAINING,
                   "python -m companion.pretrained --notebook-run")
    fields = [f.name for f in dataclasses.fields(LMHistory)]
    return model, LMHistory(**{name: record[name] for name in fields})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.pretrained",
                                     description="Re-train the pretrained GPT checkpoint.")
    parser.add_argument("--steps", type=int, default=TRAINING["steps"])
    parser.add_argument("--out", default=str(CHECKPOINT), help="where to write the checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu (default: reproducible), cuda...")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the same bytes on any machine with the "
                             "same PyTorch build, and robust on a shared CPU)")
    parser.add_argument("--notebook-run", action="store_true",
                        help="record chapter 4's notebook GPT run instead (one CPU thread)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.notebook_run:
        path = record_notebook_gpt()
        print(f"wrote {path.name}: {path.stat().st_size / 1e6:.2f} MB")
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    model, corpus, history = train_pretrained(args.steps, args.device,
                                              log=lambda s: print(s, flush=True))
    val = validation_loss(model, corpus)
    path = save_checkpoint(model, corpus, args.out, steps=args.steps, val_loss=val,
                           eval_step=history.eval_step, train_loss=history.train_loss,
                           val_loss_curve=history.val_loss, torch_version=str(torch.__version__))
    print(f"validation loss (validation text in whole windows): {val:.4f}")
    print(f"wrote {path.name}: {path.stat().st_size / 1e6:.2f} MB, sha256 {sha256(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
