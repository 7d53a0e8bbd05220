"""Integer quantization of weights: per-tensor, per-channel and group-wise, symmetric or affine.

Chapter 7, section "Quantization". A block of weights ``w`` shares one step ``s`` (the
scale) and one integer offset ``z`` (the zero point):

    q = clamp(round(w / s) + z, q_min, q_max)        w_hat = (q - z) * s

Symmetric: ``z = 0``, ``s = max|w| / (2^(b-1) - 1)``, ``q`` in int8. Asymmetric (affine):
``s = (max w - min w) / (2^b - 1)`` over a range widened to contain 0,
``z = round(-min w / s)``, ``q`` in uint8. Inside the range, ``|w - w_hat| <= s / 2``.
A "block" is the whole tensor (``axis=None``), one slice along ``axis`` (per-channel), or
``group_size`` consecutive entries along the last (input) dimension of a 2-D weight
(group-wise). ``bits`` may be 2..8; values below 8 bits are stored unpacked, one per byte
(:func:`pack_int4` stores two 4-bit values per byte). For 8 bits the integers equal
``torch.quantize_per_tensor`` / ``torch.quantize_per_channel(...).int_repr()``, except
where ``w / s`` falls within rounding error of a half-integer: torch computes
``w * (1 / s)``, which can round such a tie the other way (about one weight in four
million for random weights; the appendix's benchmark allows exactly those).
"""

from __future__ import annotations

import torch
from torch import nn

from ._validate import check_int, check_tensor, check_type


