"""Input checks shared by the package's public entry points (private module).

Every public function that validates its arguments uses these, so that a bad argument
always raises the same way: ``TypeError`` for a wrong type, ``ValueError`` for a wrong
value, and the message names the argument, what was expected and what was given.
Topic modules import from here, never from each other's private helpers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def check_type(name: str, value, expected: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``expected`` (bools are not ints)."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        wanted = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__}")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """A Python or NumPy integer (not a ``bool``) with ``low <= value <= high`` where the
    bounds are given, returned as an ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_number(name: str, value) -> float:
    """A Python or NumPy real number (not a ``bool``) as a ``float``. NaN and inf pass:
    a caller that bounds the value writes ``if not lo <= check_number(...) < hi``, which
    is false for NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_float(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) within the given (closed or open) bounds."""
    value = check_number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool = False,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``torch.Tensor``, optionally of a given number of dimensions and dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    return value


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A Python or NumPy real number, not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def check_callable(name: str, value) -> None:
    """Raise ``TypeError`` unless ``value`` can be called."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def check_batch(name: str, value, *, floating: bool = True) -> torch.Tensor:
    """A ``(B, ...)`` tensor with ``B >= 1`` (floating-point unless ``floating=False``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B, ...), got {type(value).__name__}")
    if value.dim() < 1 or value.shape[0] == 0:
        raise ValueError(f"{name} must have a batch dimension of size >= 1, got shape "
                         f"{tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


# --------------------------------------------------------------------------- array-likes
# Metrics accept tensors on any device, NumPy arrays and lists, and work on the device of
# the first tensor given (:func:`device_of`), in float64 (:func:`float_dtype`).


def device_of(*values) -> torch.device:
    """The device of the first tensor among ``values`` (the CPU if there is none)."""
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def float_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def as_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    """A tensor (detached), NumPy array or list of numbers as a tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (np.ndarray, list, tuple)):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got an array of dtype {array.dtype}")
        return torch.as_tensor(array, device=device)
    raise TypeError(f"{name} must be a torch.Tensor, NumPy array or list, "
                    f"got {type(value).__name__}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or infinity."""
    # one cheap reduction first: the sum is finite unless some entry is not (or it overflows)
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinity")


def check_labels(name: str, value, device: torch.device) -> torch.Tensor:
    """Class labels as a non-empty 1-D int64 tensor (floats must hold whole numbers)."""
    t = as_tensor(name, value, device)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {tuple(t.shape)} "
                         "(multilabel targets are not supported)")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    if t.is_floating_point():
        check_finite(name, t)
        if (t != t.round()).any():
            bad = t[t != t.round()][0].item()
            raise ValueError(f"{name} must hold class labels, got the non-integer value {bad}")
    elif t.is_complex():
        raise TypeError(f"{name} must hold class labels, got dtype {t.dtype}")
    return t.long()


def check_label_list(name: str, value, device: torch.device) -> torch.Tensor:
    """Class labels that do not repeat (an argument such as ``labels=[0, 2, 1]``)."""
    t = check_labels(name, value, device)
    if len(torch.unique(t)) != len(t):
        raise ValueError(f"{name} must not repeat a label, got {t.tolist()}")
    return t


def check_real(name: str, value, device: torch.device, ndims=(1,),
               finite: bool = True) -> torch.Tensor:
    """Real numbers (scores, probabilities) as a non-empty float64 tensor, ``ndim`` in ``ndims``."""
    t = as_tensor(name, value, device)
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    t = t.to(float_dtype(device))
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), "
                         f"got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    if finite:
        check_finite(name, t)
    return t


