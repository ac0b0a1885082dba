"""One tiny trained run shared by the serving tests (training it is their slowest part)."""

from __future__ import annotations

import pytest
from tinyrun import tiny_config, train_and_report

from moe import config as cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(exp, run_dir)`` of a 40-step tiny MoE run (tests/tinyrun.py), trained once: enough
    steps that its decodes are words, not just eos."""
    root = tmp_path_factory.mktemp("serving")
    exp = cfg.load(tiny_config(root, train={"steps": 40}, checkpoint={"every": 20}))
    run_dir = root / "runs" / "tiny"
    train_and_report(exp, run_dir)
    return exp, run_dir
