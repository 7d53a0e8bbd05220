r"""Backpropagation by hand: layers whose backward pass is written out, not derived by autograd.

Book: Chapter 2, "Loss functions and backpropagation". Every layer is an ``nn.Module``
with two methods:

* ``forward(x)`` computes the output and keeps what the backward pass needs;
* ``backward(grad_output)`` takes :math:`G = \partial L / \partial Y`, adds
  :math:`\partial L / \partial \theta` into ``param.grad`` for each parameter
  :math:`\theta` (gradients add up until ``zero_grad()``, as in PyTorch), and returns
  :math:`\partial L / \partial X`.

No autograd runs inside: the parameters do not require gradients and every derivative
is a line of tensor code, each commented with the equation it implements. Tensors are
batch-first, ``(B, features)``; a layer works on whatever device and dtype its
parameters have (``.to(device, dtype)`` as for any module). ``to_torch()`` returns the
equivalent ``torch.nn`` module with the same weights, the oracle of the tests.

:mod:`companion.gradcheck` compares every hand-written backward with ``torch.autograd``
and with central finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from companion._validate import check_int, check_layer_input, check_number, check_xy
from companion.train import History, evaluate

# --------------------------------------------------------------------------- helpers


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter that autograd ignores: its gradient is written by hand."""
    return nn.Parameter(tensor, requires_grad=False)


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    """``param.grad += grad``, as autograd does, starting from ``None``."""
    param.grad = grad if param.grad is None else param.grad + grad


class Layer(nn.Module):
    """Base class: a module with a hand-written ``backward`` and a ``torch.nn`` twin."""

    def _saved(self, name: str) -> torch.Tensor:
        value = self.__dict__.get(name)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return value

    @staticmethod
    def _check_grad(grad_output, shape: Sequence[int]) -> None:
        if not isinstance(grad_output, torch.Tensor):
            raise TypeError(f"grad_output must be a torch.Tensor, got "
                            f"{type(grad_output).__name__}")
        if grad_output.shape != tuple(shape):
            raise ValueError(f"grad_output must have the output's shape {tuple(shape)}, "
                             f"got {tuple(grad_output.shape)}")

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Return dL/d(input) from dL/d(output); add dL/d(parameter) into ``.grad``."""
        raise NotImplementedError

    def to_torch(self) -> nn.Module:
        """The equivalent ``torch.nn`` module, with a copy of this layer's state.

        Building it draws no random numbers, so it leaves PyTorch's generator as it was.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------- initialisation


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError("weight must be a 2-D tensor of shape (fan_out, fan_in), got shape "
                         f"{tuple(weight.shape)}")
    fan_out, fan_in = weight.shape
    return fan_in, fan_out


@torch.no_grad()
def xavier_uniform_(weight: torch.Tensor, gain: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Fill ``weight`` (out, in) from :math:`U(-a, a)` with :math:`a = g\sqrt{6/(n_i + n_o)}`.

    Here :math:`n_i` and :math:`n_o` are the fan-in and fan-out (``in`` and ``out``). The
    variance :math:`g^2 \cdot 2/(n_i+n_o)` keeps the scale of
    activations (forward) and of gradients (backward) roughly constant through tanh
    layers :cite:p:`glorot2010understanding`. Same draw as ``torch.nn.init.xavier_uniform_``.
    """
    fan_in, fan_out = _fans(weight)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return weight.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def xavier_normal_(weight: torch.Tensor, gain: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Fill ``weight`` from :math:`\mathcal N(0, g^2 \cdot 2/(n_i+n_o))`."""
    fan_in, fan_out = _fans(weight)
    return weight.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)


@torch.no_grad()
def he_uniform_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Fill ``weight`` from :math:`U(-a, a)`, :math:`a = \sqrt{6/n_i}`: variance :math:`2/n_i`.

    A ReLU zeroes half of its inputs, halving the second moment; the factor 2
    compensates :cite:p:`he2015delving`. Same draw as
    ``torch.nn.init.kaiming_uniform_(weight, nonlinearity="relu")``.
    """
    fan_in, _ = _fans(weight)
    bound = math.sqrt(6.0 / fan_in)
    return weight.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def he_normal_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Fill ``weight`` from :math:`\mathcal N(0, 2/n_i)` :cite:p:`he2015delving`."""
    fan_in, _ = _fans(weight)
    return weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)


