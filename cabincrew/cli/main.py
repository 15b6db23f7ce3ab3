"""Entry point of the ``cabincrew`` command: up, status, serve, auth, version and the
service command groups."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import typer
from rich.table import Table

import cabincrew
from cabincrew.auth import issue_token, parse_duration
from cabincrew.cli.common import (
    AddrOption,
    DataDirOption,
    JsonOption,
    Target,
    channel,
    console,
    err_console,
    fail,
    print_json,
    resolve_target,
    run,
)
from cabincrew.clients import HealthClient, RPCError
from cabincrew.config import SERVICE_NAMES, Config, ConfigError, load_config
from cabincrew.errors import CabinCrewError
from cabincrew.signing import Ed25519Signer

app = typer.Typer(
    name="cabincrew",
    help=(
        "Governed AI automation: engines propose, governance decides, "
        "engines execute what was approved."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
auth_app = typer.Typer(help="Identities and bearer tokens.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

GRPC_NAMES = {
    "audit": "cabincrew.v1.AuditService",
    "preflight": "cabincrew.v1.PreflightService",
    "approval": "cabincrew.v1.ApprovalService",
    "orchestrator": "cabincrew.v1.OrchestratorService",
    "mcp_gateway": "cabincrew.v1.McpGatewayService",
    "llm_gateway": "cabincrew.v1.LlmGatewayService",
}


def _configure_logging(config: Config) -> None:
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Migrations announce every plugin they load; only their warnings matter to operators.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


def build_config(
    config_file: str | None, addr: str | None, data_dir: str | None, **extra: Any
) -> Config:
    """Config from file, environment and flags, in that order of precedence (flags win)."""
    overrides: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if addr:
        overrides["server.addr"] = addr
    if data_dir:
        overrides["data_dir"] = data_dir
    return load_config(config_file, environ=os.environ, overrides=overrides)


def _serve(config: Config) -> None:
    from cabincrew.runtime.server import serve

    _configure_logging(config)

    def ready(server: Any) -> None:
        names = ", ".join(config.services)
        console.print(
            f"cabincrew {cabincrew.__version__} listening on "
            f"{config.server.addr.rsplit(':', 1)[0]}:{server.port}"
            f" ({names}); data dir {config.data_path.resolve()}",
            highlight=False,
        )
        sys.stdout.flush()

    try:
        asyncio.run(serve(config, ready=ready))
    except CabinCrewError as exc:
        raise fail(exc.message) from None


@app.command()
def up(
    addr: str = typer.Option("127.0.0.1:7070", "--addr", help="Listen address host:port."),
    data_dir: str = typer.Option(".cabincrew", "--data-dir", help="Where all state lives."),
    config_file: str = typer.Option(None, "--config", help="YAML config file."),
) -> None:
    """Run all six services in one process on one gRPC port (the embedded mode)."""
    try:
        config = build_config(config_file, addr, data_dir, services=list(SERVICE_NAMES))
    except ConfigError as exc:
        raise fail(exc.message) from None
    _serve(config)


@app.command()
def serve(
    name: str = typer.Argument(..., help=f"One of: {', '.join(SERVICE_NAMES)}."),
    addr: str = typer.Option(None, "--addr", help="Listen address host:port."),
    data_dir: str = typer.Option(None, "--data-dir", help="Where this service's state lives."),
    config_file: str = typer.Option(None, "--config", help="YAML config file."),
) -> None:
    """Run one service alone (what the container image runs)."""
    if name not in SERVICE_NAMES:
        raise fail(f"unknown service {name!r}; choose one of {', '.join(SERVICE_NAMES)}", 2)
    try:
        config = build_config(config_file, addr, data_dir, services=[name])
    except ConfigError as exc:
        raise fail(exc.message) from None
    _serve(config)


def run_single_service(name: str) -> None:
    """``python -m <service>``: same as ``cabincrew serve NAME`` with env/config only."""
    sys.argv = [sys.argv[0], "serve", name, *sys.argv[1:]]
    main()


ServiceOption = typer.Option(
    None, "--service", help="Only this service (repeatable); for one-service processes."
)


@app.command()
def status(
    addr: str = AddrOption,
    json_out: bool = JsonOption,
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for an answer."),
    only: list[str] = ServiceOption,
) -> None:
    """Show each service's health."""
    unknown = sorted(set(only or ()) - set(GRPC_NAMES))
    if unknown:
        raise fail(f"unknown service {unknown[0]!r}; choose from {', '.join(GRPC_NAMES)}", 2)
    target = resolve_target(addr)
    rows = _health(target.address, target.token, timeout, tuple(only or GRPC_NAMES))
    if json_out:
        print_json({"address": target.address, "services": rows})
    else:
        table = Table(title=f"cabincrew at {target.address}")
        table.add_column("service")
        table.add_column("gRPC name")
        table.add_column("status")
        for row in rows:
            colour = "green" if row["status"] == "SERVING" else "red"
            table.add_row(row["service"], row["grpc_service"], f"[{colour}]{row['status']}[/]")
        console.print(table)
    if any(row["status"] != "SERVING" for row in rows):
        raise typer.Exit(1)


