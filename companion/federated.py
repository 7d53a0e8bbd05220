"""Federated learning: FedAvg, secure aggregation, and the gradient-inversion attack.

Chapter 9 of the book. A separate module from :mod:`companion.privacy` because it is a
different idea: *where* training happens (on the clients, data never sent), not what
the result reveals. The chapter shows both halves:

* :func:`fedavg`, :func:`client_update` and :func:`federated_round`: clients train
  locally and the server averages their models, weighted by data size (McMahan et al.
  2017).
* :func:`encode_fixed_point`, :func:`mask_update`, :func:`secure_sum`,
  :func:`decode_fixed_point`: secure aggregation with pairwise additive masks
  (Bonawitz et al. 2017, without its dropout recovery): the server learns the sum of the
  updates and nothing about any single one.
* :func:`gradient_inversion`: "deep leakage from gradients" (Zhu et al. 2019): the
  server reconstructs a client's training example from the gradient it shared, which is
  why federated learning alone is not a privacy guarantee.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from companion._validate import check_float, check_int, check_tensor, check_type

__all__ = [
    "MODULUS",
    "client_update",
    "decode_fixed_point",
    "encode_fixed_point",
    "fedavg",
    "federated_round",
    "gradient_inversion",
    "mask_update",
    "secure_sum",
]

#: Secure aggregation works with integers modulo 2**32.
MODULUS = 2**32


# =========================================================================== FedAvg


def fedavg(client_states: Sequence[dict[str, torch.Tensor]],
           weights: Sequence[float]) -> dict[str, torch.Tensor]:
    r"""Weighted average of the clients' state dicts,
    :math:`\theta = \sum_k w_k \theta_k / \sum_k w_k` (McMahan et al. 2017 weight by the
    number of examples :math:`n_k`).

    Floating-point entries are averaged; other entries (integer counters) are taken from
    the first client. All clients must have the same names, shapes and dtypes, and every
    weight must be positive.
    """
    check_type("client_states", client_states, (list, tuple))
    check_type("weights", weights, (list, tuple))
    if not client_states:
        raise ValueError("client_states must hold at least one state dict")
    if len(weights) != len(client_states):
        raise ValueError(f"weights must have one entry per client ({len(client_states)}), "
                         f"got {len(weights)}")
    for k, w in enumerate(weights):
        check_float(f"weights[{k}]", w, 0, low_open=True)
    first = client_states[0]
    for k, state in enumerate(client_states[1:], start=1):
        if set(state) != set(first):
            raise ValueError(f"client_states[{k}] has parameters {sorted(set(state) ^ set(first))} "
                             "that client 0 has not (or the reverse)")
        for name, t in state.items():
            if t.shape != first[name].shape or t.dtype != first[name].dtype:
                raise ValueError(f"client_states[{k}][{name!r}] is {tuple(t.shape)} {t.dtype}, "
                                 f"client 0's is {tuple(first[name].shape)} {first[name].dtype}")
    total = float(sum(weights))
    out = {}
    for name, t0 in first.items():
        if t0.is_floating_point():
            out[name] = sum(w / total * s[name] for w, s in zip(weights, client_states))
        else:
            out[name] = t0.clone()
    return out


def client_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float,
                  local_steps: int,
                  loss_fn: Callable = nn.functional.cross_entropy) -> dict[str, torch.Tensor]:
    """A client's work in one round: ``local_steps`` full-batch gradient-descent steps on
    its own data, starting from the global ``model`` (left unchanged); returns the new
    state dict."""
    check_float("lr", lr, 0, low_open=True)
    check_int("local_steps", local_steps, 1)
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for _ in range(local_steps):
        opt.zero_grad()
        loss_fn(local(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in local.state_dict().items()}


def federated_round(model: nn.Module, clients: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                    lr: float, local_steps: int,
                    loss_fn: Callable = nn.functional.cross_entropy) -> None:
    """One FedAvg round with every client taking part: each runs :func:`client_update`,
    the server loads the average weighted by the clients' data sizes into ``model``."""
    states = [client_update(model, x, y, lr=lr, local_steps=local_steps, loss_fn=loss_fn)
              for x, y in clients]
    model.load_state_dict(fedavg(states, [float(len(y)) for _, y in clients]))


# =========================================================================== secure aggregation