# --------------------------------------------------------------------------- layers


class Linear(Layer):
    r""":math:`Y = X W^\top + b` for ``x`` of shape (B, in); ``weight`` is (out, in) as in PyTorch.

    Initialised like ``torch.nn.Linear``: weight and bias from
    :math:`U(-1/\sqrt{n_i}, 1/\sqrt{n_i})`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        in_features = check_int("in_features", in_features, low=1)
        out_features = check_int("out_features", out_features, low=1)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        self.weight = _parameter(weight.uniform_(-bound, bound))
        self.bias = (_parameter(torch.empty(out_features, device=device, dtype=dtype)
                                .uniform_(-bound, bound)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", self.in_features, self.weight)
        self.input = x                                            # X  (B, in)
        if self.bias is None:
            return x @ self.weight.T
        return torch.addmm(self.bias, x, self.weight.T)           # Y = X W^T + b  (B, out)

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        x = self._saved("input")
        self._check_grad(grad_output, (x.shape[0], self.out_features))
        _accumulate(self.weight, grad_output.T @ x)               # dL/dW = G^T X  (out, in)
        if self.bias is not None:
            _accumulate(self.bias, grad_output.sum(dim=0))        # dL/db = 1^T G  (out,)
        return grad_output @ self.weight                          # dL/dX = G W  (B, in)

    def to_torch(self) -> nn.Linear:
        module = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features,
                                    bias=self.bias is not None, device=self.weight.device,
                                    dtype=self.weight.dtype)  # no random draw: weights copied
        return _copy_state(self, module)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class ReLU(Layer):
    r""":math:`y = \max(x, 0)`, element-wise; :math:`y' = 1[x > 0]` (0 at 0, as PyTorch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", None, None)
        self.positive = x > 0
        return x.clamp_min(0)

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        positive = self._saved("positive")
        self._check_grad(grad_output, positive.shape)
        return grad_output.masked_fill(~positive, 0.0)            # dL/dx = G * 1[x > 0]

    def to_torch(self) -> nn.ReLU:
        return nn.ReLU()


class Tanh(Layer):
    r""":math:`y = \tanh x`, element-wise; :math:`y' = 1 - y^2`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", None, None)
        self.output = torch.tanh(x)
        return self.output

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        y = self._saved("output")
        self._check_grad(grad_output, y.shape)
        return grad_output * (1 - y * y)                          # dL/dx = G * (1 - y^2)

    def to_torch(self) -> nn.Tanh:
        return nn.Tanh()


class Sigmoid(Layer):
    r""":math:`y = \sigma(x) = 1 / (1 + e^{-x})`, element-wise; :math:`y' = y (1 - y) \le 1/4`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", None, None)
        self.output = torch.sigmoid(x)
        return self.output

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        y = self._saved("output")
        self._check_grad(grad_output, y.shape)
        return grad_output * y * (1 - y)                          # dL/dx = G * y (1 - y)

    def to_torch(self) -> nn.Sigmoid:
        return nn.Sigmoid()


class Dropout(Layer):
    r"""Dropout :cite:p:`srivastava2014dropout` in its "inverted" form: in training mode
    :math:`y = x \odot m / (1 - p)` with :math:`m_i \sim \text{Bernoulli}(1 - p)`,
    so that :math:`\mathbb E[y] = x`; in eval mode :math:`y = x`.

    The paper trains with the plain mask, :math:`y = x \odot m`, and instead multiplies
    the outgoing weights by :math:`1 - p` at test time. Scaling the survivors by
    :math:`1/(1-p)` during training gives the same expected activations and leaves the
    test-time network untouched; it is the form modern frameworks (``torch.nn.Dropout``)
    implement.

    The mask is drawn from PyTorch's global generator (``torch.manual_seed`` fixes it).
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= check_number("p", p) < 1.0:  # also rejects NaN
            raise ValueError(f"p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", None, None)
        if not self.training or self.p == 0.0:
            self.scale = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p)      # m_i ~ Bernoulli(1 - p)
        self.scale = keep / (1.0 - self.p)                        # m / (1 - p)
        return x * self.scale

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        scale = self._saved("scale")
        self._check_grad(grad_output, scale.shape)
        return grad_output * scale                                # dL/dx = G * m / (1 - p)

    def to_torch(self) -> nn.Dropout:
        return nn.Dropout(self.p).train(self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm1d(Layer):
    r"""Batch normalisation of (B, C) inputs, per feature :cite:p:`ioffe2015batch`.

    Training mode normalises with the batch's mean :math:`\mu` and biased variance
    :math:`\sigma^2`, :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`,
    :math:`y = \gamma \hat x + \beta`, and updates the running statistics
    (the running variance uses the unbiased batch variance, as PyTorch does). Eval mode
    uses the running statistics, so that a sample's output does not depend on its batch.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *,
                 device=None, dtype=None):
        super().__init__()
        num_features = check_int("num_features", num_features, low=1)
        if not check_number("eps", eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not 0.0 <= check_number("momentum", momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        kw = dict(device=device, dtype=dtype)
        self.weight = _parameter(torch.ones(num_features, **kw))      # gamma
        self.bias = _parameter(torch.zeros(num_features, **kw))       # beta
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, "x", self.num_features, self.weight)
        if self.training:
            if x.shape[0] < 2:
                raise ValueError("BatchNorm1d needs a batch of at least 2 rows in training "
                                 f"mode, got {x.shape[0]}")
            mean = x.mean(dim=0)                                        # mu  (C,)
            var = x.var(dim=0, correction=0)                            # sigma^2  (C,)
            m, n = self.momentum, x.shape[0]
            self.running_mean.copy_(m * mean + (1 - m) * self.running_mean)
            self.running_var.copy_(m * var * n / (n - 1) + (1 - m) * self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        self.inv_std = torch.rsqrt(var + self.eps)                      # 1/sqrt(s^2 + eps)
        self.x_hat = (x - mean) * self.inv_std                          # (B, C)
        self.batch_statistics = self.training
        return self.x_hat * self.weight + self.bias                     # gamma x_hat + beta

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        x_hat, inv_std = self._saved("x_hat"), self._saved("inv_std")
        self._check_grad(grad_output, x_hat.shape)
        _accumulate(self.weight, (grad_output * x_hat).sum(dim=0))     # dL/dgamma
        _accumulate(self.bias, grad_output.sum(dim=0))                 # dL/dbeta
        g = grad_output * self.weight                                   # dL/dx_hat  (B, C)
        if not self.batch_statistics:  # fixed statistics: a per-feature affine map
            return g * inv_std
        # mu and sigma depend on every row of the batch, hence the two mean terms
        return inv_std * (g - g.mean(dim=0) - x_hat * (g * x_hat).mean(dim=0))

    def to_torch(self) -> nn.BatchNorm1d:
        module = nn.utils.skip_init(nn.BatchNorm1d, self.num_features, self.eps,
                                    self.momentum, device=self.weight.device,
                                    dtype=self.weight.dtype)
        module.num_batches_tracked.zero_()  # not tracked here; only used if momentum=None
        return _copy_state(self, module).train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _copy_state(ours: nn.Module, theirs: nn.Module) -> nn.Module:
    """Copy the parameters and buffers of ``ours`` into its ``torch.nn`` twin ``theirs``."""
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"num_batches_tracked"}:
        raise RuntimeError(f"state of {type(ours).__name__} does not fit "
                           f"{type(theirs).__name__}: {result}")
    return theirs


# --------------------------------------------------------------------------- losses


class MSELoss(nn.Module):
    r"""Mean squared error :math:`L = \frac1n\sum_i (\hat y_i - y_i)^2` over all n elements.

    ``backward()`` returns :math:`\partial L/\partial \hat y = 2(\hat y - y)/n`.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_layer_input(prediction, "prediction", None, None)
        check_layer_input(target, "target", None, prediction)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        self.difference = prediction - target                          # y_hat - y
        self.count = prediction.numel() if self.reduction == "mean" else 1
        squares = self.difference.square()
        return squares.mean() if self.reduction == "mean" else squares.sum()

    def backward(self, grad_output: float | torch.Tensor = 1.0) -> torch.Tensor:
        difference = self.__dict__.get("difference")
        if difference is None:
            raise RuntimeError("MSELoss.backward called before forward")
        return grad_output * 2 * difference / self.count              # 2 (y_hat - y) / n


class SoftmaxCrossEntropy(nn.Module):
    r"""Softmax and cross-entropy fused, from logits ``z`` of shape (B, C).

    :math:`L = -\frac1B \sum_b \sum_c y_{bc} \log p_{bc}` with
    :math:`\log p = z - \operatorname{logsumexp}(z)`, computed without ever forming
    :math:`e^{z}` of a large logit (log-sum-exp subtracts the row maximum), so logits of
    :math:`\pm 10^4` give finite losses. ``target`` holds class indices (B,) of dtype
    ``torch.long``, or probabilities (B, C). ``backward()`` returns
    :math:`\partial L/\partial z = (p - y)/B`: predicted minus true distribution.
    Same value as ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_layer_input(logits, "logits", None, None)
        if logits.ndim != 2:
            raise ValueError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
        target_probs = _target_distribution(target, logits)                # y  (B, C)
        log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log p  (B, C)
        self.probs, self.target_probs = log_probs.exp(), target_probs      # p, y
        self.count = logits.shape[0] if self.reduction == "mean" else 1
        if target.dtype == torch.long:  # pick log p of the true class: no 0 * (-inf)
            per_row = -log_probs.gather(1, target[:, None]).squeeze(1)
        else:
            per_row = -(target_probs * log_probs).sum(dim=1)
        return per_row.sum() / self.count                                  # (,)

    def backward(self, grad_output: float | torch.Tensor = 1.0) -> torch.Tensor:
        probs = self.__dict__.get("probs")
        if probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return grad_output * (probs - self.target_probs) / self.count     # (p - y) / B


def _target_distribution(target, logits: torch.Tensor) -> torch.Tensor:
    """Class indices (B,) as one-hot rows, or probability rows (B, C) as they are."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise TypeError(f"target is on {target.device}, expected {logits.device} (the "
                        "logits'); use .to()")
    batch, classes = logits.shape
    if target.is_floating_point():
        if target.shape != logits.shape:
            hint = ("; class labels must have dtype torch.long" if target.ndim == 1 else "")
            raise TypeError(f"a floating-point target holds probabilities and must have the "
                            f"logits' shape {tuple(logits.shape)}, got "
                            f"{tuple(target.shape)} of dtype {target.dtype}{hint}")
        return target.to(logits.dtype)
    if target.dtype != torch.long:
        raise TypeError(f"target class labels must have dtype torch.long, got {target.dtype}")
    if target.shape != (batch,):
        raise ValueError(f"target must have shape ({batch},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if batch and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"target class labels must be in [0, {classes}), got values in "
                         f"[{target.min().item()}, {target.max().item()}]")
    return F.one_hot(target, classes).to(logits.dtype)


# --------------------------------------------------------------------------- networks


class Sequential(Layer):
    """Layers applied in order; ``backward`` visits them in reverse (the chain rule)."""

    def __init__(self, *layers: Layer):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} must be a companion.backprop.Layer, "
                                f"got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            grad_output = layer.backward(grad_output)
        return grad_output

    @torch.no_grad()
    def sgd_step(self, lr: float) -> None:
        r"""A gradient-descent step, :math:`\theta \leftarrow \theta - \eta\,\nabla_\theta L`."""
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        for param in self.parameters():
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)

    def to_torch(self) -> nn.Sequential:
        return nn.Sequential(*(layer.to_torch() for layer in self.layers)).train(self.training)


ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


class MLP(Sequential):
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` of hand-written layers.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``; the last
    ``Linear`` outputs logits. With ``sizes=[64, 128, 10]`` that is
    ``Linear(64, 128), ReLU(), Linear(128, 10)``.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", *,
                 batchnorm: bool = False, dropout: float = 0.0, device=None, dtype=None):
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        layers: list[Layer] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(n_in, n_out, device=device, dtype=dtype))
            if i < len(sizes) - 2:
                if batchnorm:
                    layers.append(BatchNorm1d(n_out, device=device, dtype=dtype))
                layers.append(ACTIVATIONS[activation]())
                if dropout:
                    layers.append(Dropout(dropout))
        super().__init__(*layers)

    @property
    def linear_layers(self) -> list[Linear]:
        """The ``Linear`` layers, from the input to the output."""
        return [layer for layer in self.layers if isinstance(layer, Linear)]


