"""Step graphs: validation, order and the scheduler's frontier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_svc.dag import Dag, StepState
from orchestrator_svc.errors import DagError

S = StepState


def diamond() -> Dag:
    return Dag.build([("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", [])])


def test_topological_order_takes_the_earliest_declared_ready_step_first() -> None:
    assert diamond().topological_order() == ("a", "b", "c", "d", "e")


def test_ancestors_and_dependents_follow_the_edges() -> None:
    dag = diamond()
    assert dag.ancestors("d") == {"a", "b", "c"}
    assert dag.ancestors("a") == frozenset()
    assert dag.dependents("a") == ("b", "c")


@pytest.mark.parametrize(
    ("edges", "step"),
    [
        ([("a", []), ("a", [])], "a"),
        ([("a", ["ghost"])], "a"),
        ([("a", ["a"])], "a"),
        ([("a", []), ("b", ["a", "a"])], "b"),
    ],
)
def test_malformed_graphs_name_the_offending_step(
    edges: list[tuple[str, list[str]]], step: str
) -> None:
    with pytest.raises(DagError) as caught:
        Dag.build(edges)
    assert [problem.step for problem in caught.value.problems] == [step]


def test_a_cycle_is_reported_as_a_closed_path() -> None:
    with pytest.raises(DagError) as caught:
        Dag.build([("x", []), ("a", ["c"]), ("b", ["a"]), ("c", ["b"])])
    (problem,) = caught.value.problems
    assert problem.step == "a" and problem.dependency == "c"


def test_the_frontier_starts_independent_steps_up_to_the_limit() -> None:
    dag = diamond()
    first = dag.frontier({}, limit=2)
    assert first.ready == ("a", "e") and not first.finished
    running = dag.frontier({"a": S.RUNNING, "e": S.RUNNING}, limit=2)
    assert running.ready == () and running.in_flight == 2
    after_a = dag.frontier({"a": S.SUCCEEDED, "e": S.RUNNING}, limit=2)
    assert after_a.ready == ("b",)
    wide = dag.frontier({"a": S.SUCCEEDED, "e": S.WAITING}, limit=8)
    assert wide.ready == ("b", "c")


def test_skips_and_failures_propagate_to_dependents() -> None:
    dag = diamond()
    skipped = dag.frontier(
        {"a": S.SUCCEEDED, "b": S.SKIPPED, "c": S.SUCCEEDED, "e": S.SUCCEEDED}, limit=4
    )
    assert skipped.skip == ("d",) and skipped.ready == ()
    failed = dag.frontier({"a": S.FAILED}, limit=4)
    assert failed.cancel == ("b", "c") and failed.ready == ("e",)


def test_the_frontier_says_when_everything_is_terminal() -> None:
    dag = Dag.build([("a", []), ("b", ["a"])])
    assert dag.frontier({"a": S.SUCCEEDED, "b": S.CANCELLED}, limit=1).finished


def test_the_frontier_refuses_a_zero_limit_and_unknown_steps() -> None:
    with pytest.raises(ValueError):
        diamond().frontier({}, limit=0)
    with pytest.raises(ValueError):
        diamond().frontier({"ghost": S.RUNNING}, limit=1)


def test_a_long_chain_does_not_exhaust_the_stack() -> None:
    edges: list[tuple[str, list[str]]] = [("s0", [])] + [
        (f"s{i}", [f"s{i - 1}"]) for i in range(1, 5000)
    ]
    assert Dag.build(edges).topological_order()[-1] == "s4999"
    with pytest.raises(DagError):
        Dag.build([("s0", ["s4999"]), *edges[1:]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(min_value=0, max_value=30), max_size=4), min_size=1, max_size=30)
)
def test_any_acyclic_graph_orders_every_step_after_its_dependencies(raw: list[list[int]]) -> None:
    # Edges only point backwards, so the graph is acyclic by construction.
    edges = [
        (f"s{i}", sorted({f"s{d % i}" for d in deps}) if i else []) for i, deps in enumerate(raw)
    ]
    dag = Dag.build(edges)
    order = dag.topological_order()
    assert sorted(order) == sorted(node for node, _ in edges)
    position = {node: index for index, node in enumerate(order)}
    for node, deps in edges:
        assert all(position[dep] < position[node] for dep in deps)
