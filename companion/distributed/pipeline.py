"""Pipeline schedules: GPipe and 1F1B, and their idle fraction (chapter 8, "Pipelines")."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._validate import check_float, check_int


@dataclass(frozen=True)
class Task:
    """One pass of one micro-batch on one pipeline stage, placed in time."""

    stage: int
    micro_batch: int
    kind: str  # "F" (forward) or "B" (backward)
    start: float
    end: float


@dataclass
class Schedule:
    """A pipeline schedule: its tasks, and what it costs."""

    tasks: list[Task] = field(default_factory=list)
    n_stages: int = 0

    @property
    def makespan(self) -> float:
        """Time from the first task's start to the last task's end."""
        return max(t.end for t in self.tasks)

    @property
    def idle_fraction(self) -> float:
        """The share of stage time spent waiting, ``1 - busy / (p * makespan)``."""
        busy = sum(t.end - t.start for t in self.tasks)
        return 1 - busy / (self.n_stages * self.makespan)

    def peak_activations(self) -> list[int]:
        """Per stage, the most micro-batches whose activations are held at once
        (forward done, backward not yet)."""
        peaks = []
        for s in range(self.n_stages):
            held = peak = 0
            for t in sorted((t for t in self.tasks if t.stage == s), key=lambda t: t.start):
                held += 1 if t.kind == "F" else -1
                peak = max(peak, held)
            peaks.append(peak)
        return peaks


def _place(orders: list[list[tuple[str, int]]], t_forward: float, t_backward: float) -> Schedule:
    """Start every task as early as its stage and its data allow: ``F(s, i)`` after
    ``F(s-1, i)``; ``B(s, i)`` after ``B(s+1, i)`` (and after ``F(p-1, i)`` on the last
    stage); each stage runs its tasks in the given order, one at a time."""
    p = len(orders)
    end: dict[tuple[str, int, int], float] = {}
    position = [0] * p
    free = [0.0] * p
    tasks = []
    while any(position[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(orders[s]):
                continue
            kind, i = orders[s][position[s]]
            dep = ("F", s - 1, i) if kind == "F" else (("B", s + 1, i) if s < p - 1
                                                        else ("F", s, i))
            if kind == "F" and s == 0:
                ready = 0.0
            elif dep in end:
                ready = end[dep]
            else:
                continue
            start = max(ready, free[s])
            finish = start + (t_forward if kind == "F" else t_backward)
            end[kind, s, i] = free[s] = finish
            tasks.append(Task(s, i, kind, start, finish))
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocks")
    return Schedule(tasks, p)


def _check_pipeline(n_stages, n_micro, t_forward, t_backward) -> None:
    check_int("n_stages", n_stages, 1)
    check_int("n_micro", n_micro, 1)
    check_float("t_forward", t_forward, 0, low_open=True)
    check_float("t_backward", t_backward, 0, low_open=True)


def gpipe_schedule(n_stages: int, n_micro: int, t_forward: float = 1.0,
                   t_backward: float = 2.0) -> Schedule:
    """GPipe :cite:p:`huang2019gpipe`: all forwards, then all backwards, on every stage.

    Idle fraction ``(p - 1) / (m + p - 1)``; each stage holds the activations of all
    ``m`` micro-batches at the turn.
    """
    _check_pipeline(n_stages, n_micro, t_forward, t_backward)
    order = [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]
    return _place([order] * n_stages, t_forward, t_backward)


def one_f_one_b_schedule(n_stages: int, n_micro: int, t_forward: float = 1.0,
                         t_backward: float = 2.0) -> Schedule:
    """1F1B (PipeDream-Flush, :cite:t:`narayanan2021efficient`): stage ``s`` runs
    ``p - s - 1`` warm-up forwards, then alternates one forward and one backward.

    Same bubble as GPipe, but stage ``s`` holds at most ``p - s`` micro-batches'
    activations instead of ``m``.
    """
    _check_pipeline(n_stages, n_micro, t_forward, t_backward)
    orders = []
    for s in range(n_stages):
        warm = min(n_stages - s - 1, n_micro)
        order = [("F", i) for i in range(warm)]
        for i in range(n_micro - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", i) for i in range(n_micro - warm, n_micro)]
        orders.append(order)
    return _place(orders, t_forward, t_backward)
