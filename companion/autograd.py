"""A reverse-mode automatic differentiation engine on scalars, and a drawing of its graph.

Book: Chapter 2, "What ``loss.backward()`` does". In the spirit of micrograd:
:class:`Value` wraps one float; every operation on values creates a new value that
remembers its inputs and how to pass a gradient back to them. :meth:`Value.backward`
sorts the graph topologically and applies the chain rule from the output to the
leaves -- which is what ``torch.Tensor.backward`` does, on tensors instead of scalars
:cite:p:`baydin2018automatic,paszke2019pytorch`. :func:`draw_graph` draws the graph
with matplotlib alone (no Graphviz).
"""

from __future__ import annotations

import math

from companion._validate import check_number


class Value:
    """A scalar in a computation graph: its ``data`` and, after ``backward()``, its ``grad``.

    Supports ``+ - * / **`` (with a number as exponent), ``exp``, ``log``, ``tanh`` and
    ``relu``; plain numbers mix in (``2 * v``, ``v + 1``).
    """

    def __init__(self, data: float, _children: tuple[Value, ...] = (), _op: str = "",
                 label: str = ""):
        self.data = check_number("data", data)
        self.grad = 0.0                      # dL/d(this value), filled in by backward()
        self._backward = lambda: None        # adds this node's grad into its children's
        self._prev = _children
        self._op = _op
        self.label = label

    def __add__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward():                     # d(a + b)/da = d(a + b)/db = 1
            self.grad += out.grad
            other.grad += out.grad
        out._backward = _backward
        return out

    def __mul__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "*")

        def _backward():                     # d(ab)/da = b, d(ab)/db = a
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad
        out._backward = _backward
        return out

    def __pow__(self, exponent: float) -> Value:
        check_number("exponent", exponent)
        if self.data < 0 and not float(exponent).is_integer():
            raise ValueError(f"a negative base ({self.data}) needs an integer exponent, "
                             f"got {exponent}")
        out = Value(self.data ** exponent, (self,), f"**{exponent:g}")

        def _backward():                     # d(a^k)/da = k a^(k-1)
            self.grad += exponent * self.data ** (exponent - 1) * out.grad
        out._backward = _backward
        return out

    def exp(self) -> Value:
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward():                     # d(e^a)/da = e^a
            self.grad += out.data * out.grad
        out._backward = _backward
        return out

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log needs a positive value, got {self.data}")
        out = Value(math.log(self.data), (self,), "log")

        def _backward():                     # d(log a)/da = 1/a
            self.grad += out.grad / self.data
        out._backward = _backward
        return out

    def tanh(self) -> Value:
        out = Value(math.tanh(self.data), (self,), "tanh")

        def _backward():                     # d(tanh a)/da = 1 - tanh(a)^2
            self.grad += (1 - out.data ** 2) * out.grad
        out._backward = _backward
        return out

    def relu(self) -> Value:
        out = Value(max(self.data, 0.0), (self,), "relu")

        def _backward():                     # d(relu a)/da = 1 if a > 0 else 0
            self.grad += (self.data > 0) * out.grad
        out._backward = _backward
        return out

    def backward(self) -> None:
        """Set ``grad`` of every value this one depends on to d(self)/d(that value).

        Gradients are set afresh on each call (PyTorch instead adds into ``.grad``).
        """
        order = topological_order(self)
        for node in order:
            node.grad = 0.0
        self.grad = 1.0                      # dL/dL = 1
        for node in reversed(order):         # outputs before the inputs they depend on
            node._backward()

    # the rest is arithmetic built from the operations above
    def __neg__(self) -> Value:
        return self * -1

    def __sub__(self, other: Value | float) -> Value:
        return self + (-other)

    def __truediv__(self, other: Value | float) -> Value:
        return self * other ** -1

    def __radd__(self, other: float) -> Value:
        return self + other

    def __rmul__(self, other: float) -> Value:
        return self * other

    def __rsub__(self, other: float) -> Value:
        return other + (-self)

    def __rtruediv__(self, other: float) -> Value:
        return other * self ** -1

    def __repr__(self) -> str:
        return f"Value(data={self.data:.4g}, grad={self.grad:.4g})"


def topological_order(root: Value) -> list[Value]:
    """Every value ``root`` depends on, each after all of its inputs (``root`` last)."""
    order: list[Value] = []
    visited: set[int] = set()
    stack: list[tuple[Value, bool]] = [(root, False)]
    while stack:                             # depth-first search without recursion
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
        elif id(node) not in visited:
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in node._prev)
    return order


# --------------------------------------------------------------------------- the drawing


def graph_layout(root: Value) -> dict[Value, tuple[float, float]]:
    """Positions ``(column, row)`` for every node. An operation's column is its depth (the
    longest path from a leaf); a leaf sits just left of its first consumer, so that every
    arrow points to the right and is short."""
    order = topological_order(root)
    depth: dict[int, int] = {}
    for node in order:
        depth[id(node)] = 1 + max((depth[id(c)] for c in node._prev), default=-1)
    first_use: dict[int, int] = {}           # leaf -> depth of its earliest consumer
    for node in order:
        for child in node._prev:
            if not child._prev:
                first_use[id(child)] = min(first_use.get(id(child), depth[id(node)]),
                                           depth[id(node)])
    for leaf_id, consumer_depth in first_use.items():
        depth[leaf_id] = consumer_depth - 1
    columns: dict[int, list[Value]] = {}
    for node in order:
        columns.setdefault(depth[id(node)], []).append(node)
    positions = {}
    for column, nodes in columns.items():
        for row, node in enumerate(nodes):
            positions[node] = (float(column), row - (len(nodes) - 1) / 2)
    return positions


def draw_graph(root: Value, ax=None, *, title: str = "Computation graph"):
    """Draw the graph of ``root`` with matplotlib: one box per value, labelled with its
    operation (or name), its ``data`` and its ``grad``; arrows from inputs to outputs."""
    import matplotlib.pyplot as plt

    positions = graph_layout(root)
    n_columns = 1 + max(x for x, _ in positions.values())
    n_rows = max(sum(1 for x, _ in positions.values() if x == c) for c in range(int(n_columns)))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 1.9 * n_columns), max(2.5, 1.25 * n_rows)))
    for node, (x, y) in positions.items():
        for child in node._prev:
            cx, cy = positions[child]
            ax.annotate("", xy=(x - 0.36, y), xytext=(cx + 0.36, cy),
                        arrowprops=dict(arrowstyle="-|>", color="0.45", lw=1.2,
                                        shrinkA=0, shrinkB=0))
    for node, (x, y) in positions.items():
        name = " ".join(filter(None, (node.label, f"({node._op})" if node._op else ""))) \
            or "leaf"
        leaf = not node._prev
        ax.text(x, y, f"{name}\ndata {node.data:.4g}\ngrad {node.grad:.4g}",
                ha="center", va="center", fontsize=9, family="monospace",
                bbox=dict(boxstyle="round,pad=0.35", lw=1.2,
                          fc="#e8f1fa" if leaf else "#fdf1e3",
                          ec="#0173b2" if leaf else "#de8f05"))
    ax.set_xlim(-0.6, n_columns - 0.4)
    half = max(abs(y) for _, y in positions.values()) + 0.6
    ax.set_ylim(-half, half)
    ax.set_title(title)
    ax.set_xlabel("depth: operations since the inputs")
    ax.set_ylabel("values at that depth")
    ax.set_xticks(range(int(n_columns)))
    ax.set_yticks([])
    ax.grid(False)
    return ax


__all__ = ["Value", "topological_order", "graph_layout", "draw_graph"]
