"""Protocol schema checks compiled to plain Python closures, for the hot paths.

``jsonschema`` walks the schema for every document (about 0.7 ms for an audit event, a
dozen times per workflow step). Here a definition is compiled once, with its ``$ref``s
inlined (exact under draft-07, which ignores a ``$ref``'s siblings), into nested closures
that answer only *valid or not*. The compiler knows the keywords the protocol schema uses
and nothing else: a definition with any other keyword, a recursive reference or an enum of
non-strings is not compiled, and its check is ``jsonschema``'s own. Callers still take
their error messages from ``jsonschema``: a document the compiled check refuses is
described there, so only the verdict on valid documents comes from here, and the tests
compare both verdicts on generated documents.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

from jsonschema import FormatChecker

from cabincrew import protocol_schema

Check = Callable[[Any], bool]

# Keywords that assert nothing (draft-07 annotations and containers).
_ANNOTATIONS = frozenset(
    {"description", "title", "$comment", "$schema", "default", "examples", "definitions"}
)


class _Unsupported(Exception):
    """The schema uses something this compiler does not mirror exactly."""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    # Draft-07 (as jsonschema reads it): 1.0 is an integer; True is not.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": _is_integer,
}


def _always(_value: Any) -> bool:
    return True


def _never(_value: Any) -> bool:
    return False


class _Compiler:
    def __init__(self, definitions: dict[str, Any], formats: FormatChecker | None) -> None:
        self._definitions = definitions
        self._formats = formats

    def compile(self, schema: Any, seen: tuple[str, ...]) -> Check:
        if schema is True or schema == {}:
            return _always
        if schema is False:
            return _never
        if not isinstance(schema, dict):
            raise _Unsupported(repr(schema))
        ref = schema.get("$ref")
        if ref is not None:
            name = ref.removeprefix("#/definitions/") if isinstance(ref, str) else ""
            if not name or name == ref or name in seen or name not in self._definitions:
                raise _Unsupported(str(ref))
            return self.compile(self._definitions[name], (*seen, name))
        checks: list[Check] = []
        for keyword, value in schema.items():
            if keyword in _ANNOTATIONS or keyword in ("properties", "additionalProperties"):
                continue
            checks.append(self._keyword(keyword, value, schema, seen))
        if "properties" in schema or "additionalProperties" in schema:
            checks.append(self._object(schema, seen))
        if not checks:
            return _always
        if len(checks) == 1:
            return checks[0]
        checks_tuple = tuple(checks)
        return lambda value: all(check(value) for check in checks_tuple)

    def _keyword(
        self, keyword: str, value: Any, schema: dict[str, Any], seen: tuple[str, ...]
    ) -> Check:
        if keyword == "type":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(n in _TYPES for n in names):
                raise _Unsupported(f"type {value!r}")
            tests = tuple(_TYPES[n] for n in names)
            if len(tests) == 1:
                return tests[0]
            return lambda v: any(test(v) for test in tests)
        if keyword == "required":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise _Unsupported("required")
            names = tuple(value)
            return lambda v: not isinstance(v, dict) or all(n in v for n in names)
        if keyword == "enum":
            if not isinstance(value, list):
                raise _Unsupported("enum")
            if all(isinstance(n, str) for n in value):
                allowed = frozenset(value)
                return lambda v: isinstance(v, str) and v in allowed
            if all(_is_number(n) for n in value):
                # jsonschema compares numbers by value (1.0 is 1) and never equal to a bool.
                numbers_allowed = frozenset(value)
                return lambda v: _is_number(v) and v in numbers_allowed
            raise _Unsupported("enum of mixed values")
        if keyword == "minimum":
            if not _is_number(value):
                raise _Unsupported("minimum")
            bound = value
            return lambda v: not _is_number(v) or v >= bound
        if keyword == "items":
            if isinstance(value, list):
                raise _Unsupported("positional items")
            item = self.compile(value, seen)
            if item is _always:
                return _always
            return lambda v: not isinstance(v, list) or all(item(x) for x in v)
        if keyword == "anyOf":
            if not isinstance(value, list) or not value:
                raise _Unsupported("anyOf")
            options = tuple(self.compile(option, seen) for option in value)
            return lambda v: any(option(v) for option in options)
        if keyword == "format":
            if self._formats is None or value not in self._formats.checkers:
                return _always  # unchecked formats are annotations, as in jsonschema
            formats, name = self._formats, value
            return lambda v: bool(formats.conforms(v, name))
        raise _Unsupported(keyword)

    def _object(self, schema: dict[str, Any], seen: tuple[str, ...]) -> Check:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise _Unsupported("properties")
        compiled = {name: self.compile(sub, seen) for name, sub in properties.items()}
        checked = {name: check for name, check in compiled.items() if check is not _always}
        extra_schema = schema.get("additionalProperties", True)
        extra: Check | None = None if extra_schema is True else self.compile(extra_schema, seen)
        if extra is _always:
            extra = None

        def check(value: Any) -> bool:
            if not isinstance(value, dict):
                return True
            for name, item in value.items():
                sub = checked.get(name)
                if sub is not None:
                    if not sub(item):
                        return False
                elif extra is not None and name not in compiled and not extra(item):
                    return False
            return True

        return check


def compile_schema(
    schema: Any, definitions: dict[str, Any], formats: FormatChecker | None = None
) -> Check | None:
    """A compiled validity check for ``schema``, or None where it cannot mirror jsonschema."""
    try:
        return _Compiler(definitions, formats).compile(schema, ())
    except _Unsupported:
        return None


@functools.cache
def _compiled(definition: str, formats: FormatChecker | None) -> Check:
    definitions = protocol_schema.protocol_schema()["definitions"]
    check = compile_schema({"$ref": f"#/definitions/{definition}"}, definitions, formats)
    if check is not None:
        return check
    validator = protocol_schema.validator(definition)
    if formats is not None:
        validator = validator.evolve(format_checker=formats)
    fallback: Check = validator.is_valid
    return fallback


def is_valid(definition: str, instance: Any, formats: FormatChecker | None = None) -> bool:
    """Whether ``instance`` is valid against the protocol definition (same verdict as
    ``protocol_schema.validator(definition)``, evolved with ``formats`` when given)."""
    return _compiled(definition, formats)(instance)


__all__ = ["compile_schema", "is_valid"]
