"""Run the audit and approval services in one process, exactly as ``cabincrew up`` builds
them (real outbox emitter, real audit log), for tests that kill the process.

Usage: python -m tests.approval.serve_pair DATA_DIR HOST:PORT
"""

from __future__ import annotations

import asyncio
import sys

from cabincrew.config import load_config
from cabincrew.runtime.server import CabinCrewServer, serve


def main() -> None:
    data_dir, addr = sys.argv[1:3]
    config = load_config(
        None,
        environ={},
        overrides={"data_dir": data_dir, "server.addr": addr, "services": ["audit", "approval"]},
    )

    def ready(app: CabinCrewServer) -> None:
        sys.stdout.write(f"READY {app.port}\n")
        sys.stdout.flush()

    asyncio.run(serve(config, ready=ready))


if __name__ == "__main__":
    main()
