r"""Attributions that are computed and then checked (book: chapter 6, "Interpretability").

An *attribution* assigns to every input feature a share of one output of a model.
This module implements the pieces the chapter derives and tests:

* :func:`integrated_gradients` -- Integrated Gradients :cite:p:`sundararajan2017axiomatic`
  from its definition, with the quadrature rules of :func:`path_quadrature`; the unit
  tests compare it with Captum's :cite:p:`kokhlikyan2020captum`
  ``captum.attr.IntegratedGradients``.
* :func:`forward_from_layer` -- a model as a function of one layer's output, to attribute
  to token embeddings (Captum's ``LayerIntegratedGradients``).
* :func:`token_ablation` and :func:`continuation_integrated_gradients` -- attributions of
  a generated continuation's log-probability :math:`\sum_j \log p(c_j \mid x, c_{<j})`
  to the prompt's tokens, the quantities of Captum's ``LLMAttribution`` and
  ``LLMGradientAttribution`` (:class:`CaptumTokenizer` lets those run on the book's
  character tokenizer).
* :func:`shapley_values` -- exact Shapley values of a few feature groups, by enumerating
  every coalition: the quantity that SHAP :cite:p:`lundberg2017unified` estimates.
* :func:`perturbation_curve` -- deletion and insertion curves
  :cite:p:`petsiuk2018rise`: does removing the highest-attributed features hurt most?
* :func:`cascading_randomization` and :func:`rank_correlation` -- the model-randomisation
  sanity check :cite:p:`adebayo2018sanity`.
* :func:`attention_rollout` -- attention flow through the layers of a Transformer
  :cite:p:`abnar2020quantifying`.

Every function takes batch-first tensors, ``(B, ...)``, and works on any device; ``(B,)``
means one feature per example. Data (inputs, baselines given as arrays, attributions,
masks, attention maps) must be tensors; numbers (``n_steps``, a constant baseline,
``residual_weight``, ...) may be Python or NumPy scalars, and ``target`` may be an int, a
sequence of ints, a NumPy integer array or a tensor. A wrong type raises ``TypeError``, a
wrong value or shape ``ValueError``; the checks are in ``companion/_validate.py``. The
figures of attributions are drawn by :func:`companion.plotting.show_image_attributions`
and :func:`companion.plotting.show_text_attribution`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from companion._validate import (
    check_baselines,
    check_batch,
    check_callable,
    check_int,
    check_target,
    is_integer,
    is_real,
)

#: The quadrature rules of :func:`path_quadrature` (Captum's names).
QUADRATURE_METHODS = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)

__all__ = [
    "QUADRATURE_METHODS",
    "path_quadrature",
    "integrated_gradients",
    "forward_from_layer",
    "shapley_values",
    "continuation_log_probs",
    "token_ablation",
    "continuation_integrated_gradients",
    "CaptumTokenizer",
    "TEXT_DELETION",
    "TEXT_DELETION_RECORD",
    "embedding_ig",
    "deletion_windows",
    "text_orderings",
    "deletion_study",
    "record_text_deletion",
    "load_text_deletion",
    "PerturbationCurve",
    "perturbation_curve",
    "rank_correlation",
    "randomizable_layers",
    "cascading_randomization",
    "attention_rollout",
]


# --------------------------------------------------------------------------- integrated gradients


def path_quadrature(method: str = "riemann_trapezoid", n_steps: int = 50, *,
                    dtype: torch.dtype = torch.float64, device=None) -> tuple[Tensor, Tensor]:
    r"""Nodes :math:`\alpha_k \in [0, 1]` and weights :math:`w_k` of a quadrature rule.

    :math:`\sum_k w_k\, g(\alpha_k) \approx \int_0^1 g(\alpha)\, d\alpha`, with ``n_steps``
    nodes. The Riemann rules use equal weights :math:`1/n` at the left ends, right ends
    or midpoints of :math:`n` equal intervals; the trapezoid rule puts its :math:`n` nodes
    at :math:`k / (n - 1)` with weights :math:`1/(n-1)`, halved at both ends; Gauss-Legendre
    uses the roots of the Legendre polynomial :math:`P_n`, exact for polynomials of degree
    :math:`2n - 1`. The weights always sum to one.

    Nodes and weights are computed in float64 and then cast to ``dtype``. (Captum 0.9
    differs in two ways. Its Riemann nodes come from ``torch.linspace`` in the default
    dtype, float32 unless changed, and it casts every rule's weights to float32; its
    Gauss-Legendre nodes stay float64. And its ``riemann_trapezoid`` weights are
    :math:`1/n`, halved at the ends, which sum to :math:`(n - 1)/n`. Book section
    "Integrated Gradients from its definition".)

    Returns
    -------
    alphas, weights : two ``(n_steps,)`` tensors
    """
    if method not in QUADRATURE_METHODS:
        raise ValueError(f"method must be one of {QUADRATURE_METHODS}, got {method!r}")
    minimum = 2 if method == "riemann_trapezoid" else 1
    if not is_integer(n_steps):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if n_steps < minimum:
        raise ValueError(f"n_steps must be an int >= {minimum} for {method}, got {n_steps!r}")
    n = int(n_steps)
    f64 = dict(dtype=torch.float64)
    weights = torch.full((n,), 1.0 / n, **f64)
    if method == "riemann_left":
        alphas = torch.linspace(0.0, 1.0 - 1.0 / n, n, **f64)
    elif method == "riemann_right":
        alphas = torch.linspace(1.0 / n, 1.0, n, **f64)
    elif method == "riemann_middle":
        alphas = torch.linspace(0.5 / n, 1.0 - 0.5 / n, n, **f64)
    elif method == "riemann_trapezoid":
        alphas = torch.linspace(0.0, 1.0, n, **f64)
        weights = torch.full((n,), 1.0 / (n - 1), **f64)
        weights[[0, -1]] /= 2
    else:  # Gauss-Legendre on [-1, 1], mapped to [0, 1]
        nodes, node_weights = np.polynomial.legendre.leggauss(n)
        alphas, weights = torch.from_numpy((nodes + 1) / 2), torch.from_numpy(node_weights / 2)
    return alphas.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


def integrated_gradients(forward_func: Callable[[Tensor], Tensor], inputs: Tensor,
                         baselines=None, target=None, n_steps: int = 50,
                         method: str = "riemann_trapezoid",
                         return_convergence_delta: bool = False):
    r"""Integrated Gradients of ``forward_func`` at ``inputs``, by hand.

    For an input :math:`x`, a baseline :math:`x'` and the explained output :math:`F`,

    .. math::

        \operatorname{IG}_i(x) = (x_i - x'_i) \int_0^1
            \frac{\partial F}{\partial x_i}\bigl(x' + \alpha (x - x')\bigr)\, d\alpha
        \approx (x_i - x'_i) \sum_{k=1}^{n} w_k\,
            \frac{\partial F}{\partial x_i}\bigl(x' + \alpha_k (x - x')\bigr),

    with the nodes and weights of :func:`path_quadrature`. All ``n_steps`` points of all
    ``B`` paths go through ``forward_func`` as one batch of ``n_steps * B`` rows, and one
    backward pass gives every gradient (call it on slices of ``inputs`` if that batch does
    not fit in memory). By the fundamental theorem of calculus the
    attributions add up to :math:`F(x) - F(x')` (*completeness*); the quadrature error is
    the convergence delta. Book: chapter 6, "Integrated Gradients from its definition".

    Parameters
    ----------
    forward_func:
        Maps a ``(N, ...)`` batch to ``(N,)`` outputs or ``(N, C)`` outputs (logits,
        probabilities). Rows must not interact: put the model in ``eval()`` mode.
    inputs:
        ``(B, ...)`` floating-point tensor.
    baselines:
        ``None`` (zeros), a number, or a tensor of shape ``(B, ...)`` or ``(1, ...)``.
    target:
        Which output to explain when ``forward_func`` returns ``(N, C)``: an int for every
        example, or ``B`` ints (list or tensor). Must be ``None`` for ``(N,)`` outputs.
    n_steps, method:
        Quadrature nodes and rule, one of :data:`QUADRATURE_METHODS`.
    return_convergence_delta:
        Also return :math:`\sum_i \operatorname{IG}_i - (F(x) - F(x'))` per example.

    Returns
    -------
    attributions : ``(B, ...)`` tensor, like ``inputs``
    delta : ``(B,)`` tensor, only if ``return_convergence_delta``
    """
    check_callable("forward_func", forward_func)
    inputs = check_batch("inputs", inputs)
    baselines = check_baselines(inputs, baselines)
    alphas, weights = path_quadrature(method, n_steps, dtype=inputs.dtype, device=inputs.device)
    n_examples, feature_dims = inputs.shape[0], (1,) * inputs.dim()

    difference = (inputs - baselines).detach()  # (B, ...)
    # Points on the straight paths, step-major: rows k*B .. k*B+B-1 are step k.
    path = baselines.detach() + alphas.view(n_steps, *feature_dims) * difference  # (n, B, ...)
    path = path.flatten(0, 1).requires_grad_(True)  # (n * B, ...)
    with torch.enable_grad():
        explained = _explained(forward_func(path), target, n_examples, n_steps)  # (n * B,)
        # Rows do not interact, so the gradient of the sum holds every row's own gradient.
        gradients = (torch.autograd.grad(explained.sum(), path, allow_unused=True)[0]
                     if explained.requires_grad else None)
    if gradients is None:  # forward_func ignores its input
        gradients = torch.zeros_like(path)
    gradients = gradients.view(n_steps, *inputs.shape)  # (n, B, ...)
    average_gradient = (weights.view(n_steps, *feature_dims) * gradients).sum(0)  # (B, ...)
    attributions = difference * average_gradient
    if not return_convergence_delta:
        return attributions
    with torch.no_grad():
        at_inputs = _explained(forward_func(inputs), target, n_examples, 1)
        start = baselines.expand_as(inputs).contiguous()
        at_baselines = _explained(forward_func(start), target, n_examples, 1)
    delta = _rows(attributions).sum(1) - (at_inputs - at_baselines)
    return attributions, delta


def forward_from_layer(forward_func: Callable[[Tensor], Tensor], layer: nn.Module,
                       inputs: Tensor) -> Callable[[Tensor], Tensor]:
    r"""``forward_func(inputs)`` as a function of the output of ``layer``.

    Returns :math:`g` with :math:`g(h)` = ``forward_func(inputs)`` computed with the output
    of ``layer`` replaced by :math:`h` (a forward hook, removed afterwards). Then
    ``integrated_gradients(g, layer(inputs), layer(baseline_inputs), ...)`` attributes the
    output to the layer's activations -- for a token embedding, to each token's embedding
    vector -- which is what Captum's ``LayerIntegratedGradients`` does. :math:`h` may have
    :math:`k B` rows for ``inputs`` of :math:`B` rows (the :math:`k` steps of IG's paths,
    step-major); ``inputs`` are repeated :math:`k` times to match. Book: chapter 6, text.
    """
    check_callable("forward_func", forward_func)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
    inputs = check_batch("inputs", inputs, floating=False)

    def forward(layer_output: Tensor) -> Tensor:
        repeats, rest = divmod(layer_output.shape[0], inputs.shape[0])
        if rest or repeats == 0:
            raise ValueError(f"the layer output has {layer_output.shape[0]} rows, not a "
                             f"multiple of the {inputs.shape[0]} rows of inputs")
        handle = layer.register_forward_hook(lambda module, args, output: layer_output)
        try:
            return forward_func(inputs.repeat(repeats, *[1] * (inputs.dim() - 1)))
        finally:
            handle.remove()

    return forward


# --------------------------------------------------------------------------- Shapley values


def shapley_values(forward_func: Callable[[Tensor], Tensor], inputs: Tensor, baselines=None,
                   target=None, *, feature_mask: Tensor, max_groups: int = 16,
                   batch_size: int | None = None) -> Tensor:
    r"""Exact Shapley values of the feature groups in ``feature_mask``.

    The features of each example are split into :math:`M` groups (``feature_mask`` holds a
    group id ``0 .. M-1`` per feature, shared by every example). A coalition :math:`S` of
    groups keeps their features from the input and takes the others from the baseline;
    :math:`v(S)` is the explained output on that mixture. The Shapley value of group
    :math:`i` is its average marginal contribution over all orders of arrival:

    .. math::

        \phi_i = \sum_{S \subseteq M \setminus \{i\}}
            \frac{|S|!\,(M - |S| - 1)!}{M!}\, \bigl(v(S \cup \{i\}) - v(S)\bigr),

    and the :math:`\phi_i` add up to :math:`v(M) - v(\varnothing) = F(x) - F(x')`. All
    :math:`2^M` coalitions of all :math:`B` examples make :math:`2^M B` rows, hence
    ``max_groups``; they go through ``forward_func`` in one batch, or in batches of
    ``batch_size`` rows -- the same values, since rows do not interact, and on a CPU
    batches whose activations fit in its caches can run a few times faster. KernelSHAP and
    LIME estimate such values from samples of coalitions
    :cite:p:`lundberg2017unified,ribeiro2016why`. Book: chapter 6, "Where LIME and SHAP
    fit".

    Returns a tensor shaped like ``inputs`` in which every feature carries the value of its
    group (Captum's convention for ``feature_mask``).
    """
    check_callable("forward_func", forward_func)
    inputs = check_batch("inputs", inputs)
    baselines = check_baselines(inputs, baselines)
    groups = _check_feature_mask(feature_mask, inputs, max_groups)  # (D,): group of feature j
    n_groups = int(groups.max()) + 1
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, low=1)

    n_examples, n_coalitions = inputs.shape[0], 2 ** n_groups
    ids = torch.arange(n_coalitions, device=inputs.device)  # coalition S as a bit set
    bits = 1 << torch.arange(n_groups, device=inputs.device)  # (M,)
    members = (ids[:, None] & bits) != 0  # (2^M, M): is group i in S?
    keep = members[:, groups]  # (2^M, D): is feature j taken from the input?
    x, b = _rows(inputs), _rows(baselines.expand_as(inputs))  # (B, D)
    with torch.no_grad():
        mixtures = torch.where(keep[:, None, :], x, b)  # (2^M, B, D)
        rows = mixtures.reshape(n_coalitions * n_examples, *inputs.shape[1:])
        outputs = [forward_func(batch) for batch in rows.split(batch_size or len(rows))]
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        value = _explained(output, target, n_examples, n_coalitions)
    value = value.view(n_coalitions, n_examples)  # v(S) for every S and example
    # |S|! (M - |S| - 1)! / M! = 1 / (M * binom(M - 1, |S|)), for |S| = 0 .. M-1
    weight_of_size = torch.tensor([1.0 / (n_groups * math.comb(n_groups - 1, s))
                                   for s in range(n_groups)] + [0.0],
                                  dtype=value.dtype, device=value.device)
    weight = weight_of_size[members.sum(1)]  # (2^M,)
    phi = torch.empty(n_examples, n_groups, dtype=value.dtype, device=value.device)
    for i in range(n_groups):  # one vectorised sum over all 2^(M-1) coalitions per group
        without_i = ids[~members[:, i]]  # S with i not in S
        gain = value[without_i | bits[i]] - value[without_i]  # (2^(M-1), B)
        phi[:, i] = weight[without_i] @ gain
    return phi[:, groups].view_as(inputs)


# --------------------------------------------------------------------------- deletion / insertion


@dataclass(frozen=True)
class PerturbationCurve:
    """The explained output as features are deleted or inserted in attribution order.

    ``fractions`` is ``(K,)``: the fraction of features perturbed at each point;
    ``scores`` is ``(B, K)``: the explained output of each example at each point.
    """

    mode: str
    fractions: Tensor
    scores: Tensor

    def area(self) -> Tensor:
        """Area under each example's curve, ``(B,)`` (trapezoid rule over ``fractions``).

        Deletion: a smaller area means the attribution found the features that matter.
        Insertion: a larger area does.
        """
        return torch.trapezoid(self.scores, self.fractions, dim=-1)


def perturbation_curve(forward_func: Callable[[Tensor], Tensor], inputs: Tensor,
                       attributions: Tensor, target=None, *, baselines=None,
                       mode: str = "deletion", n_points: int | None = None) -> PerturbationCurve:
    r"""Deletion or insertion curve of ``attributions`` :cite:p:`petsiuk2018rise`.

    Features are ranked by attribution, largest first (ties in feature order). The
    *deletion* curve replaces the top :math:`k` features of each input by the baseline and
    records the explained output, for :math:`k = 0 \dots D`; the *insertion* curve starts
    from the baseline and puts the top :math:`k` features back. If the attribution is
    right, the deletion curve falls faster -- and the insertion curve rises faster -- than
    for a random ranking. All points go through ``forward_func`` as one batch of
    :math:`K B` rows. Book: chapter 6, "Are the explanations right?".

    Parameters
    ----------
    inputs:
        ``(B, ...)``; may be integer (token ids), in which case ``baselines`` holds ids too.
    attributions:
        Floating tensor of the shape of ``inputs``; pass a random tensor for the random
        ranking that every curve should beat.
    n_points:
        Number of points :math:`K`, evenly spaced in :math:`k`; default: every
        :math:`k = 0 \dots D`.
    """
    check_callable("forward_func", forward_func)
    inputs = check_batch("inputs", inputs, floating=False)
    attributions = _check_attributions(attributions, inputs)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    baselines = check_baselines(inputs, baselines)
    n_examples, n_features = inputs.shape[0], inputs[0].numel()
    counts = _feature_counts(n_points, n_features, inputs.device)  # (K,): values of k

    order = torch.argsort(_rows(attributions), dim=1, descending=True, stable=True)  # (B, D)
    rank = torch.empty_like(order)  # rank[b, j] = position of feature j in the ranking
    rank.scatter_(1, order, torch.arange(n_features, device=order.device).expand_as(order))
    top_k = rank[None] < counts[:, None, None]  # (K, B, D): among the first k features?
    x, b = _rows(inputs), _rows(baselines.expand_as(inputs))  # (B, D)
    with torch.no_grad():
        perturbed = torch.where(top_k, b, x) if mode == "deletion" else torch.where(top_k, x, b)
        rows = perturbed.reshape(len(counts) * n_examples, *inputs.shape[1:])
        scores = _explained(forward_func(rows), target, n_examples, len(counts))
    scores = scores.view(len(counts), n_examples).T  # (B, K)
    return PerturbationCurve(mode, counts.to(scores.dtype) / n_features, scores)


# --------------------------------------------------------------------------- generated text


def continuation_log_probs(logits_func: Callable[[Tensor], Tensor], prompts: Tensor,
                           continuation: Tensor) -> Tensor:
    r"""``(B, C)``: :math:`\log p(c_j \mid \text{prompt}_b, c_{<j})` for every prompt row.

    The continuation ``(C,)`` is appended to each prompt of ``prompts (B, P)`` and scored
    in one teacher-forced pass of ``logits_func`` (ids ``(B, L)`` to logits ``(B, L, V)``),
    as Captum's ``LLMAttribution`` does with ``forward_in_tokens=False``.
    Book: chapter 6, "Captum for language models".
    """
    check_callable("logits_func", logits_func)
    prompts = check_batch("prompts", prompts, floating=False)
    continuation = _check_ids("continuation", continuation)
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be (B, P) ids with P >= 1, got {tuple(prompts.shape)}")
    n_prompt, n_new = prompts.shape[1], len(continuation)
    ids = torch.cat([prompts, continuation.to(prompts.device).expand(len(prompts), -1)], 1)
    logits = logits_func(ids)[:, n_prompt - 1 : n_prompt - 1 + n_new]  # (B, C, V)
    picked = continuation.to(logits.device).expand(len(prompts), -1)[..., None]
    return logits.log_softmax(-1).gather(-1, picked)[..., 0]


def token_ablation(logits_func: Callable[[Tensor], Tensor], prompt: Tensor,
                   continuation: Tensor, baseline: int) -> Tensor:
    r"""Leave-one-token-out attributions of a continuation, ``(1 + C, P)``.

    Entry :math:`(1 + j, i)` is :math:`\log p(c_j \mid \ldots) - \log p(c_j \mid \ldots)`
    with prompt token :math:`i` replaced by ``baseline``; row 0 is their sum over
    :math:`j`, the change of the continuation's log-probability. This is the layout of
    Captum's ``LLMAttribution(FeatureAblation(...))``: ``seq_attr`` is row 0, ``token_attr``
    the rest. All :math:`P + 1` prompts go through ``logits_func`` as one batch.
    Book: chapter 6, "Captum for language models".
    """
    prompt = _check_ids("prompt", prompt)
    if not is_integer(baseline):
        raise TypeError(f"baseline must be a token id (int), got {type(baseline).__name__}")
    positions = torch.arange(len(prompt), device=prompt.device)
    ablated = prompt.repeat(len(prompt) + 1, 1)  # (1 + P, P): row 0 intact
    ablated[positions + 1, positions] = int(baseline)
    log_probs = continuation_log_probs(logits_func, ablated, continuation)  # (1 + P, C)
    per_token = (log_probs[0] - log_probs[1:]).T  # (C, P)
    return torch.cat([per_token.sum(0, keepdim=True), per_token])


def continuation_integrated_gradients(logits_func: Callable[[Tensor], Tensor],
                                      embedding: nn.Module, prompt: Tensor,
                                      continuation: Tensor, baseline: int,
                                      n_steps: int = 50,
                                      method: str = "gausslegendre") -> Tensor:
    r"""IG of each generated token's log-probability on the prompt's embeddings, ``(C, P)``.

    For token :math:`c_j` the input is the prompt followed by :math:`c_{<j}`; the path
    runs from the embeddings of ``baseline`` at every prompt position (the continuation
    kept) to those of the input, and the attribution of a prompt token is the sum over
    its embedding dimensions. This is what Captum's
    ``LLMGradientAttribution(LayerIntegratedGradients(model, embedding))`` computes,
    with :func:`integrated_gradients` and :func:`forward_from_layer`.
    Book: chapter 6, "Captum for language models".
    """
    prompt = _check_ids("prompt", prompt)
    continuation = _check_ids("continuation", continuation).to(prompt.device)
    if not is_integer(baseline):
        raise TypeError(f"baseline must be a token id (int), got {type(baseline).__name__}")
    rows = []
    for j in range(len(continuation)):
        ids = torch.cat([prompt, continuation[:j]])[None]  # (1, P + j)
        start = torch.cat([torch.full_like(prompt, int(baseline)), continuation[:j]])[None]

        def log_probs(ids_):
            return logits_func(ids_)[:, -1].log_softmax(-1)

        attributions = integrated_gradients(
            forward_from_layer(log_probs, embedding, ids), embedding(ids).detach(),
            embedding(start).detach(), target=continuation[j : j + 1], n_steps=n_steps,
            method=method)  # (1, P + j, d)
        rows.append(attributions[0, : len(prompt)].sum(-1))
    return torch.stack(rows)


class CaptumTokenizer:
    """A character tokenizer with the Hugging Face methods Captum's LLM classes call.

    ``TextTokenInput``, ``LLMAttribution`` and ``LLMGradientAttribution`` encode text,
    decode ids, convert between ids and tokens and ask for character offsets; this
    adapter answers those calls for :class:`companion.data.CharTokenizer`, which has no
    special tokens. Book: chapter 6, "Captum for language models".
    """

    def __init__(self, tokenizer):
        if not (hasattr(tokenizer, "stoi") and hasattr(tokenizer, "itos")):
            raise TypeError("tokenizer must be a CharTokenizer (with stoi and itos), got "
                            f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors=None):
        ids = self.tokenizer.encode(text)
        return ids[None] if return_tensors == "pt" else ids.tolist()

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids)

    def __call__(self, text: str, return_offsets_mapping: bool = False, **kwargs) -> dict:
        encoded = {"input_ids": self.encode(text)}
        if return_offsets_mapping:
            encoded["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return encoded

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.tokenizer.itos[i] for i in torch.as_tensor(ids).flatten().tolist()]

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        return [self.tokenizer.stoi[token] for token in tokens]


# ------------------------------------------------------------ section 6b's deletion test

#: Section 6b's deletion test -- windows of the validation text, IG against spaces with
#: Gauss-Legendre steps, points per curve, draws of random replacement characters.
TEXT_DELETION = {"n_windows": 24, "length": 64, "n_steps": 32, "n_points": 17, "n_draws": 2}

#: Where the recorded deletion test lies (see :func:`record_text_deletion`).
TEXT_DELETION_RECORD = Path(__file__).resolve().parent / "assets" / "text_deletion.json"


def embedding_ig(next_logits: Callable[[Tensor], Tensor], embedding: nn.Module, ids: Tensor,
                 baseline: int, target, n_steps: int = 32) -> Tensor:
    """IG of ``next_logits(ids)[target]`` per token, ``(B, T)``, against all-``baseline`` ids.

    The path runs on the token embeddings (:func:`forward_from_layer`) with Gauss-Legendre
    steps; each token's attribution is the sum over its embedding dimensions.
    """
    return integrated_gradients(
        forward_from_layer(next_logits, embedding, ids), embedding(ids).detach(),
        embedding(torch.full_like(ids, baseline)).detach(), target=target, n_steps=n_steps,
        method="gausslegendre").sum(-1)


def deletion_windows(validation: Tensor, space: int, n_windows: int = 24, length: int = 64,
                     n_draws: int = 2) -> tuple[Tensor, list[Tensor]]:
    """``n_windows`` windows ``(N, length)`` spaced evenly over ``validation``, and
    ``n_draws`` texts of the same shape of its non-space characters drawn at random (seed 0).
    """
    starts = torch.linspace(0, len(validation) - length - 1, n_windows).long()
    sample = validation[starts[:, None] + torch.arange(length)]  # (N, length)
    non_space = validation[validation != space]
    draws = torch.Generator().manual_seed(0)
    return sample, [non_space[torch.randint(len(non_space), sample.shape, generator=draws)]
                    for _ in range(n_draws)]


def text_orderings(model: nn.Module, sample: Tensor, ig: Tensor) -> dict[str, Tensor]:
    """The rankings section 6b tests, each ``(N, T)``: IG, the last layer's attention of the
    last position (mean over heads), rollout, recency and a random ranking (seed 0)."""
    maps = model.attention_maps(sample)
    n_windows, length = sample.shape
    return {"IG": ig,
            "attention, last layer": maps[-1].mean(1)[:, -1, :],
            "attention rollout": attention_rollout(maps)[:, -1, :],
            "recency": torch.arange(length, dtype=torch.float32,
                                    device=sample.device).expand(n_windows, length),
            "random": torch.rand(n_windows, length, generator=torch.Generator().manual_seed(0)
                                 ).to(sample.device)}


def deletion_study(forward_func: Callable[[Tensor], Tensor], inputs: Tensor,
                   orderings: dict[str, Tensor], target, replacements: dict,
                   n_points: int | None = None) -> dict[str, dict[str, PerturbationCurve]]:
    """Deletion curves ``{replacement: {ordering: curve}}`` of every ordering under every
    replacement (a token id or ids shaped like ``inputs``), by :func:`perturbation_curve`."""
    return {how: {name: perturbation_curve(forward_func, inputs, scores, target,
                                           baselines=baseline, n_points=n_points)
                  for name, scores in orderings.items()}
            for how, baseline in replacements.items()}


def _deletion_setup():
    """The pretrained GPT on the CPU, its next-character logits, section 6b's windows and
    random texts (:data:`TEXT_DELETION`), the predicted characters and the space id."""
    from companion.pretrained import load_pretrained_gpt

    model, corpus = load_pretrained_gpt("cpu")
    s, space = TEXT_DELETION, corpus.tokenizer.stoi[" "]
    sample, texts = deletion_windows(corpus.val_ids, space, s["n_windows"], s["length"],
                                     s["n_draws"])

    def next_logits(ids):
        return model(ids)[0][:, -1, :]

    with torch.no_grad():
        target = next_logits(sample).argmax(-1)
    return model, next_logits, sample, texts, target, space


def record_text_deletion(path: str | Path = TEXT_DELETION_RECORD) -> dict:
    """Run section 6b's deletion test in full (:data:`TEXT_DELETION`) and write it as JSON.

    Loads the pretrained GPT on the CPU, attributes every window with :func:`embedding_ig`
    and records IG and every curve's scores; tens of seconds of CPU time, so the book
    reads the record (:func:`load_text_deletion`) and re-computes its first windows to
    check it. Returns what was written.
    """
    model, next_logits, sample, texts, target, space = _deletion_setup()
    s = TEXT_DELETION
    ig = embedding_ig(next_logits, model.token_embedding, sample, space, target, s["n_steps"])
    replacements = {"spaces": space} | {f"random {k}": t for k, t in enumerate(texts)}
    study = deletion_study(lambda ids: next_logits(ids).softmax(-1), sample,
                           text_orderings(model, sample, ig), target, replacements,
                           s["n_points"])
    record = {"what": "section 6b's deletion test (companion.interpret.record_text_deletion)",
              "torch": torch.__version__, "settings": s, "ig": ig.tolist(),
              "scores": {how: {name: curve.scores.tolist() for name, curve in curves.items()}
                         for how, curves in study.items()}}
    Path(path).write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def load_text_deletion(path: str | Path = TEXT_DELETION_RECORD
                       ) -> tuple[Tensor, dict[str, dict[str, PerturbationCurve]]]:
    """The recorded deletion test: IG ``(N, T)`` and ``{replacement: {ordering: curve}}``.

    Raises ``ValueError`` if it was recorded with other settings than :data:`TEXT_DELETION`.
    """
    record = json.loads(Path(path).read_text())
    if record["settings"] != TEXT_DELETION:
        raise ValueError(f"{path} was recorded with {record['settings']}, not "
                         f"{TEXT_DELETION}: re-record it with record_text_deletion()")
    s = TEXT_DELETION
    fractions = _feature_counts(s["n_points"], s["length"], "cpu").double() / s["length"]
    study = {how: {name: PerturbationCurve("deletion", fractions.float(), torch.tensor(scores))
                   for name, scores in curves.items()}
             for how, curves in record["scores"].items()}
    return torch.tensor(record["ig"]), study


#: Section 6b's matched-baseline exercise: IG against the first draw of random characters
#: with 16 Gauss-Legendre steps, on the windows of :data:`TEXT_DELETION`.
MATCHED_DELETION = {**TEXT_DELETION, "n_steps": 16, "draw": 0}

#: Where :func:`record_matched_deletion` writes.
MATCHED_DELETION_RECORD = Path(__file__).resolve().parent / "assets" / \
    "text_deletion_matched.json"


def matched_deletion(next_logits: Callable[[Tensor], Tensor], embedding: nn.Module,
                     ids: Tensor, replacement: Tensor, target, n_steps: int = 16,
                     n_points: int | None = None) -> tuple[Tensor, PerturbationCurve]:
    """IG of ``next_logits(ids)[target]`` per token, ``(B, T)``, with the ``replacement``
    ids (shaped like ``ids``) as the baseline, and the deletion curve of that ranking
    when the characters are replaced by the same ids: the attribution asked the test's
    own question. Gauss-Legendre steps on the token embeddings (:func:`forward_from_layer`).
    """
    ig = integrated_gradients(
        forward_from_layer(next_logits, embedding, ids), embedding(ids).detach(),
        embedding(replacement).detach(), target=target, n_steps=n_steps,
        method="gausslegendre").sum(-1)
    curve = perturbation_curve(lambda x: next_logits(x).softmax(-1), ids, ig, target,
                               baselines=replacement, n_points=n_points)
    return ig, curve


def record_matched_deletion(path: str | Path = MATCHED_DELETION_RECORD) -> dict:
    """Run :func:`matched_deletion` on all of section 6b's windows (:data:`MATCHED_DELETION`)
    and write IG and the curve's scores as JSON; seconds of CPU time that the book saves
    by reading the record (:func:`load_matched_deletion`) and re-computing the first
    windows. Returns what was written."""
    from companion.records import write_record

    model, next_logits, sample, texts, target, _ = _deletion_setup()
    s = MATCHED_DELETION
    ig, curve = matched_deletion(next_logits, model.token_embedding, sample,
                                 texts[s["draw"]], target, s["n_steps"], s["n_points"])
    return write_record(path, "section 6b's matched-baseline deletion test "
                        "(companion.interpret.record_matched_deletion)", s,
                        ig=ig.tolist(), scores=curve.scores.tolist())


def load_matched_deletion(path: str | Path = MATCHED_DELETION_RECORD
                          ) -> tuple[Tensor, PerturbationCurve]:
    """The recorded matched-baseline test: IG ``(N, T)`` and its deletion curve.

    Raises ``ValueError`` if it was recorded with other settings than
    :data:`MATCHED_DELETION`.
    """
    from companion.records import load_record

    s = MATCHED_DELETION
    record = load_record(path, s, "python -c 'import companion.interpret as i; "
                         "i.record_matched_deletion()'")
    fractions = _feature_counts(s["n_points"], s["length"], "cpu").double() / s["length"]
    return torch.tensor(record["ig"]), PerturbationCurve(
        "deletion", fractions.float(), torch.tensor(record["scores"]))


# --------------------------------------------------------------------------- randomisation check


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..D of each row, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    values = values.contiguous()
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values, right=False)  # how many are smaller
    up_to = torch.searchsorted(ordered, values, right=True)  # how many are smaller or equal
    return (below + up_to + 1).to(torch.float64) / 2


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman's rank correlation between ``a[i]`` and ``b[i]`` for every example ``i``.

    The Pearson correlation of the ranks, ties given their average rank (as
    ``scipy.stats.spearmanr``); a constant row gives ``nan``. ``a`` and ``b`` have shape
    ``(B, ...)``; the result is ``(B,)`` in float64. Used to compare attributions of a
    trained and a randomised model :cite:p:`adebayo2018sanity` (chapter 6).
    """
    a, b = check_batch("a", a, floating=False), check_batch("b", b, floating=False)
    for name, values in (("a", a), ("b", b)):
        if values.dim() < 2:
            raise ValueError(f"{name} must have shape (B, D, ...): a ranking of D features per "
                             f"example; got shape {tuple(values.shape)} (for one correlation "
                             f"over a vector v, pass v[None])")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    ra, rb = _average_ranks(_rows(a)), _average_ranks(_rows(b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the submodules that own parameters and can ``reset_parameters()``, in order."""
    return [name for name, module in model.named_modules()
            if callable(getattr(module, "reset_parameters", None))
            and next(module.parameters(recurse=False), None) is not None]


def cascading_randomization(model: nn.Module, seed: int = 0) -> list[tuple[str, nn.Module]]:
    r"""Copies of ``model`` with more and more layers re-initialised, from the top down.

    The model-randomisation test of :cite:t:`adebayo2018sanity`. With the :math:`L` layers
    of :func:`randomizable_layers` (for a ``nn.Sequential``: input to output order), copy
    :math:`k = 1, \dots, L` has its last :math:`k` layers reset to fresh random weights
    and the other :math:`L - k` trained. Copy :math:`k` is copy :math:`k - 1` with one more
    layer reset -- the :math:`k`-th from the top, drawn once with the seed
    ``seed + k - 1`` -- so the copies are nested: a layer re-drawn in one copy has the same
    random weights in every later copy. The weights are drawn on the CPU and then moved to
    the layer's device, so that the copies are the same on any device. An attribution
    method that explains the *model* must give different attributions for the copies.
    Returns
    ``[(name of the layer reset last, copy k), ...]`` for :math:`k = 1, \dots, L`; the
    model itself is untouched.
    """
    if not is_integer(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    layers = randomizable_layers(model)
    if not layers:
        raise ValueError("model has no layer with parameters and reset_parameters()")
    copies, current = [], model
    for k, name in enumerate(reversed(layers)):
        current = copy.deepcopy(current)
        layer = current.get_submodule(name)
        fresh = copy.deepcopy(layer).cpu()  # drawn on the CPU: the same on every device
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(int(seed) + k)
            fresh.reset_parameters()
        layer.load_state_dict(fresh.state_dict())  # copied into the layer, on its device
        copies.append((name, current))
    return copies


# --------------------------------------------------------------------------- attention rollout


def attention_rollout(attention_maps: Sequence[Tensor], residual_weight: float = 0.5) -> Tensor:
    r"""Attention rollout :cite:p:`abnar2020quantifying`: attention composed across layers.

    Each layer's attention, averaged over heads, is mixed with the identity for the
    residual connection, :math:`\hat A_l = w I + (1 - w) \bar A_l` (rows renormalised), and
    the layers are multiplied: :math:`R = \hat A_L \hat A_{L-1} \cdots \hat A_1`.
    :math:`R_{tj}` is how much of position :math:`t`'s top-layer representation "flows"
    from input position :math:`j`, *if* mixing were linear -- it is not, which is one reason
    attention is not explanation (book: chapter 6, text).

    Parameters
    ----------
    attention_maps:
        One ``(B, n_head, T, T)`` tensor per layer, bottom layer first, rows summing to one.
    residual_weight:
        :math:`w \in [0, 1]`; 0.5 as in the paper.

    Returns
    -------
    ``(B, T, T)`` tensor whose rows sum to one.
    """
    _check_attention_maps(attention_maps)
    residual_weight = _check_residual_weight(residual_weight)
    first = attention_maps[0]  # (B, n_head, T, T)
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    rollout = None
    for maps in attention_maps:
        mixed = residual_weight * eye + (1 - residual_weight) * maps.mean(1)  # (B, T, T)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


# --------------------------------------------------------------------------- helpers


def _rows(values: Tensor) -> Tensor:
    """``(B, ...)`` as ``(B, D)``: one row of ``D`` features per example (``(B,)`` gives D = 1)."""
    return values.reshape(values.shape[0], -1)


def _explained(output, target, n_examples: int, n_repeats: int) -> Tensor:
    """The explained number per row of ``output``: ``(n_repeats * n_examples,)``.

    The rows of ``output`` are ``n_repeats`` blocks of the ``n_examples`` examples, in
    that order (the layout of a batch of paths, perturbations or coalitions); ``target``
    picks one column of a ``(N, C)`` output per example.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor, got {type(output).__name__}")
    n_rows = n_repeats * n_examples
    if output.dim() not in (1, 2) or output.shape[0] != n_rows:
        raise ValueError(f"forward_func must return shape ({n_rows},) or ({n_rows}, outputs) "
                         f"for {n_rows} input rows, got {tuple(output.shape)}")
    n_outputs = output.shape[1] if output.dim() == 2 else None
    index = check_target(target, n_examples, n_outputs, output.device)
    if index is None:
        return output.reshape(n_rows)
    return output.gather(1, index.repeat(n_repeats)[:, None]).squeeze(1)


def _check_feature_mask(feature_mask, inputs: Tensor, max_groups) -> Tensor:
    """The group id of every feature, ``(D,)`` int64, using each id ``0 .. M-1``."""
    if not isinstance(feature_mask, Tensor) or feature_mask.is_floating_point():
        raise TypeError("feature_mask must be an integer tensor of group ids")
    if tuple(feature_mask.shape) != tuple(inputs.shape[1:]):
        raise ValueError(f"feature_mask must have the shape of one example, "
                         f"{tuple(inputs.shape[1:])}, got {tuple(feature_mask.shape)}")
    groups = feature_mask.flatten().to(inputs.device).long()  # (D,)
    n_groups = int(groups.max()) + 1
    if int(groups.min()) != 0 or torch.unique(groups).numel() != n_groups:
        raise ValueError(f"feature_mask must use every group id 0 .. M-1, got ids "
                         f"{torch.unique(groups).tolist()}")
    if not is_integer(max_groups):
        raise TypeError(f"max_groups must be an int, got {type(max_groups).__name__}")
    if n_groups > max_groups:
        raise ValueError(f"feature_mask has {n_groups} groups; exact Shapley values need "
                         f"2**{n_groups} forward rows per example (max_groups={max_groups})")
    return groups


def _check_attributions(attributions, inputs: Tensor) -> Tensor:
    """Floating ``attributions`` shaped like ``inputs``, on their device."""
    attributions = check_batch("attributions", attributions).to(inputs.device)
    if attributions.shape != inputs.shape:
        raise ValueError(f"attributions must have the shape of inputs, {tuple(inputs.shape)}, "
                         f"got {tuple(attributions.shape)}")
    return attributions


def _feature_counts(n_points, n_features: int, device) -> Tensor:
    """The numbers of perturbed features :math:`k` of a curve's ``n_points`` points."""
    if n_points is None:
        return torch.arange(n_features + 1, device=device)
    if not is_integer(n_points):
        raise TypeError(f"n_points must be None or an int >= 2, got {type(n_points).__name__}")
    if n_points < 2:
        raise ValueError(f"n_points must be None or an int >= 2, got {n_points!r}")
    return torch.linspace(0, n_features, int(n_points), device=device).round().long()


def _check_attention_maps(attention_maps) -> None:
    """A non-empty list of floating ``(B, n_head, T, T)`` tensors of one shape."""
    if isinstance(attention_maps, Tensor) or not isinstance(attention_maps, Sequence) \
            or len(attention_maps) == 0:
        raise TypeError("attention_maps must be a non-empty list of (B, n_head, T, T) tensors")
    for layer, maps in enumerate(attention_maps):
        name = f"attention_maps[{layer}]"
        if not isinstance(maps, Tensor):
            raise TypeError(f"{name} must be a (B, n_head, T, T) tensor, got {type(maps).__name__}")
        if not maps.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {maps.dtype}")
        if maps.dim() != 4 or maps.shape != attention_maps[0].shape \
                or maps.shape[-1] != maps.shape[-2]:
            raise ValueError(f"{name} must be a (B, n_head, T, T) tensor shaped like "
                             f"attention_maps[0], got {tuple(maps.shape)}")


def _check_residual_weight(residual_weight) -> float:
    if not is_real(residual_weight):
        raise TypeError(f"residual_weight must be a number in [0, 1], got "
                        f"{type(residual_weight).__name__}")
    if not 0.0 <= residual_weight <= 1.0:
        raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight}")
    return float(residual_weight)


def _check_ids(name: str, ids) -> Tensor:
    """A non-empty 1-D integer tensor of token ids."""
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D integer tensor of token ids, got "
                        f"{type(ids).__name__ if not isinstance(ids, Tensor) else ids.dtype}")
    if ids.dim() != 1 or len(ids) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    return ids
