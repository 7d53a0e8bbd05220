"""companion.device: device choice and seeding."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from companion.device import ENV_VAR, get_device, seed_everything


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn
    flags = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
    yield
    torch.use_deterministic_algorithms(before)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = flags


def test_default_picks_best_available(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


def test_environment_variable_overrides(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert get_device() == torch.device("cpu")


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "not-a-device")
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x"])
def test_unknown_device_names_the_source(monkeypatch, bad):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="prefer"):
        get_device(bad)
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ValueError, match=ENV_VAR):
        get_device()


def test_wrong_type():
    with pytest.raises(TypeError, match="prefer"):
        get_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_missing_cuda_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="not available"):
        get_device("cuda")


@pytest.mark.cuda
def test_cuda_index_out_of_range():
    with pytest.raises(ValueError, match="CUDA device"):
        get_device(f"cuda:{torch.cuda.device_count()}")


def _draw():
    return random.random(), np.random.rand(), torch.rand(3).tolist()


def test_seed_everything_repeats_every_generator():
    seed_everything(123)
    first = _draw()
    seed_everything(123)
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first


def test_seed_everything_sets_deterministic_mode():
    seed_everything(0)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.deterministic


@pytest.mark.cuda
def test_seed_everything_seeds_cuda():
    seed_everything(5)
    a = torch.rand(4, device="cuda")
    seed_everything(5)
    assert torch.equal(a, torch.rand(4, device="cuda"))


@pytest.mark.parametrize("bad, error", [(1.5, TypeError), (True, TypeError), ("1", TypeError),
                                        (-1, ValueError), (2**32, ValueError)])
def test_seed_validation(bad, error):
    with pytest.raises(error, match="seed"):
        seed_everything(bad)


_STATE = """
import sys, torch
from companion.device import seed_everything
{call}
imported = "torch._inductor" in sys.modules
import torch._inductor.config as inductor
print(torch.are_deterministic_algorithms_enabled(),
      torch.is_deterministic_algorithms_warn_only_enabled(), inductor.deterministic, imported)
"""


@pytest.mark.parametrize("mode", [True, False])
def test_deterministic_mode_equals_the_public_call_without_importing_inductor(mode):
    """Both flags end as torch.use_deterministic_algorithms leaves them; TorchInductor is
    not imported (fresh interpreters: the flags and the imports are process-wide)."""
    def state(call):
        out = subprocess.run([sys.executable, "-c", _STATE.format(call=call)], text=True,
                             capture_output=True, timeout=120, check=True)
        return out.stdout.split()

    env_free = "import os; os.environ.pop('TORCHINDUCTOR_DETERMINISTIC', None)\n"
    ours = state(env_free + f"seed_everything(0, deterministic={mode})")
    public = state(env_free + f"torch.use_deterministic_algorithms({mode}, warn_only={mode})")
    assert ours[:3] == public[:3] == [str(mode), str(mode), str(mode)]
    assert ours[3] == "False" and public[3] == "True"