def _check(w, bits, axis, group_size) -> None:
    check_tensor("w", w, floating=True)
    check_int("bits", bits, 2, 8)
    if axis is not None:
        check_int("axis", axis, -w.ndim, w.ndim - 1)
    if group_size is not None:
        check_int("group_size", group_size, 1)
        if axis is not None:
            raise ValueError("give axis (per-channel) or group_size (group-wise), not both")
        if w.ndim != 2:
            raise ValueError(f"group_size needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
        if w.shape[1] % group_size != 0:
            raise ValueError(f"group_size must divide the input dimension {w.shape[1]}, "
                             f"got {group_size}")


def _blocks(w: torch.Tensor, axis, group_size) -> torch.Tensor:
    """View ``w`` as (blocks, entries per block)."""
    if group_size is not None:
        return w.reshape(-1, group_size)                 # (out * in / g, g)
    if axis is not None:
        return w.movedim(axis, 0).reshape(w.shape[axis], -1)   # (channels, rest)
    return w.reshape(1, -1)                              # (1, numel)


def _unblock(x: torch.Tensor, shape, axis, group_size) -> torch.Tensor:
    if axis is not None:
        moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        return x.reshape(moved).movedim(0, axis)
    return x.reshape(shape)


def _param_shape(shape, axis, group_size):
    if group_size is not None:
        return (shape[0], shape[1] // group_size)
    if axis is not None:
        return (shape[axis],)
    return ()


def quantize(w: torch.Tensor, bits: int = 8, axis: int | None = None,
             group_size: int | None = None, symmetric: bool = True):
    """Quantize ``w`` to ``bits``-bit integers: returns ``(q, scale, zero_point)``.

    ``q`` has ``w``'s shape (int8 if symmetric, else uint8); ``scale`` (float32) and
    ``zero_point`` (int64) have shape ``()`` per-tensor, ``(w.shape[axis],)`` per-channel,
    ``(out, in // group_size)`` group-wise.
    """
    _check(w, bits, axis, group_size)
    check_type("symmetric", symmetric, bool)
    blocks = _blocks(w.detach().float(), axis, group_size)          # (n_blocks, block)
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        scale = blocks.abs().amax(dim=1) / q_max                        # (n_blocks,)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        q_min, q_max = 0, 2 ** bits - 1
        lo = blocks.amin(dim=1).clamp(max=0)                            # range contains 0
        hi = blocks.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / (q_max - q_min)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
        ok = scale > 0
        zero_point[ok] = (q_min - torch.round(lo[ok] / scale[ok])).long().clamp(q_min, q_max)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # all-zero block: s = 1
    q = torch.round(blocks / scale[:, None]) + zero_point[:, None]
    q = q.clamp(q_min, q_max).to(torch.int8 if symmetric else torch.uint8)
    shape = _param_shape(w.shape, axis, group_size)
    return (_unblock(q, w.shape, axis, group_size), scale.reshape(shape),
            zero_point.reshape(shape))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, broadcasting the parameters over their blocks."""
    check_tensor("q", q)
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"q must have dtype torch.int8 or torch.uint8, got {q.dtype}")
    check_tensor("scale", scale, floating=True)
    check_tensor("zero_point", zero_point)
    if group_size is not None:
        check_int("group_size", group_size, 1)
        if q.ndim != 2 or q.shape[1] % group_size:
            raise ValueError(f"group_size must divide the input dimension of a 2-D q, "
                             f"got {group_size} for shape {tuple(q.shape)}")
    if axis is not None:
        check_int("axis", axis, -q.ndim, q.ndim - 1)
    expected = _param_shape(q.shape, axis, group_size)
    if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
        raise ValueError(f"scale and zero_point must have shape {expected}, "
                         f"got {tuple(scale.shape)} and {tuple(zero_point.shape)}")
    blocks = _blocks(q, axis, group_size).float()
    w = (blocks - zero_point.reshape(-1, 1).float()) * scale.reshape(-1, 1).float()
    return _unblock(w, q.shape, axis, group_size)


def fake_quantize(w: torch.Tensor, bits: int = 8, axis: int | None = None,
                  group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the weights a quantized model computes with."""
    q, scale, zp = quantize(w, bits, axis, group_size, symmetric)
    return dequantize(q, scale, zp, axis, group_size).to(w.dtype)


def quantized_bytes(numel: int, bits: int, n_params: int, symmetric: bool = True) -> int:
    """Bytes of ``numel`` packed ``bits``-bit integers + float32 scales (+ int8 zero points)."""
    return (numel * bits + 7) // 8 + n_params * (4 if symmetric else 5)


@torch.no_grad()
def quantize_linear_weights(model: nn.Module, bits: int = 8, axis: int | None = None,
                            group_size: int | None = None, symmetric: bool = True) -> dict:
    """Replace every ``nn.Linear`` weight of ``model`` in place by its fake-quantized copy.

    Weight-only quantization: activations, biases, embeddings and norms stay float.
    ``axis=0`` is per output channel. Returns ``{"linear_weights", "bytes_float32",
    "bytes_quantized"}`` over the quantized weights (packed storage, scales included).
    """
    check_type("model", model, nn.Module)
    numel = bytes_q = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            q, scale, zp = quantize(w, bits, axis, group_size, symmetric)
            w.copy_(dequantize(q, scale, zp, axis, group_size).to(w.dtype))
            numel += w.numel()
            bytes_q += quantized_bytes(w.numel(), bits, scale.numel(), symmetric)
    return {"linear_weights": numel, "bytes_float32": 4 * numel, "bytes_quantized": bytes_q}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (int8 in [-8, 7] or uint8 in [0, 15]), two per byte, along the last dim.

    Entry ``2i`` goes to the low nibble of byte ``i``, entry ``2i + 1`` to the high nibble.
    """
    check_tensor("q", q)
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"q must have dtype torch.int8 or torch.uint8, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"the last dimension of q must be even, got {q.shape[-1]}")
    lo, hi = (-8, 7) if q.dtype == torch.int8 else (0, 15)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"q must hold 4-bit values in [{lo}, {hi}]")
    nibbles = q.to(torch.uint8) & 0x0F                  # two's complement low nibble
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 in [-8, 7] if ``signed``, else uint8 in [0, 15]."""
    check_tensor("packed", packed, dtype=torch.uint8)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    if not signed:
        return nibbles
    return (nibbles.to(torch.int8) ^ 8) - 8             # sign-extend the 4-bit value
