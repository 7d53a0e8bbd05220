"""Mechanistic interpretability on the book's GPT (book: chapter 6, "Inside the model").

The residual stream ``r_0 = E[x] + P``, ``r_{l+1} = r_l + Attn_l(r_l) + MLP_l(...)`` is the
one vector each position carries through the model; every method here reads or edits it.

* **Logit lens** :cite:p:`nostalgebraist2020logitlens`: decode every ``r_l`` as if it were
  the last, ``logits_l = W_U LN_f(r_l)``; at ``l = L`` this *is* the model's output.
* **Activation patching** :cite:p:`meng2022locating`: run a corrupted prompt, but put back
  the clean run's ``r_l`` at one position; how much of the clean answer returns says where
  the information that decides it lives.
* **Induction heads** :cite:p:`olsson2022induction`: heads that attend from a token to the
  token that *followed* its previous occurrence, and so copy ``[A][B] ... [A] -> [B]``;
  the toy model is an :class:`AttentionOnlyGPT` trained on :func:`in_context_bigram_batch`.
* **Linear probes with control tasks** :cite:p:`hewitt2019control`: selectivity is the
  probe's accuracy on the property minus its accuracy on random labels per token type.
* **Sparse autoencoders** :cite:p:`bricken2023monosemanticity`:
  ``f = ReLU(W_enc^T (x - b_dec) + b_enc)``, ``x_hat = W_dec^T f + b_dec``, trained on one
  layer's activations with an L1 penalty on ``f`` weighted by the decoder norms.

Everything works on :class:`~companion.transformer.GPT` through forward hooks, so the
same functions apply to the pretrained model (:mod:`companion.pretrained`) unchanged.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from companion._validate import check_callable, check_float, check_int, check_tensor
from companion.records import load_record, record_main, write_record
from companion.transformer import GPT, GPTConfig

# --------------------------------------------------------------------------- residual stream


def _check_model_ids(model, idx) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a companion.transformer.GPT, got {type(model).__name__}")
    model._check_ids("idx", idx)


def _site(model: GPT, layer: int) -> nn.Module:
    """The module whose input is the residual stream ``r_layer`` (the final norm for L)."""
    check_int("layer", layer, low=0, high=model.config.n_layer)
    return model.blocks[layer] if layer < model.config.n_layer else model.final_norm


@torch.no_grad()
def residual_stream(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The residual stream before each block and before the final norm: ``(L+1, B, T, C)``.

    Read with forward pre-hooks during the model's own forward pass.
    """
    _check_model_ids(model, idx)
    cache = []
    hooks = [_site(model, layer).register_forward_pre_hook(
        lambda module, args: cache.append(args[0].detach()))
        for layer in range(model.config.n_layer + 1)]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(cache)  # (L+1, B, T, C)


