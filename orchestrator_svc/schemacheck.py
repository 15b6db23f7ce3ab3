"""Protocol schema checks on the hot path.

A document is first judged by the compiled check (``cabincrew.schema_check``: same verdicts
as ``jsonschema``, a fraction of the time); only one it refuses goes through
``protocol_schema.errors`` for the usual messages, so callers see identical verdicts and
wording.
"""

from __future__ import annotations

from typing import Any

from cabincrew import protocol_schema
from cabincrew.schema_check import protocol_check


def errors(definition: str, instance: Any) -> list[str]:
    """``protocol_schema.errors``, with a fast acceptance of valid documents."""
    if protocol_check(definition)(instance):
        return []
    return protocol_schema.errors(definition, instance) or [f"/: not a valid {definition}"]


__all__ = ["errors"]
