"""``cabincrew approvals``: list, show, approve, reject, cancel, verify and signing-key.

The acting identity is ``CABINCREW_TOKEN``: the approver of ``approve`` and ``reject`` is
whoever that token names, never a flag. ``approve`` and ``reject`` fetch the approval
first and answer for the subject hash they show, so a person approves what they saw.
Everything an approval carries is shown as plain text: control characters in reasons or
previews are made visible, so that no terminal escape can hide part of a diff.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format
from rich.console import Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from approval_svc import wire
from approval_svc.records import verify_approval
from cabincrew.cli.common import (
    AddrOption,
    JsonOption,
    Target,
    channel,
    console,
    fail,
    message_to_json,
    print_json,
    resolve_target,
    run,
)
from cabincrew.clients import ApprovalClient
from cabincrew.errors import CabinCrewError
from cabincrew.signing import Ed25519Verifier, SigningError, key_id_for
from cabincrew.v1 import approval_pb2, common_pb2

approvals_app = typer.Typer(help="Human approvals bound to the exact plan.", no_args_is_help=True)

STATES = {
    "pending": approval_pb2.APPROVAL_STATE_PENDING,
    "approved": approval_pb2.APPROVAL_STATE_APPROVED,
    "rejected": approval_pb2.APPROVAL_STATE_REJECTED,
    "expired": approval_pb2.APPROVAL_STATE_EXPIRED,
    "cancelled": approval_pb2.APPROVAL_STATE_CANCELLED,
    "consumed": approval_pb2.APPROVAL_STATE_CONSUMED,
}
_STATE_NAMES: dict[int, str] = {int(value): name for name, value in STATES.items()}
_STATE_STYLE = {
    "pending": "yellow",
    "approved": "green",
    "consumed": "green",
    "rejected": "red",
    "expired": "red",
    "cancelled": "dim",
}
_LIVE = frozenset({approval_pb2.APPROVAL_STATE_PENDING, approval_pb2.APPROVAL_STATE_APPROVED})
_KINDS: dict[int, str] = {
    approval_pb2.SUBJECT_KIND_PLAN_TOKEN: "plan-token",
    approval_pb2.SUBJECT_KIND_MCP_REQUEST: "MCP request",
    approval_pb2.SUBJECT_KIND_LLM_REQUEST: "LLM request",
    approval_pb2.SUBJECT_KIND_LLM_RESPONSE: "LLM response",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_DIFF_LINE = re.compile(r"^(diff --git |--- |\+\+\+ |@@ )", re.MULTILINE)


def register(app: typer.Typer) -> None:
    """Add the ``approvals`` command group to the main CLI."""
    app.add_typer(approvals_app, name="approvals")


def _client(target: Target) -> ApprovalClient:
    return ApprovalClient(channel(target))


# --- list ------------------------------------------------------------------------------------


@approvals_app.command("list")
def list_approvals(
    state: str = typer.Option(None, "--state", help=f"One of: {', '.join(STATES)}."),
    workflow: str = typer.Option("", "--workflow", help="Only this workflow id."),
    role: str = typer.Option("", "--role", help="Only approvals needing this role."),
    requester: str = typer.Option("", "--requester", help="Only approvals asked by this name."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """List approvals, oldest first."""
    if state is not None and state not in STATES:
        raise fail(f"unknown state {state!r}; choose one of {', '.join(STATES)}", 2)
    request = approval_pb2.ListApprovalsRequest(
        state=STATES[state] if state else approval_pb2.APPROVAL_STATE_UNSPECIFIED,
        workflow_id=workflow,
        required_role=role,
        requester=requester,
    )
    found = _list(resolve_target(addr), request, limit)
    if json_out:
        print_json({"approvals": [message_to_json(a) for a in found]})
        return
    if not found:
        console.print("no approvals" + (f" in state {state}" if state else ""), highlight=False)
        return
    wide = console.width >= 120
    table = Table(title=f"{len(found)} approval(s)")
    table.add_column("id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("needs", overflow="fold")
    table.add_column("for", overflow="fold")
    table.add_column("expires")
    if wide:
        # A ratio here would let rich squeeze the other columns to nothing; the reason
        # takes what the fixed columns leave, and is cut with an ellipsis.
        table.add_column(
            "reason", overflow="ellipsis", no_wrap=True, max_width=max(24, console.width - 100)
        )
    now = datetime.now(UTC)
    for approval in found:
        row = [
            _plain(approval.approval_id),
            _state_text(approval.state),
            _plain(f"{_given(approval)}/{approval.quorum} {approval.required_role}"),
            _plain(f"{_subject_line(approval)} by {approval.requester}"),
            _plain(
                _relative(approval.expires_at.ToDatetime(tzinfo=UTC), now)
                if approval.state in _LIVE
                else "-"
            ),
        ]
        if wide:
            row.append(_plain(_short(approval.reason, 120)))
        table.add_row(*row)
    console.print(table)


@run
async def _list(
    target: Target, request: approval_pb2.ListApprovalsRequest, limit: int
) -> list[approval_pb2.Approval]:
    client = _client(target)
    found: list[approval_pb2.Approval] = []
    try:
        while len(found) < limit:
            request.page_size = min(limit - len(found), 500)
            page = await client.list(request)
            found.extend(page.approvals)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
    finally:
        await client.aclose()
    return found[:limit]


# --- show ------------------------------------------------------------------------------------


@approvals_app.command("show")
def show(
    approval_id: str = typer.Argument(..., help="The approval id."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Show what is to be approved: reason, policies, artifacts (diffs rendered), decisions.

    ``--json`` prints the whole record, signatures included; ``approvals verify --record``
    checks such an export offline.
    """
    approval = _get(resolve_target(addr), approval_id)
    if json_out:
        print_json(message_to_json(approval))
        return
    console.print(render(approval))


