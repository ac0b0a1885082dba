"""``moe grow RUN_DIR --config grow.yaml``: add experts and a task to a trained model, without
changing what the old tasks compute.

μ2Net (Gesmundo & Dean 2022, papers §7.2) grows a multitask system by *cloning* parent
components into a new task's path (trainable, task-private) while the components finished tasks
use stay *frozen*. Here the components are experts:

1. probe: run the parent on ``probe_batches`` batches of the new task's training data and
   measure, per MoE layer, which experts its tokens go to (``expert_load``);
2. clone: the ``add_experts`` most-used experts are copied into new experts ``E, E+1, ...``
   (weights and router column), so the new task starts from what it already used;
3. pathways: the new task may use the new experts plus the next ``share_experts`` most-used old
   ones (frozen; a cloned source is replaced by its clone, as in μ2Net); every old task keeps
   exactly its old experts (the new ones are masked for it);
4. freeze: old tasks become ``frozen`` (weight 0), so only the rows no old task uses train
   (``pathway_spec.selector``: new experts, their router columns, the new task's embedding row);
   shared non-expert weights are frozen, with no optimizer state (``freeze.train_only``);
5. train the new run from that step-0 checkpoint with the ordinary loop.

What is guaranteed for an old task evaluated alone (one-task batches, as ``moe eval`` does, on
the same mesh), by construction: every weight it touches is bit-identical (frozen, updates of
exactly -0.0); the capacity is computed for the original expert count (``moe.capacity_experts``);
the new experts' logits are masked (their probabilities are exact zeros); and the grown config
records each growth (``moe.grown_experts``), so the router computes its logits one product per
block of experts (the parent's, then each growth's) and sums the softmax normaliser block by
block (``moe.routing.token_choice.softmax``): an old task's logits and normaliser are the
parent's numbers (plus exact zeros), whatever order the backend would sum a wider row in. So
the same tokens reach the same experts with the same gates, and logits, perplexity and decodes
are bit-identical, after any number of growths (tested in ``tests/pathways/test_grow.py`` at
64 -> 72 -> 80 -> 88 experts, where one product over the wider kernel and one sum over the longer
row differ in the last bits on XLA:CPU; measured in docs/results.md). ``grow.json`` records a
check before training and the comparison for every grown run.

Not guaranteed: batches that mix old and new tasks under a finite capacity (token choice fills
an old expert's slots in token order, so a new task sharing that expert can take slots an old
token had) and the auxiliary losses (averaged over all experts). Training batches of a grown
run hold the new task only (old tasks have weight 0).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from moe import config as cfg
from moe import config_io
from moe.config_sections import Section
from moe.data.pipeline import RunData, prepare
from moe.errors import UserError
from moe.pathways import surgery
from moe.pathways.extract import task_index
from moe.pathways.usage import ranked
from moe.training import pathway_spec
from moe.training.evaluation import Evaluator
from moe.training.freeze import trainable_view
from moe.training.restore import Restored, restore, run_config
from moe.training.sharding import Placement

# The grow file (`moe grow --config`).


class GrowSpec(Section):
    """How ``moe grow`` extends a trained model (μ2Net-style cloning, papers §7.2)."""

    task: str = Field(
        min_length=1,
        description="The task to add: a task of the parent run reserved with weight 0 (its "
        "text is already in the shared vocabulary).",
    )
    add_experts: int = Field(ge=1, description="New experts per MoE layer (trainable).")
    share_experts: int = Field(
        2,
        ge=0,
        description="Old experts per layer in the new task's pathway (frozen): the ones its "
        "data routes to most, after the ones the new experts clone.",
    )
    probe_batches: int = Field(
        8, ge=1, description="Batches of the new task's training data used to measure routing."
    )


class GrowFile(Section):
    """A ``moe grow --config`` file: the new run's name, the growth, and training settings
    merged over the parent's (model, moe, tasks, data and pod come from the parent)."""

    name: str = Field(min_length=1, description="Name of the grown run: <runs_dir>/<name>/.")
    runs_dir: str | None = Field(None, description="Default: the parent run's runs_dir.")
    grow: GrowSpec
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of train.*.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Overrides of eval.*.")
    checkpoint: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of checkpoint.*."
    )


def load_grow_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> GrowFile:
    """Load a grow file (``extends:`` and ``key.path=value`` overrides as for experiments)."""
    return config_io.load(GrowFile, path, overrides)


@dataclasses.dataclass(frozen=True)
class GrowthPlan:
    """Per MoE layer: the old experts each new expert clones and the new task's pathway."""

    task: int
    usage: dict[str, list[float]]  # the new task's load over the old experts (probe)
    clones: dict[str, list[int]]  # new expert E + j clones old expert clones[layer][j]
    pathway: dict[str, list[int]]  # the new task's experts (shared old ones + all new ones)