@torch.no_grad()
def logit_lens(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Each layer's residual stream decoded by the final norm and the unembedding:
    ``(L+1, B, T, V)``; the last entry equals ``model(idx)[0]``."""
    return model.lm_head(model.final_norm(residual_stream(model, idx)))


# --------------------------------------------------------------------------- patching


@contextlib.contextmanager
def patch_residual(model: GPT, layer: int, source: torch.Tensor, position=None):
    """While active, the residual stream ``r_layer`` is replaced by ``source``'s (a
    ``(B, T, C)`` tensor, e.g. ``residual_stream(model, clean)[layer]``) at ``position``
    (an int, a list or a slice; ``None``: every position)."""
    check_tensor("source", source, ndim=3, floating=True)
    where = slice(None) if position is None else position

    def hook(module, args):
        x = args[0].clone()
        x[:, where] = source[:, where].to(x)
        return (x, *args[1:])

    handle = _site(model, layer).register_forward_pre_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def logit_difference(logits: torch.Tensor, right: int, wrong: int) -> torch.Tensor:
    """``logit[right] - logit[wrong]`` at the last position, per batch row: ``(B,)``."""
    return logits[:, -1, right] - logits[:, -1, wrong]


@torch.no_grad()
def activation_patching(model: GPT, clean_idx: torch.Tensor, corrupted_idx: torch.Tensor,
                        metric) -> torch.Tensor:
    """``metric(logits)`` of the corrupted run with the clean ``r_l`` patched in at one
    layer ``l`` (0 .. L) and one position ``t``: ``(L+1, T)`` (``metric`` returns a scalar
    or a ``(B,)`` tensor, averaged over the batch)."""
    _check_model_ids(model, corrupted_idx)
    check_callable("metric", metric)
    if clean_idx.shape != corrupted_idx.shape:
        raise ValueError(f"clean_idx and corrupted_idx must have the same shape, got "
                         f"{tuple(clean_idx.shape)} and {tuple(corrupted_idx.shape)}")
    clean = residual_stream(model, clean_idx)  # (L+1, B, T, C)
    n_sites, T = clean.size(0), clean_idx.size(1)
    result = torch.empty(n_sites, T, dtype=clean.dtype)
    for layer in range(n_sites):
        for t in range(T):
            with patch_residual(model, layer, clean[layer], t):
                result[layer, t] = metric(model(corrupted_idx)[0]).mean()
    return result


# --------------------------------------------------------------------------- heads


@contextlib.contextmanager
def ablate_heads(model: GPT, heads):
    """While active, the outputs of ``heads`` (``(layer, head)`` pairs) are zero: their
    slice of the concatenated head outputs is zeroed before ``out_proj``."""
    heads = list(heads)
    c = model.config
    hs = c.n_embd // c.n_head
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        check_int("layer", layer, low=0, high=c.n_layer - 1)
        check_int("head", head, low=0, high=c.n_head - 1)
        by_layer.setdefault(layer, []).append(head)

    def make_hook(layer_heads):
        def hook(module, args):
            y = args[0].clone()  # (B, T, C): heads side by side
            for h in layer_heads:
                y[..., h * hs:(h + 1) * hs] = 0
            return (y,)
        return hook

    handles = [model.blocks[layer].attn.out_proj.register_forward_pre_hook(make_hook(hh))
               for layer, hh in by_layer.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def repeated_random_tokens(batch_size: int, length: int, vocab_size: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """``length`` uniformly random ids, then the same ids again: ``(B, 2 * length)``."""
    for name, value in (("batch_size", batch_size), ("length", length),
                        ("vocab_size", vocab_size)):
        check_int(name, value, low=1)
    first = torch.randint(vocab_size, (batch_size, length), generator=generator)
    return torch.cat([first, first], dim=1)


def _check_repeat(idx: torch.Tensor, length: int) -> None:
    check_int("length", length, low=1)
    if idx.size(1) != 2 * length:
        raise ValueError(f"idx must have 2 * length = {2 * length} positions, "
                         f"got {idx.size(1)}")


def induction_scores(model: GPT, idx: torch.Tensor, length: int) -> torch.Tensor:
    """Mean attention from each position ``i`` of the repeat (``length <= i < 2 length``)
    to ``i - length + 1``, the token after the previous occurrence: ``(L, n_head)``."""
    _check_repeat(idx, length)
    i = torch.arange(length, 2 * length)
    maps = model.attention_maps(idx)  # L x (B, nh, T, T)
    return torch.stack([m[:, :, i, i - length + 1].mean(dim=(0, 2)) for m in maps])


@torch.no_grad()
def token_losses(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token, ``(B, T-1)``; entry ``t`` predicts ``idx[:, t+1]``."""
    logits = model(idx[:, :-1])[0]
    return F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")


def in_context_gain(model: GPT, idx: torch.Tensor, length: int) -> float:
    """Mean loss on the first copy minus on the repeat (tokens 1 .. length-1 of each):
    near zero without in-context copying, up to ``log V`` with perfect copying."""
    _check_repeat(idx, length)
    losses = token_losses(model, idx)  # (B, 2 length - 1)
    return float(losses[:, :length - 1].mean() - losses[:, length:].mean())


