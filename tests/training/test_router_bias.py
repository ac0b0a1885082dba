"""Auxiliary-loss-free balancing in training: the train step moves each layer's router bias by
gamma against the step's load (outside the optimizer), a skipped step keeps it, checkpoints
resume it bit for bit, and an expert-parallel dropless run with a shared expert drops nothing
and reports the biases and the device fan-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tinyrun import tiny_config, train_and_report

from moe import config as cfg
from moe import runfiles as rf
from moe.training import build
from moe.training import state as state_lib
from moe.training.checkpoint import Checkpointer
from moe.training.loop import train
from moe.training.sharding import Placement
from moe.training.step import make_train_step

GAMMA = 0.01
MOE = {"gate": "sigmoid", "bias_balance_rate": GAMMA, "aux_loss_weight": 0.0}


def batch(seed, rows=8, length=6, vocab=64):
    ks = jax.random.split(jax.random.key(seed), 3)
    tokens = lambda k: jax.random.randint(k, (rows, length), 1, vocab)  # noqa: E731
    return {
        "src": tokens(ks[0]),
        "tgt_in": tokens(ks[1]),
        "tgt_out": tokens(ks[2]),
        "task": jnp.arange(rows) % 2,
    }


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    exp = cfg.load(tiny_config(root, moe=MOE, train={"grad_accum": 2}))
    optimizer = build.build_optimizer(exp)
    graphdef, state = state_lib.create(build.build_model(exp), optimizer)
    step = jax.jit(make_train_step(exp, graphdef, optimizer))
    return exp, state, step


def biases(state):
    return {
        "/".join(map(str, path[:2])): np.asarray(v)
        for path, v in nnx.to_flat_state(state.router_bias)
    }


@pytest.mark.slow  # ~20-70 s: it compiles a whole train step
def test_train_step_moves_the_bias_by_gamma_against_the_load(step_setup):
    exp, state, step = step_setup
    params = [path for path, _ in nnx.to_flat_state(state.params)]
    assert not any(path[-2:] == ("router", "bias") for path in params)  # not a parameter
    assert jax.tree.leaves(nnx.to_flat_state(state.router_bias))
    before = biases(state)
    assert set(before) == set(exp.moe_layers) and all((b == 0).all() for b in before.values())
    new, metrics = step(state, batch(0), jax.random.key(0))
    for layer, old in before.items():
        load = np.asarray(metrics["moe"][layer]["choices_per_expert"])  # mean of 2 micro-batches
        want = old + GAMMA * np.sign(load.mean() - load)
        np.testing.assert_array_equal(biases(new)[layer], want.astype(np.float32))
        np.testing.assert_array_equal(metrics["moe"][layer]["router_bias"], biases(new)[layer])
        assert load.sum() == 8 * 6 * exp.moe.top_k / 2  # selections before capacity, per pass
        assert np.any(biases(new)[layer] != 0)
    # the optimizer sees parameters only
    assert len(jax.tree.leaves(state.opt_state)) == len(jax.tree.leaves(new.opt_state))


@pytest.mark.slow
def test_a_skipped_step_keeps_the_bias(step_setup):
    _, state, step = step_setup
    moved, _ = step(state, batch(1), jax.random.key(0))
    broken = moved.__class__(
        **{**vars(moved), "params": jax.tree.map(lambda x: x * jnp.nan, moved.params)}
    )
    after, metrics = step(broken, batch(2), jax.random.key(0))
    assert not bool(metrics["finite"]) and int(after.skipped) == 1
    for layer, b in biases(moved).items():
        np.testing.assert_array_equal(biases(after)[layer], b)


def final_state(exp, run_dir, step):
    placement = Placement.for_experiment(exp)
    restored, _ = Checkpointer(run_dir / "checkpoints", keep=5).restore(
        step, placement.abstract_state
    )
    return jax.device_get(restored)


@pytest.mark.slow
def test_interrupted_run_resumes_the_bias_bit_for_bit(tmp_path, monkeypatch):
    exp = cfg.load(tiny_config(tmp_path, moe=MOE, eval={"every": 0, "bleu_examples": 0}))
    ref_dir = tmp_path / "runs" / "tiny"
    train_and_report(exp, ref_dir)
    from moe.data import tasks

    original = tasks.Batcher.process_batch

    def crash_at_step_6(self, step, *args):
        if step == 6:
            raise KeyboardInterrupt  # dies after the step-4 checkpoint
        return original(self, step, *args)

    run_dir = tmp_path / "interrupted"
    monkeypatch.setattr(tasks.Batcher, "process_batch", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(exp, run_dir, progress=False)
    monkeypatch.setattr(tasks.Batcher, "process_batch", original)
    assert train(exp, run_dir, progress=False).resumed_from == 4
    ours, ref = final_state(exp, run_dir, 12), final_state(exp, ref_dir, 12)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    ref_bias = biases(ref)
    assert set(ref_bias) == {"encoder/1", "decoder/1"}
    np.testing.assert_array_equal(biases(ours)["decoder/1"], ref_bias["decoder/1"])
    assert all(np.abs(b).max() > 0 for b in ref_bias.values())
    # the report shows the final biases (the last metrics line's)
    report = json.loads((ref_dir / "report.json").read_text())
    np.testing.assert_allclose(report["experts"]["router_bias"]["decoder/1"], ref_bias["decoder/1"])
    assert "Router bias" in (ref_dir / "report.md").read_text()


@pytest.mark.slow
def test_expert_parallel_dropless_run_with_a_shared_expert_drops_nothing(tmp_path):
    config = tiny_config(
        tmp_path,
        moe={
            **MOE,
            "capacity_factor_train": 0.0,
            "num_shared_experts": 1,
            "device_limit": 1,
            "aux_loss_weight": 0.01,
        },
        pod={"topology": "cpu", "slice": "4", "mesh": {"data": 2, "expert": 2}, "processes": 2},
        train={"steps": 6},
        eval={"every": 0, "bleu_examples": 0},
        checkpoint={"every": 0},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-m", "moe.cli", "train", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    lines, _, _ = rf.read_metrics(run_dir / "metrics.jsonl")
    assert [x.step for x in lines] == [2, 4, 6]
    for line in lines:
        for layer in ("encoder/1", "decoder/1"):
            assert line.layer_stat(layer, "dropped_fraction") == 0.0  # exactly
            assert line.layer_stat(layer, "device_fanout") == 1.0  # device_limit=1
            assert len(line.moe[layer]["router_bias"]) == 4
    report = json.loads((run_dir / "report.json").read_text())
    assert report["experts"]["layers"]["decoder/1"]["final_device_fanout"] == 1.0
    assert set(report["experts"]["router_bias"]) == {"encoder/1", "decoder/1"}
