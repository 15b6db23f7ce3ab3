"""Step dependency graphs: validation, topological order and the scheduler's ready set."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator_svc.errors import DagError, DagProblem


class StepState(enum.Enum):
    """Where one step of a running workflow stands, as far as scheduling is concerned."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # paused on a human approval; counts as in flight
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the step will not change state again."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED, StepState.CANCELLED}
)
_IN_FLIGHT = frozenset({StepState.RUNNING, StepState.WAITING})


@dataclass(frozen=True)
class Frontier:
    """What a scheduler should do next: start, skip or cancel these steps."""

    ready: tuple[str, ...]
    skip: tuple[str, ...]
    cancel: tuple[str, ...]
    in_flight: int
    finished: bool


@dataclass(frozen=True)
class Dag:
    """An acyclic graph of step ids; ``deps[x]`` are the steps that ``x`` depends on."""

    nodes: tuple[str, ...]
    deps: Mapping[str, frozenset[str]]

    def __post_init__(self) -> None:
        problems = _problems(self.nodes, {n: tuple(self.deps.get(n, ())) for n in self.nodes})
        if problems:
            raise DagError(problems)
        object.__setattr__(self, "deps", MappingProxyType(dict(self.deps)))

    @classmethod
    def build(cls, edges: Sequence[tuple[str, Sequence[str]]]) -> Dag:
        """Build from ``(step id, depends_on)`` pairs in declaration order; raise ``DagError``."""
        nodes = [node for node, _ in edges]
        problems = _problems(nodes, {node: tuple(deps) for node, deps in edges})
        if problems:
            raise DagError(problems)
        return cls(tuple(nodes), {node: frozenset(deps) for node, deps in edges})

    def dependents(self, node: str) -> tuple[str, ...]:
        """Return the steps that depend directly on ``node``, in declaration order."""
        return tuple(other for other in self.nodes if node in self.deps[other])

    def ancestors(self, node: str) -> frozenset[str]:
        """Return every step that ``node`` depends on, directly or transitively."""
        seen: set[str] = set()
        stack = list(self.deps[node])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.deps[current])
        return frozenset(seen)

    def topological_order(self) -> tuple[str, ...]:
        """Return every step after its dependencies; ties keep declaration order (stable)."""
        position = {node: index for index, node in enumerate(self.nodes)}
        remaining = {node: len(self.deps[node]) for node in self.nodes}
        children: dict[str, list[str]] = {node: [] for node in self.nodes}
        for node in self.nodes:
            for dep in self.deps[node]:
                children[dep].append(node)
        ready = sorted(
            (n for n, count in remaining.items() if count == 0), key=position.__getitem__
        )
        order: list[str] = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for child in children[node]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    ready.append(child)
            ready.sort(key=position.__getitem__)
        return tuple(order)

    def frontier(self, states: Mapping[str, StepState], limit: int) -> Frontier:
        """Return the next steps to start (at most ``limit`` in flight), skip or cancel.

        A step becomes ready when every dependency succeeded. A step whose dependency was
        skipped is skipped too, and one whose dependency failed or was cancelled is cancelled,
        so that conditions and templates only ever see steps that ran to success.
        """
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        unknown = set(states) - set(self.nodes)
        if unknown:
            raise ValueError(f"states for unknown steps: {sorted(unknown)}")
        state = {node: states.get(node, StepState.PENDING) for node in self.nodes}
        in_flight = sum(1 for node in self.nodes if state[node] in _IN_FLIGHT)
        ready: list[str] = []
        skip: list[str] = []
        cancel: list[str] = []
        for node in self.topological_order():
            if state[node] is not StepState.PENDING:
                continue
            dep_states = {state[dep] for dep in self.deps[node]}
            if dep_states & {StepState.FAILED, StepState.CANCELLED}:
                cancel.append(node)
            elif StepState.SKIPPED in dep_states:
                skip.append(node)
            elif dep_states <= {StepState.SUCCEEDED}:
                ready.append(node)
        free = max(0, limit - in_flight)
        finished = all(state[node].terminal for node in self.nodes)
        return Frontier(tuple(ready[:free]), tuple(skip), tuple(cancel), in_flight, finished)


def _problems(nodes: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[DagProblem]:
    problems: list[DagProblem] = []
    seen: set[str] = set()
    for node in nodes:
        if node in seen:
            problems.append(DagProblem(node, "duplicate step id"))
        seen.add(node)
    for node in dict.fromkeys(nodes):
        listed: set[str] = set()
        for dep in deps.get(node, ()):
            if dep == node:
                problems.append(DagProblem(node, "depends on itself", dep))
            elif dep not in seen:
                problems.append(DagProblem(node, f"depends on unknown step {dep!r}", dep))
            elif dep in listed:
                problems.append(DagProblem(node, f"lists dependency {dep!r} twice", dep))
            listed.add(dep)
    if problems:
        return problems
    cycle = _find_cycle(list(dict.fromkeys(nodes)), deps)
    if cycle:
        problems.append(DagProblem(cycle[0], "dependency cycle: " + " -> ".join(cycle), cycle[1]))
    return problems


def _find_cycle(nodes: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Return one cycle as a closed path ``[a, b, ..., a]``, or an empty list."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(nodes, white)
    for start in nodes:
        if colour[start] != white:
            continue
        # Iterative DFS so a long chain of steps cannot exhaust the recursion limit.
        path: list[str] = [start]
        iters = [iter(deps.get(start, ()))]
        colour[start] = grey
        while path:
            advanced = False
            for dep in iters[-1]:
                if colour[dep] == grey:
                    return [*path[path.index(dep) :], dep]
                if colour[dep] == white:
                    colour[dep] = grey
                    path.append(dep)
                    iters.append(iter(deps.get(dep, ())))
                    advanced = True
                    break
            if not advanced:
                colour[path.pop()] = black
                iters.pop()
    return []
