"""Knowledge distillation: a student learns the teacher's softened output distribution.

Chapter 7, section "Distillation" (Hinton et al., 2015). With temperature ``T``,
``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` over the last dimension,

    L_KD = T^2 * KL(p || q) = T^2 * sum_i p_i (log p_i - log q_i),

averaged over all other positions (the batch, and the sequence for a language model).
The gradient of ``KL`` with respect to the student's logits is ``(q - p) / T``, and
``q - p`` itself shrinks roughly like ``1 / T`` once ``T`` is large, so the factor ``T^2``
keeps the gradient's size roughly independent of a large ``T`` (of the same order, not
equal: the book's chapter 7 measures it). A student is usually
trained on ``alpha * L_KD + (1 - alpha) * cross_entropy(student, labels)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_float, check_tensor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over positions.

    Logits have shape ``(..., classes)``; the teacher is treated as a constant (detached).
    """
    check_tensor("student_logits", student_logits, floating=True)
    check_tensor("teacher_logits", teacher_logits, floating=True)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim == 0:
        raise ValueError(f"student_logits and teacher_logits must have the same shape (..., C), "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    T = check_float("temperature", temperature, 0.0, low_open=True)
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=-1)          # (..., C) teacher
    log_q = F.log_softmax(student_logits / T, dim=-1)                   # (..., C) student
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)                    # (...,) per position
    return T ** 2 * kl.mean()


def student_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, temperature: float = 2.0,
                 alpha: float = 0.5) -> torch.Tensor:
    """``alpha * distillation_loss + (1 - alpha) * cross_entropy(student, targets)``."""
    check_float("alpha", alpha, 0.0, 1.0)
    check_tensor("targets", targets)
    kd = distillation_loss(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]),
                         targets.reshape(-1))
    return alpha * kd + (1 - alpha) * ce
