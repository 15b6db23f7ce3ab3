"""A Node.js client built from proto/ with @grpc/grpc-js talks to a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.runtime.server import CabinCrewServer, create_server
from tests.conftest import ROOT, make_config, token_for

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js and npm are needed for the polyglot client test")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        # node_modules is git-ignored; the test installs what it needs.
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR / "client.js"


@pytest.fixture
async def server(data_dir: Path) -> AsyncIterator[CabinCrewServer]:
    app, _ = await create_server(make_config(data_dir))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


async def test_a_node_client_sees_all_services_serving(
    node_client: Path, server: CabinCrewServer
) -> None:
    import asyncio

    token = token_for(server.context.config, "node-client", ["auditor"])
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(node_client),
        f"127.0.0.1:{server.port}",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert set(result["health"].values()) == {"SERVING"}
    assert len(result["health"]) == 6
    # The call got through authentication to the service (answered, not UNAUTHENTICATED=16).
    assert result["checkpoint"]["code"] != 16
