"""End to end: a real (tiny) run, exact resume, checkpoints that survive crashes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tinyrun import tiny_config, train_and_report

from moe import config as cfg
from moe.data.pipeline import prepare
from moe.errors import UserError
from moe.training.checkpoint import Checkpointer
from moe.training.loop import train
from moe.training.sharding import Placement


def final_params(exp, run_dir, step):
    placement = Placement.for_experiment(exp)
    restored, _ = Checkpointer(run_dir / "checkpoints", keep=5).restore(
        step, placement.abstract_state
    )
    return jax.tree.leaves(jax.device_get(restored))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    exp = cfg.load(tiny_config(root))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # what the user sees (no bar: like under mpirun)
        summary = train_and_report(exp, root / "runs" / "tiny")
    (root / "stderr.txt").write_text(err.getvalue())
    return exp, root / "runs" / "tiny", summary


@pytest.mark.slow
def test_a_short_run_writes_the_whole_run_directory(reference_run):
    exp, run_dir, summary = reference_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "train_summary.json",
        "eval/summary.json",
        "eval/rev.hyp.txt",
        "eval/rev.ref.txt",
    ):
        assert (run_dir / name).is_file(), name
    # TensorBoard (the package the README's `tensorboard --logdir runs/` runs) reads them back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/rev/loss", "eval/rev/perplexity", "eval/rev/bleu"} <= set(scalars)
    assert "eval/rev/chrf" in scalars
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 13, 2))
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["tasks"]) == {"rev", "lm"}
    assert report["tasks"]["rev"]["bleu"] is not None and report["tasks"]["lm"]["bleu"] is None
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == list(range(2, 13, 2))
    assert set(train_lines[-1]["moe"]) == {"encoder/1", "decoder/1"}
    assert len(train_lines[-1]["moe"]["decoder/1"]["expert_load"]) == 4
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]  # it learns
    batcher = prepare(exp, say=lambda *a: None).batcher  # the plans of every step, all rows
    planned = sum(len(batcher.plan(step).task) for step in range(12))
    assert summary.examples_seen["rev"] + summary.examples_seen["lm"] == planned > 12 * 8  # packed


@pytest.mark.slow
def test_every_phase_says_what_it_did_and_how_long_it_took(reference_run):
    _, run_dir, _ = reference_run
    err = (run_dir.parent.parent / "stderr.txt").read_text()
    for line in (
        r"moe: read 2 task source\(s\), [\d,]+ examples, in \d+\.\d s",
        r"moe: vocabulary of \d+ pieces in \d+\.\d s",
        r"moe: token stores of 6 task splits in \d+\.\d s",
        r"moe: input data ready in \d+\.\d s",
        r"moe: compiled the train step and ran step 1 in \d+\.\d s",
        # without a bar (mpirun, a pipe): lines with the steady-state speed and an ETA
        r"moe: step 4/12 \(33%\) loss \d\.\d{3}, [\d,]+ tok/s \(steady\), \d+ ms/step, ETA 0:\d\d",
        r"moe: valid perplexity at step 6: rev [\d.]+, lm [\d.]+ \(\d+\.\d s\)",
        r"moe: final evaluation on the test split, decoding 8 sentences of each of 1 task\(s\)",
        r"moe: final evaluation done in \d+\.\d s",
        r"moe: rev \(test, step 12\): perplexity [\d.]+, BLEU [\d.]+, chrF [\d.]+ \(8 sentences\)",
        r"moe: lm \(test, step 12\): perplexity [\d.]+",
    ):
        assert re.search(line, err), (line, err)


@pytest.mark.slow
def test_training_a_finished_run_again_repeats_nothing(reference_run):
    exp, run_dir, summary = reference_run
    files = ("metrics.jsonl", "eval/summary.json", "train_summary.json")
    before = {name: (run_dir / name).read_bytes() for name in files}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        again = train(exp, run_dir, progress=False)
    assert "evaluated on the test split already; nothing to do" in err.getvalue()
    assert again.wall_time_s == summary.wall_time_s
    assert {name: (run_dir / name).read_bytes() for name in files} == before
    summary_json = json.loads((run_dir / "eval" / "summary.json").read_text())
    rev = summary_json["tasks"]["rev"]
    assert rev["chrf"] > 0 and "tok:13a" in rev["bleu_signature"]
    assert (rev["decoded"], rev["sample_seed"], rev["split_size"]) == (8, 0, rev["split_size"])
    assert rev["split_size"] > 8


@pytest.mark.slow
def test_interrupted_run_resumes_to_bit_identical_parameters(reference_run, tmp_path, monkeypatch):
    exp, ref_dir, _ = reference_run
    run_dir = tmp_path / "interrupted"
    from moe.data import tasks

    original = tasks.Batcher.process_batch

    def crash_at_step_6(self, step, *args):
        if step == 6:
            raise KeyboardInterrupt  # the process dies after the step-4 checkpoint
        return original(self, step, *args)

    monkeypatch.setattr(tasks.Batcher, "process_batch", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(exp, run_dir, progress=False)
    assert Checkpointer(run_dir / "checkpoints", keep=5).latest_step() == 4
    monkeypatch.setattr(tasks.Batcher, "process_batch", original)
    summary = train(exp, run_dir, progress=False)
    assert summary.resumed_from == 4
    ours, ref = final_params(exp, run_dir, 12), final_params(exp, ref_dir, 12)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    steps = [
        json.loads(x)["step"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == sorted(set(steps)), "no duplicated metric lines after resume"


def test_a_half_written_checkpoint_is_ignored(reference_run, tmp_path):
    exp, ref_dir, _ = reference_run
    ckpt = Checkpointer(ref_dir / "checkpoints", keep=5)
    latest = ckpt.latest_step()
    # What a crash in the middle of orbax's save leaves behind: a temporary directory.
    partial = ref_dir / "checkpoints" / f"{latest + 4}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 100)
    try:
        assert Checkpointer(ref_dir / "checkpoints", keep=5).latest_step() == latest
        assert final_params(exp, ref_dir, latest)
    finally:
        import shutil

        shutil.rmtree(partial)


@pytest.mark.slow
def test_kill_9_then_moe_train_resumes_and_finishes(tmp_path):
    config = tiny_config(
        tmp_path, train={"steps": 400}, checkpoint={"every": 1, "keep": 2}, eval={"every": 0}
    )
    cmd = [sys.executable, "-m", "moe.cli", "train", str(config)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    time.sleep(0.3)  # land somewhere in a step or in the middle of a save
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = Checkpointer(ckpts, keep=2).latest_step()
    assert latest is not None and latest < 400
    result = subprocess.run(
        [*cmd, f"train.steps={latest + 3}", "eval.bleu_examples=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {latest}" in result.stderr
    assert Checkpointer(ckpts, keep=2).latest_step() == latest + 3


@pytest.mark.slow
def test_moe_eval_evaluates_a_named_checkpoint_and_keeps_the_metrics(reference_run):
    from moe.training.loop import evaluate_checkpoint

    exp, run_dir, _ = reference_run
    with pytest.raises(UserError, match="eval.. overrides only"):
        evaluate_checkpoint(run_dir, overrides=("model.d_model=8",))
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    evaluate_checkpoint(run_dir, step=8, split="valid", overrides=("eval.bleu_examples=4",))
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert json.loads(after[-1])["split"] == "valid" and json.loads(after[-1])["step"] == 8
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["step"] == 8 and summary["split"] == "valid"
    assert summary["tasks"]["rev"]["perplexity"] > 1 and summary["tasks"]["rev"]["decoded"] == 4
    from moe.report.build import build

    report = build(run_dir)  # the valid numbers are labelled valid, never final
    assert (report.final_split, report.final_step) == ("valid", 8)
    assert "perplexity (valid, step 8)" in (run_dir / "report.md").read_text()


def test_evaluating_a_subset_of_tasks_gives_their_numbers_and_a_report(reference_run, tmp_path):
    """``eval.tasks`` (at 100+ tasks, evaluate the few you compare): the named tasks only, with
    the figures the evaluation of every task gave them."""
    from moe.report.build import build
    from moe.training.loop import evaluate_checkpoint

    _, run_dir, _ = reference_run
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    full = json.loads((copy / "eval" / "summary.json").read_text())["tasks"]
    evaluate_checkpoint(copy, overrides=("eval.tasks=[rev]",))
    subset = json.loads((copy / "eval" / "summary.json").read_text())
    assert list(subset["tasks"]) == ["rev"] and subset["step"] == 12
    for key in ("loss", "perplexity", "bleu", "tokens"):
        assert subset["tasks"]["rev"][key] == full["rev"][key], key
    assert (copy / "eval" / "rev.hyp.txt").read_bytes() == (
        run_dir / "eval" / "rev.hyp.txt"
    ).read_bytes()
    assert "rev" in (copy / "report.md").read_text() and build(copy).final_step == 12
    with pytest.raises(cfg.ConfigError, match="eval.tasks: 'nope': no such task"):
        cfg.load(copy / "config.yaml", ["eval.tasks=[rev, nope]"])


@pytest.mark.slow
def test_an_exploding_update_never_costs_the_last_good_checkpoint(reference_run, tmp_path):
    """learning_rate=1e30 after a good run: the update is finite but blows the weights up. The
    guard skips it, nothing is saved while steps are skipped (keep=2 would rotate the good ones
    out), and the stop message names the checkpoint that really is kept."""
    import shutil

    from moe.training.loop import RunError

    _, ref_dir, _ = reference_run
    run_dir = tmp_path / "blown"
    shutil.copytree(ref_dir, run_dir)
    exp = cfg.load(
        run_dir / "config.yaml",
        ["train.learning_rate=1e30", "train.steps=24", "train.max_bad_steps=2"]
        + ["checkpoint.every=2", "checkpoint.keep=2", "eval.every=0"],
    )
    with pytest.raises(RunError, match=r"last good checkpoint \(step 12\) is kept"):
        train(exp, run_dir, progress=False)
    assert Checkpointer(run_dir / "checkpoints", keep=2).all_steps()[-1] == 12
    kept = final_params(exp, run_dir, 12)
    assert max(float(np.abs(x).max()) for x in kept) < 1e3
    for a, b in zip(kept, final_params(exp, ref_dir, 12)):
        np.testing.assert_array_equal(a, b)