@run
async def _health(
    address: str, token: str, timeout: float, services: tuple[str, ...]
) -> list[dict[str, str]]:
    client = HealthClient(channel(Target(address, token)), deadline_seconds=timeout, max_attempts=1)
    rows = []
    try:
        for short in services:
            full = GRPC_NAMES[short]
            try:
                state = await client.check(full)
            except RPCError as exc:
                if exc.status.name == "NOT_FOUND":
                    state = "SERVICE_UNKNOWN"
                else:
                    raise
            rows.append({"service": short, "grpc_service": full, "status": state})
    finally:
        await client.aclose()
    return rows


@auth_app.command("issue")
def auth_issue(
    principal: str = typer.Option(..., "--principal", help="Name of the identity."),
    roles: str = typer.Option(
        "", "--roles", help="Comma-separated roles, e.g. approver,release-manager."
    ),
    ttl: str = typer.Option("8h", "--ttl", help="Lifetime: 90s, 15m, 8h, 7d."),
    data_dir: str = DataDirOption,
    key_file: str = typer.Option(
        None, "--key-file", help="Signing key (default: DATA_DIR/keys/auth.key)."
    ),
) -> None:
    """Print a signed bearer token; pass it to other commands as CABINCREW_TOKEN."""
    try:
        config = build_config(None, None, data_dir)
        path = key_file or str(config.auth_key_path())
        signer = Ed25519Signer.load_or_create(path)
        token = issue_token(
            signer,
            principal,
            roles.split(","),
            ttl_seconds=parse_duration(ttl),
            audience=config.auth.audience,
        )
    except CabinCrewError as exc:
        raise fail(exc.message) from None
    sys.stdout.write(token + "\n")


@app.command()
def version(json_out: bool = JsonOption) -> None:
    """Print the version."""
    info = {"cabincrew": cabincrew.__version__, "protocol": cabincrew.PROTOCOL_VERSION}
    if json_out:
        print_json(info)
    else:
        console.print(
            f"cabincrew {info['cabincrew']} (protocol {info['protocol']})", highlight=False
        )


def _register_groups() -> None:
    # Command groups of the services register themselves here as their issues land.
    import importlib

    for module in (
        "cabincrew.cli.audit",
        "cabincrew.cli.approvals",
        "cabincrew.cli.preflight",
        "cabincrew.cli.workflows",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


_register_groups()


def main() -> None:
    """Console-script entry point: no tracebacks for users."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # the last line of defence: one line, never a traceback
        if os.environ.get("CABINCREW_DEBUG"):
            raise
        err_console.print(
            f"[bold red]error:[/] internal error ({type(exc).__name__}); "
            "set CABINCREW_DEBUG=1 for details"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
