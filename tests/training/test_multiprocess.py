"""A real 2-rank training run (``moe train`` starts mpirun itself) against the same run in one
process with the same 4 devices: the same losses, and every process's examples counted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tinyrun import tiny_config

from moe import runfiles as rf

POD = {"topology": "cpu", "slice": "4", "mesh": {"data": 2, "expert": 2}}


def run(root, processes: int) -> tuple[rf.TrainSummary, list[rf.TrainLine], str]:
    config = tiny_config(
        root,
        pod={**POD, "processes": processes},
        eval={"every": 0, "bleu_examples": 0},
        checkpoint={"every": 0},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-m", "moe.cli", "train", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = root / "runs" / "tiny"
    summary, problem = rf.read_json(run_dir / "train_summary.json", rf.TrainSummary)
    assert problem is None
    train, _, _ = rf.read_metrics(run_dir / "metrics.jsonl")
    return summary, train, out.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {n: run(tmp_path_factory.mktemp(f"p{n}"), n) for n in (1, 2)}


def test_two_ranks_count_the_examples_of_both(runs):
    summary, _, _ = runs[2]
    assert summary.pod.processes == 2
    assert sum(summary.examples_seen.values()) >= 12 * 8  # steps x rows, packed: more
    assert summary.examples_seen == runs[1][0].examples_seen


def test_two_ranks_train_like_one_process_with_the_same_devices(runs):
    (_, one, _), (_, two, _) = runs[1], runs[2]
    assert [x.step for x in one] == [x.step for x in two]
    for a, b in zip(one, two):
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4, abs=1e-6)
    assert set(two[-1].tasks) == {"rev", "lm"}  # per-task losses, logged by rank 0


def test_under_mpirun_rank_0_prints_each_phase_and_progress_line_once(runs):
    err = runs[2][2]
    for line in (
        "moe: input data ready in ",
        "moe: compiled the train step and ran step 1 in ",
        "moe: step 6/12 (50%) loss ",
        "moe: final evaluation done in ",
    ):
        assert err.count(line) == 1, (line, err[-3000:])
    assert "tok/s (steady)" in err and "ETA 0:" in err