def render(approval: approval_pb2.Approval) -> Group:
    """A readable view of one approval."""
    now = datetime.now(UTC)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row(
        "approval", Text.assemble(_plain(approval.approval_id), "  ", _state_text(approval.state))
    )
    facts.add_row(
        "subject",
        _plain(f"{_KINDS.get(approval.subject_kind, '?')} sha256:{approval.subject_hash}"),
    )
    if approval.workflow_id:
        facts.add_row("workflow", _plain(f"{approval.workflow_id} / step {approval.step_id}"))
    if approval.gateway_request_id:
        facts.add_row("gateway request", _plain(approval.gateway_request_id))
    requester = approval.requester
    if approval.created_by and approval.created_by != approval.requester:
        requester += f" (asked through {approval.created_by})"
    facts.add_row("requester", _plain(requester))
    facts.add_row(
        "needs",
        _plain(
            f"{approval.quorum} distinct approver(s) with role {approval.required_role!r}; "
            f"{_given(approval)} so far"
        ),
    )
    created = approval.created_at.ToDatetime(tzinfo=UTC)
    expires = approval.expires_at.ToDatetime(tzinfo=UTC)
    facts.add_row("created", _plain(_when(created)))
    facts.add_row("expires", _plain(f"{_when(expires)} ({_relative(expires, now)})"))
    if approval.consumed_by:
        facts.add_row("used by", _plain(approval.consumed_by))
    if approval.cancelled_by:
        facts.add_row("cancelled", _plain(f"by {approval.cancelled_by}: {approval.cancel_reason}"))
    facts.add_row("reason", _plain(approval.reason))
    parts: list[Any] = [facts]

    if approval.triggered_policies:
        policies = Table(title="triggered policies", title_justify="left")
        for column in ("source", "policy", "decision", "severity", "reason"):
            policies.add_column(column)
        for policy in approval.triggered_policies:
            policies.add_row(
                _plain(_enum_name(common_pb2.PolicySource, policy.source, "POLICY_SOURCE_")),
                _plain(policy.policy_id),
                _plain(_enum_name(common_pb2.Decision, policy.decision, "DECISION_")),
                _plain(str(policy.severity)),
                _plain(policy.reason),
            )
        parts.append(policies)

    if approval.artifacts:
        artifacts = Table(title="artifacts", title_justify="left")
        for column in ("name", "role", "action", "target", "size", "sha256"):
            artifacts.add_column(column)
        for artifact in approval.artifacts:
            artifacts.add_row(
                _plain(artifact.name),
                _plain(artifact.role),
                _plain(artifact.action),
                _plain(artifact.target),
                _plain(str(artifact.size)),
                _plain(artifact.hash[:16] + ("…" if len(artifact.hash) > 16 else "")),
            )
        parts.append(artifacts)
        for artifact in approval.artifacts:
            if artifact.preview:
                parts.append(_preview(artifact))

    if approval.decisions:
        decisions = Table(title="decisions (signed)", title_justify="left")
        for column in ("approver", "decision", "roles", "at", "reason", "key"):
            decisions.add_column(column)
        for record in approval.decisions:
            decisions.add_row(
                _plain(record.approver),
                Text("approved", "green") if record.approved else Text("rejected", "red"),
                _plain(", ".join(record.approver_roles)),
                _plain(_when(record.decided_at.ToDatetime(tzinfo=UTC))),
                _plain(record.reason),
                _plain(record.key_id),
            )
        parts.append(decisions)
    return Group(*parts)


