"""Audit append throughput and verification time.

1. Durable events/s through ``AppendStream`` with 1, 8 and 64 concurrent streams: the audit
   service runs alone in a subprocess (``python -m audit_svc``, SQLite, WAL,
   ``synchronous=FULL``), started fresh for every measurement; this process sends
   pre-built events and counts acks, each of which means "committed". Batched: each request
   carries ``--batch`` events (``AppendStreamRequest.events``) and is answered by one
   response with one result per event; every stream sends all its requests without waiting
   (HTTP/2 flow control and the service's window hold it back). For comparison, the same
   with one event per request (``--single-events`` events). The clock runs from the first
   request to the last ack; the service's and this process's CPU time over the same
   interval are printed per event.
2. The baseline, in the same run: a raw SQLAlchemy Core insert of the same rows into SQLite
   with the same pragmas and batch size, one transaction per batch. The ratio says what the
   service costs on top of the database.
3. Time for ``VerifyLog`` over 1,000,000 stored events (every leaf and chain hash and the
   Merkle tree recomputed, the signed checkpoint checked), and the service's start-up time
   on that log (the tree is rebuilt from stored leaf hashes, the chain checked).

Each figure is the median of ``--runs`` runs (the individual runs are printed too).

Usage: ``python bench/audit_append.py [--events 100000] [--single-events 20000]
[--streams 1,8,64] [--batch 256] [--runs 3] [--verify 1000000]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit_svc.checkpoint import sign_checkpoint, vkey_string  # noqa: E402
from audit_svc.events import (  # noqa: E402
    GENESIS_CHAIN_HASH,
    PreparedEvent,
    leaf_hash,
    next_chain_hash,
    prepare_event,
)
from audit_svc.merkle import MerkleTree  # noqa: E402
from audit_svc.store import CheckpointRecord, SqlAuditStore, _row, create_engine  # noqa: E402
from cabincrew.auth import issue_token  # noqa: E402
from cabincrew.clients import AuditClient, ChannelOptions, open_channel  # noqa: E402
from cabincrew.signing import Ed25519Signer  # noqa: E402
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2  # noqa: E402

MAX_BATCH = 2000
BATCH = 256


def make_event(index: int) -> common_pb2.AuditEvent:
    """A typical service event (about 330 bytes in canonical form)."""
    message = common_pb2.AuditEvent(
        event_id=f"bench-{index:09d}",
        event_type="orchestrator.engine_started",
        workflow_state="PLAN_RUNNING",
        message=f"engine file-patch started for step build-{index % 97}",
        severity=common_pb2.EVENT_SEVERITY_INFO,
        workflow=common_pb2.AuditWorkflow(
            workflow_id=f"wf-{index // 100:06d}", step_id=f"build-{index % 97}", mode="flight-plan"
        ),
        engine=common_pb2.AuditEngine(engine_id="file-patch", receipt_id=f"r-{index}"),
    )
    message.timestamp.FromSeconds(1_700_000_000 + index)
    return message


class Server:
    """The audit service alone in a subprocess, on a fresh data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        env = {
            **os.environ,
            "CABINCREW_ADDR": "127.0.0.1:0",
            "CABINCREW_DATA_DIR": str(data_dir),
            "CABINCREW__LOG_LEVEL": "warning",
        }
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "audit_svc"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        text = ""
        for line in self.process.stdout:
            text += line
            found = re.search(r"127\.0\.0\.1:(\d+)", text)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("the audit service did not start")
        self.startup_seconds = time.perf_counter() - self.started
        signer = Ed25519Signer.load_or_create(data_dir / "keys" / "auth.key")
        self.token = issue_token(signer, "bench", ["operator"], ttl_seconds=3600)

    def client(self) -> AuditClient:
        options = ChannelOptions(address=f"127.0.0.1:{self.port}", token=self.token)
        return AuditClient(open_channel(options))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        assert self.process.stdout is not None
        self.process.stdout.close()


