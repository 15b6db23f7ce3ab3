"""The write-ahead log's checksum chain, and its verification on replay.

Each entry's checksum is the SHA-256 hex of ``previous checksum (hex) + "\\n" + canonical JSON
of {workflow_id, position, timestamp_us, entry_type, data}``, where ``previous`` is the
checksum of the workflow's previous entry (64 zeros for the first). The chain runs per
workflow, not across the whole table: one workflow is written by one owner at a time, so
chaining per workflow needs no global lock and still catches any changed, removed, inserted
or reordered entry of a workflow. The global ``sequence`` orders entries across workflows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from cabincrew.canonical import canonical_json
from orchestrator_svc.model import Entry

GENESIS = "0" * 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def entry_checksum(
    previous: str,
    workflow_id: str,
    position: int,
    timestamp_us: int,
    entry_type: str,
    data: Mapping[str, Any],
) -> str:
    """The checksum of one entry, chained to the previous one of the same workflow."""
    body = canonical_json(
        {
            "workflow_id": workflow_id,
            "position": position,
            "timestamp_us": timestamp_us,
            "entry_type": entry_type,
            "data": dict(data),
        }
    )
    return hashlib.sha256(previous.encode("ascii") + b"\n" + body).hexdigest()


def verify_chain(entries: Iterable[Entry]) -> list[str]:
    """Every problem in one workflow's entries (in position order); empty when intact."""
    problems: list[str] = []
    previous = GENESIS
    expected_position = 1
    for entry in entries:
        if entry.position != expected_position:
            problems.append(
                f"entry at position {entry.position} where {expected_position} was expected"
            )
            expected_position = entry.position
        computed = entry_checksum(
            previous,
            entry.workflow_id,
            entry.position,
            entry.timestamp_us,
            entry.entry_type,
            entry.data,
        )
        if computed != entry.checksum:
            problems.append(f"entry {entry.position} ({entry.entry_type}): checksum mismatch")
        previous = entry.checksum
        expected_position += 1
    return problems


def rfc3339(timestamp_us: int) -> str:
    """An RFC 3339 UTC timestamp with microseconds."""
    moment = _EPOCH + timedelta(microseconds=timestamp_us)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = ["GENESIS", "entry_checksum", "rfc3339", "verify_chain"]