def encode_fixed_point(x: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    r"""Real numbers to integers modulo :math:`2^{32}`: :math:`\mathrm{round}(x\,2^f) \bmod 2^{32}`
    (negative numbers wrap around, two's-complement style). Returns ``int64`` in
    :math:`[0, 2^{32})`. Values must satisfy :math:`|x| 2^f < 2^{31}` so that sums of a
    few of them still decode."""
    check_tensor("x", x, floating=True)
    check_int("frac_bits", frac_bits, 0, 30)
    scaled = torch.round(x.double() * 2**frac_bits)
    if scaled.abs().max() >= 2**31:
        raise ValueError(f"x is too large for {frac_bits} fractional bits in 32 bits")
    return scaled.to(torch.int64) % MODULUS


def decode_fixed_point(v: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    """Inverse of :func:`encode_fixed_point` (float64): values at or above 2**31 are negative."""
    check_tensor("v", v, dtype=torch.int64)
    v = v % MODULUS
    signed = torch.where(v >= 2**31, v - MODULUS, v)
    return signed.double() / 2**frac_bits


def _pair_mask(seed: int, i: int, j: int, shape, device) -> torch.Tensor:
    # The mask clients i < j both derive from the seed they agreed on (in Bonawitz et al.
    # by a Diffie-Hellman key exchange; here from one shared integer).
    g = torch.Generator().manual_seed(seed * 1_000_003 + i * 1_009 + j)
    return torch.randint(0, MODULUS, tuple(shape), generator=g, dtype=torch.int64).to(device)


def mask_update(encoded: torch.Tensor, client: int, num_clients: int, seed: int) -> torch.Tensor:
    r"""Client ``client``'s masked update:
    :math:`y_i = x_i + \sum_{j > i} m_{ij} - \sum_{j < i} m_{ji} \bmod 2^{32}`.

    Each mask :math:`m_{ij}` is uniform on :math:`[0, 2^{32})`, so :math:`y_i` alone is
    uniform too: it tells the server nothing. In the sum over all clients each mask
    appears once with each sign and cancels.
    """
    check_tensor("encoded", encoded, dtype=torch.int64)
    check_int("num_clients", num_clients, 2)
    check_int("client", client, 0, num_clients - 1)
    check_int("seed", seed, 0)
    out = encoded.clone()
    for j in range(num_clients):
        if j > client:
            out += _pair_mask(seed, client, j, encoded.shape, encoded.device)
        elif j < client:
            out -= _pair_mask(seed, j, client, encoded.shape, encoded.device)
    return out % MODULUS


def secure_sum(masked: Sequence[torch.Tensor]) -> torch.Tensor:
    """The server's step: add the masked updates modulo 2**32 (masks cancel)."""
    check_type("masked", masked, (list, tuple))
    if not masked:
        raise ValueError("masked must hold at least one update")
    total = torch.zeros_like(masked[0])
    for y in masked:
        total = (total + y) % MODULUS
    return total


# =========================================================================== gradient inversion


def gradient_inversion(model: nn.Module, loss_fn: Callable,
                       target_grads: Sequence[torch.Tensor], y: torch.Tensor, x_shape, *,
                       steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Reconstruct an input from its gradient (Zhu et al. 2019, with the label given).

    Start from a random :math:`\hat x` and minimise
    :math:`\sum_p \|\nabla_p \ell(f(\hat x), y) - g_p\|^2` over :math:`\hat x` with L-BFGS,
    where :math:`g` = ``target_grads`` is what the client shared (one tensor per
    parameter, in ``model.parameters()`` order). The label ``y`` can itself be read off
    the gradient: for cross-entropy the last layer's bias gradient :math:`p - e_y` is
    negative only at the true class (Zhao et al. 2020). Returns :math:`\hat x`.
    """
    check_type("model", model, nn.Module)
    check_int("steps", steps, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    if len(target_grads) != len(params):
        raise ValueError(f"target_grads must have one tensor per parameter ({len(params)}), "
                         f"got {len(target_grads)}")
    ref = params[0]
    x_hat = torch.randn(tuple(x_shape), generator=generator, dtype=ref.dtype).to(ref.device)
    x_hat.requires_grad_(True)
    opt = torch.optim.LBFGS([x_hat], lr=1, max_iter=steps, history_size=100,
                            tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        grads = torch.autograd.grad(loss_fn(model(x_hat), y), params, create_graph=True)
        mismatch = sum(((g - t) ** 2).sum() for g, t in zip(grads, target_grads))
        mismatch.backward()
        return mismatch

    opt.step(closure)
    return x_hat.detach()
