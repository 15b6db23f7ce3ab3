"""``cabincrew run``, ``workflows``, ``batch`` and ``plan-token``: governed workflows.

``run FILE`` submits a workflow file (YAML or JSON) and, with ``--wait``, follows it to its
end: a live table on a terminal, one line per transition otherwise, the final state last.
It exits 0 when the workflow COMPLETED, 1 when it FAILED or was CANCELLED, 3 when
``--timeout`` passed first. Relative paths in the file resolve against the file's folder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import typer
import yaml
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cabincrew.cli.common import (
    AddrOption,
    DataDirOption,
    JsonOption,
    Target,
    channel,
    console,
    err_console,
    fail,
    message_to_json,
    print_json,
    resolve_target,
    run,
)
from cabincrew.clients import OrchestratorClient, RPCError, new_request_id
from cabincrew.plantoken import verify_signed
from cabincrew.signing import Ed25519Signer, Ed25519Verifier, SigningError
from cabincrew.v1 import common_pb2, orchestrator_pb2

workflows_app = typer.Typer(
    help="Governed workflows: list, show, timeline, resume, cancel.", no_args_is_help=True
)
batch_app = typer.Typer(help="Many workflows at once, with a failure policy.", no_args_is_help=True)
plan_token_app = typer.Typer(
    help="Signed plan-tokens: export and verify offline.", no_args_is_help=True
)

TERMINAL = frozenset(
    {
        common_pb2.WORKFLOW_STATE_COMPLETED,
        common_pb2.WORKFLOW_STATE_FAILED,
        common_pb2.WORKFLOW_STATE_CANCELLED,
    }
)
STATES = [
    name.removeprefix("WORKFLOW_STATE_")
    for name in common_pb2.WorkflowState.keys()
    if name != "WORKFLOW_STATE_UNSPECIFIED"
]
POLICIES = {
    "quarantine": orchestrator_pb2.FAILURE_POLICY_QUARANTINE,
    "strict": orchestrator_pb2.FAILURE_POLICY_STRICT,
    "continue": orchestrator_pb2.FAILURE_POLICY_CONTINUE,
}
_STYLE = {"COMPLETED": "green", "FAILED": "red", "CANCELLED": "dim", "AWAITING_APPROVAL": "yellow"}
EXIT_FAILED = 1
EXIT_TIMEOUT = 3

# Options whose values are mutable types are built once (ruff B008).
_WORKFLOW_FILE = typer.Argument(..., help="Workflow file (YAML or JSON).")
_INPUTS = typer.Option([], "--input", "-i", help="An input, key=value (repeat).")
_LABELS = typer.Option([], "--label", help="A label, key=value (repeat).")
_BATCH_FILE = typer.Argument(..., help="Batch file (YAML or JSON).")
_OUT = typer.Option(None, "--out", help="Write to this file (default: stdout).")
_ENVELOPE_FILE = typer.Argument(..., help="A signed plan-token envelope (JSON).")
_PUBLIC_KEY = typer.Option(
    None, "--public-key", help="The orchestrator's public key (PEM, or raw base64)."
)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``workflows``, ``batch`` and ``plan-token`` to the main CLI."""
    app.command("run")(run_workflow)
    app.add_typer(workflows_app, name="workflows")
    app.add_typer(batch_app, name="batch")
    app.add_typer(plan_token_app, name="plan-token")


def state_name(value: int) -> str:
    """A WorkflowState's short name."""
    return common_pb2.WorkflowState.Name(value).removeprefix("WORKFLOW_STATE_")  # type: ignore[arg-type]


