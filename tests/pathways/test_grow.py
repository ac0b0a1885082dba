"""Growing a trained run for a new task: old tasks bit-identical, the new task learns, the
parameters old tasks use untouched; extraction through the CLI; growing under expert
parallelism (4 virtual devices, in a subprocess)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from tinyrun import WORDS, tiny_config, train_and_report

from moe import cli
from moe import config as cfg
from moe.pathways import grow, surgery
from moe.pathways.usage import ranked
from moe.report import build as report
from moe.training import build, pathway_spec
from moe.training.freeze import path_names
from moe.training.loop import train
from moe.training.restore import restore


def write_copy_task(root):
    rng = random.Random(5)
    lines = {" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(300)}
    (root / "copy.tsv").write_text("".join(f"{x}\t{x}\n" for x in sorted(lines)))
    return root / "copy.tsv"


def parent_config(root, **sections):
    """The tests' tiny two-task run plus a reserved third task (weight 0); task `rev` has a
    pathway in the encoder, so old pathways narrower than 'all' are covered too."""
    path = tiny_config(root, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"][0]["experts"] = {"encoder/1": [0, 1, 3]}
    copy = {"name": "copy", "kind": "translate", "source": f"tsv:{write_copy_task(root)}"}
    raw["tasks"].append({**copy, "weight": 0})
    raw["checkpoint"] = {"every": 0, "keep": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


def grow_file(root, name="grown", **train):
    raw = {
        "name": name,
        "grow": {"task": "copy", "add_experts": 2, "share_experts": 1, "probe_batches": 2},
        "train": {"steps": 24, "learning_rate": 0.03, "warmup_steps": 2, "log_every": 4, **train},
        "eval": {"every": 0},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_growing_in_memory_keeps_old_tasks_bit_identical_and_the_new_task_close():
    """No run directory: a random parent, a fake probe, the grown model's logits. With
    add + share = E the new task starts as the parent computed it (clones replace their
    sources; up to float rounding of the combine order)."""
    model = {"d_model": 8, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2}
    model.update(d_ff=12, dropout=0.0, vocab_size=64)
    tasks = [
        {"name": "a", "kind": "lm", "source": "t", "experts": {"decoder/1": [0, 2]}},
        {"name": "b", "kind": "lm", "source": "t"},
        {"name": "new", "kind": "lm", "source": "t", "weight": 0},
    ]
    moe = {"num_experts": 4, "every": 2, "capacity_factor_eval": 1.0}
    parent = cfg.from_dict({"name": "p", "model": model, "moe": moe, "tasks": tasks})
    make = lambda e: lambda: build.build_model(e)
    graph, _ = nnx.split(nnx.eval_shape(make(parent)), nnx.Param)
    params = jax.jit(lambda: nnx.split(make(parent)(), nnx.Param)[1])()
    usage = {"encoder/1": [0.1, 0.4, 0.3, 0.2], "decoder/1": [0.3, 0.1, 0.2, 0.4]}
    spec = grow.GrowSpec(task="new", add_experts=2, share_experts=2)
    plan = grow.plan_growth(parent, usage, 2, spec)
    assert plan.clones == {"encoder/1": [1, 2], "decoder/1": [3, 0]}
    assert plan.pathway == {"encoder/1": [0, 3, 4, 5], "decoder/1": [1, 2, 4, 5]}
    child = grow.grown_experiment(parent, plan, grow.GrowFile(name="c", grow=spec), "test")
    big = jax.tree.map(jnp.asarray, surgery.append_experts(params, plan.clones))
    child_graph, _ = nnx.split(nnx.eval_shape(make(child)), nnx.Param)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(4, 64, (6, 7)), rng.integers(4, 64, (6, 5))

    def forward(g):
        fn = jax.jit(lambda p, t: nnx.merge(g, p)(src, tgt, jnp.full((6,), t, jnp.int32))[0])
        return lambda p, t: np.asarray(fn(p, t))

    before, after = forward(graph), forward(child_graph)
    for task in (0, 1):
        assert np.array_equal(before(params, task), after(big, task))
    np.testing.assert_allclose(after(big, 2), before(params, 2), rtol=1e-5, atol=1e-5)


def test_growing_again_and_again_at_64_experts_keeps_every_earlier_task_bit_identical():
    """64 -> 72 -> 80 -> 88 experts under Task-MoE routing, as scripts/grow_many.sh does: a
    wider router kernel and a longer softmax row change how XLA:CPU sums (before
    ``moe.grown_experts`` split them into blocks this failed at every step); after each growth
    every earlier task's logits are the parent's bit for bit."""
    model = {"d_model": 8, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2}
    model.update(d_ff=12, dropout=0.0, vocab_size=64)
    tasks = [{"name": n, "kind": "lm", "source": "t", "weight": w} for n, w in
             [("a", 1), ("b", 1), ("c", 0), ("d", 0), ("e", 0)]]  # fmt: skip
    routing = {"encoder": "token+task", "decoder": "task"}
    moe = {"num_experts": 64, "every": 2, "capacity_factor_eval": 1.0, "routing_input": routing}
    parent = cfg.from_dict({"name": "p", "model": model, "moe": moe, "tasks": tasks})
    make = lambda e: lambda: build.build_model(e)
    graph, _ = nnx.split(nnx.eval_shape(make(parent)), nnx.Param)
    params = jax.jit(lambda: nnx.split(make(parent)(), nnx.Param)[1])()
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(4, 64, (8, 9)), rng.integers(4, 64, (8, 8))

    def forward(g):
        fn = jax.jit(lambda p, t: nnx.merge(g, p)(src, tgt, jnp.full((8,), t, jnp.int32))[0])
        return lambda p, t: np.asarray(fn(p, t))

    for new in (2, 3, 4):
        usage = {
            layer: rng.random(parent.experts_in(layer)).tolist() for layer in parent.moe_layers
        }
        spec = grow.GrowSpec(task=tasks[new]["name"], add_experts=8, share_experts=2)
        plan = grow.plan_growth(parent, usage, new, spec)
        child = grow.grown_experiment(parent, plan, grow.GrowFile(name="c", grow=spec), "test")
        assert child.moe.grown_experts == [8] * (new - 1)
        big = jax.tree.map(jnp.asarray, surgery.append_experts(params, plan.clones))
        child_graph, _ = nnx.split(nnx.eval_shape(make(child)), nnx.Param)
        before, after = forward(graph), forward(child_graph)
        for task in range(new):
            a, b = before(params, task), after(big, task)
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), (new, task)
        parent, params, graph = child, big, child_graph


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    exp = cfg.load(parent_config(root))
    run_dir = root / "runs" / "tiny"
    train_and_report(exp, run_dir)
    return root, run_dir


@pytest.fixture(scope="module")
def grown(parent):
    root, parent_dir = parent
    path = grow_file(root)
    run_dir = grow.prepare_grown_run(
        parent_dir, grow.load_grow_file(path), str(path), say=lambda *a: 0
    )
    child = cfg.load(run_dir / "config.yaml")
    train(child, run_dir, progress=False)
    rows = grow.compare_old_tasks(run_dir)
    report.build(run_dir)
    return root, parent_dir, run_dir, rows


@pytest.mark.slow
def test_grown_config_freezes_old_tasks_on_their_pathways(grown):
    _, parent_dir, run_dir, _ = grown
    child = cfg.load(run_dir / "config.yaml")
    record = json.loads((run_dir / "grow.json").read_text())
    assert child.moe.num_experts == 6 and child.moe.capacity_experts == 4
    rev, lm, copy = child.tasks
    assert rev.frozen and lm.frozen and not copy.frozen
    assert (rev.weight, lm.weight, copy.weight) == (0.0, 0.0, 1.0)
    assert rev.experts == {"encoder/1": [0, 1, 3], "decoder/1": [0, 1, 2, 3]}
    assert lm.experts == {"encoder/1": [0, 1, 2, 3], "decoder/1": [0, 1, 2, 3]}
    for layer in ("encoder/1", "decoder/1"):
        order = ranked(record["usage"][layer])
        assert record["clones"][layer] == order[:2]
        assert copy.experts[layer] == [order[2], 4, 5]
    assert pathway_spec.trainable_experts(child) == {"encoder/1": [4, 5], "decoder/1": [4, 5]}
    assert set(record["old_tasks_check"]) == {"rev", "lm"}  # checked before training, too
    assert all(r["identical"] for r in record["old_tasks_check"].values())


@pytest.mark.slow
def test_every_old_task_evaluates_bit_identically_after_growing(grown):
    _, _, run_dir, rows = grown
    assert set(rows) == {"rev", "lm"}
    for name, row in rows.items():
        assert row["identical"], name
        assert row["before"]["loss"] == row["after"]["loss"]
    report = (run_dir / "report.md").read_text()
    assert "## Pathways" in report and "Old tasks, evaluated alone" in report


@pytest.mark.slow
def test_old_tasks_logits_and_used_parameters_are_bit_identical(grown):
    _, parent_dir, run_dir, _ = grown
    before, after = restore(parent_dir), restore(run_dir)
    assert after.step == 24
    flat_a = dict(jax.tree_util.tree_flatten_with_path(after.params)[0])
    for path, old in jax.tree_util.tree_flatten_with_path(before.params)[0]:
        old, new = np.asarray(old), np.asarray(flat_a[path])
        where = surgery.expert_axis(path)
        if where is not None:  # the old experts are the first E_old along the expert axis
            new = np.take(new, np.arange(old.shape[where[1]]), axis=where[1])
        assert np.array_equal(old.view(np.uint32), new.view(np.uint32)), path_names(path)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(4, 60, (8, 10)), rng.integers(4, 60, (8, 10))
    run = lambda r: jax.jit(lambda p, t: nnx.merge(r.placement.graphdef, p)(src, tgt, t)[0])
    forward = {id(r): run(r) for r in (before, after)}
    for task in (0, 1):
        t = jnp.full((8,), task, jnp.int32)
        outs = [np.asarray(forward[id(r)](r.params, t)) for r in (before, after)]
        assert np.array_equal(outs[0], outs[1]), task


@pytest.mark.slow
def test_the_new_task_learns(grown):
    _, parent_dir, run_dir, _ = grown
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["tasks"]["copy"]["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
    held_out = [json.loads((d / "eval/summary.json").read_text())["tasks"]["copy"]["loss"]
                for d in (parent_dir, run_dir)]  # fmt: skip
    assert held_out[1] < held_out[0] - 0.1
    summary = json.loads((run_dir / "train_summary.json").read_text())
    seen = summary["examples_seen"]  # the new task only; packed rows hold more than one
    assert (seen["rev"], seen["lm"]) == (0, 0) and seen["copy"] >= 24 * 8


@pytest.mark.slow
def test_old_tasks_are_not_comparable_when_eval_settings_differ(grown, monkeypatch):
    _, _, run_dir, _ = grown
    import moe.pathways.grow as g

    monkeypatch.setattr(g, "_eval_differences", lambda a, b: ["eval.bleu_examples"])
    rows = g.compare_old_tasks(run_dir)
    assert all(r["identical"] is None for r in rows.values())
    monkeypatch.undo()
    assert all(r["identical"] for r in g.compare_old_tasks(run_dir).values())  # as it was


@pytest.mark.slow
def test_extract_through_the_cli_evaluates_like_the_full_model(parent, capsys):
    root, parent_dir = parent
    out = root / "rev-only"
    assert cli.main(["extract", str(parent_dir), "--task", "rev", "--out", str(out)]) == 0
    assert "experts encoder/1: 3/4, decoder/1: 4/4" in capsys.readouterr().out
    assert cli.main(["eval", str(out)]) == 0
    full = json.loads((parent_dir / "eval" / "summary.json").read_text())["tasks"]["rev"]
    part = json.loads((out / "eval" / "summary.json").read_text())["tasks"]["rev"]
    assert part["loss"] == pytest.approx(full["loss"], rel=1e-6) and part["bleu"] == full["bleu"]
    assert (out / "eval/rev.hyp.txt").read_text() == (parent_dir / "eval/rev.hyp.txt").read_text()
    manifest = json.loads((out / "extracted.json").read_text())
    assert manifest["params_after"] < manifest["params_before"]


@pytest.mark.slow
def test_pathways_cli_prints_usage_and_learned_yaml(parent, capsys):
    _, parent_dir = parent
    assert cli.main(["pathways", str(parent_dir)]) == 0
    text = capsys.readouterr().out
    assert "encoder/1 (4 experts)" in text and "0,1,3" in text
    assert cli.main(["pathways", str(parent_dir), "--yaml", "--coverage", "0.5"]) == 0
    learned = yaml.safe_load(capsys.readouterr().out)
    rev = next(t for t in learned["tasks"] if t["name"] == "rev")
    assert set(rev["experts"]["encoder/1"]) <= {0, 1, 3}


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["grow.task=nope"], "no task named 'nope'"),
        (["grow.add_experts=0"], "grow.add_experts"),
        (["grow.share_experts=0", "grow.add_experts=1"], "fewer than moe.top_k=2"),
        (["grwo.task=x"], "unknown key"),
    ],
)
def test_grow_user_errors_are_one_line(parent, capsys, args, message):
    root, parent_dir = parent
    path = grow_file(root, name="bad")
    code = cli.main(["grow", str(parent_dir), "--config", str(path), *args, "--no-train"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


EP_SCRIPT = """
import json, sys
from pathlib import Path
from moe import cli
root, parent, grow_yaml = map(Path, sys.argv[1:4])
assert cli.main(["train", str(root / "tiny.yaml"), "--no-progress"]) == 0
assert cli.main(["grow", str(parent), "--config", str(grow_yaml), "--no-progress"]) == 0
print(json.dumps(json.loads((root / "runs" / "grown_ep" / "grow.json").read_text())))
"""


@pytest.mark.slow
def test_growing_a_model_trained_with_expert_parallelism(tmp_path):
    """4 virtual devices, experts split over an expert axis of 2 (and data 2)."""
    pod = {"topology": "cpu", "slice": "4", "mesh": {"data": 2, "expert": 2}}
    parent_config(tmp_path, pod=pod)
    path = grow_file(tmp_path, name="grown_ep")
    out = subprocess.run(
        [sys.executable, "-c", EP_SCRIPT, str(tmp_path), str(tmp_path / "runs/tiny"), str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(r["identical"] for r in record["old_tasks_after"].values())
    child = cfg.load(tmp_path / "runs" / "grown_ep" / "config.yaml")
    assert child.mesh_shape == {"data": 2, "expert": 2} and child.moe.num_experts == 6
    assert build.transformer_spec(child).pathways  # the old tasks' masks are in the model
