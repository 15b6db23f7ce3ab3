"""JSON Schema validity checks compiled into Python closures: jsonschema's verdict, faster.

``jsonschema`` walks the schema anew for every instance (an evolved validator per keyword,
a resolver lookup per ``$ref``): about 0.3 ms for an audit event or a policy input, paid
on every preflight decision. ``compile_check(validator)`` turns the same schema into one
closure per node, once, and answers only *whether* an instance is valid; a caller asks the
original validator for the errors when the answer is no, so refusals keep their exact
wording. This is the idea of audit_svc.events' compiled schema nodes, taken to every
keyword instead of the two its input can fail.

Only the keywords the project's schemas use are compiled (``COMPILED_KEYWORDS``), with
jsonschema 4's semantics for them (draft 7 and 2020-12 agree on all of them); a schema with
any other assertion keyword, a ``$ref`` beside assertions or a non-standard type checker
raises ``UnsupportedSchema``, and the caller keeps the validator. ``format`` is asserted
through the validator's own format checker, for the formats that checker knows.
tests/kernel/test_schema_check.py holds the verdicts to jsonschema's on valid, mutated and
random instances.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import jsonschema

__all__ = [
    "COMPILED_KEYWORDS",
    "Check",
    "UnsupportedSchema",
    "compile_check",
    "fast_check",
    "protocol_check",
]

Check = Callable[[Any], bool]

COMPILED_KEYWORDS: Final = frozenset(
    {
        "$ref",
        "type",
        "properties",
        "additionalProperties",
        "required",
        "items",
        "enum",
        "const",
        "minimum",
        "minLength",
        "pattern",
        "anyOf",
        "oneOf",
    }
)
# Keywords that assert nothing here; ``format`` asserts what the format checker knows.
_ANNOTATIONS: Final = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
    }
)
_VALIDATORS: Final = (jsonschema.Draft7Validator, jsonschema.Draft202012Validator)


class UnsupportedSchema(Exception):
    """The schema uses something this module does not compile; keep the validator."""


def compile_check(validator: Any) -> Check:
    """A function with ``validator.is_valid``'s verdict for every JSON-like instance."""
    if type(validator) not in _VALIDATORS:
        raise UnsupportedSchema(f"validator class {type(validator).__name__}")
    if validator.TYPE_CHECKER is not type(validator).TYPE_CHECKER:
        raise UnsupportedSchema("a custom type checker")
    return _Compiler(validator.schema, validator.format_checker).node(validator.schema)


def fast_check(validator: Any) -> Check:
    """``compile_check(validator)``, or the validator's own ``is_valid`` where the schema
    cannot be compiled: the same verdict either way, fast where it can be."""
    try:
        return compile_check(validator)
    except UnsupportedSchema:
        return validator.is_valid  # type: ignore[no-any-return]


class _Compiler:
    def __init__(self, root: Any, format_checker: Any) -> None:
        self._root = root
        self._formats = format_checker
        # Compiled targets of $ref, filled lazily so that recursive definitions terminate.
        self._refs: dict[str, Check] = {}

    def node(self, schema: Any) -> Check:
        if schema is True:
            return _always
        if schema is False:
            return _never
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"a schema that is a {type(schema).__name__}")
        unknown = set(schema) - COMPILED_KEYWORDS - _ANNOTATIONS
        if unknown:
            raise UnsupportedSchema(f"keywords {sorted(unknown)}")
        if "$id" in schema and schema is not self._root:
            # An embedded resource moves the base that its "#..." references resolve from.
            raise UnsupportedSchema("$id below the root")
        fmt = schema.get("format")
        asserted = self._formats is not None and fmt in self._formats.checkers
        if "$ref" in schema:
            # Draft 7 ignores a $ref's siblings and 2020-12 applies them: only a lone $ref
            # (annotations aside) means the same in both.
            if set(schema) & COMPILED_KEYWORDS != {"$ref"} or asserted:
                raise UnsupportedSchema("$ref beside other assertions")
            return self._ref(schema["$ref"])
        checks: list[Check] = []
        if "type" in schema:
            checks.append(_type_check(schema["type"]))
        for keyword in ("enum", "const"):
            if keyword in schema:
                checks.append(
                    _enum_check(schema[keyword] if keyword == "enum" else [schema[keyword]])
                )
        if asserted:
            # The validator's own format checker, so the verdict is its verdict.
            conforms = self._formats.conforms
            checks.append(lambda value: bool(conforms(value, fmt)))
        if "minimum" in schema:
            checks.append(_minimum_check(schema["minimum"]))
        if "minLength" in schema or "pattern" in schema:
            checks.append(_string_check(schema.get("minLength"), schema.get("pattern")))
        if {"properties", "additionalProperties", "required"} & set(schema):
            checks.append(self._object_check(schema))
        if "items" in schema:
            checks.append(self._items_check(schema["items"]))
        if "anyOf" in schema:
            checks.append(_any_of(self._subschemas(schema["anyOf"])))
        if "oneOf" in schema:
            checks.append(_one_of(self._subschemas(schema["oneOf"])))
        return _all_of(checks)

    def _subschemas(self, schemas: Any) -> tuple[Check, ...]:
        if not isinstance(schemas, list) or not schemas:
            raise UnsupportedSchema("anyOf/oneOf must be a non-empty list")
        return tuple(self.node(s) for s in schemas)

    def _ref(self, ref: Any) -> Check:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(f"non-local $ref {ref!r}")
        refs = self._refs
        if ref not in refs:
            refs[ref] = _never  # replaced below; a recursive use goes through the table
            refs[ref] = self.node(_resolve(self._root, ref))
        if refs[ref] is not _never:
            return refs[ref]
        return lambda value: refs[ref](value)

    def _object_check(self, schema: Mapping[str, Any]) -> Check:
        properties = {name: self.node(sub) for name, sub in schema.get("properties", {}).items()}
        required = tuple(schema.get("required", ()))
        extra_schema = schema.get("additionalProperties", True)
        # additionalProperties: allowed without a check (true, {}), refused (false), or checked.
        refuse_extra = extra_schema is False
        extra = None if extra_schema is True or extra_schema == {} else self.node(extra_schema)

        def check(value: Any) -> bool:
            if not isinstance(value, dict):
                return True
            for name in required:
                if name not in value:
                    return False
            for key, item in value.items():
                sub = properties.get(key)
                if sub is not None:
                    if not sub(item):
                        return False
                elif refuse_extra:
                    return False
                elif extra is not None and not extra(item):
                    return False
            return True

        return check

    def _items_check(self, items: Any) -> Check:
        if not isinstance(items, dict | bool):
            # Draft 7's tuple form (a list of schemas) is another keyword in 2020-12.
            raise UnsupportedSchema("items that is not a single schema")
        sub = self.node(items)

        def check(value: Any) -> bool:
            if isinstance(value, list):
                for item in value:
                    if not sub(item):
                        return False
            return True

        return check


