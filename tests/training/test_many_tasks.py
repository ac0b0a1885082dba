"""Many tasks at small scale (issue 13's Done-when): a gettext family over a locale tree of the
test's own (4 languages, both directions, plus LM) with Task-MoE routing on a simulated 4-chip
slice with expert parallelism; `moe train ... train.steps=2 eval.every=0 checkpoint.every=0`
finishes and report.json has a finite perplexity for every task."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from tinyrun import fake_locale, tiny_config

pytestmark = pytest.mark.slow


def many_tasks_config(tmp_path, **sections):
    root = fake_locale(tmp_path / "locale", {"aa": 60, "bb": 50, "cc": 40, "dd": 30})
    family = {"family": "gettext", "directions": ["en-x", "x-en"], "min_pairs": 20}
    return tiny_config(
        tmp_path,
        tasks=[{"name": "en-lm", "kind": "lm", "source": "gettext:aa"}, family],
        data={"locale_dir": str(root), "vocab_per_language": 30, "max_chars": 60},
        model={"encoder_layers": 1, "decoder_layers": 1},  # one MoE layer a stack: fast compile
        moe={"every": 1, "routing_input": {"encoder": "token+task", "decoder": "task"}},
        pod={"topology": "tpu-v3", "slice": "2x2", "mesh": {"data": 2, "expert": 2}},
        eval={"max_examples": 8, "batches": 1},
        **sections,
    )


def test_many_tasks_train_reports_every_task(tmp_path):
    path = many_tasks_config(tmp_path)
    overrides = ["train.steps=2", "eval.every=0", "checkpoint.every=0", "eval.bleu_examples=4"]
    out = subprocess.run(
        [sys.executable, "-m", "moe.cli", "train", str(path), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    tasks = json.loads((run / "report.json").read_text())["tasks"]
    assert len(tasks) == 9 and {"en-aa", "aa-en", "en-dd", "dd-en", "en-lm"} <= set(tasks)
    assert all(math.isfinite(t["perplexity"]) for t in tasks.values())
    data = json.loads((run / "train_summary.json").read_text())["data"]
    assert data["aa-en"]["language"] == "aa" and data["aa-en"]["unk_rate"] is not None
    config = (run / "config.yaml").read_text()
    assert "name: dd-en" in config and "reverse: true" in config
