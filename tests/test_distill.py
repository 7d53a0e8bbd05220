"""distillation_loss against the F.kl_div formulation, its gradient, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from companion.distill import distillation_loss, student_loss


def _oracle(student, teacher, T):
    """The usual PyTorch formulation: kl_div(log q, log p, log_target) * T^2, per position."""
    C = student.shape[-1]
    kl = F.kl_div(F.log_softmax(student.reshape(-1, C) / T, dim=-1),
                  F.log_softmax(teacher.reshape(-1, C) / T, dim=-1),
                  reduction="batchmean", log_target=True)
    return kl * T ** 2


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("shape", [(16, 10), (3, 7, 65)])
def test_equals_kl_div_and_its_gradient(T, shape, device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device)
    ours = distillation_loss(s, t, T)
    ref = _oracle(s, t, T)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(_oracle(s, t, T), s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-15)
    # analytic gradient: T^2 * (q - p) / T / positions
    n = s.numel() // shape[-1]
    q, p = F.softmax(s.detach() / T, -1), F.softmax(t / T, -1)
    assert torch.allclose(g_ours, T * (q - p) / n, rtol=1e-10, atol=1e-15)


def test_gradcheck_and_properties():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t, 3.0), (s,))
    assert distillation_loss(t, t, 2.0).abs().item() < 1e-15          # zero when they agree
    assert distillation_loss(s, t, 2.0).item() > 0
    shifted = distillation_loss(s + 5.0, t - 2.0, 2.0)                  # logits shift-invariant
    assert torch.allclose(shifted, distillation_loss(s, t, 2.0), rtol=1e-12)
    t.requires_grad_()
    distillation_loss(s, t, 2.0).backward()
    assert t.grad is None                                               # teacher is a constant


def test_student_loss_mixes_both_terms():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    ce = F.cross_entropy(s.reshape(-1, 7), y.reshape(-1))
    kd = distillation_loss(s, t, 2.0)
    assert torch.allclose(student_loss(s, t, y, 2.0, 0.3), 0.3 * kd + 0.7 * ce, rtol=1e-14)
    assert torch.allclose(student_loss(s, t, y, 2.0, 0.0), ce, rtol=1e-14)


def test_bad_input():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    for T in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(s, t, T)
    with pytest.raises(TypeError, match="temperature must be"):
        distillation_loss(s, t, "2")
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        distillation_loss(torch.ones(3, 4, dtype=torch.int64), t)
    with pytest.raises(ValueError, match="alpha"):
        student_loss(s, t, torch.zeros(3, dtype=torch.int64), alpha=1.5)
