"""Optimizers from gradient descent to AdamW, matched to ``torch.optim`` (book: chapter 3).

Each optimizer is a ``torch.optim.Optimizer`` subclass with PyTorch's argument names and
defaults: its state lives in ``self.state`` under PyTorch's keys (``momentum_buffer``,
``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so that ``state_dict()`` and
``load_state_dict()`` work -- even across the two libraries -- and parameters whose
``.grad`` is ``None`` are skipped. As in PyTorch, ``lr`` may also be a 0-dim tensor, and
Adam treats a complex parameter as a pair of real ones. The unit tests check that
parameters and every state tensor agree with ``torch.optim`` to 1e-12 relative in float64
(and complex128) over hundreds of steps.

Each update exists twice, as in PyTorch:

* ``*_single_tensor`` -- a loop over the parameters, one readable line per equation;
* ``*_foreach`` -- the same arithmetic on whole lists of tensors with ``torch._foreach_*``
  (a few kernel launches per operation for all parameters on a GPU), the default.

Contents, in the order of the chapter:

* two-dimensional test problems (:func:`quadratic`, :func:`rosenbrock`) and
  :func:`trajectory`, which records an optimizer's path on them;
* :class:`SGD` (momentum, dampening, Nesterov, weight decay), :class:`Adam` (L2 weight
  decay, AMSGrad, and the paper's "epsilon hat" as an option) and :class:`AdamW`;
* :func:`warmup_cosine_schedule`, linear warm-up followed by cosine decay.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from companion._validate import check_int, check_number

# =========================================================================== test problems


def quadratic(point: torch.Tensor, eigenvalues: tuple[float, float] = (1.0, 10.0),
              angle: float = 0.0) -> torch.Tensor:
    r"""An ill-conditioned quadratic bowl :math:`f(z) = \tfrac12 z^\top H z` in two dimensions.

    ``H = R diag(eigenvalues) R^T`` with ``R`` the rotation by ``angle`` (radians), so the
    condition number is ``max / min`` of ``eigenvalues``; ``angle=0`` aligns the valley
    with the axes. ``point`` has shape ``(..., 2)``; the result has shape ``(...)``.
    Minimum 0 at the origin. Book: section "Momentum and Nesterov".
    """
    low, high = eigenvalues
    if not 0 < low <= high:
        raise ValueError(f"eigenvalues must satisfy 0 < first <= second, got {eigenvalues}")
    c, s = math.cos(angle), math.sin(angle)
    u = c * point[..., 0] + s * point[..., 1]   # coordinate along the first eigenvector
    w = -s * point[..., 0] + c * point[..., 1]  # coordinate along the second
    return 0.5 * (low * u**2 + high * w**2)


def rosenbrock(point: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    r"""Rosenbrock's banana valley :math:`f(x, y) = (a - x)^2 + b\,(y - x^2)^2`.

    ``point`` has shape ``(..., 2)``; the result has shape ``(...)``. Minimum 0 at
    :math:`(a, a^2)`, at the end of a long curved valley. Book: "Momentum and Nesterov".
    """
    x, y = point[..., 0], point[..., 1]
    return (a - x) ** 2 + b * (y - x**2) ** 2


def trajectory(objective: Callable[[torch.Tensor], torch.Tensor], start: Sequence[float],
               optimizer_cls: type[Optimizer], steps: int, **hyperparameters) -> torch.Tensor:
    """Minimise ``objective`` from ``start`` with ``optimizer_cls(**hyperparameters)``.

    Works with any ``torch.optim.Optimizer`` class, ours or PyTorch's. Runs in float64.

    Returns
    -------
    torch.Tensor
        ``(steps + 1, len(start))``: the starting point and the point after each step.
    """
    check_int("steps", steps, low=0)
    point = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_cls([point], **hyperparameters)
    path = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        objective(point).backward()
        optimizer.step()
        path.append(point.detach().clone())
    return torch.stack(path)


# =========================================================================== validation


def _at_least_zero(name: str, value) -> None:
    if not check_number(name, value) >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_lr(lr) -> None:
    """``lr`` must be a real number >= 0 or, as ``torch.optim`` allows, a 0-dim tensor.

    A tensor ``lr`` can be changed in place between steps (``lr.fill_(...)``), and each
    step reads its current value. It must be a 0-dim floating-point tensor:
    ``torch.tensor(1e-3)``.
    """
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a real number or a 0-dim floating-point tensor, "
                            f"got a tensor of dtype {lr.dtype}")
        if lr.dim() != 0:
            raise ValueError(f"lr as a tensor must be 0-dim, e.g. torch.tensor(1e-3), got "
                             f"shape {tuple(lr.shape)}")
        if not lr.item() >= 0.0:  # also rejects NaN
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        return
    _at_least_zero("lr", lr)


def _check_sgd_group(group: dict) -> None:
    _check_lr(group["lr"])
    for name in ("momentum", "weight_decay"):
        _at_least_zero(name, group[name])
    check_number("dampening", group["dampening"])
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0, got "
                         f"momentum={group['momentum']!r}, dampening={group['dampening']!r}")


def _check_adam_group(group: dict) -> None:
    _check_lr(group["lr"])
    for name in ("eps", "weight_decay"):
        _at_least_zero(name, group[name])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= check_number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")


def _buckets(group: dict) -> list[list[torch.Tensor]]:
    """The group's parameters that have a gradient, split by (device, dtype).

    A ``torch._foreach_*`` kernel handles a list of tensors of one device and dtype.
    """
    buckets = defaultdict(list)
    for p in group["params"]:
        if p.grad is not None:
            if p.grad.is_sparse:
                raise TypeError(f"gradients must be dense tensors, got a sparse gradient for a "
                                f"parameter of shape {tuple(p.shape)} (see torch.optim.SparseAdam)")
            buckets[(p.device, p.dtype)].append(p)
    return list(buckets.values())


def _closure_loss(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# =========================================================================== SGD


def sgd_single_tensor(params: list[torch.Tensor], grads: list[torch.Tensor],
                      momentum_buffers: list[torch.Tensor | None], *,
                      lr: float | torch.Tensor, momentum: float, dampening: float,
                      weight_decay: float, nesterov: bool) -> None:
    """One SGD step, parameter by parameter (see :class:`SGD` for the equations).

    Updates ``params`` in place; fills the ``None`` entries of ``momentum_buffers``.
    """
    for i, (param, g) in enumerate(zip(params, grads, strict=True)):
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)                 # g + lambda theta
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:                                      # first step: b_1 = g_1
                buf = momentum_buffers[i] = g.detach().clone()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)  # mu b + (1 - tau) g
            g = g.add(buf, alpha=momentum) if nesterov else buf  # g + mu b, or b
        param.add_(g, alpha=-lr)                                 # theta - lr g


def sgd_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor | None], *, lr: float | torch.Tensor,
                momentum: float, dampening: float, weight_decay: float,
                nesterov: bool) -> None:
    """:func:`sgd_single_tensor` on whole lists of tensors with ``torch._foreach_*``.

    All tensors must share one device and dtype. Unlike PyTorch's foreach SGD, this
    never writes into ``grads`` (torch's adds the Nesterov term to ``p.grad`` in place
    when ``weight_decay=0``).
    """
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        started = [i for i, b in enumerate(momentum_buffers) if b is not None]
        if started:
            old = [momentum_buffers[i] for i in started]
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, [grads[i] for i in started], alpha=1 - dampening)
        for i, buf in enumerate(momentum_buffers):
            if buf is None:  # first step of this parameter: b_1 = g_1
                momentum_buffers[i] = grads[i].detach().clone()
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    torch._foreach_add_(params, grads, alpha=-lr)


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, dampening, Nesterov and weight decay.

    The same algorithm and argument names as ``torch.optim.SGD``. For each parameter
    :math:`\theta` with gradient :math:`g_t`, learning rate :math:`\gamma`, weight decay
    :math:`\lambda`, momentum :math:`\mu` and dampening :math:`\tau`:

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{t-1} \\
        b_t &\leftarrow \mu b_{t-1} + (1 - \tau)\, g_t \quad (b_1 = g_1) \\
        g_t &\leftarrow g_t + \mu b_t \ \text{(Nesterov)} \quad\text{or}\quad g_t \leftarrow b_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\, g_t

    With ``momentum=0`` this is plain (mini-batch) SGD :cite:p:`robbins1951stochastic`;
    with momentum it is Polyak's heavy ball :cite:p:`polyak1964some` in PyTorch's variant
    of the form of :cite:t:`sutskever2013importance`, and ``nesterov=True`` is that
    variant of their reformulation of Nesterov's method :cite:p:`nesterov1983method`.
    The variant keeps the learning rate outside the buffer (Sutskever et al. write
    :math:`v_t = \mu v_{t-1} - \gamma g_t`, :math:`\theta_t = \theta_{t-1} + v_t`): the
    same method while :math:`\gamma` is constant, not when a schedule changes it. And it
    starts the buffer at :math:`b_1 = g_1` rather than from zero, which differs only with
    dampening. The momentum buffer is kept in ``state[p]["momentum_buffer"]``.
    Book: chapter 3, "Momentum and Nesterov".

    Parameters
    ----------
    params:
        Parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
    lr, momentum, dampening, weight_decay, nesterov:
        As in ``torch.optim.SGD`` (same defaults; ``lr`` a float or a 0-dim tensor).
        ``weight_decay`` adds :math:`\lambda\theta` to the gradient: the gradient of an
        L2 penalty :math:`\tfrac{\lambda}{2}\lVert\theta\rVert^2`.
    foreach:
        ``True`` (default): :func:`sgd_foreach`; ``False``: :func:`sgd_single_tensor`.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 foreach: bool = True):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group; its hyper-parameters are checked like the defaults."""
        super().add_param_group(param_group)
        _check_sgd_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()`` if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            update = sgd_foreach if group["foreach"] else sgd_single_tensor
            for params in _buckets(group):
                buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
                update(params, [p.grad for p in params], buffers, lr=group["lr"],
                       momentum=group["momentum"], dampening=group["dampening"],
                       weight_decay=group["weight_decay"], nesterov=group["nesterov"])
                if group["momentum"] != 0:
                    for p, buf in zip(params, buffers, strict=True):
                        self.state[p]["momentum_buffer"] = buf
        return loss


