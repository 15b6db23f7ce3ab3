"""``cabincrew approvals`` as a user runs it, against a real server in a background thread."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from typer.testing import CliRunner

from approval_svc import wire
from approval_svc.records import sign_record
from approval_svc.server import build
from cabincrew.cli.main import app
from cabincrew.clients import ApprovalClient, ChannelOptions, open_channel
from cabincrew.config import Config
from cabincrew.runtime.server import create_server
from cabincrew.signing import Ed25519Signer
from cabincrew.v1 import approval_pb2, common_pb2
from tests.approval.conftest import FakeClock, Recorder, create_request
from tests.conftest import make_config, token_for

DIFF = (
    "diff --git a/app.yaml b/app.yaml\n--- a/app.yaml\n+++ b/app.yaml\n@@ -1 +1 @@\n"
    "-image: web:1.4\n+image: web:1.5\n\x1b[2Khidden line\n"
)


@dataclass
class Live:
    """A server running on its own event loop in a thread."""

    config: Config
    port: int
    audit: Recorder

    def env(self, name: str, roles: list[str]) -> dict[str, str]:
        return {
            "CABINCREW_ADDR": f"127.0.0.1:{self.port}",
            "CABINCREW_TOKEN": token_for(self.config, name, roles),
            "COLUMNS": "200",
        }

    def create(self, **fields: Any) -> approval_pb2.Approval:
        async def call() -> approval_pb2.Approval:
            token = token_for(self.config, "orchestrator", ["service"])
            client = ApprovalClient(
                open_channel(ChannelOptions(address=f"127.0.0.1:{self.port}", token=token))
            )
            try:
                return await client.create(create_request(on_behalf_of="alice", **fields))
            finally:
                await client.aclose()

        return asyncio.run(call())


@pytest.fixture
def live(data_dir: Path) -> Iterator[Live]:
    config = make_config(data_dir, services=("approval",))
    audit = Recorder()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        factory = functools.partial(build, clock=FakeClock(), emitter=audit)
        server, port = await create_server(config, {"approval": factory})
        await server.start()
        holder.update(server=server, port=port, stop=asyncio.Event())
        started.set()
        await holder["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the server did not start"
    try:
        yield Live(config, holder["port"], audit)
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
        loop.close()


def cli(live: Live, who: tuple[str, list[str]], *args: str) -> Any:
    """Run ``cabincrew ARGS`` as ``who``."""
    return CliRunner().invoke(app, list(args), env=live.env(*who))


def exported(live: Live, approval_id: str) -> dict[str, Any]:
    """``approvals show ID --json``."""
    document: dict[str, Any] = json.loads(
        cli(live, CAROL, "approvals", "show", approval_id, "--json").stdout
    )
    return document


CAROL = ("carol", ["release-manager"])
MALLORY = ("mallory", ["developer"])


def test_list_shows_pending_approvals(live: Live) -> None:
    approval = live.create()

    text = cli(live, CAROL, "approvals", "list", "--state", "pending")
    assert text.exit_code == 0, text.output
    assert approval.approval_id in text.output

    listed = cli(live, CAROL, "approvals", "list", "--state", "pending", "--json")
    ids = [a["approval_id"] for a in json.loads(listed.stdout)["approvals"]]
    assert ids == [approval.approval_id]
    assert json.loads(
        cli(live, CAROL, "approvals", "list", "--state", "approved", "--json").stdout
    ) == {"approvals": []}


def test_show_renders_reason_policies_and_diffs_without_terminal_escapes(live: Live) -> None:
    approval = live.create(
        triggered_policies=[
            common_pb2.PolicyEvaluation(
                policy_id="prod-needs-approval", decision=common_pb2.DECISION_REQUIRE_APPROVAL
            )
        ],
        artifacts=[
            approval_pb2.ArtifactSummary(
                name="patch", role="evidence", size=len(DIFF), preview=DIFF, action="patch"
            )
        ],
    )

    shown = cli(live, CAROL, "approvals", "show", approval.approval_id)

    assert shown.exit_code == 0, shown.output
    for expected in (
        "production deploy needs a release manager",
        "prod-needs-approval",
        "+image: web:1.5",
        "-image: web:1.4",
        approval.subject_hash,
        "\\x1b[2Khidden line",
    ):
        assert expected in shown.output
    assert "\x1b" not in shown.output


def test_approve_answers_for_the_subject_it_shows(live: Live) -> None:
    approval = live.create()

    done = cli(live, CAROL, "approvals", "approve", approval.approval_id, "--reason", "ok")

    assert done.exit_code == 0, done.output
    assert approval.subject_hash in done.output
    shown = exported(live, approval.approval_id)
    assert shown["state"] == "APPROVAL_STATE_APPROVED"
    assert [d["approver"] for d in shown["decisions"]] == ["carol"]
    assert shown["decisions"][0]["subject_hash"] == approval.subject_hash


def test_approve_sends_nothing_when_the_subject_is_not_the_expected_one(live: Live) -> None:
    approval = live.create()

    done = cli(
        live, CAROL, "approvals", "approve", approval.approval_id, "--subject-hash", "0" * 64
    )

    assert done.exit_code == 1
    assert live.audit.of_type("approval.responded") == []


def test_refusals_are_one_line_errors(live: Live) -> None:
    approval = live.create()

    done = cli(live, MALLORY, "approvals", "approve", approval.approval_id)

    assert done.exit_code == 1
    assert "PERMISSION_DENIED" in done.output
    assert "Traceback" not in done.output


def test_reject_needs_a_reason(live: Live) -> None:
    approval = live.create()

    assert cli(live, CAROL, "approvals", "reject", approval.approval_id).exit_code == 2
    done = cli(
        live, CAROL, "approvals", "reject", approval.approval_id, "--reason", "wrong tag", "--json"
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["state"] == "APPROVAL_STATE_REJECTED"


def test_verify_checks_signatures_online_and_offline(live: Live, tmp_path: Path) -> None:
    approval = live.create()
    cli(live, CAROL, "approvals", "approve", approval.approval_id, "--reason", "ok")

    online = cli(live, CAROL, "approvals", "verify", approval.approval_id, "--json")
    assert online.exit_code == 0, online.output
    assert json.loads(online.stdout)["verified"] is True

    record = tmp_path / "record.json"
    record.write_text(json.dumps(exported(live, approval.approval_id)))
    key = tmp_path / "key.pem"
    key.write_text(cli(live, CAROL, "approvals", "signing-key").stdout)
    offline = ["approvals", "verify", "--record", str(record), "--public-key", str(key)]
    assert CliRunner().invoke(app, offline, env={"CABINCREW_ADDR": "127.0.0.1:1"}).exit_code == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reason", "approved by the CTO"),
        ("approver", "dave"),
        ("approved", False),
        ("subject_hash", "1" * 64),
        ("decided_at", "2031-01-01T00:00:00Z"),
        ("approver_roles", ["admin"]),
    ],
)
def test_an_altered_record_fails_verify(
    live: Live, tmp_path: Path, field: str, value: object
) -> None:
    approval = live.create()
    cli(live, CAROL, "approvals", "approve", approval.approval_id)
    document = json.loads(
        cli(live, CAROL, "approvals", "show", approval.approval_id, "--json").stdout
    )
    document["decisions"][0][field] = value
    record = tmp_path / "altered.json"
    record.write_text(json.dumps(document))

    done = cli(live, CAROL, "approvals", "verify", "--record", str(record), "--json")

    assert done.exit_code == 1
    assert json.loads(done.stdout)["verified"] is False


def test_a_forged_record_fails_verify(live: Live, tmp_path: Path) -> None:
    """A record signed by another key, even one that claims our key id, does not verify."""
    approval = live.create()
    cli(live, CAROL, "approvals", "approve", approval.approval_id)
    message = approval_pb2.Approval()
    json_format.ParseDict(exported(live, approval.approval_id), message)
    domain = wire.approval_from_proto(message)
    forger = Ed25519Signer.generate()
    forged_record = sign_record(domain.decisions[0], forger)
    message.decisions[0].CopyFrom(wire.record_to_proto(forged_record))
    message.decisions[0].key_id = domain.decisions[0].key_id
    record = tmp_path / "forged.json"
    record.write_text(json_format.MessageToJson(message, preserving_proto_field_name=True))

    done = cli(live, CAROL, "approvals", "verify", "--record", str(record))

    assert done.exit_code == 1


def test_a_quorum_claim_without_enough_records_fails_verify(live: Live, tmp_path: Path) -> None:
    approval = live.create(quorum=2)
    cli(live, CAROL, "approvals", "approve", approval.approval_id)
    document = json.loads(
        cli(live, CAROL, "approvals", "show", approval.approval_id, "--json").stdout
    )
    document["state"] = "APPROVAL_STATE_APPROVED"
    record = tmp_path / "claimed.json"
    record.write_text(json.dumps(document))

    assert cli(live, CAROL, "approvals", "verify", "--record", str(record)).exit_code == 1
