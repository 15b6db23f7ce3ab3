"""Fixtures for the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.harness import Sandbox


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """A fresh workspace, temp dir and artifact dirs for one test."""
    return Sandbox(tmp_path)