# =========================================================================== Adam and AdamW


def _as_real(*lists: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each list with its complex tensors viewed as real ones (``torch.view_as_real``).

    Adam's second moment averages *squared* gradients, and for a complex gradient
    :math:`g = a + ib` the product ``g * g`` is :math:`a^2 - b^2 + 2iab`, not
    :math:`|g|^2 = a^2 + b^2`. Like ``torch.optim``, we treat a complex parameter as a
    pair of real ones -- its real and imaginary parts, each with its own :math:`m` and
    :math:`v` -- by updating real views ``(..., 2)`` that share the complex tensors'
    memory. (PyTorch's single-tensor Adam adds the L2 weight-decay term before it takes
    the views, we after: the two can differ in the last bit.)
    """
    return [[torch.view_as_real(t) if t.is_complex() else t for t in tensors]
            for tensors in lists]


def adam_single_tensor(params: list[torch.Tensor], grads: list[torch.Tensor],
                       exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                       max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *,
                       lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
                       weight_decay: float, amsgrad: bool, decoupled_weight_decay: bool,
                       epsilon_hat: bool = False) -> None:
    """One Adam/AdamW step, parameter by parameter (see :class:`Adam` for the equations).

    Updates ``params``, ``exp_avgs`` (m), ``exp_avg_sqs`` (v), ``max_exp_avg_sqs`` (only
    read when ``amsgrad``) and the step counters ``steps`` in place. Complex tensors are
    updated as pairs of reals (``_as_real``).
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = _as_real(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    for i, (param, g) in enumerate(zip(params, grads, strict=True)):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        t = steps[i].item()
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)      # AdamW: theta <- (1 - lr lambda) theta
            else:
                g = g.add(param, alpha=weight_decay)   # Adam: g <- g + lambda theta (L2)
        m.lerp_(g, 1 - beta1)                          # m <- beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]                     # v_max <- max(v_max, v)
        eps_t = eps / bias_correction2_sqrt if epsilon_hat else eps
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps_t)  # sqrt(v_hat) + eps
        param.addcdiv_(m, denom, value=-lr / bias_correction1)  # theta - lr m_hat / denom


