"""Learned pathways: which experts carry each task's tokens, from measured expert usage.

Train with token routing, then read which experts carry most of each task's tokens
(``eval/summary.json`` ``expert_usage``) with :func:`suggest` (``moe pathways RUN_DIR``), and
write them into the config as ``tasks[i].experts`` (``moe.training.pathway_spec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from moe.config import Experiment
from moe.training.pathway_spec import task_experts


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