# --------------------------------------------------------------------------- probes


def bracket_labels(text: str) -> torch.Tensor:
    """1 for each character inside at least one pair of round brackets, else 0: ``(N,)``.

    The opening bracket counts as inside, the closing one as outside; unmatched closing
    brackets are ignored."""
    depth, labels = 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)
        labels.append(int(depth > 0))
    return torch.tensor(labels)


def control_labels(ids: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Hewitt & Liang's control task: each token *type* gets one label, drawn from the
    empirical distribution of ``labels``; every occurrence of the type carries it."""
    check_tensor("ids", ids, ndim=1)
    check_tensor("labels", labels, ndim=1)
    if ids.shape != labels.shape:
        raise ValueError(f"ids and labels must have the same shape, got {tuple(ids.shape)} "
                         f"and {tuple(labels.shape)}")
    types = torch.unique(ids)
    draws = torch.randint(labels.numel(), (types.numel(),), generator=generator)
    table = torch.zeros(int(ids.max()) + 1, dtype=labels.dtype)
    table[types] = labels[draws]
    return table[ids]


def probe_accuracy(train_x, train_y, test_x, test_y, *, C: float = 1.0) -> float:
    """Test accuracy of a logistic-regression probe (scikit-learn, L2 penalty ``1/C``)
    fitted on the training features."""
    from sklearn.linear_model import LogisticRegression

    check_float("C", C, low=0.0, low_open=True)
    probe = LogisticRegression(C=C, max_iter=1000)
    probe.fit(_numpy(train_x), _numpy(train_y))
    return float(probe.score(_numpy(test_x), _numpy(test_y)))


def _numpy(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------- SAE


class SparseAutoencoder(nn.Module):
    """``f = ReLU((x - b_dec) W_enc + b_enc)``, ``x_hat = f W_dec + b_dec``.

    ``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)`` (SAELens's layout); the decoder starts
    as the encoder's transpose with unit-norm rows.
    """

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        check_int("d_in", d_in, low=1)
        check_int("d_sae", d_sae, low=1)
        W = torch.randn(d_sae, d_in)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)  # (N, d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec  # (N, d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, f)``."""
        f = self.encode(x)
        return self.decode(f), f


def sae_loss(sae: SparseAutoencoder, x: torch.Tensor, l1_coefficient: float) -> torch.Tensor:
    """``mean ||x - x_hat||^2 + l1 * mean sum_i f_i ||W_dec[i]||`` (Bricken et al.'s penalty:
    weighting by the decoder norm stops the model from shrinking ``f`` by growing ``W_dec``)."""
    x_hat, f = sae(x)
    penalty = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return (x - x_hat).pow(2).sum(-1).mean() + l1_coefficient * penalty


def train_sae(activations: torch.Tensor, d_sae: int, *, l1_coefficient: float = 1.0,
              steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
              seed: int = 0) -> tuple[SparseAutoencoder, list[float]]:
    """Fit a :class:`SparseAutoencoder` to ``activations (N, d_in)`` with Adam; ``b_dec``
    starts at their mean. Returns the SAE and its loss every step."""
    check_tensor("activations", activations, ndim=2, floating=True)
    check_float("l1_coefficient", l1_coefficient, low=0.0)
    torch.manual_seed(seed)
    sae = SparseAutoencoder(activations.size(1), d_sae).to(activations)
    with torch.no_grad():
        sae.b_dec.copy_(activations.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = activations[torch.randint(activations.size(0), (batch_size,),
                                          generator=generator)]
        loss = sae_loss(sae, batch, l1_coefficient)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sae, losses


@torch.no_grad()
def sae_statistics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """On ``x (N, d_in)``: ``explained_variance`` (1 - residual / total variance),
    ``l0`` (mean number of active features per row) and ``dead_fraction`` (features
    that never fire on ``x``)."""
    x_hat, f = sae(x)
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    active = f > 0
    return {"explained_variance": float(1 - residual / total),
            "l0": float(active.sum(1).double().mean()),
            "dead_fraction": float((~active.any(0)).double().mean())}


# --------------------------------------------------------------------------- a toy induction model
# Book: "Induction heads from scratch". A 2-layer attention-only model learns to copy
# ``[A][B] ... [A] -> [B]`` from in-context bigrams (each sequence has its own successor
# map, and a token recurs at random distances), so no fixed relative position solves the
# task: only a previous-token head in layer 0 composed with an induction head in layer 1
# does (Bietti et al. 2023).
# ``python -m companion.mechinterp --record induction`` trains three seeds and writes the
# JSON asset; the notebook re-trains a cheap prefix and checks it against the record.


class _NoMLP(nn.Module):
    """Stands in for a block's MLP and adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())


class AttentionOnlyGPT(GPT):
    """A :class:`~companion.transformer.GPT` whose blocks have no MLP:
    ``r_{l+1} = r_l + Attn_l(LN_l(r_l))`` :cite:p:`olsson2022induction`.

    The blocks are chapter 4's :class:`~companion.transformer.TransformerBlock` with the
    MLP (and its norm) replaced by a zero, so ``attention_maps``, :func:`ablate_heads` and
    :func:`logit_lens` apply unchanged. Conversion to Hugging Face is not supported.
    """

    def __init__(self, config):
        super().__init__(config)
        for block in self.blocks:
            block.mlp_norm = nn.Identity()
            block.mlp = _NoMLP()


def in_context_bigram_batch(batch_size: int, seq_len: int, vocab_size: int, noise: float,
                            generator: torch.Generator | None = None):
    """In-context bigrams :cite:p:`bietti2023birth`: each sequence draws its own successor
    map ``s`` (a random permutation of the ids); each next id is ``s(x_t)`` with
    probability ``1 - noise``, else uniformly random. A token recurs at random distances,
    so no fixed look-back predicts its successor: the model must find its previous
    occurrence and copy what followed it.

    Returns ``(x, y)``, both ``(B, T)`` with ``T = seq_len``: ``y[:, t]`` is the target
    ``x[:, t + 1]`` where the context predicts it (``x_t`` was already followed by
    ``s(x_t)`` before ``t``, and ``x_{t+1} = s(x_t)``), else ``-1``; ``y[:, -1] = -1``.
    """
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=2)
    check_int("vocab_size", vocab_size, low=2)
    check_float("noise", noise, low=0.0, high=1.0)
    B, T = batch_size, seq_len
    successor = torch.rand(B, vocab_size, generator=generator).argsort(dim=1)  # (B, V)
    follow = torch.rand(B, T, generator=generator) >= noise  # (B, T)
    x = torch.randint(vocab_size, (B, T), generator=generator)
    for t in range(1, T):
        x[:, t] = torch.where(follow[:, t], successor.gather(1, x[:, t - 1:t])[:, 0], x[:, t])
    mapped = torch.zeros(B, T, dtype=torch.bool)  # x_{t+1} = s(x_t)
    mapped[:, :-1] = x[:, 1:] == successor.gather(1, x[:, :-1])
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # (t, s): s < t
    same = x[:, :, None] == x[:, None, :]  # (B, t, s)
    seen = (same & mapped[:, None, :] & earlier).any(dim=-1)  # (B, T)
    y = torch.full_like(x, -1)
    y[:, :-1] = torch.where((seen & mapped)[:, :-1], x[:, 1:], -1)
    return x, y


def previous_token_scores(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position ``i >= 1`` to ``i - 1``: ``(L, n_head)``."""
    if idx.dim() != 2 or idx.size(1) < 2:
        raise ValueError(f"idx must have shape (batch, time) with time >= 2, "
                         f"got {tuple(idx.shape)}")
    i = torch.arange(1, idx.size(1))
    maps = model.attention_maps(idx)  # L x (B, nh, T, T)
    return torch.stack([m[:, :, i, i - 1].mean(dim=(0, 2)) for m in maps])


#: Where ``python -m companion.mechinterp --record induction`` writes the three runs.
INDUCTION_RECORD = Path(__file__).parent / "assets" / "induction_runs.json"
#: The toy model, its data, its training and its evaluation batch.
INDUCTION = {"vocab_size": 16, "seq_len": 64, "noise": 0.25, "n_embd": 32, "n_head": 2,
             "batch": 64, "lr": 3e-3, "steps": 5000, "eval_every": 100, "eval_length": 8,
             "eval_batch": 128, "eval_seed": 1000, "seeds": (0, 1, 2)}


def induction_model(seed: int = 0) -> AttentionOnlyGPT:
    """The untrained 2-layer attention-only model of :data:`INDUCTION`, seeded."""
    c = INDUCTION
    torch.manual_seed(seed)
    return AttentionOnlyGPT(GPTConfig(vocab_size=c["vocab_size"], block_size=c["seq_len"],
                                      n_layer=2, n_head=c["n_head"], n_embd=c["n_embd"]))


def induction_eval_ids() -> torch.Tensor:
    """The fixed evaluation batch: ``eval_length`` random ids, then the same again."""
    c = INDUCTION
    return repeated_random_tokens(c["eval_batch"], c["eval_length"], c["vocab_size"],
                                  torch.Generator().manual_seed(c["eval_seed"]))


@torch.no_grad()
def copy_losses(model: GPT, idx: torch.Tensor, length: int) -> tuple[float, float]:
    """Mean next-token loss on the first copy and on the repeat of ``idx``
    (``(B, 2 length)``), tokens 1 .. length-1 of each: the terms of :func:`in_context_gain`."""
    _check_repeat(idx, length)
    losses = token_losses(model, idx)  # (B, 2 length - 1)
    return float(losses[:, :length - 1].mean()), float(losses[:, length:].mean())


def induction_task_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out batch of the training task, :func:`in_context_bigram_batch`."""
    c = INDUCTION
    return in_context_bigram_batch(c["eval_batch"], c["seq_len"], c["vocab_size"], c["noise"],
                                   torch.Generator().manual_seed(c["eval_seed"] + 1))


@torch.no_grad()
def task_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean loss on the in-context predictable targets ``y >= 0`` of a task batch."""
    logits = model(x)[0]  # (B, T, V)
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1))


