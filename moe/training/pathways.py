"""Task pathways: which experts each task may use per MoE layer, and what a grown model trains.

A task's *pathway* is, per MoE layer, the set of experts it may use (docs/ARCHITECTURE.md
§Pathways). It comes from the config (``tasks[i].experts``: a list for every layer or a dict
``{layer: ids}``; absent = every expert) and becomes a static mask ``[num_tasks][E]`` per layer
that the model applies to the router logits (the block gives a task none of the tokens of a
masked expert, so neither outputs nor gradients of a task touch experts outside its pathway).

Pathways can also be *learned*: train with token routing, then read which experts carry most of
each task's tokens (``eval/summary.json`` ``expert_usage``) with :func:`suggest` (``moe
pathways RUN_DIR``), and write them into the config.

Freezing (``tasks[i].frozen``, set by ``moe grow`` on the old tasks), following μ2Net's
knowledge compartmentalisation (Gesmundo & Dean 2022, papers §7.2: a component used by a
finished task is locked for every other task): an expert is trainable iff some unfrozen task's
pathway has it and no frozen task's does; a task embedding row iff its task is unfrozen;
every shared (non-expert) weight is frozen as soon as one task is, since every task uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from moe.config import ConfigError, Experiment
from moe.training.freeze import Rows, path_names

EXPERT_LEAVES = ("w_in", "b_in", "w_out", "b_out")  # [E, ...]: experts along axis 0
ROUTER_LEAVES = ("w_gate", "w_noise")  # [d, E]: experts along axis 1


def task_experts(exp: Experiment, task: int, layer: str) -> list[int]:
    """Expert ids task ``task`` may use in MoE layer ``layer`` (sorted)."""
    ids = exp.tasks[task].experts
    if isinstance(ids, dict):
        ids = ids.get(layer)
    return sorted(ids) if ids is not None else list(range(exp.experts_in(layer)))


def masks(exp: Experiment) -> dict[str, tuple[tuple[bool, ...], ...]]:
    """``{layer: mask[task][expert]}`` for the MoE layers where some task is restricted."""
    out = {}
    for layer in exp.moe_layers:
        e = exp.experts_in(layer)
        rows = []
        for t in range(len(exp.tasks)):
            allowed = set(task_experts(exp, t, layer))
            rows.append(tuple(x in allowed for x in range(e)))
        if not all(all(row) for row in rows):
            out[layer] = tuple(rows)
    return out


def frozen_tasks(exp: Experiment) -> list[int]:
    return [i for i, t in enumerate(exp.tasks) if t.frozen]


def trainable_experts(exp: Experiment) -> dict[str, list[int]]:
    """``{layer: expert ids}`` a model with frozen tasks trains (all, if no task is frozen)."""
    frozen = set(frozen_tasks(exp))
    out = {}
    for layer in exp.moe_layers:
        live = {
            x for t in range(len(exp.tasks)) if t not in frozen for x in task_experts(exp, t, layer)
        }
        locked = {x for t in frozen for x in task_experts(exp, t, layer)}
        out[layer] = sorted(live - locked)
    return out


def selector(exp: Experiment):
    """The ``select(path, shape)`` of :func:`moe.training.freeze.train_only` for ``exp``, or
    None when no task is frozen (everything trains)."""
    frozen = frozen_tasks(exp)
    if not frozen:
        return None
    experts = trainable_experts(exp)
    ep = exp.mesh_shape.get("expert", 1)
    for layer, ids in experts.items():
        if ids and len(ids) % ep:
            raise ConfigError(
                f"{layer} trains {len(ids)} expert(s) ({ids}), not divisible by the expert axis "
                f"({ep}): their optimizer state cannot be sharded; add a multiple of {ep} experts"
            )
    live_tasks = tuple(i for i in range(len(exp.tasks)) if i not in frozen)

    def select(path, shape):
        names = path_names(path)
        if names[:1] == ("task_embed",):
            return _rows(0, live_tasks, shape)
        if len(names) == 5 and names[2] == "ffn":
            layer = f"{names[0]}/{names[1]}"
            if names[3] == "experts" and names[4] in EXPERT_LEAVES:
                return _rows(0, experts[layer], shape)
            if names[3] == "router" and names[4] in ROUTER_LEAVES:
                return _rows(1, experts[layer], shape)
        return False

    return select


def _rows(axis: int, index: Sequence[int], shape: tuple[int, ...]) -> bool | Rows:
    if not index:
        return False
    if list(index) == list(range(shape[axis])):
        return True
    return Rows(axis, tuple(index))


# ----------------------------------------------------------------------------------------------
# Learned pathways: from measured expert usage.
# ----------------------------------------------------------------------------------------------


def suggest(
    usage: Mapping[str, Mapping[str, Sequence[float]]], coverage: float = 0.9, min_experts: int = 1
) -> dict[str, dict[str, list[int]]]:
    """The smallest expert set per task and layer that carries ``coverage`` of its tokens.

    Args:
      usage: ``{layer: {task: load [E]}}``, each load the fraction of the task's kept routing
        assignments per expert (``eval/summary.json`` ``expert_usage``).
      coverage: fraction of the load the chosen experts must carry, in (0, 1].
      min_experts: at least this many experts (use ``moe.top_k``).

    Returns:
      ``{task: {layer: sorted expert ids}}``, most-used experts first chosen.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage={coverage} must be in (0, 1]")
    out: dict[str, dict[str, list[int]]] = {}
    for layer in sorted(usage):
        for task, load in usage[layer].items():
            order = sorted(range(len(load)), key=lambda e: (-load[e], e))
            total = sum(load) or 1.0
            chosen, carried = [], 0.0
            for e in order:
                if len(chosen) >= min_experts and carried >= coverage * total - 1e-9:
                    break
                chosen.append(e)
                carried += load[e]
            out.setdefault(task, {})[layer] = sorted(chosen)
    return out


