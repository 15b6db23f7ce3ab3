"""Templates and when-conditions: a small, safe expression language."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_svc.errors import ExpressionError, ExpressionSyntaxError
from orchestrator_svc.templating import (
    Condition,
    Reference,
    Scope,
    StepValues,
    Template,
    json_equal,
    render_config,
    step_outputs,
)

SCOPE = Scope(
    inputs={"env": "staging", "count": 3, "tags": ["a", "b"], "nested": {"k": {"v": 1}}},
    steps={
        "plan": StepValues(
            {"changed": "true", "files": 2, "flag": True, "list": [1, 2]}, decision="warn"
        ),
    },
)


def test_a_lone_placeholder_keeps_the_json_type() -> None:
    assert Template.parse("{{ inputs.count }}").render(SCOPE) == 3
    assert Template.parse("{{steps.plan.outputs.list}}").render(SCOPE) == [1, 2]
    assert Template.parse("{{ inputs.nested.k.v }}").render(SCOPE) == 1


def test_embedded_placeholders_are_spliced_in_as_text() -> None:
    template = Template.parse(
        "env={{ inputs.env }} n={{ inputs.count }} f={{ steps.plan.outputs.flag }}"
    )
    assert template.render(SCOPE) == "env=staging n=3 f=true"
    assert Template.parse("literal {{ '{{' }} braces }}").render(SCOPE) == "literal {{ braces }}"


def test_render_config_walks_lists_and_mappings_without_touching_keys() -> None:
    config = {"{{ inputs.env }}": ["{{ inputs.env }}", 1, {"deep": "x{{ steps.plan.decision }}"}]}
    assert render_config(config, SCOPE) == {"{{ inputs.env }}": ["staging", 1, {"deep": "xwarn"}]}


@pytest.mark.parametrize(
    "text",
    [
        "{{ inputs.missing }}",
        "{{ steps.other.outputs.x }}",
        "{{ steps.plan.outputs.nope }}",
        "{{ inputs.env.deeper }}",
        "{{ inputs.nested.k.missing }}",
    ],
)
def test_missing_values_are_clear_errors(text: str) -> None:
    with pytest.raises(ExpressionError):
        Template.parse(text).render(SCOPE)


@pytest.mark.parametrize(
    "text",
    [
        "{{ inputs.env",
        "{{ }}",
        "{{ inputs.a inputs.b }}",
        "{{ 1 }}",
        "{{ env }}",
        "{{ steps.plan }}",
        "{{ __import__ }}",
    ],
)
def test_malformed_placeholders_are_syntax_errors(text: str) -> None:
    with pytest.raises(ExpressionSyntaxError):
        Template.parse(text)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('steps.plan.outputs.changed == "true" and inputs.env != "prod"', True),
        ("inputs.env in ['dev', 'staging']", True),
        ("inputs.env not in ['dev', 'staging']", False),
        ("'a' in inputs.tags and not ('z' in inputs.tags)", True),
        ("'stag' in inputs.env", True),
        ("steps.plan.decision == 'warn' or steps.plan.decision == 'allow'", True),
        ("steps.plan.outputs.files == 2.0", True),
        ("steps.plan.outputs.flag == 1", False),
        ("steps.plan.outputs.flag", True),
        ("not not true", True),
        ("null == null and [] == []", True),
        ("inputs.nested == inputs.nested", True),
        ("false and inputs.missing == 1", False),  # short-circuit: the right side is never read
        ("true or inputs.missing", True),
        ("inputs.count == -3 or inputs.count == 3e0", True),
    ],
)
def test_conditions_evaluate_strictly(expression: str, expected: bool) -> None:
    assert Condition.parse(expression).evaluate(SCOPE) is expected


@pytest.mark.parametrize(
    "expression",
    [
        "inputs.env",  # a string is not a boolean
        "inputs.count and true",
        "inputs.missing == 1",
        "1 in inputs.env",
        "'a' in inputs.count",
    ],
)
def test_type_errors_and_missing_values_fail_evaluation(expression: str) -> None:
    with pytest.raises(ExpressionError):
        Condition.parse(expression).evaluate(SCOPE)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('id')",
        "inputs.env.upper()",
        "inputs.count + 1",
        "inputs.count > 1",
        "x",
        "inputs",
        "steps.plan.outputs",
        "a = 1",
        "'unterminated",
        "'bad \\q escape'",
        "(true",
        "[1, 2",
        "true true",
        "",
        "not",
        "inputs.a == 1 == 1",
        "(" * 40 + "true" + ")" * 40,
        "x" * 5000,
    ],
)
def test_anything_outside_the_language_is_refused_at_parse_time(expression: str) -> None:
    with pytest.raises(ExpressionSyntaxError):
        Condition.parse(expression)


def test_references_are_listed_for_load_time_checks() -> None:
    condition = Condition.parse("steps.a-b.outputs.k == inputs.x or steps.c.decision == 'deny'")
    assert [str(ref) for ref in condition.references()] == [
        "steps.a-b.outputs.k",
        "inputs.x",
        "steps.c.decision",
    ]
    assert Reference.parse("steps.s.outputs.k.deeper").keys == ("k", "deeper")


def test_json_equality_never_confuses_booleans_and_numbers() -> None:
    assert not json_equal(True, 1) and not json_equal(0, False)
    assert json_equal(1, 1.0) and json_equal({"a": [1]}, {"a": [1.0]})
    assert not json_equal("1", 1) and not json_equal(None, False)


def test_step_outputs_merge_metrics_under_the_outputs_document() -> None:
    metrics = [{"name": "files", "value": 1}, {"name": "lines", "value": 7}]
    assert step_outputs(metrics, {"files": "one"}) == {"files": "one", "lines": 7}
    assert step_outputs(metrics, None) == {"files": 1, "lines": 7}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parsing_arbitrary_text_fails_only_with_syntax_errors(text: str) -> None:
    try:
        condition = Condition.parse(text)
    except ExpressionSyntaxError:
        return
    try:
        condition.evaluate(SCOPE)
    except ExpressionError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="{} ab.'\"", max_size=30))
def test_parsing_arbitrary_templates_fails_only_with_syntax_errors(text: str) -> None:
    try:
        template = Template.parse(text)
    except ExpressionSyntaxError:
        return
    try:
        template.render(SCOPE)
    except ExpressionError:
        pass
