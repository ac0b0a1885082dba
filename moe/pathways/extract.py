"""``moe extract RUN_DIR --task NAME``: a task's sub-network as a smaller run directory.

Task-MoE's serving benefit (Kudugunta et al. 2021 §3.2, papers §6.1): when a task's experts are
known in advance, only those need loading. Per MoE layer the task keeps

- with task routing (``moe.routing_input`` ``task``) and a top-k router whose gates do not
  depend on the other experts' logits (token choice with ``renormalize``, or noisy top-k, whose
  softmax runs over the top k): the k experts its task embedding selects,
  ``top_k(e_task W_gate)`` within its pathway (papers §6.2: "precompute top2(softmax(e_task W))");
- otherwise its pathway (``tasks[i].experts``; all experts when it has none: token routing may
  send a token anywhere, so nothing can be dropped without changing outputs).

The new config keeps every task (the shared vocabulary is built from all of them) and sets
``moe.layer_experts`` to the kept counts and ``moe.capacity_experts`` to the original count, so
capacity, and hence which tokens are dropped, is unchanged. For the extracted task evaluated
alone (one-task batches, as ``moe eval`` does) on the same mesh, the same experts see the same
tokens with the same router logits, and the same weights compute their outputs. What changes is
the router softmax's normaliser: it sums over the kept experts instead of over all E (where the
masked ones contributed exact zeros, or, under task routing, small non-zero probabilities), so
gates, and hence outputs, agree to float rounding (~1e-8 here; greedy decodes identical in the
experiment), bit for bit only when the backend happens to sum both the same way.

Other tasks in the extracted directory run on the extracted experts and mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe import config as cfg
from moe.errors import UserError
from moe.pathways import surgery
from moe.training import pathway_spec
from moe.training.restore import restore, run_config


def task_index(exp: cfg.Experiment, name: str) -> int:
    names = [t.name for t in exp.tasks]
    if name not in names:
        raise UserError(f"no task named {name!r} (tasks: {', '.join(names)})")
    return names.index(name)


def kept_experts(exp: cfg.Experiment, params, task: int) -> dict[str, list[int]]:
    """``{layer: expert ids}`` task ``task`` can reach (module docstring), sorted; ``params``
    (the model's parameters) are read only under task routing."""
    out = {}
    for layer in exp.moe_layers:
        stack, i = layer.split("/")
        allowed = pathway_spec.task_experts(exp, task, layer)
        mode = getattr(exp.moe.routing_input, stack)
        router = exp.moe.router_of(stack)
        renormalized = router == "noisy" or (router == "token_choice" and exp.moe.renormalize)
        if mode != "task" or not renormalized:
            out[layer] = allowed
            continue
        w_gate = params[stack][int(i)]["ffn"]["router"]["w_gate"][...]  # [d, E]
        emb = params["task_embed"][...][task]  # [d]
        logits = jnp.dot(emb, w_gate, precision=jax.lax.Precision.HIGHEST)  # [E]
        mask = np.zeros(logits.shape, bool)
        mask[allowed] = True
        logits = jnp.where(jnp.asarray(mask), logits, -jnp.inf)
        top = jax.lax.top_k(logits, exp.moe.top_k)[1]
        out[layer] = sorted(int(e) for e in np.asarray(top))
    return out


def extracted_experiment(exp: cfg.Experiment, task: int, keep: dict[str, list[int]], name: str):
    raw = exp.model_dump(mode="json")
    raw["name"] = name
    raw["moe"]["layer_experts"] = {layer: len(ids) for layer, ids in keep.items()}
    raw["moe"]["capacity_experts"] = exp.moe.capacity_experts or exp.moe.num_experts
    raw["moe"]["grown_experts"] = []  # the kept experts no longer split into growth blocks
    for t in raw["tasks"]:
        t["experts"], t["frozen"] = None, False
    ep = exp.mesh_shape.get("expert", 1)
    if any(len(ids) % ep for ids in keep.values()):
        raw["pod"]["mesh"] = {"data": -1, "expert": 1}  # an expert axis cannot split them
    return cfg.from_dict(raw, where=f"extracted config of {exp.tasks[task].name}")


def extract(run_dir: Path, task_name: str, out: Path | None = None, step: int | None = None):
    """Write the sub-network of ``task_name`` to ``out`` (default ``<run_dir>-<task>``);
    returns the manifest (also saved as ``out/extracted.json``)."""
    run_dir = Path(run_dir)
    surgery.check_supported(run_config(run_dir), "extract")
    restored = restore(run_dir, step)
    exp = restored.exp
    task = task_index(exp, task_name)
    keep = kept_experts(exp, restored.params, task)
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-{task_name}")
    child = extracted_experiment(exp, task, keep, name=out.name)
    params = surgery.take_experts(restored.params, keep)
    manifest = {
        "parent": str(run_dir),
        "out": str(out),
        "step": restored.step,
        "task": task_name,
        "experts": keep,
        "experts_before": {layer: exp.experts_in(layer) for layer in exp.moe_layers},
        "params_before": surgery.num_params(restored.params),
        "params_after": surgery.num_params(params),
        "mesh": child.mesh_shape,
    }
    surgery.write_run(child, out, params, restored.step, {"extracted_from": str(run_dir)})
    (out / "extracted.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest
