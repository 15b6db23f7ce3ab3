"""The audit log: group commit, the in-memory Merkle tree, checkpoints, proofs and reads.

``submit`` queues a group of prepared events (one request's worth) and returns one future
that resolves to their outcomes once the transaction holding them is committed (tessera's
``Add``: the sequence is durably assigned before anyone hears of it). One writer task drains
the queue, whole groups, adding groups to a transaction while it holds fewer than
``max_batch`` events, while the next batch accumulates behind it; a full queue is
back-pressure (``LogOverloaded``, RESOURCE_EXHAUSTED with a retry hint) for the whole
group, never a silent drop. Closing stops intake and drains what was accepted.

The Merkle tree lives in memory (about 64 bytes per entry), built from the stored leaf
hashes at start while the stored chain is checked, and grown by each commit; it answers
roots and proofs for every size the log has had. Nothing here knows gRPC or SQL: storage is
the ``LogStore`` port, called from worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from audit_svc.checkpoint import sign_checkpoint, vkey_string
from audit_svc.errors import EventConflict, LogClosed, LogCorrupted, LogOverloaded
from audit_svc.events import GENESIS_CHAIN_HASH, PreparedEvent, next_chain_hash
from audit_svc.merkle import MerkleTree
from audit_svc.store import (
    Appended,
    BatchResult,
    CheckpointRecord,
    EventQuery,
    StoredEntry,
)
from audit_svc.verify import LogVerifier, VerifyResult
from cabincrew.aio import wait_event
from cabincrew.signing import Signer

log = logging.getLogger("cabincrew.audit")
T = TypeVar("T")

# How long a tail waits for a commit before looking again (catches other processes' rows).
TAIL_POLL_SECONDS = 1.0
_LOAD_CHUNK = 50_000


class LogStore(Protocol):
    """What the log needs from storage (``store.SqlAuditStore``)."""

    def append_batch(
        self,
        batch: Sequence[PreparedEvent],
        known_size: int,
        known_chain: bytes,
        received_at_us: int,
    ) -> BatchResult: ...

    def hashes(self, start: int, limit: int) -> list[tuple[int, bytes, bytes]]: ...

    def entries(self, query: EventQuery, limit: int) -> list[StoredEntry]: ...

    def scan(self, chunk: int = ...) -> Iterator[list[tuple[int, bytes, bytes, bytes]]]: ...

    def max_sequence(self) -> int: ...

    def add_checkpoint(self, record: CheckpointRecord) -> None: ...

    def latest_checkpoint(self) -> CheckpointRecord | None: ...

    def checkpoints(self) -> list[CheckpointRecord]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LogOptions:
    """Settings of one log, validated before anything starts."""

    origin: str
    max_queue: int = 100_000
    max_batch: int = 2_000
    checkpoint_interval_seconds: float = 60.0

    def __post_init__(self) -> None:
        # The origin is also the checkpoint key's name: no spaces, no '+' (C2SP signed note).
        if not self.origin or "+" in self.origin or any(c.isspace() for c in self.origin):
            raise ValueError("audit.origin must be non-empty, without spaces or '+'")
        if self.max_queue < 1 or self.max_batch < 1:
            raise ValueError("audit.max_queue and audit.max_batch must be at least 1")
        if self.checkpoint_interval_seconds <= 0:
            raise ValueError("audit.checkpoint_interval_seconds must be positive")


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with what a verifier needs."""

    origin: str
    tree_size: int
    root_hash: bytes
    note: str
    verifier_key: str
    public_key: bytes
    created_at_us: int


@dataclass(frozen=True)
class InclusionProof:
    """An RFC 9162 inclusion proof."""

    sequence: int
    tree_size: int
    leaf_hash: bytes
    hashes: list[bytes]
    root_hash: bytes


@dataclass(frozen=True)
class ConsistencyProof:
    """An RFC 9162 consistency proof."""

    from_size: int
    to_size: int
    hashes: list[bytes]
    from_root: bytes
    to_root: bytes


