"""companion.federated: FedAvg against centralised gradient descent, secure aggregation
against the plain sum, gradient inversion against the true input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.federated import (
    MODULUS,
    client_update,
    decode_fixed_point,
    encode_fixed_point,
    fedavg,
    federated_round,
    gradient_inversion,
    mask_update,
    secure_sum,
)


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().to(device)


def _clients(sizes, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64).to(device),
             torch.randint(0, 3, (n,), generator=g).to(device)) for n in sizes]


def test_fedavg_with_one_full_batch_step_is_centralised_gradient_descent(device):
    clients = _clients([3, 8, 5, 11], device)
    fed, central = _model(device), _model(device)
    x = torch.cat([c[0] for c in clients])
    y = torch.cat([c[1] for c in clients])
    opt = torch.optim.SGD(central.parameters(), lr=0.3)
    for _ in range(5):
        federated_round(fed, clients, lr=0.3, local_steps=1)
        opt.zero_grad()
        F.cross_entropy(central(x), y).backward()
        opt.step()
    for a, b in zip(fed.parameters(), central.parameters()):
        assert (a - b).abs().max() < 1e-13
    # several local steps are not gradient descent on the union any more
    drift = _model(device)
    for _ in range(5):
        federated_round(drift, clients, lr=0.3, local_steps=4)
    four_central = _model(device)
    opt = torch.optim.SGD(four_central.parameters(), lr=0.3)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(four_central(x), y).backward()
        opt.step()
    gap = max(float((a - b).detach().abs().max())
              for a, b in zip(drift.parameters(), four_central.parameters()))
    assert gap > 1e-4


def test_fedavg_weights_and_integer_entries():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    avg = fedavg([a, b], [1.0, 2.0])
    assert torch.equal(avg["w"], torch.tensor([3.0, 6.0]))
    assert int(avg["n"]) == 3  # integer entries are copied from the first client
    # client_update leaves the global model untouched
    model = _model()
    before = copy.deepcopy(model.state_dict())
    (x, y), = _clients([4])
    client_update(model, x, y, lr=0.1, local_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fedavg_bad_input():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        fedavg([a, a], [1.0, 0.0])
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        fedavg([a, a], [-1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per client"):
        fedavg([a, a], [1.0])
    with pytest.raises(ValueError, match="client_states\\[1\\]"):
        fedavg([a, {"v": torch.zeros(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="client_states\\[1\\]\\['w'\\]"):
        fedavg([a, {"w": torch.zeros(3)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])
    with pytest.raises(ValueError, match="local_steps"):
        client_update(_model(), *_clients([2])[0], lr=0.1, local_steps=0)


def test_secure_sum_is_the_exact_sum_and_masked_updates_look_uniform(device):
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(4000, generator=g, dtype=torch.float64).to(device) for _ in range(5)]
    encoded = [encode_fixed_point(u) for u in updates]
    masked = [mask_update(e, i, 5, seed=42) for i, e in enumerate(encoded)]
    plain = encoded[0]
    for e in encoded[1:]:
        plain = (plain + e) % MODULUS
    assert torch.equal(secure_sum(masked), plain)  # exact, integer arithmetic
    total = decode_fixed_point(secure_sum(masked))
    assert (total - sum(updates)).abs().max() <= 5 * 2 ** -17  # rounding of the encoding
    # one masked update is spread over [0, 2^32): its mean is near 2^31, unlike the update's
    m = masked[0].double() / MODULUS
    assert abs(float(m.mean()) - 0.5) < 0.02 and abs(float(m.std()) - (1 / 12) ** 0.5) < 0.02
    # the round trip of a single value
    x = torch.tensor([-1.5, 0.0, 2.25, -3e-5], dtype=torch.float64)
    assert (decode_fixed_point(encode_fixed_point(x)) - x).abs().max() <= 2 ** -17


def test_secure_aggregation_bad_input():
    with pytest.raises(ValueError, match="too large"):
        encode_fixed_point(torch.tensor([1e6]), frac_bits=16)
    with pytest.raises(ValueError, match="client"):
        mask_update(torch.zeros(3, dtype=torch.int64), 3, 3, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        mask_update(torch.zeros(3, dtype=torch.int64), 0, 1, seed=0)
    with pytest.raises(TypeError, match="encoded"):
        mask_update(torch.zeros(3), 0, 2, seed=0)


def test_gradient_inversion_recovers_the_input_of_a_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3)).double()
    x = torch.rand(1, 8, dtype=torch.float64)
    y = torch.tensor([2])
    shared = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    # the label is the only negative entry of the last bias gradient
    assert int(shared[-1].argmin()) == 2
    x_hat = gradient_inversion(model, F.cross_entropy, shared, y, x.shape, steps=100,
                               generator=torch.Generator().manual_seed(0))
    assert (x_hat - x).abs().max() < 1e-4
    # noise on the gradient (as DP-SGD adds) ruins the reconstruction
    g = torch.Generator().manual_seed(1)
    noisy = [s + 0.05 * torch.randn(s.shape, generator=g, dtype=s.dtype) for s in shared]
    x_bad = gradient_inversion(model, F.cross_entropy, noisy, y, x.shape, steps=100,
                               generator=torch.Generator().manual_seed(0))
    assert (x_bad - x).abs().max() > 0.1
    with pytest.raises(ValueError, match="one tensor per parameter"):
        gradient_inversion(model, F.cross_entropy, shared[:-1], y, x.shape)