def _preview(artifact: approval_pb2.ArtifactSummary) -> Panel:
    text = _visible(artifact.preview)
    diff = bool(_DIFF_LINE.search(text)) or artifact.action in ("patch", "diff")
    body = Syntax(text, "diff" if diff else "text", word_wrap=True, theme="ansi_dark")
    return Panel(body, title=_plain(f"{artifact.name} (preview)"), title_align="left")


@run
async def _get(target: Target, approval_id: str) -> approval_pb2.Approval:
    client = _client(target)
    try:
        return await client.get(approval_id)
    finally:
        await client.aclose()


# --- approve / reject / cancel -------------------------------------------------------------


@approvals_app.command("approve")
def approve(
    approval_id: str = typer.Argument(..., help="The approval id."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the signed record)."),
    subject_hash: str = typer.Option(
        None, "--subject-hash", help="Refuse unless the approval is bound to this hash."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Approve as the identity of CABINCREW_TOKEN, for the subject hash shown."""
    _respond(approval_id, True, reason, subject_hash, addr, json_out)


@approvals_app.command("reject")
def reject(
    approval_id: str = typer.Argument(..., help="The approval id."),
    reason: str = typer.Option(..., "--reason", help="Why (required; kept in the signed record)."),
    subject_hash: str = typer.Option(
        None, "--subject-hash", help="Refuse unless the approval is bound to this hash."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Reject as the identity of CABINCREW_TOKEN; one rejection rejects."""
    if not reason.strip():
        raise fail("a rejection needs a --reason", 2)
    _respond(approval_id, False, reason, subject_hash, addr, json_out)


def _respond(
    approval_id: str,
    approved: bool,
    reason: str,
    expected: str | None,
    addr: str | None,
    json_out: bool,
) -> None:
    target = resolve_target(addr)
    current = _get(target, approval_id)
    if expected is not None and expected.removeprefix("sha256:") != current.subject_hash:
        raise fail(
            f"approval {approval_id} is bound to sha256:{current.subject_hash}, "
            f"not {expected}; nothing was sent"
        )
    verb = "approving" if approved else "rejecting"
    if not json_out:
        console.print(
            Text.assemble(
                f"{verb} ",
                _plain(approval_id),
                " for ",
                _plain(_KINDS.get(current.subject_kind, "subject")),
                " ",
                Text(f"sha256:{current.subject_hash}", "bold"),
            )
        )
    updated = _send_response(target, approval_id, current.subject_hash, approved, reason)
    if json_out:
        print_json(message_to_json(updated))
        return
    mine = [d for d in updated.decisions if d.approved == approved]
    key = f" (record signed, key {mine[-1].key_id})" if mine else ""
    console.print(
        Text.assemble(
            "approval is now ",
            _state_text(updated.state),
            f"; {_given(updated)}/{updated.quorum} approvals{key}",
        )
    )


@run
async def _send_response(
    target: Target, approval_id: str, subject_hash: str, approved: bool, reason: str
) -> approval_pb2.Approval:
    client = _client(target)
    try:
        return await client.respond(approval_id, subject_hash, approved, reason)
    finally:
        await client.aclose()


@approvals_app.command("cancel")
def cancel(
    approval_id: str = typer.Argument(..., help="The approval id."),
    reason: str = typer.Option(..., "--reason", help="Why it is withdrawn."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Withdraw an unused approval (its requester or an admin)."""
    updated = _cancel(resolve_target(addr), approval_id, reason)
    if json_out:
        print_json(message_to_json(updated))
    else:
        console.print(Text.assemble("approval is now ", _state_text(updated.state)))


@run
async def _cancel(target: Target, approval_id: str, reason: str) -> approval_pb2.Approval:
    client = _client(target)
    try:
        return await client.cancel(approval_id, reason)
    finally:
        await client.aclose()


# --- verify / signing-key ------------------------------------------------------------------


@approvals_app.command("verify")
def verify(
    approval_id: str = typer.Argument(None, help="The approval id (optional with --record)."),
    record: str = typer.Option(
        None, "--record", help="Verify this export of `approvals show ID --json` (offline)."
    ),
    public_key: str = typer.Option(
        None, "--public-key", help="PEM public key from `approvals signing-key` (offline)."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Check every decision record's Ed25519 signature, and that the records justify the
    approval's state. With --record and --public-key nothing is fetched."""
    if record is None and not approval_id:
        raise fail("name an approval id, or pass --record FILE", 2)
    target: Target | None = None
    if record is not None:
        approval = _read_record(record)
        if approval_id and approval_id != approval.approval_id:
            raise fail(f"{record} holds approval {approval.approval_id}, not {approval_id}")
    else:
        target = resolve_target(addr)
        approval = _get(target, approval_id)
    if public_key is not None:
        key = _read_public_key(public_key)
    else:
        target = target or resolve_target(addr)
        key = _signing_key(target).public_key
    try:
        domain = wire.approval_from_proto(approval)
    except CabinCrewError as exc:
        problems = [exc.message]
    else:
        problems = verify_approval(domain, key)
    result = {
        "approval_id": approval.approval_id,
        "state": _STATE_NAMES.get(approval.state, "unknown"),
        "subject_hash": approval.subject_hash,
        "key_id": key_id_for(key),
        "decisions": len(approval.decisions),
        "verified": not problems,
        "problems": problems,
    }
    if json_out:
        print_json(result)
    else:
        for line in problems:
            console.print(Text.assemble(Text("✗ ", "red"), _plain(line)))
        if not problems:
            console.print(
                Text.assemble(
                    Text("✓ ", "green"),
                    f"{len(approval.decisions)} signed record(s) of approval ",
                    _plain(approval.approval_id),
                    f" verify with key {key_id_for(key)} and justify its state (",
                    _state_text(approval.state),
                    ")",
                )
            )
    if problems:
        raise typer.Exit(1)


def _read_record(path: str) -> approval_pb2.Approval:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise fail(f"{path} is not JSON") from None
    message = approval_pb2.Approval()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError:
        raise fail(f"{path} is not an approval exported by `approvals show --json`") from None
    return message


def _read_public_key(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Ed25519Verifier.from_pem(data).public_key_bytes()
    except SigningError as exc:
        raise fail(f"{path}: {exc.message}") from None


@approvals_app.command("signing-key")
def signing_key(addr: str = AddrOption, json_out: bool = JsonOption) -> None:
    """Print the public key that verifies approval records (PEM), for offline checks."""
    response = _signing_key(resolve_target(addr))
    pem = _pem(response.public_key)
    if json_out:
        print_json({"key_id": response.key_id, "public_key_pem": pem})
        return
    typer.echo(pem, nl=False)


def _pem(public_key: bytes) -> str:
    key = Ed25519PublicKey.from_public_bytes(public_key)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@run
async def _signing_key(target: Target) -> approval_pb2.GetSigningKeyResponse:
    client = _client(target)
    try:
        return await client.signing_key()
    finally:
        await client.aclose()


# --- helpers ---------------------------------------------------------------------------------


def _visible(text: str) -> str:
    """Control characters shown as escapes (no terminal sequence from the data runs)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _plain(text: str) -> Text:
    return Text(_visible(text))


def _state_text(state: int) -> Text:
    name = _STATE_NAMES.get(state, "unknown")
    return Text(name, _STATE_STYLE.get(name, ""))


def _given(approval: approval_pb2.Approval) -> int:
    return len({d.approver for d in approval.decisions if d.approved})


def _subject_line(approval: approval_pb2.Approval) -> str:
    if approval.workflow_id:
        return f"{approval.workflow_id}/{approval.step_id}"
    return f"{_KINDS.get(approval.subject_kind, '?')} {approval.gateway_request_id}"


def _short(text: str, size: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= size else line[: size - 1] + "…"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(moment: datetime, now: datetime) -> str:
    seconds = int((moment - now).total_seconds())
    span = abs(seconds)
    if span >= 86400:
        amount = f"{span // 86400}d {span % 86400 // 3600}h"
    elif span >= 3600:
        amount = f"{span // 3600}h {span % 3600 // 60}m"
    elif span >= 60:
        amount = f"{span // 60}m"
    else:
        amount = f"{span}s"
    return f"in {amount}" if seconds >= 0 else f"{amount} ago"


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)
