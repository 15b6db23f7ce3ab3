"""Fixtures shared by the whole suite: real servers on loopback, identities, paths."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.auth import issue_token
from cabincrew.clients import ChannelOptions, open_channel
from cabincrew.config import Config, load_config
from cabincrew.signing import Ed25519Signer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BIN = Path(sys.executable).parent


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(
    data_dir: Path, services: tuple[str, ...] | None = None, **overrides: object
) -> Config:
    """A config listening on an ephemeral loopback port with state in ``data_dir``."""
    values: dict[str, object] = {
        "data_dir": str(data_dir),
        "server.addr": "127.0.0.1:0",
        **overrides,
    }
    if services is not None:
        values["services"] = list(services)
    return load_config(None, environ={}, overrides=values)


def token_for(config: Config, principal: str, roles: list[str]) -> str:
    """A bearer token signed by the data dir's auth key."""
    signer = Ed25519Signer.load_or_create(config.auth_key_path())
    return issue_token(signer, principal, roles, ttl_seconds=600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data dir."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL URL for tests that need one (skips where none is configured)."""
    url = os.environ.get("CABINCREW_TEST_POSTGRES_URL", "")
    if not url:
        pytest.skip("CABINCREW_TEST_POSTGRES_URL is not set; CI sets it where PostgreSQL runs")
    return url


async def open_client_channel(port: int, token: str = "") -> AsyncIterator[object]:
    """An async channel to a loopback port (helper for fixtures)."""
    channel = open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token))
    try:
        yield channel
    finally:
        await channel.close()
