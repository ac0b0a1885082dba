"""PowerSign / AddSign (Bello et al. 2017): update sequences worked out by hand, the sign decays
at known points, the config's checks, and exact resume of a tiny run trained with each."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tinyrun import tiny_config

from moe import config as cfg
from moe.training import build, sign_optimizers
from moe.training.checkpoint import Checkpointer
from moe.training.loop import train
from moe.training.sharding import Placement

GRADS = [[1.0, -2.0], [-1.0, 1.0], [0.5, 3.0], [-2.0, -1.0]]


def run(opt, grads, w0=(1.0, -1.0)):
    w = jnp.asarray(w0, jnp.float32)
    state = opt.init(w)
    out = []
    for g in grads:
        u, state = opt.update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, u)
        out.append(np.asarray(w))
    return out, state


def test_power_sign_follows_the_hand_computed_sequence():
    # alpha 2, beta 0.5, f = 1, lr 0.1. m_t = (m + g) / 2; u = 2^(sign g * sign m) g.
    #   1: m [0.5, -1]        signs agree [+, +]   u [2, -4]     w [0.8, -0.6]
    #   2: m [-0.25, 0]       [+, 0 (m = 0)]       u [-2, 1]     w [1.0, -0.7]
    #   3: m [0.125, 1.5]     [+, +]               u [1, 6]      w [0.9, -1.3]
    #   4: m [-0.9375, 0.25]  [+, - (disagree)]    u [-4, -0.5]  w [1.3, -1.25]
    opt = sign_optimizers.power_sign(0.1, alpha=2.0, beta=0.5)
    ws, state = run(opt, GRADS)
    want = [[0.8, -0.6], [1.0, -0.7], [0.9, -1.3], [1.3, -1.25]]
    np.testing.assert_allclose(ws, want, rtol=1e-6)
    np.testing.assert_allclose(state[0].m, [-0.9375, 0.25], rtol=1e-6)
    assert int(state[0].count) == 4


def test_add_sign_with_linear_decay_follows_the_hand_computed_sequence():
    # alpha 1, beta 0.5, f(t) = (4 - t) / 4 for t = 0, 1, 2, 3 (updates already applied).
    #   1: f 1     signs [+, +]  mult [2, 2]         u [2, -4]        w [0.8, -0.6]
    #   2: f 0.75  [+, 0]        mult [1.75, 1]      u [-1.75, 1]     w [0.975, -0.7]
    #   3: f 0.5   [+, +]        mult [1.5, 1.5]     u [0.75, 4.5]    w [0.9, -1.15]
    #   4: f 0.25  [+, -]        mult [1.25, 0.75]   u [-2.5, -0.75]  w [1.15, -1.075]
    decay = sign_optimizers.sign_decay("linear", 4)
    opt = sign_optimizers.add_sign(0.1, alpha=1.0, beta=0.5, decay=decay)
    ws, _ = run(opt, GRADS)
    want = [[0.8, -0.6], [0.975, -0.7], [0.9, -1.15], [1.15, -1.075]]
    np.testing.assert_allclose(ws, want, rtol=1e-6)


def test_default_power_sign_is_e_to_the_agreement():
    opt = sign_optimizers.scale_by_power_sign()  # alpha e, beta 0.9
    state = opt.init(jnp.zeros(3))
    u, _ = opt.update(jnp.asarray([1.0, -1.0, 0.0]), state)
    # m = 0.1 g: same signs, so every nonzero entry is scaled by e.
    np.testing.assert_allclose(u, [math.e, -math.e, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    "kind,periods,points",
    [
        ("constant", None, {0: 1.0, 50: 1.0, 500: 1.0}),
        ("linear", None, {0: 1.0, 25: 0.75, 100: 0.0, 150: 0.0}),
        # 0.5 (1 + cos(2 pi n t / T)), n = 0.5: a half cosine from 1 to 0, then held at 0.
        ("cyclical", None, {0: 1.0, 50: 0.5, 100: 0.0, 200: 0.0}),
        ("cyclical", 1.0, {25: 0.5, 50: 0.0, 75: 0.5, 100: 1.0}),
        # 0.5 (1 + cos(pi ((n t) mod T) / T)), n = 2: restarts at t = 50.
        ("restart", 2.0, {0: 1.0, 25: 0.5, 50: 1.0, 75: 0.5}),
        ("restart", None, {0: 1.0, 50: 0.5, 99: 0.5 * (1 + math.cos(math.pi * 0.99))}),
    ],
)
def test_sign_decays_at_known_points(kind, periods, points):
    f = sign_optimizers.sign_decay(kind, 100, periods)
    for t, want in points.items():
        assert float(f(t)) == pytest.approx(want, abs=1e-6), (kind, t)


def test_config_checks_name_the_fields(tmp_path):
    path = tiny_config(tmp_path)
    exp = cfg.load(path, ["train.optimizer=addsign", "train.sign_decay=restart"])
    assert exp.train.sign_decay == "restart"
    with pytest.raises(cfg.ConfigError, match=r"train.sign_decay=linear only applies"):
        cfg.load(path, ["train.sign_decay=linear"])
    with pytest.raises(cfg.ConfigError, match=r"sign_alpha=0.5 is below 1"):
        cfg.load(path, ["train.optimizer=addsign", "train.sign_alpha=0.5"])
    with pytest.raises(cfg.ConfigError, match=r"sign_decay_periods is set"):
        cfg.load(path, ["train.optimizer=powersign", "train.sign_decay_periods=2"])
    with pytest.raises(cfg.ConfigError, match=r"sign_decay"):
        cfg.load(path, ["train.optimizer=powersign", "train.sign_decay=cosine"])


def test_built_optimizer_clips_then_applies_the_rule_with_the_schedule(tmp_path):
    exp = cfg.load(
        tiny_config(tmp_path),
        ["train.optimizer=powersign", "train.schedule=constant", "train.warmup_steps=0"],
    )
    opt = build.build_optimizer(exp)
    params, g = {"w": jnp.zeros(2)}, {"w": jnp.asarray([3.0, 4.0])}
    u, state = opt.update(g, opt.init(params), params)
    np.testing.assert_array_equal(u["w"], 0.0)  # the schedule's lr at step 0 (warm-up)
    u, _ = opt.update(g, state, params)
    # clip to norm 1: [0.6, 0.8]; m agrees in sign: x e; lr 0.01 (tiny config), descent.
    np.testing.assert_allclose(u["w"], -0.01 * math.e * np.asarray([0.6, 0.8]), rtol=1e-5)


def final_leaves(exp, run_dir, step):
    placement = Placement.for_experiment(exp)
    state, _ = Checkpointer(run_dir / "checkpoints", keep=5).restore(step, placement.abstract_state)
    return jax.tree.leaves(jax.device_get(state))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["powersign", "addsign"])
def test_interrupted_sign_optimizer_run_resumes_bit_identically(tmp_path, monkeypatch, optimizer):
    overrides = [f"train.optimizer={optimizer}", "train.learning_rate=0.1", "eval.every=0"]
    if optimizer == "addsign":
        overrides.append("train.sign_decay=cyclical")
    exp = cfg.load(tiny_config(tmp_path), overrides + ["eval.bleu_examples=0"])
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "interrupted"
    ref = train(exp, ref_dir, progress=False)
    from moe.data import tasks

    original = tasks.Batcher.process_batch

    def crash_at_step_6(self, step, *args):
        if step == 6:
            raise KeyboardInterrupt  # after the step-4 checkpoint
        return original(self, step, *args)

    monkeypatch.setattr(tasks.Batcher, "process_batch", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(exp, run_dir, progress=False)
    monkeypatch.setattr(tasks.Batcher, "process_batch", original)
    assert train(exp, run_dir, progress=False).resumed_from == 4
    ours, theirs = final_leaves(exp, run_dir, 12), final_leaves(exp, ref_dir, 12)
    assert len(ours) == len(theirs)  # parameters, m and counts
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert ref.skipped_steps == 0
