"""Verification of a log, entry by entry: the same code checks the stored log (VerifyLog)
and an export file against a signed checkpoint (``cabincrew audit verify --export``).

For each entry, in order from sequence 0: the sequence is the next one; the leaf hash
recomputed from the event equals the recorded one; the chain hash recomputed from the
previous one equals the recorded one; where an independent copy of the leaves is at hand
(the running server's tree), the leaf equals that copy. Then the Merkle tree over the
recomputed leaves must have the root of every signed checkpoint, and each checkpoint's
signature must verify. The first failure names the first sequence that cannot be trusted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from audit_svc.checkpoint import CheckpointError, parse_and_verify
from audit_svc.events import (
    GENESIS_CHAIN_HASH,
    canonical_bytes,
    leaf_document,
    leaf_hash,
    next_chain_hash,
)
from audit_svc.merkle import MerkleTree


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of a verification."""

    ok: bool
    tree_size: int
    root_hash: bytes
    # The first sequence that does not verify; -1 when everything does.
    first_bad_sequence: int
    reason: str


class LogVerifier:
    """Feeds entries in order; stops at the first one that does not verify."""

    def __init__(
        self, known_leaf: Callable[[int], bytes] | None = None, known_size: int = 0
    ) -> None:
        self._known_leaf = known_leaf
        self._known_size = known_size if known_leaf is not None else 0
        self._tree = MerkleTree()
        self._chain = GENESIS_CHAIN_HASH
        self._next = 0
        self._pending: list[bytes] = []
        # Everything below this size is vouched for by a verified checkpoint.
        self._vouched = 0
        self._bad: tuple[int, str] | None = None

    @property
    def next_sequence(self) -> int:
        """The sequence the next entry must have."""
        return self._next

    @property
    def failed(self) -> bool:
        """Whether a failure was found."""
        return self._bad is not None

    def add(
        self, sequence: int, leaf_input: bytes, stored_leaf: bytes, stored_chain: bytes
    ) -> bool:
        """Check one entry; False (and stop) at the first one that does not verify."""
        if self._bad is not None:
            return False
        expected = self._next
        if sequence != expected:
            what = "is missing" if sequence > expected else "is out of order or repeated"
            return self._fail(expected, f"entry {expected} {what}")
        leaf = leaf_hash(leaf_input)
        if leaf != stored_leaf:
            return self._fail(sequence, f"entry {sequence}: the event does not match its leaf hash")
        chain = next_chain_hash(self._chain, leaf)
        if chain != stored_chain:
            return self._fail(sequence, f"entry {sequence}: the chain hash does not match")
        if sequence < self._known_size and self._known_leaf is not None:
            if self._known_leaf(sequence) != leaf:
                return self._fail(
                    sequence, f"entry {sequence} differs from the one this server appended"
                )
        self._chain = chain
        self._pending.append(leaf)
        if len(self._pending) >= 4096:
            self._flush()
        self._next += 1
        return True

    def check_checkpoint(
        self, tree_size: int, root_hash: bytes, note: str, verifier_key: str
    ) -> bool:
        """Check a signed checkpoint against the entries seen so far."""
        if self._bad is not None:
            return False
        self._flush()
        try:
            signed = parse_and_verify(note, verifier_key)
        except CheckpointError:
            return self._fail(self._vouched, f"the checkpoint of size {tree_size} does not verify")
        if signed.size != tree_size or signed.root != root_hash:
            return self._fail(
                self._vouched, f"the checkpoint of size {tree_size} differs from its signed note"
            )
        if tree_size > self._tree.size:
            return self._fail(
                self._tree.size,
                f"the signed checkpoint covers {tree_size} entries; only {self._tree.size} exist",
            )
        if tree_size and self._tree.root(tree_size) != root_hash:
            start = self._vouched if self._vouched < tree_size else 0
            return self._fail(
                start,
                f"entries {start}..{tree_size - 1} do not match the signed checkpoint "
                f"of size {tree_size}",
            )
        self._vouched = max(self._vouched, tree_size)
        return True

    def result(self) -> VerifyResult:
        """The outcome so far."""
        self._flush()
        root = self._tree.root()
        if self._bad is not None:
            sequence, reason = self._bad
            return VerifyResult(False, self._tree.size, root, sequence, reason)
        return VerifyResult(True, self._tree.size, root, -1, "")

    def _flush(self) -> None:
        if self._pending:
            self._tree.append_many(self._pending)
            self._pending = []

    def _fail(self, sequence: int, reason: str) -> bool:
        self._bad = (sequence, reason)
        return False


@dataclass(frozen=True)
class ExportLine:
    """One line of ``cabincrew audit export``."""

    sequence: int
    event: dict[str, Any]
    leaf_hash: bytes
    chain_hash: bytes


def parse_export(lines: Iterable[str]) -> Iterator[ExportLine | tuple[int, str]]:
    """Parse export lines; a malformed line yields (line number, problem) instead."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            entry = ExportLine(
                sequence=int(item["sequence"]),
                event=dict(item["event"]),
                leaf_hash=bytes.fromhex(item["leaf_hash"]),
                chain_hash=bytes.fromhex(item["chain_hash"]),
            )
        except (ValueError, KeyError, TypeError):
            yield (number, "not an export line {sequence, event, leaf_hash, chain_hash}")
            continue
        yield entry


def verify_export(lines: Iterable[str], note: str, verifier_key: str) -> VerifyResult:
    """Verify an export (from sequence 0) against a signed checkpoint, without a server."""
    try:
        signed = parse_and_verify(note, verifier_key)
    except CheckpointError:
        return VerifyResult(False, 0, b"", -1, "the checkpoint does not verify with its key")
    verifier = LogVerifier()
    for item in parse_export(lines):
        if isinstance(item, tuple):
            number, problem = item
            return _bad(verifier, verifier.next_sequence, f"line {number}: {problem}")
        if item.event.get("chain_hash") != item.chain_hash.hex():
            return _bad(verifier, item.sequence, "the event's chain_hash is not the entry's")
        try:
            leaf_input = canonical_bytes(leaf_document(item.event))
        except ValueError:
            return _bad(verifier, item.sequence, "the event has no canonical JSON form")
        if not verifier.add(item.sequence, leaf_input, item.leaf_hash, item.chain_hash):
            return verifier.result()
    verifier.check_checkpoint(signed.size, signed.root, note, verifier_key)
    return verifier.result()


def _bad(verifier: LogVerifier, sequence: int, reason: str) -> VerifyResult:
    result = verifier.result()
    return VerifyResult(False, result.tree_size, result.root_hash, sequence, reason)
