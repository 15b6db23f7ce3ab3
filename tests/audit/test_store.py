"""The SQL store's sequencing: one writer at a time, catching up with other writers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from audit_svc.errors import EventConflict, LogCorrupted
from audit_svc.events import GENESIS_CHAIN_HASH, PreparedEvent, next_chain_hash, prepare_event
from audit_svc.store import Appended, SqlAuditStore
from tests.audit.conftest import event


@pytest.fixture
def url(data_dir: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{data_dir / 'audit.db'}"


@pytest.fixture
def stores(url: str) -> Iterator[tuple[SqlAuditStore, SqlAuditStore]]:
    first, second = SqlAuditStore.open(url), SqlAuditStore.open(url)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _prepared(*indexes: int, prefix: str = "ev", **fields: object) -> list[PreparedEvent]:
    return [prepare_event(event(i, prefix=prefix, **fields), 65536) for i in indexes]


def test_a_second_writer_numbers_after_rows_it_had_not_seen(
    stores: tuple[SqlAuditStore, SqlAuditStore],
) -> None:
    first, second = stores
    mine = first.append_batch(_prepared(0, 1, 2), 0, GENESIS_CHAIN_HASH, 1)
    theirs = second.append_batch(_prepared(0, 1, prefix="other"), 0, GENESIS_CHAIN_HASH, 2)
    assert [o.sequence for o in theirs.outcomes if isinstance(o, Appended)] == [3, 4]
    assert theirs.new_leaves[:3] == mine.new_leaves
    chain = GENESIS_CHAIN_HASH
    for leaf in theirs.new_leaves:
        chain = next_chain_hash(chain, leaf)
    assert theirs.last_chain == chain
    again = first.append_batch(_prepared(5), 3, mine.last_chain, 3)
    assert again.new_leaves[:2] == theirs.new_leaves[3:]
    assert isinstance(again.outcomes[0], Appended) and again.outcomes[0].sequence == 5


def test_duplicates_and_conflicts_inside_one_batch(
    stores: tuple[SqlAuditStore, SqlAuditStore],
) -> None:
    first, _ = stores
    batch = _prepared(0, 1, 0) + _prepared(1, message="changed")
    result = first.append_batch(batch, 0, GENESIS_CHAIN_HASH, 1)
    outcomes = result.outcomes
    assert [(o.sequence, o.duplicate) for o in outcomes[:3] if isinstance(o, Appended)] == [
        (0, False),
        (1, False),
        (0, True),
    ]
    assert isinstance(outcomes[3], EventConflict)
    assert len(result.new_leaves) == 2
    assert first.max_sequence() == 1


def test_a_writer_whose_last_entry_changed_refuses_to_append(
    stores: tuple[SqlAuditStore, SqlAuditStore],
) -> None:
    first, _ = stores
    first.append_batch(_prepared(0, 1), 0, GENESIS_CHAIN_HASH, 1)
    with pytest.raises(LogCorrupted) as info:
        first.append_batch(_prepared(2), 2, b"\x07" * 32, 2)
    assert info.value.sequence == 1
    assert first.max_sequence() == 1