async def _stream(client: AuditClient, events: list[common_pb2.AuditEvent], batch: int) -> int:
    stub = audit_pb2_grpc.AuditServiceStub(client.channel)

    async def requests() -> AsyncIterator[audit_pb2.AppendStreamRequest]:
        if batch == 1:
            for item in events:
                yield audit_pb2.AppendStreamRequest(event=item)
            return
        for offset in range(0, len(events), batch):
            yield audit_pb2.AppendStreamRequest(events=events[offset : offset + batch])

    acked = 0
    async for response in stub.AppendStream(requests(), timeout=3600):
        if batch == 1:
            if not response.HasField("ack") or response.ack.duplicate:
                raise RuntimeError(f"unexpected response {response}")
            acked += 1
            continue
        for result in response.results:
            if not result.HasField("ack") or result.ack.duplicate:
                raise RuntimeError(f"unexpected result {result}")
        acked += len(response.results)
    return acked


@dataclass(frozen=True)
class Rate:
    """One throughput measurement."""

    events_per_second: float
    # CPU time per event over the measured interval (NaN where /proc is not available).
    server_cpu_us: float
    client_cpu_us: float


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_streams(
    events: list[common_pb2.AuditEvent], streams: int, batch: int = BATCH
) -> Rate:
    """Durable events/s through ``streams`` concurrent AppendStreams to a fresh service."""
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as directory:
        server = Server(Path(directory))
        client = server.client()
        try:
            parts = [events[k::streams] for k in range(streams)]
            server_cpu = _process_cpu_seconds(server.process.pid)
            client_cpu = time.process_time()
            start = time.perf_counter()
            acked = sum(await asyncio.gather(*(_stream(client, part, batch) for part in parts)))
            elapsed = time.perf_counter() - start
            server_cpu = _process_cpu_seconds(server.process.pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
            assert acked == len(events)
            assert (await client.verify_log()).ok
        finally:
            await client.aclose()
            server.stop()
    count = len(events)
    return Rate(count / elapsed, server_cpu / count * 1e6, client_cpu / count * 1e6)


async def _median(runs: int, measure: Callable[[], Awaitable[Rate]]) -> tuple[Rate, list[float]]:
    """The run with the median rate, and every run's rate."""
    results = [await measure() for _ in range(runs)]
    middle = statistics.median_low(r.events_per_second for r in results)
    chosen = next(r for r in results if r.events_per_second == middle)
    return chosen, [r.events_per_second for r in results]


def measure_raw_insert(prepared: list[PreparedEvent]) -> float:
    """Rows/s of a plain SQLAlchemy Core insert of the same rows, same pragmas and batches."""
    with tempfile.TemporaryDirectory(prefix="cc-bench-raw-") as directory:
        engine = create_engine(f"sqlite:///{directory}/raw.db")
        metadata = sa.MetaData()
        table = sa.Table(
            "raw_events",
            metadata,
            sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("event_id", sa.String(128), nullable=False, unique=True),
            sa.Column("event", sa.Text, nullable=False),
            sa.Column("signature", sa.Text, nullable=False),
            sa.Column("signature_key_ref", sa.Text, nullable=False),
            sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
            sa.Column("chain_hash", sa.LargeBinary(32), nullable=False),
            sa.Column("received_at_us", sa.BigInteger, nullable=False),
            sa.Column("redactions", sa.Integer, nullable=False),
            sa.Column("event_type", sa.String(128), nullable=False),
            sa.Column("workflow_id", sa.Text, nullable=False, index=True),
            sa.Column("step_id", sa.Text, nullable=False),
            sa.Column("severity", sa.SmallInteger, nullable=False),
            sa.Column("event_time_us", sa.BigInteger, nullable=False),
        )
        metadata.create_all(engine)
        names = [c.name for c in table.columns]
        chain = GENESIS_CHAIN_HASH
        rows = []
        for sequence, event in enumerate(prepared):
            chain = next_chain_hash(chain, event.leaf_hash)
            rows.append(dict(zip(names, _row(event, sequence, chain, 0), strict=True)))
        start = time.perf_counter()
        for offset in range(0, len(rows), MAX_BATCH):
            with engine.begin() as conn:
                conn.execute(table.insert(), rows[offset : offset + MAX_BATCH])
        elapsed = time.perf_counter() - start
        engine.dispose()
    return len(rows) / elapsed


def build_log(data_dir: Path, count: int) -> None:
    """Write ``count`` valid entries and a signed checkpoint straight into a fresh store."""
    store = SqlAuditStore.open(f"sqlite:///{data_dir / 'audit' / 'audit.db'}")
    template = prepare_event(make_event(0), 1 << 20)
    first_id = template.event_id.encode()
    text = template.leaf_input
    tree = MerkleTree()
    chain = GENESIS_CHAIN_HASH
    insert = store._insert_sql
    batch: list[tuple[object, ...]] = []
    leaves: list[bytes] = []
    for sequence in range(count):
        event_id = f"bench-{sequence:09d}"
        leaf_input = text.replace(first_id, event_id.encode())
        leaf = leaf_hash(leaf_input)
        chain = next_chain_hash(chain, leaf)
        batch.append(
            (
                sequence,
                event_id,
                leaf_input.decode(),
                "",
                "",
                leaf,
                chain,
                0,
                0,
                template.event_type,
                template.workflow_id,
                template.step_id,
                template.severity,
                template.event_time_us,
            )
        )
        leaves.append(leaf)
        if len(batch) == 50_000 or sequence == count - 1:
            with store.engine.begin() as conn:
                conn.exec_driver_sql(insert, batch)
            tree.append_many(leaves)
            batch, leaves = [], []
    signer = Ed25519Signer.load_or_create(data_dir / "keys" / "audit-checkpoint.key")
    origin = "cabincrew.local/audit"
    root = tree.root()
    note = sign_checkpoint(origin, count, root, signer, origin)
    store.add_checkpoint(
        CheckpointRecord(count, root, note, vkey_string(origin, signer.public_key_bytes()), 0)
    )
    store.close()


async def measure_verify(count: int) -> tuple[float, float, float]:
    """(build seconds, service start-up seconds, VerifyLog seconds) for ``count`` events."""
    with tempfile.TemporaryDirectory(prefix="cc-bench-verify-") as directory:
        data_dir = Path(directory)
        start = time.perf_counter()
        build_log(data_dir, count)
        built = time.perf_counter() - start
        server = Server(data_dir)
        client = server.client()
        try:
            # The banner is printed once the tree is loaded; a first call confirms it.
            assert (await client.get_checkpoint()).tree_size == count
            startup = server.startup_seconds
            start = time.perf_counter()
            result = await client.verify_log(timeout=3600)
            verified = time.perf_counter() - start
            assert result.ok and result.tree_size == count, result
        finally:
            await client.aclose()
            server.stop()
    return built, startup, verified


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per batched run")
    parser.add_argument(
        "--single-events", type=int, default=20_000, help="events per one-event-per-message run"
    )
    parser.add_argument("--streams", default="1,8,64", help="concurrent stream counts")
    parser.add_argument("--batch", type=int, default=BATCH, help="events per batched request")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median shown)")
    parser.add_argument("--verify", type=int, default=1_000_000, help="log size to verify")
    args = parser.parse_args()

    events = [make_event(i) for i in range(args.events)]
    prepared = [prepare_event(e, 1 << 20) for e in events]
    print(
        f"audit append: {args.events:,} events per batched run, {args.single_events:,} per "
        f"single-event run, median of {args.runs}; {os.cpu_count()} CPU cores"
    )
    raws = sorted(measure_raw_insert(prepared) for _ in range(args.runs))
    raw = statistics.median_low(raws)
    print(
        f"  raw SQLAlchemy/SQLite insert (same rows, batches of {MAX_BATCH}): {raw:,.0f} rows/s"
        f"  (runs: {', '.join(f'{r:,.0f}' for r in raws)})"
    )
    settings = [(int(s), args.batch, events) for s in args.streams.split(",")]
    settings += [(int(s), 1, events[: args.single_events]) for s in args.streams.split(",")]
    for streams, batch, sent in settings:
        rate, runs = await _median(
            args.runs, functools.partial(measure_streams, sent, streams, batch)
        )
        form = f"batches of {batch}" if batch > 1 else "one event per message"
        print(
            f"  AppendStream x{streams:<3} {form:<22} durable: "
            f"{rate.events_per_second:,.0f} events/s ({rate.events_per_second / raw:.1%} of the "
            f"raw insert); CPU per event: service {rate.server_cpu_us:.1f} us, "
            f"sender {rate.client_cpu_us:.1f} us  (runs: {', '.join(f'{r:,.0f}' for r in runs)})"
        )
    if args.verify:
        built, startup, verified = await measure_verify(args.verify)
        print(
            f"verify {args.verify:,} events: VerifyLog {verified:.1f} s; "
            f"service start-up (tree rebuilt, chain checked) {startup:.1f} s; "
            f"building the log took {built:.1f} s"
        )


if __name__ == "__main__":
    asyncio.run(main())