def probe_usage(restored: Restored, data: RunData, task: int, batches: int) -> dict[str, list]:
    """``{layer: load [E]}``: mean fraction of the task's routing assignments per expert over
    the first ``batches`` evaluation-mode batches of its training split."""
    exp = restored.exp
    evaluator = Evaluator(exp, data, restored.placement)
    loads: dict[str, list[np.ndarray]] = {}
    for host in data.eval_batches(task, "train", exp.eval.batch_size, batches):
        metrics = evaluator.metrics(restored.params, host)
        for layer, stats in metrics["moe"].items():
            loads.setdefault(layer, []).append(np.asarray(stats["expert_load"]))
    return {layer: np.mean(rows, axis=0).tolist() for layer, rows in loads.items()}


def check_growable(exp: cfg.Experiment, spec: GrowSpec) -> None:
    """User errors that need no parameters: the router kind, pathway width vs top-k."""
    if exp.moe.router == "hierarchical" or exp.moe.decoder_router == "hierarchical":
        raise UserError("grow: hierarchical routers cannot be grown (their groups are fixed)")
    if not exp.moe_layers:
        raise UserError("grow: the model has no MoE layer to add experts to")
    surgery.check_supported(exp, "grow")
    for layer in exp.moe_layers:
        e_old = exp.experts_in(layer)
        width = spec.add_experts + min(spec.share_experts, e_old - min(spec.add_experts, e_old))
        if width < exp.moe.top_k:
            raise UserError(
                f"grow: the new task's pathway in {layer} would have {width} expert(s), fewer "
                f"than moe.top_k={exp.moe.top_k}; raise grow.add_experts or grow.share_experts"
            )


def plan_growth(exp: cfg.Experiment, usage, task: int, spec: GrowSpec) -> GrowthPlan:
    """Which experts to clone and share in each layer (module docstring, steps 2-3)."""
    clones, pathway = {}, {}
    for layer in exp.moe_layers:
        e_old = exp.experts_in(layer)
        order = ranked(usage[layer])
        sources = [order[j % e_old] for j in range(spec.add_experts)]
        shared = [e for e in order if e not in sources][: spec.share_experts]
        clones[layer] = sources
        pathway[layer] = sorted(shared) + list(range(e_old, e_old + spec.add_experts))
    return GrowthPlan(task, {k: list(v) for k, v in usage.items()}, clones, pathway)


def grown_experiment(parent: cfg.Experiment, plan: GrowthPlan, gf: GrowFile, where: str):
    """The new run's config: more experts, old tasks frozen on their pathways (weight 0), the
    new task on its pathway, training settings from the grow file."""
    add = gf.grow.add_experts
    raw = parent.model_dump(mode="json")
    raw["name"] = gf.name
    raw["runs_dir"] = gf.runs_dir or parent.runs_dir
    moe = raw["moe"]
    moe["num_experts"] = parent.moe.num_experts + add
    moe["layer_experts"] = {layer: e + add for layer, e in parent.moe.layer_experts.items()}
    moe["capacity_experts"] = parent.moe.capacity_experts or parent.moe.num_experts
    moe["grown_experts"] = [*parent.moe.grown_experts, add]
    for i, task in enumerate(raw["tasks"]):
        if i == plan.task:
            task.update(experts=plan.pathway, frozen=False, weight=task["weight"] or 1.0)
        else:
            old = {
                layer: pathway_spec.task_experts(parent, i, layer) for layer in parent.moe_layers
            }
            task.update(experts=old, frozen=True, weight=0.0)
    for section in ("train", "eval", "checkpoint"):
        raw[section] = {**raw[section], **getattr(gf, section)}
    return cfg.from_dict(raw, where=where)