def init_weights_(model: nn.Module, scheme: str, *, std: float | None = None,
                  generator: torch.Generator | None = None) -> nn.Module:
    r"""Re-initialise every ``Linear`` weight of ``model`` and set its bias to zero.

    ``scheme`` is ``"normal"`` (:math:`\mathcal N(0, \text{std}^2)`, whatever the layer
    size), ``"xavier"`` (:func:`xavier_normal_`) or ``"he"`` (:func:`he_normal_`).
    """
    if scheme not in ("normal", "xavier", "he"):
        raise ValueError(f"scheme must be 'normal', 'xavier' or 'he', got {scheme!r}")
    if (scheme == "normal") != (std is not None):
        raise ValueError("give std with scheme='normal', and only then")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (Linear, nn.Linear)):
                if scheme == "normal":
                    layer.weight.normal_(0.0, std, generator=generator)
                else:
                    (xavier_normal_ if scheme == "xavier" else he_normal_)(
                        layer.weight, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


def train_sgd(model: Sequential, X: torch.Tensor, y: torch.Tensor, *, epochs: int,
              batch_size: int, lr: float, X_val: torch.Tensor | None = None,
              y_val: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> History:
    """Mini-batch SGD on softmax cross-entropy with the hand-written backward pass.

    The same loop as :func:`companion.train.train_classifier` -- each epoch visits the rows
    in the order ``torch.randperm(len(X), generator=generator)`` -- with
    ``loss.backward(); optimizer.step()`` replaced by ``model.backward(...)`` and
    :meth:`Sequential.sgd_step`. The same generator seed therefore gives the same batches
    as ``train_classifier`` with ``torch.optim.SGD``.
    """
    check_xy(X, y)
    if X_val is not None or y_val is not None:
        if X_val is None or y_val is None:
            raise ValueError("give both X_val and y_val, or neither")
        check_xy(X_val, y_val, "X_val", "y_val")
    check_int("epochs", epochs, low=1)
    check_int("batch_size", batch_size, low=1)
    loss_fn = SoftmaxCrossEntropy()
    history = History()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(X), generator=generator).to(X.device)
        for start in range(0, len(X), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(model(X[index]), y[index])     # forward
            model.zero_grad(set_to_none=True)
            model.backward(loss_fn.backward())             # backward, by hand
            model.sgd_step(lr)                             # theta -= lr * grad
            history.step_loss.append(loss.item())
        for X_eval, y_eval, losses, accuracies in (
                (X, y, history.epoch_train_loss, history.epoch_train_accuracy),
                (X_val, y_val, history.epoch_val_loss, history.epoch_val_accuracy)):
            if X_eval is not None:
                loss_value, accuracy_value = evaluate(model, X_eval, y_eval)
                losses.append(loss_value)
                accuracies.append(accuracy_value)
    return history


__all__ = [
    "Layer", "Linear", "ReLU", "Tanh", "Sigmoid", "Dropout", "BatchNorm1d",
    "MSELoss", "SoftmaxCrossEntropy", "Sequential", "MLP", "ACTIVATIONS",
    "xavier_uniform_", "xavier_normal_", "he_uniform_", "he_normal_", "init_weights_",
    "train_sgd",
]
