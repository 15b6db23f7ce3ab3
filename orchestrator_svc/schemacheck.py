"""Protocol schema checks on the hot path: a compiled, reference-free validator per definition.

``protocol_schema.validator`` resolves every ``$ref`` through ``referencing`` on each call,
which is most of the time a check takes. Here each definition is validated against a copy
with its references inlined (exact under draft-07, which ignores a ``$ref``'s siblings), built
once. A document it accepts is valid; anything else goes through ``protocol_schema.errors``
for the same messages as before, so callers see identical verdicts and wording.
"""

from __future__ import annotations

import functools
from typing import Any

from jsonschema import Draft7Validator

from cabincrew import protocol_schema


@functools.cache
def _fast(definition: str) -> Any:
    definitions = protocol_schema.protocol_schema()["definitions"]

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.removeprefix("#/definitions/")
                if name == ref or name in seen or name not in definitions:
                    raise LookupError(ref)
                return inline(definitions[name], (*seen, name))
            return {key: inline(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        return node

    try:
        return Draft7Validator(inline(definitions[definition], (definition,)))
    except LookupError:  # recursive or external reference: keep the ordinary validator
        return protocol_schema.validator(definition)


def errors(definition: str, instance: Any) -> list[str]:
    """``protocol_schema.errors``, with a fast acceptance of valid documents."""
    if _fast(definition).is_valid(instance):
        return []
    return protocol_schema.errors(definition, instance) or [f"/: not a valid {definition}"]


__all__ = ["errors"]
