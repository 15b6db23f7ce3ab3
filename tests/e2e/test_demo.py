"""`make demo` as CI runs it: ``scripts/demo.py`` with the venv's Python, to its last line.

The script starts its own ``cabincrew up`` on a free port; it is given a data dir under
tmp_path so that it never touches the repository's ``.cabincrew/demo``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_demo_runs_its_whole_story_and_the_audit_log_verifies(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CABINCREW_TOKEN", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), str(tmp_path / "demo")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    verify = result.stdout.split("== cabincrew audit verify", 1)
    assert len(verify) == 2, result.stdout[-4000:]
    assert re.search(r"^ok: [1-9]\d* entries verify$", verify[1], re.MULTILINE), verify[1]
    assert "cabincrew up exited with 0" in verify[1]
    assert (tmp_path / "demo" / "up.log").exists()