def adam_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 amsgrad: bool, decoupled_weight_decay: bool,
                 epsilon_hat: bool = False) -> None:
    """:func:`adam_single_tensor` on whole lists of tensors with ``torch._foreach_*``.

    All tensors of one list must share a device and dtype (``steps`` are CPU scalars);
    ``lr`` must be a float. Complex tensors are updated as pairs of reals (``_as_real``).
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = _as_real(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    torch._foreach_add_(steps, 1.0)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    ts = [s.item() for s in steps]
    step_sizes = [-lr / (1 - beta1**t) for t in ts]
    bias_corrections2_sqrt = [(1 - beta2**t) ** 0.5 for t in ts]
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denoms = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_corrections2_sqrt)
    if epsilon_hat:
        torch._foreach_add_(denoms, [eps / b for b in bias_corrections2_sqrt])
    else:
        torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)


class Adam(Optimizer):
    r"""Adam :cite:p:`kingma2015adam`, with L2 weight decay and AMSGrad as in ``torch.optim.Adam``.

    For each parameter, with :math:`g_t` its gradient at step :math:`t = 1, 2, \dots`:

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(L2 weight decay; AdamW instead
              scales } \theta_{t-1} \text{ by } 1 - \gamma\lambda) \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \hat m_t &= m_t / (1 - \beta_1^t), \qquad \hat v_t = v_t / (1 - \beta_2^t) \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

    AMSGrad :cite:p:`reddi2018convergence` replaces :math:`v_t` by its running maximum.
    A complex parameter is treated, as in PyTorch, as a pair of real ones (its real and
    imaginary parts), so that :math:`g_t^2` is the square of each part, never the complex
    square (``_as_real``).
    :math:`m_t` is computed as ``m.lerp_(g, 1 - beta1)``, :math:`m + (1-\beta_1)(g - m)`,
    which is the same average rounded as PyTorch rounds it. State per parameter:
    ``step`` (a float CPU scalar, as in PyTorch), ``exp_avg`` (:math:`m`),
    ``exp_avg_sq`` (:math:`v`) and, with AMSGrad, ``max_exp_avg_sq``.
    Book: chapter 3, "Adam, line by line".

    Parameters
    ----------
    params:
        Parameters or parameter groups (dicts).
    lr, betas, eps, weight_decay, amsgrad:
        As in ``torch.optim.Adam`` (same defaults; ``lr`` a float or a 0-dim tensor).
    foreach:
        ``True`` (default): :func:`adam_foreach`; ``False``: :func:`adam_single_tensor`.
        A group whose ``lr`` is a tensor takes the single-tensor path, as
        ``torch.optim.Adam`` does by default (its foreach path takes a tensor ``lr`` only
        with ``capturable=True``).
    epsilon_hat:
        ``False`` (default, PyTorch and the paper's Algorithm 1): :math:`\epsilon` is added
        to :math:`\sqrt{\hat v_t}`. ``True``: the paper's "epsilon hat" form (end of its
        section 2), used by TensorFlow/Keras, :math:`\theta \leftarrow \theta - \gamma
        \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} + \hat\epsilon}`,
        which equals Algorithm 1 with :math:`\epsilon_t = \hat\epsilon / \sqrt{1-\beta_2^t}`.
    """

    #: Whether weight decay is decoupled (AdamW) rather than an L2 term in the gradient.
    decoupled_weight_decay = False

    def __init__(self, params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool = True,
                 epsilon_hat: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, foreach=foreach, epsilon_hat=epsilon_hat)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group; its hyper-parameters are checked like the defaults."""
        super().add_param_group(param_group)
        _check_adam_group(self.param_groups[-1])

    def _state_of(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:  # lazy initialisation, on the first step that has a gradient
            state["step"] = torch.tensor(0.0, device="cpu")  # a host scalar, as in PyTorch
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()`` if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            foreach = group["foreach"] and not torch.is_tensor(group["lr"])
            update = adam_foreach if foreach else adam_single_tensor
            beta1, beta2 = group["betas"]
            for params in _buckets(group):
                states = [self._state_of(p, group["amsgrad"]) for p in params]
                update(params, [p.grad for p in params],
                       [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                       [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"],
                       amsgrad=group["amsgrad"],
                       decoupled_weight_decay=self.decoupled_weight_decay,
                       epsilon_hat=group.get("epsilon_hat", False))
        return loss


class AdamW(Adam):
    r"""AdamW :cite:p:`loshchilov2019decoupled`: Adam with decoupled weight decay.

    Before the Adam update, every parameter is shrunk by the factor
    :math:`1 - \gamma\lambda`, and the gradient that feeds :math:`m` and :math:`v` carries
    no decay term -- so the decay is not divided by :math:`\sqrt{\hat v_t}` and is the same
    relative shrinkage for every weight. As in ``torch.optim.AdamW`` the decay is
    multiplied by the learning rate :math:`\gamma` (so a schedule scales both), and
    ``weight_decay`` defaults to ``1e-2``. Everything else is :class:`Adam`.
    Book: chapter 3, "Weight decay: L2 in Adam versus AdamW".
    """

    decoupled_weight_decay = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach: bool = True,
                 epsilon_hat: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         epsilon_hat=epsilon_hat)


# =========================================================================== schedules


@dataclass(frozen=True)
class WarmupCosine:
    r"""The multiplier of the learning rate at step ``t``: linear warm-up, then cosine decay.

    With :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps`` and :math:`r` =
    ``min_lr_ratio``:

    .. math::

        f(t) = \begin{cases}
            \dfrac{t + 1}{W} & t < W \\[1ex]
            r + (1 - r)\,\dfrac{1 + \cos\!\big(\pi \min(1, \tfrac{t - W}{T - W})\big)}{2}
                & t \ge W
        \end{cases}

    so the multiplier climbs in :math:`W` equal steps to 1 (reached at step
    :math:`W - 1`), falls to :math:`r` at step :math:`T` along half a cosine
    :cite:p:`loshchilov2017sgdr`, and stays there. ``warmup_steps=0`` is a pure cosine.
    A callable object rather than a lambda, so that ``LambdaLR.state_dict()`` saves it.
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        for name in ("warmup_steps", "total_steps"):
            check_int(name, getattr(self, name), low=0)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps must be > warmup_steps={self.warmup_steps}, "
                             f"got {self.total_steps}")
        if not 0.0 <= check_number("min_lr_ratio", self.min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                           min_lr_ratio: float = 0.0, last_epoch: int = -1) -> LambdaLR:
    """A ``LambdaLR`` that multiplies each group's initial lr by :class:`WarmupCosine`.

    Call ``scheduler.step()`` once after each ``optimizer.step()``; the learning rate of
    step ``t`` (counting from 0) is ``initial_lr * WarmupCosine(...)(t)``. Up to step
    :math:`T` it is PyTorch's ``SequentialLR([LinearLR(start_factor=1/W, total_iters=W-1),
    CosineAnnealingLR(T_max=T-W, eta_min=r*lr)], milestones=[W])``, which the tests
    check. Book: chapter 3, "Warm-up and cosine decay".
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio),
                    last_epoch=last_epoch)


__all__ = [
    "quadratic", "rosenbrock", "trajectory",
    "sgd_single_tensor", "sgd_foreach", "SGD",
    "adam_single_tensor", "adam_foreach", "Adam", "AdamW",
    "WarmupCosine", "warmup_cosine_schedule",
]
