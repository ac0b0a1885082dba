"""Applying a placement: the permuted run computes the same outputs and trains on as the
original would (weights, router columns, Adam moments and pathways all moved together)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from tinyrun import tiny_config

from moe import config as cfg
from moe.data.pipeline import prepare
from moe.pathways import surgery
from moe.placement.apply import apply_placement, check_placeable
from moe.training.evaluation import Evaluator
from moe.training.loop import train
from moe.training.restore import restore
from moe.training.step import segments

ORDERS = {"encoder/1": [3, 1, 0, 2], "decoder/1": [2, 3, 0, 1]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("place")
    path = tiny_config(root)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"][0]["experts"] = {"encoder/1": [0, 1, 3]}  # a pathway to renumber
    raw["eval"]["every"] = 0
    path.write_text(yaml.safe_dump(raw))
    exp = cfg.load(path, ["train.steps=8"])
    run_dir = root / "runs" / "tiny"
    train(exp, run_dir, progress=False)
    out = root / "runs" / "placed"
    manifest = apply_placement(run_dir, ORDERS, out)
    return exp, run_dir, out, manifest


@pytest.mark.slow
def test_placed_config_renumbers_pathways_and_resumes_in_place(runs):
    exp, _, out, manifest = runs
    child = cfg.load(out / "config.yaml")
    assert manifest["step"] == 8
    assert (child.name, child.runs_dir) == ("placed", str(out.parent))
    # rev may use old experts 0, 1, 3 of encoder/1; they are new experts 2, 1, 0
    assert child.tasks[0].experts == {"encoder/1": [0, 1, 2], "decoder/1": [0, 1, 2, 3]}
    assert child.tasks[1].experts is None
    assert child.model == exp.model and child.train == exp.train


@pytest.mark.slow
def test_placed_run_gives_the_same_logits_and_evaluation(runs):
    exp, run_dir, out, _ = runs
    a, b = restore(run_dir), restore(out)
    data = prepare(exp, say=lambda *x, **k: None)
    host = next(iter(data.eval_batches(0, "test", exp.eval.batch_size, 1)))
    logits = []
    for r in (a, b):
        model = nnx.merge(r.placement.graphdef, r.params)
        batch = {k: jnp.asarray(v) for k, v in host.items()}
        segs = segments(batch)  # packed rows
        logits.append(np.asarray(model(batch["src"], batch["tgt_in"], None, segments=segs)[0]))
    # the router softmax sums its E logits in another order: equal to float rounding (here
    # |logit difference| <= ~1e-6; not bit-identical), and so is the loss; decodes are equal
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6, atol=1e-6)
    ev_a = Evaluator(exp, data, a.placement).full(run_dir, a.params, "test", 8)
    ev_b = Evaluator(b.exp, data, b.placement).full(out, b.params, "test", 8)
    for name in ev_a.tasks:
        assert ev_b.tasks[name].loss == pytest.approx(ev_a.tasks[name].loss, rel=1e-6)
    hyps = [(d / "eval" / "rev.hyp.txt").read_text() for d in (run_dir, out)]
    assert hyps[0] == hyps[1]
    usage_a = np.asarray(ev_a.expert_usage["encoder/1"]["lm"])
    np.testing.assert_allclose(ev_b.expert_usage["encoder/1"]["lm"], usage_a[ORDERS["encoder/1"]])


@pytest.mark.slow
def test_placed_run_trains_on_like_the_original(runs, tmp_path):
    exp, run_dir, out, _ = runs
    ref_dir, placed_dir = tmp_path / "ref", tmp_path / "placed"
    shutil.copytree(run_dir, ref_dir)
    shutil.copytree(out, placed_dir)
    more = cfg.load(run_dir / "config.yaml", ["train.steps=12", "checkpoint.every=0"])
    train(more, ref_dir, progress=False)
    child = cfg.load(out / "config.yaml", ["train.steps=12", "checkpoint.every=0"])
    assert train(child, placed_dir, progress=False).resumed_from == 8
    ref = surgery.take_experts(restore(ref_dir).params, ORDERS)
    got = jax.tree.map(np.asarray, restore(placed_dir).params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        # a fresh Adam state would move these by ~lr = 1e-2 per step
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_runs_that_cannot_be_placed_are_user_errors(tmp_path):
    from moe.errors import UserError

    path = tiny_config(tmp_path)
    with pytest.raises(UserError, match="no MoE layer"):
        check_placeable(cfg.load(path, ["moe.every=0"]), apply=False)
    with pytest.raises(UserError, match="hierarchical"):
        exp = cfg.load(path, ["moe.router=hierarchical", "moe.num_groups=2"])
        check_placeable(exp, apply=False)
    with pytest.raises(UserError, match="adafactor"):
        check_placeable(cfg.load(path, ["train.optimizer=adafactor"]), apply=True)