def _resolve(root: Any, ref: str) -> Any:
    node = root
    pointer = ref[1:]
    if pointer and not pointer.startswith("/"):
        raise UnsupportedSchema(f"$ref {ref!r} is not a JSON pointer")
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise UnsupportedSchema(f"$ref {ref!r} does not resolve")
    return node


def _always(_value: Any) -> bool:
    return True


def _never(_value: Any) -> bool:
    return False


def _all_of(checks: Sequence[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def check_all(value: Any) -> bool:
        # A loop, not all(<generator>): this runs for most nodes of every instance.
        for check in frozen:
            if not check(value):
                return False
        return True

    return check_all


def _any_of(checks: tuple[Check, ...]) -> Check:
    return lambda value: any(check(value) for check in checks)


def _one_of(checks: tuple[Check, ...]) -> Check:
    return lambda value: sum(1 for check in checks if check(value)) == 1


# jsonschema's draft 6+ type checker, type by type.
def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Number)


_TYPES: Final[dict[str, Check]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
    "integer": _is_integer,
    "number": _is_number,
}


def _type_check(types: Any) -> Check:
    names = [types] if isinstance(types, str) else types
    if not isinstance(names, list) or not names or any(n not in _TYPES for n in names):
        raise UnsupportedSchema(f"type {types!r}")
    if names == ["object"]:
        return _TYPES["object"]
    if names == ["string"]:
        return _TYPES["string"]
    checks = tuple(_TYPES[n] for n in names)
    return lambda value: any(check(value) for check in checks)


def _equal(one: Any, two: Any) -> bool:
    # jsonschema._utils.equal: bool is not a number, sequences and mappings compare deeply.
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return len(one) == len(two) and all(
            key in two and _equal(one[key], two[key]) for key in one
        )
    if isinstance(one, bool) or isinstance(two, bool):
        # unbool: True and False equal only themselves (the `is` above).
        return False
    return bool(one == two)


def _enum_check(members: Any) -> Check:
    if not isinstance(members, list):
        raise UnsupportedSchema("enum that is not a list")
    strings = frozenset(m for m in members if type(m) is str)
    others = tuple(m for m in members if type(m) is not str)

    def check(value: Any) -> bool:
        if type(value) is str:
            # A str equals only strings (``==``); other members compare through _equal.
            return value in strings or any(_equal(value, m) for m in others)
        return any(_equal(value, m) for m in members)

    return check


def _minimum_check(minimum: Any) -> Check:
    if not _is_number(minimum):
        raise UnsupportedSchema("minimum that is not a number")
    return lambda value: not (_is_number(value) and value < minimum)


def _string_check(min_length: Any, pattern: Any) -> Check:
    if min_length is not None and not _is_integer(min_length):
        raise UnsupportedSchema("minLength that is not an integer")
    if pattern is not None and not isinstance(pattern, str):
        raise UnsupportedSchema("pattern that is not a string")
    shortest = min_length or 0
    # jsonschema calls re.search(pattern, instance), which compiles through re's cache.
    search = re.compile(pattern).search if pattern is not None else None

    def check(value: Any) -> bool:
        if not isinstance(value, str):
            return True
        if len(value) < shortest:
            return False
        return search is None or search(value) is not None

    return check


@functools.cache
def protocol_check(definition: str) -> Check:
    """The compiled check of one definition of the protocol schema, with ``format`` left
    unasserted as in ``protocol_schema.errors``; the validator's own ``is_valid`` where the
    definition cannot be compiled."""
    from cabincrew import protocol_schema

    return fast_check(protocol_schema.validator(definition))