def ranked(load: Sequence[float]) -> list[int]:
    """Expert ids by decreasing load (ties: lower id first)."""
    return sorted(range(len(load)), key=lambda e: (-load[e], e))


def entropy_experts(load: Sequence[float]) -> float:
    """exp(entropy) of a load vector: the effective number of experts it uses."""
    total = sum(load)
    if total <= 0:
        return 0.0
    h = -sum(p / total * math.log(p / total) for p in load if p > 0)
    return math.exp(h)


def describe(exp: Experiment, usage, coverage: float = 0.9, as_yaml: bool = False) -> str:
    """``moe pathways``: per MoE layer and task, its configured pathway, the experts carrying
    its tokens (most first, with shares) and the fewest covering ``coverage``; or (``as_yaml``)
    those as ``tasks[i].experts`` to paste into a config."""
    learned = suggest(usage, coverage, min_experts=exp.moe.top_k)
    if as_yaml:
        import yaml

        tasks = [
            {"name": t, "experts": learned[t]} for t in [x.name for x in exp.tasks] if t in learned
        ]
        head = f"# learned pathways: the experts carrying {coverage:.0%} of each task's tokens\n"
        return head + yaml.safe_dump({"tasks": tasks}, sort_keys=False, default_flow_style=None)
    lines = [
        f"run {exp.name}: routing encoder={exp.moe.routing_input.encoder}, "
        f"decoder={exp.moe.routing_input.decoder}; expert usage of the final evaluation",
    ]
    for layer in exp.moe_layers:
        if layer not in usage:
            continue
        lines += ["", f"{layer} ({exp.experts_in(layer)} experts)"]
        lines.append(f"  {'task':<12} {'pathway':<16} {'eff.':>5}  experts by share")
        for t, task in enumerate(exp.tasks):
            load = usage[layer].get(task.name)
            if load is None:
                continue
            ids = task_experts(exp, t, layer)
            allowed = "all" if len(ids) == len(load) else ",".join(map(str, ids))
            shares = " ".join(f"{e}:{load[e]:.0%}" for e in ranked(load) if load[e] >= 0.005)
            chosen = ",".join(map(str, learned[task.name][layer]))
            lines.append(
                f"  {task.name:<12} {allowed:<16} {entropy_experts(load):>5.1f}  {shares}"
                f"  -> {coverage:.0%}: {chosen}"
            )
    return "\n".join(lines)
