"""companion.autograd: the scalar engine against PyTorch's autograd, and its graph drawing."""

import math
import random

import matplotlib
import pytest
import torch

from companion.autograd import Value, draw_graph, graph_layout, topological_order

matplotlib.use("Agg")

UNARY = [
    lambda a: a.exp() if abs(_data(a)) < 5 else a.tanh(),
    lambda a: (a * a + 0.5).log(),
    lambda a: a.tanh(),
    lambda a: a.relu(),
    lambda a: a ** 2,
    lambda a: a ** 3,
    lambda a: (a * a + 1) ** 0.5,
    lambda a: (a * a + 1) ** -1.5,
    lambda a: -a,
]
BINARY = [
    lambda a, b: a + b,
    lambda a, b: a - b,
    lambda a, b: a * b,
    lambda a, b: a / (b * b + 1),
    lambda a, b: 2.0 * a + b / 3.0,
    lambda a, b: 1.0 - a * b,
    lambda a, b: 1.0 / (1.0 + (-a).exp()) if abs(_data(a)) < 5 else a * b,
]


def _data(x):
    return x.data if isinstance(x, Value) else x.item()


def _random_expression(leaves, rng: random.Random, n_ops: int):
    """Combine ``leaves`` with ``n_ops`` random operations; the same ``rng`` state builds
    the same expression from Values or from torch scalars (their methods share names)."""
    pool = list(leaves)
    for _ in range(n_ops):
        if rng.random() < 0.4:
            pool.append(rng.choice(UNARY)(rng.choice(pool)))
        else:
            pool.append(rng.choice(BINARY)(rng.choice(pool), rng.choice(pool)))
    return pool[-1] + 0.5 * pool[-2]  # the last two values, so that more of the graph counts


@pytest.mark.parametrize("seed", range(40))
def test_random_expressions_match_pytorch(seed, device):
    rng = random.Random(seed)
    numbers = [rng.uniform(-2, 2) for _ in range(4)]
    n_ops = rng.randint(3, 25)
    ours = [Value(v, label=f"x{i}") for i, v in enumerate(numbers)]
    theirs = [torch.tensor(v, dtype=torch.float64, device=device, requires_grad=True)
              for v in numbers]
    out = _random_expression(ours, random.Random(seed + 1000), n_ops)
    ref = _random_expression(theirs, random.Random(seed + 1000), n_ops)
    out.backward()
    ref.backward()
    assert out.data == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    for a, b in zip(ours, theirs, strict=True):
        expected = 0.0 if b.grad is None else b.grad.item()
        assert a.grad == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_a_value_used_twice_collects_both_gradients():
    a = Value(3.0)
    (a * a + a).backward()                 # d/da (a^2 + a) = 2a + 1
    assert a.grad == 7.0
    b = Value(-2.0)
    (b + b).backward()
    assert b.grad == 2.0


def test_backward_twice_gives_the_same_gradients():
    x, w = Value(0.5), Value(-1.5)
    loss = (x * w).tanh() ** 2
    loss.backward()
    first = (x.grad, w.grad)
    loss.backward()
    assert (x.grad, w.grad) == first


def test_relu_at_zero_has_zero_gradient_like_pytorch():
    a = Value(0.0)
    a.relu().backward()
    t = torch.tensor(0.0, requires_grad=True)
    t.relu().backward()
    assert a.grad == t.grad.item() == 0.0


def test_a_neuron_by_hand():
    # y = tanh(w1 x1 + w2 x2 + b): dy/dw1 = (1 - y^2) x1
    x1, x2, w1, w2, b = (Value(v) for v in (2.0, 0.0, -3.0, 1.0, 6.8813735870195432))
    y = (x1 * w1 + x2 * w2 + b).tanh()
    y.backward()
    assert y.data == pytest.approx(math.tanh(0.8813735870195432))
    assert w1.grad == pytest.approx((1 - y.data ** 2) * 2.0)
    assert w2.grad == 0.0 and b.grad == pytest.approx(1 - y.data ** 2)


def test_topological_order_and_a_deep_graph():
    x = Value(1.0)
    y = x
    for _ in range(5000):                  # deeper than Python's recursion limit allows
        y = y * 1.0 + 0.0
    order = topological_order(y)
    assert order[-1] is y and len(order) == 1 + 4 * 5000  # x, and 4 values per step
    position = {id(node): i for i, node in enumerate(order)}
    assert all(position[id(c)] < position[id(n)] for n in order for c in n._prev)
    y.backward()
    assert x.grad == 1.0


def test_layout_points_every_arrow_to_the_right_and_drawing_labels_every_node():
    a, b = Value(2.0, label="a"), Value(-3.0, label="b")
    c = a * b
    loss = (c + a).tanh()
    loss.backward()
    positions = graph_layout(loss)
    assert len(positions) == 5
    assert all(positions[child][0] < positions[node][0]
               for node in positions for child in node._prev)
    ax = draw_graph(loss, title="test graph")
    texts = [t.get_text() for t in ax.texts if t.get_text()]  # arrows have no text
    assert len(texts) == 5 and any(t.startswith("a\n") for t in texts)
    assert any(f"grad {a.grad:.4g}" in t for t in texts)
    assert ax.get_title() == "test graph" and ax.get_xlabel() and ax.get_ylabel()
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("make, error, match", [
    (lambda: Value("1.0"), TypeError, "real number"),
    (lambda: Value(True), TypeError, "real number"),
    (lambda: Value(-1.0).log(), ValueError, "positive"),
    (lambda: Value(2.0) ** Value(2.0), TypeError, "exponent"),
    (lambda: Value(-2.0) ** 0.5, ValueError, "integer exponent"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()