# An event durably in the log (or found there already): the store's record of where it went,
# handed out as it is rather than copied once per event.
Ack = Appended
# One outcome per submitted event: its ack, or the conflict that refused it.
Outcome = Ack | EventConflict
_Pending = tuple[Sequence[PreparedEvent], "asyncio.Future[list[Outcome]]"]


class AuditLog:
    """One append-only log over a ``LogStore``."""

    def __init__(
        self,
        store: LogStore,
        signer: Signer,
        options: LogOptions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._signer = signer
        self._options = options
        self._clock = clock
        self._tree = MerkleTree()
        self._last_chain = GENESIS_CHAIN_HASH
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._queued = 0
        # One thread for the writer keeps its connection (and SQLite's write lock) in one place.
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        # Reads get their own threads, joined on close, so that no query still holds a
        # connection when the store is disposed (a cancelled await does not stop a thread).
        self._read_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="audit-reader")
        self._stopping = asyncio.Event()
        self._tree_lock = asyncio.Lock()
        self._committed = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._accepting = False
        self._closed = False
        self._corruption: LogCorrupted | None = None
        self.verifier_key = vkey_string(options.origin, signer.public_key_bytes())

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tree from the stored leaf hashes (checking the chain), then accept appends."""
        try:
            await self._read(self._load)
        except LogCorrupted as exc:
            # Appending onto a broken log would bury the damage; reads and VerifyLog still work.
            self._corruption = exc
            log.error("audit log does not verify at sequence %d: %s", exc.sequence, exc.message)
        self._accepting = True
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="audit-checkpoints")

    def _load(self) -> None:
        tree = MerkleTree()
        chain = GENESIS_CHAIN_HASH
        start = 0
        while True:
            rows = self._store.hashes(start, _LOAD_CHUNK)
            if not rows:
                break
            leaves: list[bytes] = []
            for sequence, leaf, stored_chain in rows:
                candidate = next_chain_hash(chain, leaf)
                if sequence != start or stored_chain != candidate:
                    # Keep what verified so that proofs below the damage still answer.
                    tree.append_many(leaves)
                    self._tree, self._last_chain = tree, chain
                    raise LogCorrupted(f"stored entry {start} does not chain", start)
                chain = candidate
                leaves.append(leaf)
                start += 1
            tree.append_many(leaves)
        self._tree, self._last_chain = tree, chain
        latest = self._store.latest_checkpoint()
        if latest is not None and latest.tree_size > tree.size:
            raise LogCorrupted(
                f"a checkpoint covers {latest.tree_size} entries but {tree.size} are stored",
                tree.size,
            )
        if latest is not None and tree.root(latest.tree_size) != latest.root_hash:
            raise LogCorrupted(
                f"the stored entries do not match the checkpoint of size {latest.tree_size}",
                0,
            )
        log.info("audit log loaded: %d entries", tree.size)

    async def aclose(self) -> None:
        """Stop intake, commit what was accepted, stop the background tasks; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        self._stopping.set()
        if self._checkpointer is not None:
            await self._checkpointer
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
        self._committed.set()
        await asyncio.to_thread(self._write_pool.shutdown, wait=True)
        await asyncio.to_thread(self._read_pool.shutdown, wait=True)
        await asyncio.to_thread(self._store.close)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)

    @property
    def size(self) -> int:
        """Entries in the in-memory tree."""
        return self._tree.size

    def healthy(self) -> bool:
        """Whether the log accepts appends."""
        return self._accepting and self._corruption is None

    # --- appending -------------------------------------------------------------------------

    def submit(self, events: Sequence[PreparedEvent]) -> asyncio.Future[list[Outcome]]:
        """Queue events as one group, committed in one transaction; the future resolves after
        the commit to one outcome per event, in order. Raises, queueing none of them, when
        the group cannot be queued."""
        if not self._accepting:
            raise LogClosed("the audit log is shutting down")
        if self._corruption is not None:
            raise self._corruption
        # Room for the whole group, or an empty queue: a group larger than max_queue still
        # goes in alone, so the queue never holds more than max(max_queue, one group).
        if self._queued and self._queued + len(events) > self._options.max_queue:
            raise LogOverloaded(
                f"the audit log has {self._queued} events waiting; retry shortly",
                retry_after=0.2,
            )
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        if not events:
            future.set_result([])
            return future
        self._queued += len(events)
        self._queue.put_nowait((events, future))
        return future

    async def append(self, event: PreparedEvent) -> Ack:
        """Append one event and wait for its commit; raises ``EventConflict`` for a conflict."""
        (outcome,) = await self.submit([event])
        if isinstance(outcome, EventConflict):
            raise outcome
        return outcome

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            item = await self._queue.get()
            if item is None:
                break
            # Whole groups, so that a request's events share one commit and one future.
            batch = [item]
            events = list(item[0])
            while len(events) < self._options.max_batch and not self._queue.empty():
                following = self._queue.get_nowait()
                if following is None:
                    stopping = True
                    break
                batch.append(following)
                events.extend(following[0])
            self._queued -= len(events)
            async with self._tree_lock:
                try:
                    result = await loop.run_in_executor(
                        self._write_pool,
                        self._store.append_batch,
                        events,
                        self._tree.size,
                        self._last_chain,
                        int(self._clock() * 1_000_000),
                    )
                except LogCorrupted as exc:
                    self._corruption = exc
                    log.error("audit log does not verify: %s", exc.message)
                    _fail(batch, exc)
                    continue
                except Exception:
                    log.exception("audit store write failed; %d events not committed", len(batch))
                    _fail(batch, LogClosed("the audit store could not commit; retry"))
                    continue
                self._tree.append_many(result.new_leaves)
                self._last_chain = result.last_chain
            position = 0
            for group, future in batch:
                outcomes = result.outcomes[position : position + len(group)]
                position += len(group)
                if not future.done():
                    future.set_result(outcomes)
            self._notify()

    def _notify(self) -> None:
        self._committed.set()
        self._committed = asyncio.Event()

    async def sync(self) -> None:
        """Take in rows other processes appended (shared PostgreSQL)."""
        async with self._tree_lock:
            if self._corruption is not None:
                return
            start = self._tree.size
            rows = await self._read(self._store.hashes, start, 1 << 62)
            chain = self._last_chain
            leaves: list[bytes] = []
            for sequence, leaf, stored_chain in rows:
                chain = next_chain_hash(chain, leaf)
                if sequence != start + len(leaves) or stored_chain != chain:
                    # Another process's rows would chain; these do not: refuse to build on them.
                    self._corruption = LogCorrupted(
                        f"stored entry {start + len(leaves)} does not chain", start + len(leaves)
                    )
                    break
                leaves.append(leaf)
            self._tree.append_many(leaves)
            for leaf in leaves:
                self._last_chain = next_chain_hash(self._last_chain, leaf)

    # --- checkpoints and proofs ------------------------------------------------------------

    async def checkpoint(self, refresh: bool = False) -> SignedCheckpoint:
        """The latest signed checkpoint, or a fresh one of the current tree."""
        if not refresh:
            latest = await self._read(self._store.latest_checkpoint)
            if latest is not None and latest.verifier_key == self.verifier_key:
                return self._signed(latest)
        await self.sync()
        return self._signed(await self._sign_current())

    async def _sign_current(self) -> CheckpointRecord:
        async with self._tree_lock:
            size = self._tree.size
            root = self._tree.root(size)
        note = sign_checkpoint(self._options.origin, size, root, self._signer, self._options.origin)
        record = CheckpointRecord(size, root, note, self.verifier_key, int(self._clock() * 1e6))
        await self._read(self._store.add_checkpoint, record)
        return record

    def _signed(self, record: CheckpointRecord) -> SignedCheckpoint:
        return SignedCheckpoint(
            origin=self._options.origin,
            tree_size=record.tree_size,
            root_hash=record.root_hash,
            note=record.note,
            verifier_key=record.verifier_key,
            public_key=self._signer.public_key_bytes(),
            created_at_us=record.created_at_us,
        )

    async def _checkpoint_loop(self) -> None:
        interval = self._options.checkpoint_interval_seconds
        while not self._stopping.is_set():
            try:
                latest = await self._read(self._store.latest_checkpoint)
                await self.sync()
                if self._corruption is None and (
                    latest is None
                    or latest.tree_size != self._tree.size
                    or latest.verifier_key != self.verifier_key
                ):
                    await self._sign_current()
            except Exception:
                log.exception("scheduled audit checkpoint failed")
            await wait_event(self._stopping, interval)

    async def inclusion_proof(self, sequence: int, tree_size: int = 0) -> InclusionProof:
        """Proof that entry ``sequence`` is in the tree of ``tree_size`` (0: current)."""
        if tree_size > self._tree.size or sequence >= self._tree.size:
            await self.sync()
        size = tree_size or self._tree.size
        hashes = self._tree.inclusion_proof(sequence, size)
        return InclusionProof(
            sequence, size, self._tree.leaf(sequence), hashes, self._tree.root(size)
        )

    async def consistency_proof(self, from_size: int, to_size: int = 0) -> ConsistencyProof:
        """Proof that the tree of ``from_size`` is a prefix of the tree of ``to_size``."""
        if to_size > self._tree.size:
            await self.sync()
        size = to_size or self._tree.size
        hashes = self._tree.consistency_proof(from_size, size)
        return ConsistencyProof(
            from_size, size, hashes, self._tree.root(from_size), self._tree.root(size)
        )

    # --- reading ---------------------------------------------------------------------------

    async def entries(self, query: EventQuery, limit: int) -> list[StoredEntry]:
        """Stored entries matching ``query``, in sequence order."""
        return await self._read(self._store.entries, query, limit)

    async def tail(self, query: EventQuery, page: int = 256) -> AsyncIterator[StoredEntry]:
        """Entries from ``query.from_sequence`` on, forever; the caller pulls at its pace."""
        position = query.from_sequence
        while True:
            # Wait on the event of this moment, so a commit after the read still wakes us.
            committed = self._committed
            upper = await self._read(self._store.max_sequence) + 1
            rows: list[StoredEntry] = []
            if position < upper:
                bound = upper if query.to_sequence is None else min(upper, query.to_sequence)
                window = dataclasses.replace(query, from_sequence=position, to_sequence=bound)
                rows = await self._read(self._store.entries, window, page)
                position = rows[-1].sequence + 1 if len(rows) == page else upper
            for row in rows:
                yield row
            if position >= upper:
                if self._closed:
                    return
                await wait_event(committed, TAIL_POLL_SECONDS)

    async def verify(self) -> VerifyResult:
        """Recompute every leaf and chain hash and the tree, and check them against the
        stored hashes, this process's tree and every stored checkpoint."""
        # The tree only grows, so its first ``known`` leaves are stable while we read them.
        known = self._tree.size
        return await self._read(self._verify, known)

    def _verify(self, known: int) -> VerifyResult:
        verifier = LogVerifier(self._tree.leaf, known)
        for chunk in self._store.scan():
            for sequence, event, stored_leaf, stored_chain in chunk:
                if not verifier.add(sequence, event, stored_leaf, stored_chain):
                    return verifier.result()
        for record in self._store.checkpoints():
            if not verifier.check_checkpoint(
                record.tree_size, record.root_hash, record.note, record.verifier_key
            ):
                return verifier.result()
        return verifier.result()


def _fail(batch: list[_Pending], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
