"""moe translate: stdin lines -> one output line each, tokenised and decoded as training and
evaluation do; user mistakes are one line and exit 2."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from tinyrun import tiny_config

from moe import cli
from moe import config as cfg
from moe.data.pipeline import prepare

ROOT = Path(__file__).resolve().parents[2]


def moe(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "moe.cli", *map(str, args)],
        input=stdin, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_unknown_task_empty_input_and_not_a_run_dir_are_one_line_errors(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    exp = cfg.load(tiny_config(tmp_path))
    (run_dir / "config.yaml").write_text(cfg.dump(exp))
    assert_user_error(moe("translate", run_dir, "--task", "xx", stdin="a\n"), "'xx'", "rev, lm")
    assert_user_error(moe("translate", run_dir, "--task", "rev", stdin="\n  \n"), "no input")
    assert_user_error(moe("translate", tmp_path, "--task", "rev", stdin="a\n"), "not a run")
    # a run directory without checkpoints: one line too (after the model is set up)
    assert_user_error(moe("translate", run_dir, "--task", "rev", stdin="a\n"), "no checkpoint")


def translate(run_dir, task, lines, capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    assert cli.main(["translate", str(run_dir), "--task", task, *args]) == 0
    out, err = capsys.readouterr()
    return out.splitlines(), err


@pytest.mark.slow
def test_translate_prints_what_evaluation_decoded_one_line_per_input(tiny_run, capsys, monkeypatch):
    exp, run_dir = tiny_run
    data = prepare(exp, say=lambda *a: None)  # the sentences evaluation decoded (its sample)
    sources, _, _ = data.references(0, "test", exp.eval.bleu_examples, seed=exp.eval.sample_seed)
    sources = sources[:8]
    hyps = (run_dir / "eval" / "rev.hyp.txt").read_text(encoding="utf-8").splitlines()
    out, err = translate(run_dir, "rev", sources, capsys, monkeypatch)
    # the same 8 sources as one batch: tokenised as training did, decoded as evaluation did
    assert out == hyps[:8]

    long = " ".join(["red green blue cat"] * 6)
    out, err = translate(run_dir, "rev", [sources[0], "", long], capsys, monkeypatch, "--beam", "2")
    assert len(out) == 3 and out[1] == ""
    assert "line 3:" in err and "kept the first 8 (model.max_source_length)" in err

    out, err = translate(run_dir, "lm", ["red cat", "blue"], capsys, monkeypatch)
    assert len(out) == 2
    assert out[0].startswith("red cat") and out[1].startswith("blue")  # continued, not replaced
