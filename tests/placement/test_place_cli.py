"""`moe place` end to end on 4 virtual devices (8 experts over an expert axis of 4, in a
subprocess): the report's figures and guarantee, --apply, the placed run's evaluation and
training; and its one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from tinyrun import tiny_config

from moe import cli

SCRIPT = """
import json, shutil, sys
from pathlib import Path
from moe import cli
root = Path(sys.argv[1])
run, out = root / "runs" / "tiny", root / "runs" / "placed"
assert cli.main(["train", str(root / "tiny.yaml"), "--no-progress"]) == 0
assert cli.main(["place", str(run), "--json", str(root / "place.json"),
                 "--slice", "tpu-v4:2x2x1", "--iterations", "400"]) == 0
assert cli.main(["place", str(run), "--apply", "--out", str(out), "--iterations", "400"]) == 0
assert cli.main(["eval", str(out)]) == 0
shutil.copytree(out / "eval", root / "placed_eval")  # before training on rewrites it
assert cli.main(["train", str(out / "config.yaml"), "train.steps=14", "--no-progress"]) == 0
print("DONE")
"""


def four_device_config(root):
    return tiny_config(
        root,
        pod={"topology": "cpu", "slice": "4", "mesh": {"data": 1, "expert": 4}},
        moe={"num_experts": 8, "every": 2, "top_k": 2},
        model={"encoder_layers": 4},  # encoder/1 -> encoder/3: consecutive MoE layers
        train={"steps": 12},
        eval={"every": 0, "bleu_examples": 8},
        checkpoint={"every": 0, "keep": 2},
    )


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    root = tmp_path_factory.mktemp("placecli")
    four_device_config(root)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, timeout=1500
    )
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr[-3000:]
    return root, out.stdout


@pytest.mark.slow
def test_report_compares_placers_and_never_gets_worse_on_both(placed):
    root, stdout = placed
    report = json.loads((root / "place.json").read_text())
    assert report["slice"] == "tpu-v4:2x2x1" and report["mesh"] == {"data": 1, "expert": 4}
    assert set(report["placers"]) == {"identity", "random", "greedy", "annealing"}
    keys = ("max_device_load", "projected_exchange_ms")
    before, after = report["before"], report["after"]
    assert not all(after[k] > before[k] for k in keys)
    if report["chosen"] != "identity":
        assert any(after[k] < before[k] for k in keys)
    for layer, order in report["permutation"].items():
        assert sorted(order) == list(range(8)), layer
        assert [len(c) for c in report["devices"][layer]] == [2, 2, 2, 2]
    assert set(report["layers"]) == {"encoder/1", "encoder/3", "decoder/1"}
    assert "annealing" in stdout and "<- chosen" in stdout
    stats = json.loads((root / "runs" / "tiny" / "eval" / "routing_stats.json").read_text())
    assert stats["groups"] == 4 and stats["tasks"]["rev"]["encoder/3"]["previous"] == "encoder/1"


@pytest.mark.slow
def test_applied_run_evaluates_like_the_original_and_trains_on(placed):
    root, _ = placed
    a = json.loads((root / "runs" / "tiny" / "eval" / "summary.json").read_text())
    b = json.loads((root / "placed_eval" / "summary.json").read_text())
    for task, row in a["tasks"].items():
        assert b["tasks"][task]["loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert b["tasks"][task]["bleu"] == row["bleu"]
    hyps = [
        (d / "rev.hyp.txt").read_text() for d in (root / "runs/tiny/eval", root / "placed_eval")
    ]
    assert hyps[0] == hyps[1]
    lines = (root / "runs" / "placed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"]
    assert steps and min(steps) > 12 and max(steps) == 14  # resumed at 12, trained to 14
    assert json.loads((root / "runs" / "placed" / "placed.json").read_text())["chosen"]


@pytest.mark.slow
def test_place_errors_are_one_line(placed, tmp_path, capsys):
    root, _ = placed
    copy = tmp_path / "copy"
    shutil.copytree(root / "runs" / "tiny", copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "eval" / "routing_stats.json").unlink()
    cases = [
        (["place", str(tmp_path)], "is not a run directory"),
        (["place", str(copy)], f"run `moe eval {copy}` first"),
        (["place", str(root / "runs" / "tiny"), "--apply"], "needs --out"),
        (["place", str(root / "runs" / "tiny"), "--slice", "tpu-v4:2x2x2"], "same size"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_place_has_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["place", "--help"])
    assert done.value.code == 0 and "--apply" in capsys.readouterr().out