def _pairs(values: Sequence[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"{option} takes key=value, not {item!r}", 2)
        pairs[key] = value
    return pairs


def _definition(path: Path) -> orchestrator_pb2.WorkflowDefinition:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", 2) from None
    return orchestrator_pb2.WorkflowDefinition(
        text=text, filename=path.name, base_dir=str(path.resolve().parent)
    )


def _workspace(value: str | None) -> str:
    if not value:
        return ""
    path = Path(value).resolve()
    if not path.is_dir():
        raise fail(f"--workspace {value}: not a directory", 2)
    return str(path)


# --- run ---------------------------------------------------------------------------------


def run_workflow(
    file: Path = _WORKFLOW_FILE,
    inputs: list[str] = _INPUTS,
    workspace: str = typer.Option(None, "--workspace", help="Folder to copy as the workspace."),
    environment: str = typer.Option("", "--env", help="Environment name policies see."),
    labels: list[str] = _LABELS,
    wait: bool = typer.Option(False, "--wait", help="Follow the workflow to its end."),
    timeout: float = typer.Option(0, "--timeout", help="With --wait: give up after N seconds."),
    request_id: str = typer.Option("", "--request-id", help="Idempotency key (default: new)."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Submit a workflow; with --wait, exit 0 only if it COMPLETED."""
    request = orchestrator_pb2.SubmitWorkflowRequest(
        request_id=request_id or new_request_id(),
        definition=_definition(file),
        inputs=_pairs(inputs, "--input"),
        workspace_source=_workspace(workspace),
        labels=_pairs(labels, "--label"),
        environment=environment,
    )
    final, code = _submit_and_follow(resolve_target(addr), request, wait, timeout, json_out)
    if json_out:
        print_json({"workflow": message_to_json(final)})
    elif wait:
        _print_final(final)
    else:
        console.print(
            f"workflow [bold]{final.workflow_id}[/] submitted ({state_name(final.state)}); "
            f"follow it with: cabincrew workflows watch {final.workflow_id}",
            highlight=False,
        )
    raise typer.Exit(code)


@run
async def _submit_and_follow(
    target: Target,
    request: orchestrator_pb2.SubmitWorkflowRequest,
    wait: bool,
    timeout: float,
    quiet: bool,
) -> tuple[orchestrator_pb2.Workflow, int]:
    client = OrchestratorClient(channel(target))
    try:
        workflow = await client.submit(request)
        if not wait:
            return workflow, 0
        return await _follow(client, workflow.workflow_id, timeout, quiet)
    finally:
        await client.aclose()


async def _follow(
    client: OrchestratorClient, workflow_id: str, timeout: float, quiet: bool
) -> tuple[orchestrator_pb2.Workflow, int]:
    """Watch to the end (reconnecting if the server restarts); returns (workflow, exit code)."""
    latest: orchestrator_pb2.Workflow | None = None
    live = not quiet and console.is_terminal
    hinted: set[str] = set()

    async def watch() -> None:
        nonlocal latest
        while True:
            try:
                async for update in client.watch(workflow_id):
                    previous, latest = latest, update.workflow
                    if not quiet:
                        _progress(previous, latest, hinted, display)
                    if latest.state in TERMINAL:
                        return
            except RPCError as exc:
                if exc.status.name != "UNAVAILABLE":
                    raise
                await asyncio.sleep(1.0)

    display = Live(console=console, auto_refresh=False) if live else None
    try:
        if display is not None:
            display.start()
        if timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    await watch()
            except TimeoutError:
                assert latest is not None
                return latest, EXIT_TIMEOUT
        else:
            await watch()
    finally:
        if display is not None:
            display.stop()
    assert latest is not None
    return latest, 0 if latest.state == common_pb2.WORKFLOW_STATE_COMPLETED else EXIT_FAILED


def _progress(
    previous: orchestrator_pb2.Workflow | None,
    current: orchestrator_pb2.Workflow,
    hinted: set[str],
    display: Live | None,
) -> None:
    if display is not None:
        display.update(_steps_table(current), refresh=True)
    else:
        before = {s.step_id: s.state for s in previous.steps} if previous else {}
        for step in current.steps:
            changed = before.get(step.step_id, common_pb2.WORKFLOW_STATE_INIT) != step.state
            if changed:
                line = f"{step.step_id}: {state_name(step.state)}"
                if step.skipped:
                    line += " (skipped)"
                if step.error:
                    line += f" ({step.error})"
                console.print(line, highlight=False, markup=False)
    for step in current.steps:
        if (
            step.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
            and step.approval_id not in hinted
        ):
            hinted.add(step.approval_id)
            err_console.print(
                f"step {step.step_id} waits for approval {step.approval_id} "
                f"(role {step.approval_role or 'approver'}): "
                f"cabincrew approvals show {step.approval_id}",
                highlight=False,
            )
        if (
            step.state == common_pb2.WORKFLOW_STATE_TAKEOFF_INTERRUPTED
            and step.step_id not in hinted
        ):
            hinted.add(step.step_id)
            err_console.print(
                f"take-off of step {step.step_id} was cut off by a restart: "
                f"cabincrew workflows resume {current.workflow_id} --retry-takeoff, or cancel",
                highlight=False,
            )


def _steps_table(workflow: orchestrator_pb2.Workflow) -> Table:
    table = Table(title=f"{workflow.name} {workflow.workflow_id} — {state_name(workflow.state)}")
    table.add_column("step")
    table.add_column("state")
    table.add_column("decision")
    table.add_column("detail", overflow="fold")
    for step in workflow.steps:
        state = state_name(step.state) + (" (skipped)" if step.skipped else "")
        decision = common_pb2.Decision.Name(step.decision).removeprefix("DECISION_").lower()
        detail = step.error or (f"approval {step.approval_id}" if step.approval_id else "")
        if step.warnings:
            detail = (detail + "; " if detail else "") + "; ".join(step.warnings)
        table.add_row(
            step.step_id,
            Text(state, style=_STYLE.get(state_name(step.state), "")),
            "" if decision == "unspecified" else decision,
            Text(detail),
        )
    return table


def _print_final(workflow: orchestrator_pb2.Workflow) -> None:
    name = state_name(workflow.state)
    line = Text(f"workflow {workflow.workflow_id} {name}", style=_STYLE.get(name, ""))
    if workflow.error:
        line.append(f": {workflow.error}")
    console.print(line)
    if workflow.workspace:
        console.print(
            f"workspace: {workflow.workspace}", highlight=False, markup=False, soft_wrap=True
        )


# --- workflows ---------------------------------------------------------------------------


@workflows_app.command("list")
def list_workflows(
    state: str = typer.Option(None, "--state", help="Only workflows in this state."),
    batch: str = typer.Option("", "--batch", help="Only the workflows of this batch."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """List workflows, oldest first."""
    if state is not None and state.upper() not in STATES:
        raise fail(f"unknown state {state!r}; choose one of {', '.join(STATES)}", 2)
    request = orchestrator_pb2.ListWorkflowsRequest(
        state=common_pb2.WorkflowState.Value(f"WORKFLOW_STATE_{state.upper()}") if state else 0,  # type: ignore[arg-type]
        batch_id=batch,
    )
    found = _list(resolve_target(addr), request, limit)
    if json_out:
        print_json({"workflows": [message_to_json(w) for w in found]})
        return
    if not found:
        console.print("no workflows", highlight=False)
        return
    table = Table(title=f"{len(found)} workflow(s)")
    for column in ("id", "name", "state", "steps", "requester", "created"):
        table.add_column(column, overflow="fold")
    for workflow in found:
        done = sum(1 for s in workflow.steps if s.state in TERMINAL)
        name = state_name(workflow.state)
        table.add_row(
            workflow.workflow_id,
            workflow.name,
            Text(name, style=_STYLE.get(name, "")),
            f"{done}/{len(workflow.steps)}",
            workflow.requester,
            workflow.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@run
async def _list(
    target: Target, request: orchestrator_pb2.ListWorkflowsRequest, limit: int
) -> list[orchestrator_pb2.Workflow]:
    client = OrchestratorClient(channel(target))
    found: list[orchestrator_pb2.Workflow] = []
    try:
        while len(found) < limit:
            request.page_size = min(500, limit - len(found))
            page = await client.list(request)
            found.extend(page.workflows)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
    finally:
        await client.aclose()
    return found[:limit]


@workflows_app.command("show")
def show(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Show a workflow and its steps."""
    workflow = _get(resolve_target(addr), workflow_id)
    if json_out:
        print_json({"workflow": message_to_json(workflow)})
        return
    name = state_name(workflow.state)
    console.print(
        Text(f"{workflow.name} {workflow.workflow_id}: {name}", style=_STYLE.get(name, ""))
    )
    for label, value in (
        ("requester", workflow.requester),
        ("workspace", workflow.workspace),
        ("environment", workflow.environment),
        ("batch", workflow.batch_id),
        ("error", workflow.error),
    ):
        if value:
            console.print(f"{label}: {value}", highlight=False, markup=False, soft_wrap=True)
    console.print(_steps_table(workflow))
    for step in workflow.steps:
        if step.plan_token_hash:
            console.print(
                f"{step.step_id}: plan-token {step.plan_token_hash}",
                highlight=False,
                soft_wrap=True,
            )


@run
async def _get(target: Target, workflow_id: str) -> orchestrator_pb2.Workflow:
    client = OrchestratorClient(channel(target))
    try:
        return await client.get(workflow_id)
    finally:
        await client.aclose()


@workflows_app.command("watch")
def watch_workflow(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    timeout: float = typer.Option(0, "--timeout", help="Give up after N seconds."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Follow a workflow to its end; exit 0 only if it COMPLETED."""
    final, code = _watch(resolve_target(addr), workflow_id, timeout, json_out)
    if json_out:
        print_json({"workflow": message_to_json(final)})
    else:
        _print_final(final)
    raise typer.Exit(code)


@run
async def _watch(
    target: Target, workflow_id: str, timeout: float, quiet: bool
) -> tuple[orchestrator_pb2.Workflow, int]:
    client = OrchestratorClient(channel(target))
    try:
        return await _follow(client, workflow_id, timeout, quiet)
    finally:
        await client.aclose()


@workflows_app.command("timeline")
def timeline(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """The recorded history with durations and stats (--json exports it)."""
    result = _timeline(resolve_target(addr), workflow_id)
    if json_out:
        print_json(message_to_json(result))
        return
    table = Table(title=f"timeline of {workflow_id}")
    for column in ("#", "at", "+ms", "entry", "step", "state"):
        table.add_column(column, overflow="fold")
    for entry in result.entries:
        table.add_row(
            str(entry.sequence),
            entry.timestamp.ToDatetime().strftime("%H:%M:%S.%f")[:-3],
            f"{entry.since_previous.ToMicroseconds() / 1000:.1f}",
            entry.entry_type,
            entry.step_id,
            state_name(entry.state) if entry.state else "",
        )
    console.print(table)
    stats = result.stats
    console.print(
        f"total {stats.total_duration.ToMicroseconds() / 1e6:.3f} s; "
        + "; ".join(
            f"{s.step_id} {s.duration.ToMicroseconds() / 1e6:.3f} s ({state_name(s.final_state)})"
            for s in stats.steps
        ),
        highlight=False,
    )
    counts = ", ".join(f"{name} {count}" for name, count in sorted(stats.counts_by_type.items()))
    console.print(f"entries: {counts}", highlight=False)


@run
async def _timeline(target: Target, workflow_id: str) -> orchestrator_pb2.GetTimelineResponse:
    client = OrchestratorClient(channel(target))
    try:
        return await client.timeline(workflow_id)
    finally:
        await client.aclose()


@workflows_app.command("resume")
def resume(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    retry_takeoff: bool = typer.Option(
        False, "--retry-takeoff", help="Run again a take-off that a crash cut off."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Resume a workflow whose take-off was interrupted (an explicit operator decision)."""
    workflow = _resume(resolve_target(addr), workflow_id, retry_takeoff)
    if json_out:
        print_json({"workflow": message_to_json(workflow)})
    else:
        console.print(f"workflow {workflow_id}: {state_name(workflow.state)}", highlight=False)


@run
async def _resume(target: Target, workflow_id: str, retry: bool) -> orchestrator_pb2.Workflow:
    client = OrchestratorClient(channel(target))
    try:
        return await client.resume(workflow_id, retry_takeoff=retry)
    finally:
        await client.aclose()


@workflows_app.command("cancel")
def cancel(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the log and audit)."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Cancel a workflow (a take-off already running is allowed to finish)."""
    workflow = _cancel(resolve_target(addr), workflow_id, reason)
    if json_out:
        print_json({"workflow": message_to_json(workflow)})
    else:
        console.print(f"workflow {workflow_id}: {state_name(workflow.state)}", highlight=False)


@run
async def _cancel(target: Target, workflow_id: str, reason: str) -> orchestrator_pb2.Workflow:
    client = OrchestratorClient(channel(target))
    try:
        return await client.cancel(workflow_id, reason)
    finally:
        await client.aclose()


# --- batch -------------------------------------------------------------------------------


def load_batch_file(path: Path) -> list[orchestrator_pb2.BatchItem]:
    """Items of a batch file: ``{workflow?, items: [{workflow?, inputs?, workspace?}]}``.

    ``workflow`` (a workflow file, relative to the batch file) on the top level is the default
    of every item. A bare list of workflow file names is accepted too.
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"cannot read batch file {path}: {exc}", 2) from None
    base = path.resolve().parent
    if isinstance(document, list):
        document = {"items": [{"workflow": name} for name in document]}
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise fail(f"{path}: a batch file holds `items:` (a list)", 2)
    default = document.get("workflow")
    items = []
    definitions: dict[str, orchestrator_pb2.WorkflowDefinition] = {}
    for index, raw in enumerate(document["items"]):
        if not isinstance(raw, dict):
            raise fail(f"{path}: items[{index}] must be a mapping", 2)
        name = raw.get("workflow", default)
        if not isinstance(name, str):
            raise fail(f"{path}: items[{index}] names no workflow file", 2)
        if name not in definitions:
            definitions[name] = _definition(base / name)
        inputs = raw.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise fail(f"{path}: items[{index}].inputs must be a mapping", 2)
        workspace = raw.get("workspace")
        items.append(
            orchestrator_pb2.BatchItem(
                definition=definitions[name],
                inputs={str(k): str(v) for k, v in inputs.items()},
                workspace_source=_workspace(str(base / workspace)) if workspace else "",
            )
        )
    return items


@batch_app.command("submit")
def batch_submit(
    file: Path = _BATCH_FILE,
    max_concurrent: int = typer.Option(4, "--max-concurrent", min=1, help="Items running at once."),
    policy: str = typer.Option(
        "quarantine", "--policy", help="On a failed item: quarantine, strict or continue."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until every item has ended."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Submit a batch of workflows."""
    if policy not in POLICIES:
        raise fail(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}", 2)
    request = orchestrator_pb2.SubmitBatchRequest(
        request_id=new_request_id(),
        items=load_batch_file(file),
        max_concurrent=max_concurrent,
        failure_policy=POLICIES[policy],
    )
    batch = _submit_batch(resolve_target(addr), request, wait)
    _print_batch(batch, json_out)
    if wait:
        ok = all(item.state == common_pb2.WORKFLOW_STATE_COMPLETED for item in batch.items)
        raise typer.Exit(0 if ok else EXIT_FAILED)


@run
async def _submit_batch(
    target: Target, request: orchestrator_pb2.SubmitBatchRequest, wait: bool
) -> orchestrator_pb2.Batch:
    client = OrchestratorClient(channel(target))
    try:
        batch = await client.submit_batch(request)
        while wait and not batch.done:
            # Each item is watched to its end; the batch is read again after each one.
            for item in batch.items:
                if item.state not in TERMINAL:
                    await _follow(client, item.workflow_id, 0, True)
            batch = await client.get_batch(batch.batch_id)
        return batch
    finally:
        await client.aclose()


@batch_app.command("show")
def batch_show(
    batch_id: str = typer.Argument(..., help="The batch id."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Show a batch and its items."""
    _print_batch(_get_batch(resolve_target(addr), batch_id), json_out)


@run
async def _get_batch(target: Target, batch_id: str) -> orchestrator_pb2.Batch:
    client = OrchestratorClient(channel(target))
    try:
        return await client.get_batch(batch_id)
    finally:
        await client.aclose()


def _print_batch(batch: orchestrator_pb2.Batch, json_out: bool) -> None:
    if json_out:
        print_json({"batch": message_to_json(batch)})
        return
    policy = orchestrator_pb2.FailurePolicy.Name(batch.failure_policy).removeprefix(
        "FAILURE_POLICY_"
    )
    status = "done" if batch.done else ("stopped" if batch.stopped else "running")
    table = Table(
        title=f"batch {batch.batch_id} ({policy.lower()}, {batch.max_concurrent} at once): {status}"
    )
    for column in ("#", "workflow", "state", "note"):
        table.add_column(column, overflow="fold")
    for item in batch.items:
        name = state_name(item.state)
        note = ("quarantined: " if item.quarantined else "") + item.reason
        table.add_row(
            str(item.index), item.workflow_id, Text(name, style=_STYLE.get(name, "")), Text(note)
        )
    console.print(table)
    if batch.stop_reason:
        console.print(f"stopped: {batch.stop_reason}", highlight=False, markup=False)


# --- plan-token ------------------------------------------------------------------------------


@plan_token_app.command("export")
def export_token(
    workflow_id: str = typer.Argument(..., help="The workflow id."),
    step: str = typer.Option(None, "--step", help="The step (default: the only one with a token)."),
    out: Path = _OUT,
    addr: str = AddrOption,
) -> None:
    """Print a step's signed plan-token envelope (JSON) for offline verification."""
    workflow = _get(resolve_target(addr), workflow_id)
    signed = [
        s for s in workflow.steps if s.plan_token_envelope and (step is None or s.step_id == step)
    ]
    if not signed:
        raise fail(
            f"workflow {workflow_id} has no signed plan-token"
            + (f" for step {step}" if step else "")
        )
    if len(signed) > 1:
        raise fail(
            "several steps have plan-tokens; choose one with --step: "
            + ", ".join(s.step_id for s in signed),
            2,
        )
    text = json.dumps(json.loads(signed[0].plan_token_envelope), indent=2, sort_keys=True) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")


@plan_token_app.command("verify")
def verify_token(
    file: Path = _ENVELOPE_FILE,
    public_key: Path = _PUBLIC_KEY,
    data_dir: str = DataDirOption,
    json_out: bool = JsonOption,
) -> None:
    """Check a signed plan-token offline: its hash, its binding and its signature."""
    try:
        envelope = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise fail(f"cannot read {file}: {exc}", 2) from None
    trusted, source = _trusted_key(public_key, data_dir)
    problems = (
        verify_signed(envelope, trusted) if isinstance(envelope, Mapping) else ["not a JSON object"]
    )
    token = envelope.get("plan_token", {}).get("token", "") if isinstance(envelope, Mapping) else ""
    result = {"ok": not problems, "token": token, "problems": problems, "trusted_key": source}
    if json_out:
        print_json(result)
    elif problems:
        err_console.print(f"[bold red]plan-token does not verify[/] ({source}):")
        for problem in problems:
            err_console.print(f"  - {problem}", highlight=False, markup=False)
    else:
        console.print(f"[green]ok[/]: plan-token {token} verifies ({source})", highlight=False)
    raise typer.Exit(0 if not problems else EXIT_FAILED)


def _trusted_key(public_key: Path | None, data_dir: str | None) -> tuple[bytes | None, str]:
    if public_key is not None:
        raw = public_key.read_bytes()
        try:
            if b"BEGIN" in raw:
                return Ed25519Verifier.from_pem(raw).public_key_bytes(), f"key {public_key}"
            return base64.b64decode(raw.strip(), validate=True), f"key {public_key}"
        except (SigningError, ValueError) as exc:
            raise fail(f"--public-key {public_key}: not an Ed25519 public key ({exc})", 2) from None
    folder = data_dir or os.environ.get("CABINCREW_DATA_DIR") or ".cabincrew"
    key = Path(folder) / "keys" / "orchestrator.key"
    if key.exists():
        return Ed25519Signer.from_file(
            key
        ).public_key_bytes(), f"the orchestrator key in {key.parent}"
    return None, "no trusted key: self-consistency only (pass --public-key)"
