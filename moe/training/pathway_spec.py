"""Task pathways as the experiment states them: which experts each task may use per MoE layer
(the masks the model applies) and which parameter rows a model with frozen tasks trains.

A task's *pathway* is, per MoE layer, the set of experts it may use (docs/ARCHITECTURE.md
§Pathways). It comes from the config (``tasks[i].experts``: a list for every layer or a dict
``{layer: ids}``; absent = every expert) and becomes a static mask ``[num_tasks][E]`` per layer
that the model applies to the router logits (the block gives a task none of the tokens of a
masked expert, so neither outputs nor gradients of a task touch experts outside its pathway).

Freezing (``tasks[i].frozen``, set by ``moe grow`` on the old tasks), following μ2Net's
knowledge compartmentalisation (Gesmundo & Dean 2022, papers §7.2: a component used by a
finished task is locked for every other task): an expert is trainable iff some unfrozen task's
pathway has it and no frozen task's does; a task embedding row iff its task is unfrozen;
every shared (non-expert) weight is frozen as soon as one task is, since every task uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

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
