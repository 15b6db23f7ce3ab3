"""The vendored protocol schema, loaded once, and draft-07 validators for its definitions."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft7Validator

SCHEMA_RESOURCE = ("cabincrew", "schemas/protocol.schema.json")


@functools.cache
def protocol_schema() -> dict[str, Any]:
    """Return the parsed vendored ``protocol.schema.json`` (cached; do not mutate)."""
    package, name = SCHEMA_RESOURCE
    text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def definition_names() -> frozenset[str]:
    """Return the names of every definition in the protocol schema."""
    return frozenset(protocol_schema()["definitions"])


@functools.cache
def validator(definition: str) -> Draft7Validator:
    """Return a draft-07 validator for ``#/definitions/<definition>`` (unknown: KeyError)."""
    root = protocol_schema()
    definitions = root["definitions"]
    if definition not in definitions:
        raise KeyError(f"no definition {definition!r} in the protocol schema")
    # The definition is validated as the document root, with every sibling definition alongside
    # it, so that "#/definitions/..." references inside it resolve against the same document.
    schema = {
        "$schema": root.get("$schema", "http://json-schema.org/draft-07/schema#"),
        **definitions[definition],
        "definitions": definitions,
    }
    return Draft7Validator(schema)


def errors(definition: str, instance: Any) -> list[str]:
    """Return readable validation errors (``path: message``), sorted, empty when valid."""
    found = []
    for error in validator(definition).iter_errors(instance):
        path = "/".join(str(part) for part in error.absolute_path)
        found.append(f"/{path}: {error.message}")
    return sorted(found)


def is_valid(definition: str, instance: Any) -> bool:
    """Return whether ``instance`` is valid against the named definition."""
    return bool(validator(definition).is_valid(instance))
