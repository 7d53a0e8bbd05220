r"""Gradient checking: is a hand-written backward pass right?

Book: Chapter 2, "Gradient checking". Three independent referees for a layer of
:mod:`companion.backprop`, all best run in float64:

* :func:`check_gradients` compares the layer's ``backward`` with ``torch.autograd``
  differentiating the same forward code, and with central finite differences;
* :func:`numerical_gradient` is those central differences, needing nothing but a
  forward pass :cite:p:`baydin2018automatic`;
* :func:`as_autograd_function` wraps the hand-written backward as an autograd function,
  so that ``torch.autograd.gradcheck`` can compare it with its own finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from companion._validate import check_layer_input, check_number, is_real
from companion.backprop import Layer
from companion.claims import max_abs_diff


@contextmanager
def _fixed_random_state(seed: int, device: torch.device):
    """Run the body with the global RNG seeded to ``seed``; restore the RNG afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def _buffers_preserved(layer: nn.Module):
    """Undo the body's updates of running statistics."""
    saved = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in layer.named_buffers():
                buffer.copy_(saved[name])


def numerical_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    r"""Central differences :math:`(f(x + \epsilon e_i) - f(x - \epsilon e_i)) / 2\epsilon`.

    ``f`` maps a floating-point tensor shaped like ``x`` (any strides: ``f`` receives a
    contiguous copy) to a scalar -- a one-element tensor or a Python number. One pair of
    evaluations per element of ``x`` (that loop is what makes finite differences slow,
    and why we backpropagate). The error is :math:`O(\epsilon^2)` from truncation plus
    :math:`O(u\,|f|/\epsilon)` from rounding, with :math:`u` the unit roundoff: in float64
    with the default ``eps``, :math:`10^{-10}` to :math:`10^{-8}` for the losses of
    chapter 2, growing with the size of ``f``. Returns a contiguous tensor shaped like
    ``x``.
    """
    check_layer_input(x, "x", None, None)
    if not check_number("eps", eps) > 0:  # also rejects NaN
        raise ValueError(f"eps must be > 0, got {eps!r}")
    x = x.detach().clone(memory_format=torch.contiguous_format)
    flat = x.view(-1)
    grad = torch.empty_like(flat)
    with torch.no_grad():
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = _scalar(f(x))
            flat[i] = original - eps
            minus = _scalar(f(x))
            flat[i] = original
            grad[i] = (plus - minus) / (2 * eps)
    return grad.view_as(x)


def _scalar(value) -> torch.Tensor | float:
    """``value`` if it is a real scalar (a one-element tensor or a number), else an error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"f must return a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return value.reshape(())
    if not is_real(value):
        raise TypeError(f"f must return a scalar tensor or a real number, got "
                        f"{type(value).__name__}")
    return value


@dataclass(frozen=True)
class GradientCheck:
    """Largest absolute difference between a layer's hand-written gradients (input and
    parameters) and those of ``torch.autograd`` and of central finite differences."""

    autograd: float
    finite_differences: float


def _layer_loss(layer: Layer, names: list[str], upstream: torch.Tensor, seed: int):
    """``loss(x, *params) = sum(layer(x) * upstream)``, a function autograd can differentiate."""

    def loss(x, *params):
        with _fixed_random_state(seed, x.device), _buffers_preserved(layer):
            out = functional_call(layer, dict(zip(names, params)), (x,))
        return (out * upstream).sum()

    return loss


def check_gradients(layer: Layer, x: torch.Tensor, upstream: torch.Tensor | None = None, *,
                    seed: int = 0, eps: float = 1e-6) -> GradientCheck:
    r"""Compare ``layer.backward`` with autograd and finite differences at ``(x, parameters)``.

    The loss is :math:`L = \sum Y \odot R` for a fixed ``upstream`` gradient :math:`R`
    (random if not given), so :math:`\partial L / \partial Y = R`. Use float64: in
    float32 (:math:`u \approx 6 \times 10^{-8}`) the rounding error of the finite
    differences alone is of order :math:`u^{2/3} \approx 10^{-5}` even at the best
    :math:`\epsilon \approx u^{1/3}`, and about 1e-4 at ``eps=1e-3`` (chapter 2 measures
    both). Running statistics and the RNG are left as they were; a dropout mask is drawn
    from ``seed``.

    A parameter whose ``.grad`` the hand-written backward leaves at ``None`` counts as a
    gradient of zero, as in autograd: right if the loss does not depend on it, and
    reported as a deviation otherwise.
    """
    check_layer_input(x, "x", None, None)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach() for _, p in layer.named_parameters()]
    with _fixed_random_state(seed, x.device), _buffers_preserved(layer):
        output = layer(x)
        if upstream is None:
            upstream = torch.randn_like(output)
        layer.zero_grad(set_to_none=True)
        hand = [layer.backward(upstream)] + [
            torch.zeros_like(p) if p.grad is None else p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    loss = _layer_loss(layer, names, upstream, seed)
    inputs = [t.clone().requires_grad_(True) for t in [x, *params]]
    auto = torch.autograd.grad(loss(*inputs), inputs, allow_unused=True,
                               materialize_grads=True)  # an unused parameter: zeros
    numeric = []
    for i, tensor in enumerate([x, *params]):
        others = [t.detach() for t in inputs]

        def f(value, i=i, others=others):
            return loss(*others[:i], value, *others[i + 1:])

        numeric.append(numerical_gradient(f, tensor, eps))
    return GradientCheck(
        autograd=max_abs_diff(zip(hand, auto)),
        finite_differences=max_abs_diff(zip(hand, numeric)))


class _HandWrittenBackward(torch.autograd.Function):
    """Autograd node whose backward is a layer's hand-written ``backward``."""

    @staticmethod
    def forward(ctx, layer, seed, x, *params):
        names = [name for name, _ in layer.named_parameters()]
        ctx.layer, ctx.seed = layer, seed
        ctx.save_for_backward(x, *params)
        with _fixed_random_state(seed, x.device), _buffers_preserved(layer):
            return functional_call(layer, dict(zip(names, params)), (x,))

    @staticmethod
    def backward(ctx, grad_output):
        x, *params = ctx.saved_tensors
        layer = ctx.layer
        own = [p for _, p in layer.named_parameters()]
        if not all(torch.equal(p, q) for p, q in zip(own, params)):
            raise RuntimeError("the hand-written backward runs at the layer's own parameters")
        with _fixed_random_state(ctx.seed, x.device), _buffers_preserved(layer):
            layer.zero_grad(set_to_none=True)
            layer(x.detach())                          # recompute what backward needs
            grad_x = layer.backward(grad_output)
        grads = [p.grad for p in own]
        layer.zero_grad(set_to_none=True)
        return (None, None, grad_x, *grads)


def as_autograd_function(layer: Layer, seed: int = 0) -> Callable[..., torch.Tensor]:
    """``f(x, *parameters)``: the layer's forward, differentiated by its hand-written backward.

    For ``torch.autograd.gradcheck(f, (x, *params))``, which compares that backward with
    finite differences; pass ``params`` equal to the layer's own (e.g. detached clones
    with ``requires_grad=True``). A dropout mask is drawn from ``seed``.
    """

    def f(x, *params):
        return _HandWrittenBackward.apply(layer, seed, x, *params)

    return f


__all__ = ["numerical_gradient", "GradientCheck", "check_gradients", "as_autograd_function"]
