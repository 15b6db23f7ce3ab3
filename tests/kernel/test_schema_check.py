"""Compiled schema checks give jsonschema's verdict, on valid, mutated and random instances."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema._utils import equal as jsonschema_equal

from cabincrew import protocol_schema
from cabincrew.convert import _validator as protocol_validator
from cabincrew.emitter import _audit_event_validator
from cabincrew.schema_check import UnsupportedSchema, _equal, compile_check, fast_check
from preflight_svc.policy_input import (
    ArtifactInput,
    PolicyContext,
    SecretFinding,
    _validators,
    build_content_input,
    build_preflight_input,
)

# --- instances -------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 2.5]),
    st.text(max_size=8),
    st.sampled_from(
        [
            "",
            "allow",
            "deny",
            "opa",
            "info",
            "flight-plan",
            "preflight",
            "content",
            "mcp",
            "INIT",
            "0" * 64,
            "a" * 63,
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05.123456Z",
            "2026-13-02T03:04:05Z",
            "yesterday",
        ]
    ),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=10,
)


def _audit_event() -> dict[str, Any]:
    evaluation = {
        "source": "opa",
        "policy_id": "cabincrew.preflight.paths",
        "decision": "allow",
        "severity": 0,
        "reason": "",
        "evidence": {"findings": []},
        "evaluated_at": "2026-12-05T08:30:55.207686Z",
    }
    return {
        "event_id": "3f0e6a52-8d7c-4d0e-9a55-1c1f2b7a9e10",
        "timestamp": "2026-12-05T08:30:55.232963Z",
        "event_type": "preflight.evaluated",
        "workflow_state": "PREFLIGHT_COMPLETE",
        "severity": "info",
        "message": "preflight allow for wf/patch",
        "workflow": {"workflow_id": "wf", "step_id": "patch", "mode": "flight-plan"},
        "artifacts": [
            {"name": "a.diff", "role": "evidence", "path": "a.diff", "hash": "0" * 64, "size": 9}
        ],
        "policy": {
            "decision": "allow",
            "policy_evaluations": [evaluation, {**evaluation, "decision": "warn"}],
            "aggregation_method": "most_restrictive",
            "workflow_state": "PREFLIGHT_COMPLETE",
            "violations": [],
            "warnings": ["x"],
        },
        "gateway": {"gateway_type": "mcp", "policy_decision": "deny", "tool": "t"},
    }


_ARTIFACT = {"artifact_type": "diff", "action": "update", "target": "x.py", "mime": "text/x-diff"}


def _preflight_input() -> dict[str, Any]:
    body = b"--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    artifact = ArtifactInput("edit", "evidence", "edit", "0" * 64, len(body), _ARTIFACT, body)
    return build_preflight_input(
        workflow_id="wf",
        step_id="s",
        mode="flight-plan",
        receipt={"engine_id": "e", "mode": "flight-plan", "status": "success"},
        artifacts=[artifact],
        context=PolicyContext(environment="staging", workspace_root="/ws"),
        secrets_found=[SecretFinding("aws-access-key", artifact="edit", line=2)],
    )


def _content_input() -> dict[str, Any]:
    return build_content_input(
        domain="mcp",
        phase="request",
        payload={"method": "tools/call", "params": {"name": "read_file", "arguments": {}}},
        context={"environment": "staging"},
        texts=["hello"],
        secrets_found=[SecretFinding("github-pat", text_index=0)],
    )


_CASES = {
    "AuditEvent": (_audit_event_validator, _audit_event),
    "PreflightInput": (lambda: _validators()["PreflightInput"], _preflight_input),
    "ContentInput": (lambda: _validators()["ContentInput"], _content_input),
}


def _places(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a document."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _places(item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((value, index))
            _places(item, out)
    return out


# --- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_CASES))
def test_the_examples_are_valid_for_both(name: str) -> None:
    make_validator, make_document = _CASES[name]
    validator = make_validator()
    document = make_document()
    assert validator.is_valid(document)
    assert compile_check(validator)(document)


@pytest.mark.parametrize("name", sorted(_CASES))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_document_gets_the_verdict_of_jsonschema(name: str, data: Any) -> None:
    make_validator, make_document = _CASES[name]
    validator = make_validator()
    check = compile_check(validator)
    document = make_document()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        places = _places(document, [])
        container, key = data.draw(st.sampled_from(places))
        operation = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if operation == "replace":
            container[key] = data.draw(_json)
        elif operation == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[data.draw(st.text(max_size=6))] = data.draw(_json)
        else:
            container.append(copy.deepcopy(data.draw(st.sampled_from(container or [None]))))
    assert check(document) == validator.is_valid(document)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(protocol_schema.definition_names())), value=_json)
def test_any_protocol_definition_on_any_value_gets_the_verdict_of_jsonschema(
    name: str, value: Any
) -> None:
    validator = protocol_validator(name)
    assert compile_check(validator)(value) == validator.is_valid(value)


@settings(max_examples=500, deadline=None)
@given(one=_json, two=_json)
def test_equality_is_jsonschemas_equality(one: Any, two: Any) -> None:
    assert _equal(one, two) == jsonschema_equal(one, two)
    assert _equal(one, copy.deepcopy(one)) == jsonschema_equal(one, copy.deepcopy(one))


def test_bool_and_number_are_told_apart_as_jsonschema_does() -> None:
    validator = jsonschema.Draft202012Validator({"enum": [0, 1, "1"], "type": "integer"})
    check = compile_check(validator)
    for value in (0, 1, 1.0, True, False, "1", 2, None):
        assert check(value) == validator.is_valid(value), value


def test_recursive_references_compile_and_check() -> None:
    schema = {
        "$defs": {
            "Tree": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}},
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/Tree",
    }
    validator = jsonschema.Draft202012Validator(schema)
    check = compile_check(validator)
    for value in ({"children": [{"children": []}]}, {"children": [{"x": 1}]}, []):
        assert check(value) == validator.is_valid(value)


@pytest.mark.parametrize(
    "schema",
    [
        {"maxLength": 3},
        {"patternProperties": {"a": {}}},
        {"items": [{"type": "string"}]},
        {"$ref": "#/$defs/X", "type": "object", "$defs": {"X": {}}},
        {"$ref": "https://example.com/schema"},
        {"properties": {"a": {"$id": "https://example.com/a", "type": "string"}}},
        {"type": "uuid"},
    ],
)
def test_a_schema_with_anything_not_compiled_is_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchema):
        compile_check(jsonschema.Draft202012Validator(schema))


def test_a_ref_beside_an_asserted_format_is_refused() -> None:
    # 2020-12 applies the format beside the $ref, draft 7 does not: neither is guessed.
    checker = jsonschema.FormatChecker(formats=("ipv4",))
    schema = {"$ref": "#/$defs/S", "format": "ipv4", "$defs": {"S": {"type": "string"}}}
    with pytest.raises(UnsupportedSchema):
        compile_check(jsonschema.Draft202012Validator(schema, format_checker=checker))
    unasserted = compile_check(jsonschema.Draft202012Validator(schema))
    assert unasserted("not an address") and not unasserted(1)


def test_a_custom_type_checker_is_refused() -> None:
    checker = jsonschema.Draft7Validator.TYPE_CHECKER.redefine("array", lambda _c, v: True)
    custom = jsonschema.validators.extend(jsonschema.Draft7Validator, type_checker=checker)
    with pytest.raises(UnsupportedSchema):
        compile_check(custom({"type": "array"}))


def test_fast_check_keeps_the_validators_verdict_where_it_cannot_compile() -> None:
    # maxLength is not compiled: fast_check falls back to the validator's own is_valid.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}}}
    validator = jsonschema.Draft7Validator(schema)
    with pytest.raises(UnsupportedSchema):
        compile_check(validator)
    check = fast_check(validator)
    assert check({"name": "abc"}) is True
    assert check({"name": "abcd"}) is False
    compiled = fast_check(jsonschema.Draft7Validator({"type": "object", "required": ["a"]}))
    assert compiled({"a": 1}) is True and compiled({}) is False
