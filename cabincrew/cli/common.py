"""What every CLI command shares: finding the server, the token, errors and output."""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

from cabincrew.auth import issue_token
from cabincrew.clients import ChannelOptions, RPCError, open_channel
from cabincrew.errors import CabinCrewError
from cabincrew.signing import Ed25519Signer

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_ADDR = "127.0.0.1:7070"
DEFAULT_DATA_DIR = ".cabincrew"

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

AddrOption = typer.Option(None, "--addr", help="Server address host:port (or CABINCREW_ADDR).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")
DataDirOption = typer.Option(None, "--data-dir", help="Data dir (or CABINCREW_DATA_DIR).")


@dataclass(frozen=True)
class Target:
    """Where the CLI talks to, and as whom."""

    address: str
    token: str
    tls_ca_file: str = ""


def resolve_target(addr: str | None, data_dir: str | None = None) -> Target:
    """Resolve --addr / CABINCREW_ADDR and CABINCREW_TOKEN (or a local token from the data dir).

    In the embedded mode the data dir holds the token-signing key; a user who can read it
    is the local operator, so the CLI issues itself a short-lived token rather than making
    every local command need ``auth issue`` first.
    """
    address = addr or os.environ.get("CABINCREW_ADDR") or DEFAULT_ADDR
    token = os.environ.get("CABINCREW_TOKEN", "").strip()
    if not token:
        key = (
            Path(data_dir or os.environ.get("CABINCREW_DATA_DIR") or DEFAULT_DATA_DIR)
            / "keys"
            / "auth.key"
        )
        if key.exists():
            signer = Ed25519Signer.from_file(key)
            token = issue_token(signer, f"local:{_user()}", ["operator"], ttl_seconds=600)
    return Target(address=address, token=token, tls_ca_file=os.environ.get("CABINCREW_TLS_CA", ""))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "user"


def channel(target: Target, deadline: float = 30.0) -> grpc.aio.Channel:
    """Open a channel to the target."""
    return open_channel(
        ChannelOptions(
            address=target.address,
            token=target.token,
            tls_ca_file=target.tls_ca_file,
            deadline_seconds=deadline,
        )
    )


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear error line and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def describe_rpc_error(error: RPCError, address: str) -> str:
    """One line for a failed call."""
    if error.status == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach cabincrew at {address} ({error.message}); is `cabincrew up` running?"
    if error.status == grpc.StatusCode.UNAUTHENTICATED:
        return f"{error.message} (set CABINCREW_TOKEN from `cabincrew auth issue`)"
    return str(error)


def run(coro_fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an async command body; turn known errors into one line and an exit code."""

    @functools.wraps(coro_fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except RPCError as exc:
            address = str(kwargs.get("addr") or os.environ.get("CABINCREW_ADDR") or DEFAULT_ADDR)
            raise fail(describe_rpc_error(exc, address)) from None
        except CabinCrewError as exc:
            hint = exc.remedy()
            raise fail(exc.message + (f" ({hint})" if hint else "")) from None
        except OSError as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None

    return wrapper


def print_json(value: Any) -> None:
    """Print JSON to stdout (no colour, one document)."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def message_to_json(message: Message) -> Any:
    """A protobuf message as plain JSON (proto field names)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def gather_bounded(awaitables: list[Awaitable[T]]) -> list[T]:
    """Await all, in order."""
    return list(await asyncio.gather(*awaitables))
