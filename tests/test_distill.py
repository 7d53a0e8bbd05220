"""distillation_loss against the F.kl_div formulation, its gradient, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_gpt

from companion.distill import (
    STUDENT_RECORD,
    STUDENT_SETTINGS,
    distillation_loss,
    load_student_record,
    mean_loss,
    run_students,
    student_data,
    student_loss,
)


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


# ---------------------------------------------------------- section 7c's recorded students

def _tiny_experiment():
    from companion.data import CharCorpus

    corpus = CharCorpus()
    settings = {**STUDENT_SETTINGS, "block": 16, "n_layer": 1, "n_embd": 16, "val_windows": 8,
                "dev_windows": 4, "steps": 20, "every": 5, "learning_rates": [1e-3, 3e-3],
                "seeds": [0, 1], "sizes": [8]}
    data = student_data(corpus, torch.device("cpu"), settings)
    cfg = data["config"]
    teacher = tiny_gpt(cfg.vocab_size, cfg.block_size, n_layer=1, dtype=torch.float32)
    return teacher, data, settings


def test_run_students_grid_then_seeds_and_rerun_matches():
    teacher, data, settings = _tiny_experiment()
    assert data["val"][0].shape == (8, 16) and data["dev"][0].shape == (4, 16)
    grid = run_students(teacher, data, 8, "distilled", settings=settings)
    assert set(grid["dev"]) == {1e-3, 3e-3} and grid["lr"] == min(grid["dev"], key=grid["dev"].get)
    assert len(grid["windows"]) == 2 and len(grid["windows"][0]) == 8
    assert all(s % 5 == 0 and 5 <= s <= 20 for s in grid["steps"])
    # re-training seed 0 at the chosen rate reproduces the grid's run (the page's check)
    again = run_students(teacher, data, 8, "distilled", settings=settings, seeds=[0], lr=grid["lr"])
    assert again["windows"][0] == grid["windows"][0] and again["steps"][0] == grid["steps"][0]
    # the kept checkpoint's dev loss is the loss of the returned model on the dev text
    assert mean_loss(grid["models"][0], *data["dev"]) == pytest.approx(grid["dev"][grid["lr"]])
    with pytest.raises(ValueError, match="method"):
        run_students(teacher, data, 8, "teacher-only", settings=settings)
    with pytest.raises(ValueError, match="size"):
        run_students(teacher, data, 0, "distilled", settings=settings)


def test_student_record_matches_settings(tmp_path):
    record = load_student_record()
    assert set(record) == {(n, m) for n in STUDENT_SETTINGS["sizes"]
                           for m in STUDENT_SETTINGS["methods"]}
    for run in record.values():
        assert set(run["dev"]) == set(STUDENT_SETTINGS["learning_rates"])
        assert len(run["windows"]) == len(STUDENT_SETTINGS["seeds"])
        assert all(len(w) == STUDENT_SETTINGS["val_windows"] for w in run["windows"])
    raw = json.loads(STUDENT_RECORD.read_text())
    raw["settings"]["steps"] = 1
    (tmp_path / "r.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="re-record"):
        load_student_record(tmp_path / "r.json")
