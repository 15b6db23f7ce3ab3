"""The compiled checks (cabincrew.schema_check) give jsonschema's verdict on every
definition of the protocol schema, on documents shaped by it with deliberate mistakes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabincrew import protocol_schema
from cabincrew.convert import _FORMAT_CHECKER
from cabincrew.schema_check import compile_check, protocol_check

DEFINITIONS = protocol_schema.protocol_schema()["definitions"]
NAMES = sorted(DEFINITIONS)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, 2.5, -1.5]),
    st.sampled_from(["", "x", "2026-01-02T03:04:05Z", "2026-13-02T03:04:05Z", "allow"]),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "name", "type", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _near_valid(draw: Any, schema: Any, depth: int) -> Any:
    """A document shaped by ``schema``, with an occasional deliberate mistake."""
    if draw(st.integers(0, 19)) == 0 or depth > 6:
        return draw(ANY_JSON)  # a mistake (or at least a surprise)
    if schema is True or not isinstance(schema, dict):
        return draw(ANY_JSON)
    if "$ref" in schema:
        return _near_valid(draw, DEFINITIONS[schema["$ref"].split("/")[-1]], depth + 1)
    if "enum" in schema:
        return draw(st.sampled_from(list(schema["enum"])))
    if "anyOf" in schema:
        return _near_valid(draw, draw(st.sampled_from(schema["anyOf"])), depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = draw(st.sampled_from(kind))
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        document = {}
        for name, sub in properties.items():
            if name in required or draw(st.booleans()):
                document[name] = _near_valid(draw, sub, depth + 1)
        if draw(st.integers(0, 9)) == 0 and document:
            document.pop(draw(st.sampled_from(sorted(document))))
        if draw(st.integers(0, 9)) == 0:
            document["unexpected_" + draw(st.sampled_from("ab"))] = draw(ANY_JSON)
        return document
    if kind == "array":
        return [_near_valid(draw, schema.get("items", True), depth + 1) for _ in range(2)]
    if kind == "string":
        if schema.get("format") == "date-time":
            return draw(st.sampled_from(["2026-01-02T03:04:05Z", "2026-01-02 25:00", "x"]))
        return draw(st.sampled_from(["", "x", "sha256:ab"]))
    if kind in ("number", "integer"):
        return draw(st.sampled_from([0, 1, -1, 2.5, 3.0, True]))
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "null":
        return None
    return draw(ANY_JSON)


@pytest.mark.parametrize("formats", [None, _FORMAT_CHECKER], ids=["plain", "date-time"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_checks_agree_with_jsonschema(formats: Any, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(NAMES))
    document = _near_valid(data.draw, DEFINITIONS[name], 0)
    reference = protocol_schema.validator(name)
    if formats is not None:
        reference = reference.evolve(format_checker=formats)
    assert compile_check(reference)(document) == reference.is_valid(document)
    if formats is None:
        assert protocol_check(name)(document) == reference.is_valid(document)


def test_every_protocol_definition_compiles() -> None:
    for name in NAMES:
        compile_check(protocol_schema.validator(name))  # UnsupportedSchema would fail here