def train_induction_model(seed: int, steps: int | None = None) -> dict:
    """Train :func:`induction_model` on :func:`in_context_bigram_batch` with Adam.

    The loss is the next-token loss on every position (which keeps the predictions on
    unpredictable tokens calibrated) plus the loss on the in-context predictable targets
    alone (weighting them shortens the plateau before the model learns to copy). Every
    ``eval_every`` steps it records the first-copy and repeat losses on
    :func:`induction_eval_ids` and the :func:`task_loss` on :func:`induction_task_batch`;
    it returns them and the model."""
    c = INDUCTION
    steps = c["steps"] if steps is None else check_int("steps", steps, low=1)
    model = induction_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=c["lr"])
    generator = torch.Generator().manual_seed(seed)
    ids, task = induction_eval_ids(), induction_task_batch()
    record = {"step": [], "first": [], "repeat": [], "task": []}
    for step in range(1, steps + 1):
        x, y = in_context_bigram_batch(c["batch"], c["seq_len"], c["vocab_size"], c["noise"],
                                       generator)
        logits = model(x)[0]  # (B, T, V)
        loss = (F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
                + F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % c["eval_every"] == 0 or step == steps:
            model.eval()
            first, repeat = copy_losses(model, ids, c["eval_length"])
            record["task"].append(task_loss(model, *task))
            model.train()
            record["step"].append(step)
            record["first"].append(first)
            record["repeat"].append(repeat)
    model.eval()
    record["model"] = model
    return record


@torch.no_grad()
def analyse_induction(model: GPT, idx: torch.Tensor, length: int) -> dict:
    """Per head ``(L, n_head)`` lists: ``induction`` and ``previous`` scores, and
    ``ablated_gain``, the in-context gain with that one head ablated; ``gain`` and
    ``layer_ablated_gain`` (every head of one layer ablated, one value per layer)."""
    c = model.config
    ablated = [[0.0] * c.n_head for _ in range(c.n_layer)]
    for layer in range(c.n_layer):
        for head in range(c.n_head):
            with ablate_heads(model, [(layer, head)]):
                ablated[layer][head] = in_context_gain(model, idx, length)
    layer_ablated = []
    for layer in range(c.n_layer):
        with ablate_heads(model, [(layer, h) for h in range(c.n_head)]):
            layer_ablated.append(in_context_gain(model, idx, length))
    induction = induction_scores(model, idx, length)  # (L, nh)
    previous = previous_token_scores(model, idx)  # (L, nh)
    groups = head_groups(induction, previous)
    group_ablated = {}
    for name, heads in groups.items():
        with ablate_heads(model, heads):
            group_ablated[name] = in_context_gain(model, idx, length)
    return {"induction": induction.tolist(), "previous": previous.tolist(),
            "gain": in_context_gain(model, idx, length), "ablated_gain": ablated,
            "layer_ablated_gain": layer_ablated, "groups": groups,
            "group_ablated_gain": group_ablated}


def head_groups(induction: torch.Tensor, previous: torch.Tensor) -> dict[str, list]:
    """Split heads by their scores (both ``(L, n_head)``): ``"induction"``, those with at
    least half the best induction score; ``"previous"``, the others with at least half
    the best previous-token score; ``"other"``, the rest. Lists of ``[layer, head]``."""
    check_tensor("induction", induction, ndim=2, floating=True)
    check_tensor("previous", previous, ndim=2, floating=True)
    if induction.shape != previous.shape:
        raise ValueError(f"induction and previous must have the same shape, got "
                         f"{tuple(induction.shape)} and {tuple(previous.shape)}")
    is_induction = induction >= induction.max() / 2
    best_previous = previous.masked_fill(is_induction, -math.inf).max()
    is_previous = ~is_induction & (previous >= best_previous / 2)
    groups = {"induction": is_induction, "previous": is_previous,
              "other": ~is_induction & ~is_previous}
    return {name: mask.nonzero().tolist() for name, mask in groups.items()}


def record_induction(path: str | Path = INDUCTION_RECORD, log=print, seeds=None) -> dict:
    """Train every seed of :data:`INDUCTION` (or only ``seeds``); write each run's curves
    and analysis."""
    c, runs = INDUCTION, []
    ids = induction_eval_ids()
    for seed in c["seeds"] if seeds is None else seeds:
        run = train_induction_model(seed)
        model = run.pop("model")
        run.update(seed=seed, **analyse_induction(model, ids, c["eval_length"]))
        runs.append(run)
        log(f"seed {seed}: repeat loss {run['repeat'][-1]:.3f}, gain {run['gain']:.3f}")
    return write_record(path, "2-layer attention-only models trained on in-context bigrams "
                        "(companion.mechinterp.record_induction)", c, runs=runs)


def load_induction(path: str | Path = INDUCTION_RECORD) -> dict:
    """The recorded runs; ``ValueError`` if they were made with other settings."""
    return load_record(path, INDUCTION, "python -m companion.mechinterp --record induction")


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.mechinterp --record induction [--out PATH] [--seeds S ...]``."""
    seeds = {"type": int, "nargs": "*", "default": None,
             "help": "only these seeds (to record them in parallel, then merge)"}
    return record_main("python -m companion.mechinterp", {"induction": record_induction}, argv,
                       description="Record the chapter's training runs.",
                       options={"--seeds": seeds}, threads=1)


if __name__ == "__main__":
    raise SystemExit(main())