def prepare_grown_run(parent_dir: Path, gf: GrowFile, where: str, say=print) -> Path:
    """Steps 1-4: write the grown run directory (config, step-0 checkpoint, ``grow.json``)."""
    parent = run_config(parent_dir)
    task = task_index(parent, gf.grow.task)
    check_growable(parent, gf.grow)
    restored = restore(parent_dir)
    data = prepare(parent, say=lambda *a, **k: None)
    usage = probe_usage(restored, data, task, gf.grow.probe_batches)
    plan = plan_growth(parent, usage, task, gf.grow)
    child = grown_experiment(parent, plan, gf, where)
    run_dir = Path(child.runs_dir) / child.name
    params = surgery.append_experts(restored.params, plan.clones)
    select = pathway_spec.selector(child)
    trainable = sum(int(np.size(v)) for v in _trainable_leaves(params, select))
    record = {
        "parent": str(parent_dir),
        "parent_step": restored.step,
        "task": gf.grow.task,
        "add_experts": gf.grow.add_experts,
        "share_experts": gf.grow.share_experts,
        "usage": plan.usage,
        "clones": plan.clones,
        "pathway": plan.pathway,
        "old_tasks": [t.name for i, t in enumerate(parent.tasks) if i != task],
        "params_before": surgery.num_params(restored.params),
        "params_after": surgery.num_params(params),
        "trainable_params": trainable,
    }
    old = [i for i in range(len(parent.tasks)) if i != task]
    record["old_tasks_check"] = check_old_tasks(restored, child, params, data, old)
    surgery.write_run(child, run_dir, params, 0, {"grown_from": str(parent_dir)})
    (run_dir / "grow.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    say(
        f"moe: grow: {gf.grow.task} gets {gf.grow.add_experts} new expert(s) per layer "
        f"({record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M "
        f"parameters, {trainable / 1e6:.3f}M trainable); run {run_dir}"
    )
    differ = [n for n, r in record["old_tasks_check"].items() if not r["identical"]]
    if differ:
        say(
            f"moe: grow: warning: {', '.join(differ)} differ from the parent in the last bits "
            "(a backend that computes the routing differently for more experts); see grow.json"
        )
    return run_dir


def check_old_tasks(restored: Restored, child: cfg.Experiment, params, data: RunData, old):
    """Before training: the held-out NLL of one validation batch of each old task, parent vs
    grown model. Frozen weights never change, so this predicts the final comparison (the
    module docstring says why they agree bit for bit)."""
    parent = Evaluator(restored.exp, data, restored.placement)
    grown = Evaluator(child, data, Placement.for_experiment(child))
    params = jax.tree.map(jnp.asarray, params)
    out = {}
    for ti in old:
        name, bs = child.tasks[ti].name, child.eval.batch_size
        for host in data.eval_batches(ti, "valid", bs, 1):
            a = float(parent.metrics(restored.params, host)["task_nll"][ti])
            b = float(grown.metrics(params, host)["task_nll"][ti])
            out[name] = {"nll_parent": a, "nll_grown": b, "identical": a == b}
    return out


def _trainable_leaves(params, select):
    return jax.tree.leaves(trainable_view(params, select))


def compare_old_tasks(run_dir: Path) -> dict[str, Any]:
    """Old tasks' final evaluation before (parent) and after (grown run), side by side;
    stored in ``grow.json`` under ``old_tasks_after``. ``identical`` is None when the two
    evaluations used different ``eval`` settings (then ``eval_differs`` names them)."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "grow.json").read_text(encoding="utf-8"))
    parent = Path(record["parent"])
    before, after = _summary(parent), _summary(run_dir)
    differs = _eval_differences(parent, run_dir)
    rows = {}
    for name in record["old_tasks"]:
        b, a = before.get(name, {}), after.get(name, {})
        same = None if differs or not (a and b) else _same_eval(parent, run_dir, name, b, a)
        rows[name] = {
            "before": {k: b.get(k) for k in ("loss", "perplexity", "bleu")},
            "after": {k: a.get(k) for k in ("loss", "perplexity", "bleu")},
            "identical": same,
        }
    record["old_tasks_after"] = rows
    record["eval_differs"] = differs
    (run_dir / "grow.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rows


def _eval_differences(parent: Path, child: Path) -> list[str]:
    """``eval.*`` settings that differ between two runs' configs (and so their evaluations)."""
    a, b = cfg.load(parent / "config.yaml").eval, cfg.load(child / "config.yaml").eval
    skip = ("every", "batches")  # evaluation during training only
    return [
        f"eval.{k}"
        for k in type(a).model_fields
        if k not in skip and getattr(a, k) != getattr(b, k)
    ]


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval" / "summary.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("tasks", {})


def _same_eval(parent: Path, child: Path, name: str, b: dict, a: dict) -> bool:
    """Equal loss/perplexity/BLEU numbers and byte-identical decoded outputs."""
    if any(b.get(k) != a.get(k) for k in ("loss", "perplexity", "bleu", "tokens")):
        return False
    hyp_b, hyp_a = parent / "eval" / f"{name}.hyp.txt", child / "eval" / f"{name}.hyp.txt"
    if hyp_b.is_file() != hyp_a.is_file():
        return False
    return not hyp_b.is_file() or hyp_b.read_bytes() == hyp_a.read_bytes()