def check_unit_interval(name: str, p: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every entry of ``p`` is in [0, 1]."""
    if p.max() > 1:
        raise ValueError(f"{name} contains values greater than 1: {p.max().item()}")
    if p.min() < 0:
        raise ValueError(f"{name} contains values lower than 0: {p.min().item()}")


def check_sample_weight(value, n: int, device: torch.device) -> torch.Tensor | None:
    """``sample_weight``: ``None``, or ``n`` non-negative finite numbers with a positive sum."""
    if value is None:
        return None
    w = check_real("sample_weight", value, device)
    if len(w) != n:
        raise ValueError(f"sample_weight has {len(w)} entries for {n} samples")
    if (w < 0).any():
        raise ValueError("sample_weight must be non-negative")
    if w.sum() == 0:
        raise ValueError("sample_weight sums to zero")
    return w


def check_same_length(**arrays) -> int:
    """The common length of the named arrays; ``ValueError`` naming them all if they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("inputs have different lengths: "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    return next(iter(lengths.values()))


# --------------------------------------------------------------------------- attributions
# Captum's conventions for ``baselines`` and ``target`` (chapter 6, companion.interpret).


def check_baselines(inputs: torch.Tensor, baselines) -> torch.Tensor:
    """``baselines`` (``None``: zeros, a number, or a tensor) as a tensor shaped
    ``(B, ...)`` or ``(1, ...)`` that broadcasts on the ``(B, ...)`` ``inputs``."""
    if baselines is None:
        return torch.zeros_like(inputs[:1])
    if is_real(baselines):  # a Python or NumPy number
        return torch.full_like(inputs[:1], baselines.item() if isinstance(baselines, np.generic)
                               else baselines)
    if not isinstance(baselines, torch.Tensor):
        raise TypeError("baselines must be None, a number or a tensor, got "
                        f"{type(baselines).__name__}")
    allowed = (tuple(inputs.shape), (1, *inputs.shape[1:]))
    if tuple(baselines.shape) not in allowed:
        raise ValueError(f"baselines must have shape {allowed[0]} or {allowed[1]} (like inputs), "
                         f"got {tuple(baselines.shape)}")
    return baselines.to(dtype=inputs.dtype, device=inputs.device)


def check_target(target, n_examples: int, n_outputs: int | None, device) -> torch.Tensor | None:
    """``target`` as a ``(n_examples,)`` long tensor of output indices, or ``None`` when the
    model returns one number per example (``n_outputs`` is ``None``, or 1 and no target)."""
    if target is None:
        if n_outputs not in (None, 1):
            raise ValueError(f"target is needed: forward_func returns {n_outputs} outputs per "
                             "example; give the index of the one to explain")
        return None
    if n_outputs is None:
        raise ValueError("target must be None when forward_func returns one number per example")
    if isinstance(target, (bool, np.bool_, str, bytes)) \
            or not isinstance(target, (int, np.integer, Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"target must be an int, a sequence or array of ints or a tensor, got "
                        f"{type(target).__name__}")
    index = torch.as_tensor(target, device=device)
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex() \
            or index.dim() > 1:
        raise TypeError(f"target must hold integer indices in at most one dimension, got "
                        f"dtype {index.dtype} and shape {tuple(index.shape)}")
    if index.dim() == 1 and index.numel() != n_examples:
        raise ValueError(f"target has {index.numel()} entries but there are {n_examples} examples")
    if index.numel() and not bool(((index >= 0) & (index < n_outputs)).all()):
        raise ValueError(f"target must be in [0, {n_outputs}) (the outputs of forward_func), "
                         f"got {index.tolist()}")
    return index.long().expand(n_examples)


def check_layer_input(x, name: str, features: int | None = None,
                      like: torch.Tensor | None = None) -> None:
    """A floating-point tensor, of shape ``(batch, features)`` if ``features`` is given,
    with the dtype and device of ``like`` (a layer's parameters) if given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if features is not None and (x.ndim != 2 or x.shape[1] != features):
        raise ValueError(f"{name} must have shape (batch, {features}), got {tuple(x.shape)}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise TypeError(f"{name} is {x.dtype} on {x.device}, expected {like.dtype} on "
                        f"{like.device} (the parameters' or the prediction's); use .to()")


def check_xy(X, y, name_x: str = "X", name_y: str = "y") -> None:
    """Features and class indices of a classification set: tensors, one row each, ``y``
    of dtype ``torch.long``."""
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name_x} and {name_y} must be tensors, got "
                        f"{type(X).__name__} and {type(y).__name__}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{name_x} has {X.shape[0]} rows but {name_y} has {y.shape[0]}")
    if y.dtype != torch.long:
        raise TypeError(f"{name_y} must hold class indices of dtype torch.long, got {y.dtype}")


def check_attention_inputs(query, key, value, attn_mask, dropout_p, is_causal) -> None:
    """The arguments of scaled dot-product attention, with PyTorch's conventions: shapes
    ``(..., L, d_k)``, ``(..., S, d_k)``, ``(..., S, d_v)``, one dtype, a mask that is
    bool or of the query's dtype and broadcasts to ``(..., L, S)``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, features), "
                             f"got {tuple(t.shape)}")
    if query.size(-1) != key.size(-1):
        raise ValueError(f"query and key must have the same last dimension (d_k), "
                         f"got {query.size(-1)} and {key.size(-1)}")
    if key.size(-2) != value.size(-2):
        raise ValueError(f"key and value must have the same length S (dim -2), "
                         f"got {key.size(-2)} and {value.size(-2)}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share a dtype, "
                        f"got {query.dtype}, {key.dtype}, {value.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
        if is_causal:
            raise ValueError("give attn_mask or is_causal=True, not both "
                             "(combine them yourself: attn_mask & causal_mask(L, S))")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or {query.dtype} like query, "
                            f"got {attn_mask.dtype}")
        scores_shape = torch.Size([*torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]),
                                   query.size(-2), key.size(-2)])
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, scores_shape) == scores_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to the scores' shape (..., L, S) = {tuple(scores_shape)}")
