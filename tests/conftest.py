"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinyrun import tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny experiment (one process) with its data files."""
    return tiny_config(tmp_path_factory.mktemp("faults"))
