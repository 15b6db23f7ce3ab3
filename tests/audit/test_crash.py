"""SIGKILL in the middle of a 10,000-event ``audit append``: every acknowledged event
survives, exactly once, and the log verifies."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from cabincrew.clients import AuditClient, ChannelOptions, open_channel
from cabincrew.config import load_config
from cabincrew.convert import to_protocol
from cabincrew.v1 import audit_pb2
from tests.audit.conftest import WAIT, ServiceProcess, cli_env, event, run_cli
from tests.conftest import BIN, ROOT, token_for

pytestmark = pytest.mark.timeout(120)

EVENTS = 10_000
KILL_AFTER = 1_000


def _append_until_killed(
    source: Path, port: int, data_dir: Path, server: ServiceProcess
) -> tuple[list[dict[str, object]], int]:
    """Run the CLI; SIGKILL the server once KILL_AFTER acks are printed; return all acks."""
    cli = subprocess.Popen(
        [str(BIN / "cabincrew"), "audit", "append", str(source), "--json"],
        cwd=ROOT,
        env=cli_env(port, data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    acks: list[dict[str, object]] = []
    try:
        assert cli.stdout is not None
        for line in cli.stdout:
            acks.append(json.loads(line))
            if len(acks) == KILL_AFTER:
                server.kill()
        return acks, cli.wait(timeout=WAIT)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if cli.stdout is not None:
            cli.stdout.close()


async def _all_entries(port: int, token: str) -> list[audit_pb2.LogEntry]:
    client = AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token)))
    try:
        request = audit_pb2.QueryEventsRequest(page_size=1000)
        return [e async for page in client.query(request) for e in page.entries]
    finally:
        await client.aclose()


async def test_sigkill_mid_append_loses_no_acknowledged_event(
    tmp_path: Path, data_dir: Path, database_url: str
) -> None:
    source = tmp_path / "events.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for i in range(EVENTS):
            handle.write(json.dumps(to_protocol(event(i, prefix="crash"))) + "\n")
    token = token_for(
        load_config(None, environ={}, overrides={"data_dir": str(data_dir)}), "op", ["operator"]
    )

    first = ServiceProcess(data_dir, database_url)
    try:
        port = await first.ready()
        acks, code = await asyncio.wait_for(
            asyncio.to_thread(_append_until_killed, source, port, data_dir, first), 90
        )
    finally:
        first.kill()
    assert code != 0, "the append finished before the kill; the test proves nothing"
    assert KILL_AFTER <= len(acks) < EVENTS

    second = ServiceProcess(data_dir, database_url)
    try:
        port = await second.ready()
        entries = await _all_entries(port, token)
        stored = {e.event.event_id: e.sequence for e in entries}
        assert len(stored) == len(entries)
        assert [e.sequence for e in entries] == list(range(len(entries)))
        assert all(stored.get(str(a["event_id"])) == a["sequence"] for a in acks)
        code, out, _ = await run_cli("audit", "verify", "--json", port=port, data_dir=data_dir)
        assert code == 0, out
        assert json.loads(out)["tree_size"] == len(entries)
    finally:
        second.terminate()
