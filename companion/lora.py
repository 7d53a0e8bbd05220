"""Low-rank adaptation (LoRA) by hand, with the names and numbers of Hugging Face PEFT
(book: chapter 10, "LoRA by hand").

LoRA :cite:p:`hu2022lora` freezes a pretrained linear layer ``y = x W^T + b`` and learns a
low-rank correction beside it::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T       A: (r, d_in),  B: (d_out, r)

Only ``A`` and ``B`` train: ``r (d_in + d_out)`` numbers instead of ``d_in d_out``. ``B``
starts at zero, so the adapted model starts *exactly* as the pretrained one; ``A`` starts
like a fresh ``nn.Linear`` (Kaiming-uniform with ``a = sqrt(5)``), as in PEFT
:cite:p:`mangrulkar2022peft`. After training the update folds into the weight,
``W' = W + (alpha / r) B A``, and the model runs at the cost of the original.

* :class:`LoRALinear` -- one adapted ``nn.Linear``; :meth:`~LoRALinear.merge` and
  :meth:`~LoRALinear.unmerge` fold the update in and out of the frozen weight in place.
* :func:`add_lora` -- wrap the ``nn.Linear`` modules whose names end with the given
  target names (PEFT's ``LoraConfig(target_modules=...)``) and freeze everything else.
* :func:`merge_lora` -- replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding
  the merged weight (PEFT's ``merge_and_unload``).

The unit tests check these against PEFT's ``LoraConfig`` / ``get_peft_model`` on the same
model: outputs, gradients, one optimizer step, trainable-parameter counts, merged weights,
and, from the same seed, the same initial ``A``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from companion._validate import check_float, check_int, check_type


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (PEFT's ``lora.Linear``).

    ``forward(x) = base_layer(x) + scaling * lora_B(lora_A(lora_dropout(x)))`` with
    ``scaling = alpha / rank``; ``lora_A`` maps ``d_in -> rank``, ``lora_B`` maps
    ``rank -> d_out``, both without bias. The parameter names (``base_layer``, ``lora_A``,
    ``lora_B``) are PEFT's, less its adapter-name level (``lora_A.default``).

    ``A`` is drawn as PEFT draws it -- ``lora_A`` and ``lora_B`` are created as
    ``nn.Linear`` layers in the default dtype, ``A`` is re-drawn Kaiming-uniform
    (``a = sqrt(5)``) and ``B`` set to zero, then both move to the base layer's device and
    dtype -- so the same seed gives the same ``A`` as PEFT. The base layer's parameters
    are frozen (``requires_grad=False``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_type("base", base, nn.Linear)
        check_int("rank", rank, low=1)
        check_float("alpha", alpha, low=0.0, low_open=True)
        check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the update starts at zero: the model is unchanged
        self.lora_A.to(base.weight.device, base.weight.dtype)
        self.lora_B.to(base.weight.device, base.weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., d_out)
        if self.merged:  # the update is already inside base_layer.weight
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., r) -> (..., d_out)
        return result + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update of the weight, ``(alpha / r) B A``, shape ``(d_out, d_in)``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add :meth:`delta_weight` to the frozen weight in place (``W <- W + (alpha/r) B A``).

        Afterwards ``forward`` is one matrix product. Raises ``RuntimeError`` if already merged.
        """
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; unmerge() it first")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract :meth:`delta_weight` again (exact up to rounding). Raises if not merged."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; nothing to unmerge")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}")


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the whole name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def add_lora(model: nn.Module, target_modules: str | list[str], rank: int, alpha: float,
             dropout: float = 0.0) -> nn.Module:
    """Put a :class:`LoRALinear` on every ``nn.Linear`` whose name ends with a target name.

    ``target_modules`` is a name or a list of names matched against the module names of
    ``model.named_modules()`` as PEFT matches them: ``"in_proj"`` matches
    ``"blocks.0.attn.in_proj"``, ``"mlp.0"`` matches ``"blocks.3.mlp.0"``. Every other
    parameter of ``model`` is frozen, so that exactly ``sum r (d_in + d_out)`` parameters
    train. Changes ``model`` in place and returns it.

    Raises ``ValueError`` if a target name matches no module (PEFT raises only if no
    target matches anything), ``TypeError`` if a matched module is not an ``nn.Linear``
    (e.g. one that already has LoRA).
    """
    check_type("model", model, nn.Module)
    targets = [target_modules] if isinstance(target_modules, str) else target_modules
    check_type("target_modules", targets, (list, tuple))
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty name or list of non-empty "
                         f"names, got {target_modules!r}")
    check_int("rank", rank, low=1)
    check_float("alpha", alpha, low=0.0, low_open=True)
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(_matches(name, target) for name in names):
            endings = sorted({n.rsplit(".", 1)[-1] for n in names if n})[:8]
            raise ValueError(f"target_modules: {target!r} matches no module of the model "
                             f"(module names end with e.g. {endings})")
    chosen = [name for name in names if any(_matches(name, t) for t in targets)]
    for name in chosen:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise TypeError(f"target_modules: {name!r} is a {type(module).__name__}, "
                            "LoRA here adapts nn.Linear layers only")
    model.requires_grad_(False)
    for name in chosen:  # in named_modules order, as PEFT: the same seed gives the same A's
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The ``(name, layer)`` pairs of the :class:`LoRALinear` modules in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and put back plain ``nn.Linear`` layers.

    The result computes ``x (W + (alpha/r) B A)^T + b``: the fine-tuned model at the
    inference cost of the original (PEFT's ``merge_and_unload``). Layers merged with
    :meth:`LoRALinear.merge` before are taken as they are. In place; returns ``model``.
    Raises ``ValueError`` if ``model`` has no LoRA layer (e.g. it was merged already).
    """
    check_type("model", model, nn.Module)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layer to merge (was it merged already?)")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of distinct parameters of ``model`` (tied ones once); only trainable ones
    unless ``trainable_only=False``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lora_parameter_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """``sum r (d_in + d_out)`` over the adapted layers' ``(d_in, d_out)`` shapes."""
    check_int("rank", rank, low=1)
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes)
