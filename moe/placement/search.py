"""Placers: expert-to-column assignments for every MoE layer, scored by ``CostModel``.

- ``identity``: the layout a run starts with (experts ``[0, E/EP)`` on column 0, ...).
- ``random``: a uniformly random balanced assignment (seeded), the floor to beat.
- ``greedy``: balanced partitioning of the co-activation graph. Layers in model order (a
  layer's previous MoE layer is placed first, as the affinity schedule needs); experts by
  decreasing load, each to the column with a free slot where the whole-step objective
  (exchange + expert time) is lowest given the experts placed so far: it joins the experts it
  is co-activated with until a column's load makes that cost more than it saves.
- ``annealing``: simulated annealing over permutations (Kirkpatrick et al. 1983), a search
  in the spirit of Mirhoseini et al. 2017 (device placement with the measured run time as the
  reward; here the cost model is the reward, papers §8.4): from the better of identity and
  greedy, swap two experts of different columns in one layer; accept a worse objective with
  probability ``exp(-Δ/T)``, ``T`` cooling geometrically from 5% of the start's objective to
  0.01% of it; keep the best seen.

:func:`choose` returns the placement with the lowest objective among those that are better
than identity on the max device load or the exchange time, not worse on both, and no worse
on the objective; identity when none is (an expert axis of 1, or nothing to gain).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moe.placement.model import CostModel, summarize

Assignment = dict[str, np.ndarray]  # layer -> column of each expert [E]
PLACERS = ("identity", "random", "greedy", "annealing")


def random_placement(model: CostModel, seed: int) -> Assignment:
    rng = np.random.default_rng(seed)
    return {n: rng.permutation(dev) for n, dev in model.identity().items()}


def _objective(figures: dict) -> float:
    return figures["projected_exchange_ms"] + figures["projected_expert_ms"]


def greedy(model: CostModel) -> Assignment:
    """Greedy balanced partitioning of the co-activation graph (module docstring)."""
    out = model.identity()
    ep = model.layout.ep
    for name in model.order:
        stats = model.layers[name]
        per = stats.experts // ep
        order = np.argsort(-np.diag(stats.coactivation), kind="stable")
        dev = np.full(stats.experts, -1)
        for e in order:
            best, best_cost = -1, math.inf
            for col in range(ep):
                if np.sum(dev == col) >= per:
                    continue
                trial = dev.copy()
                trial[e] = col
                cost = _partial_cost(model, name, out, trial)
                if cost < best_cost - 1e-12:
                    best, best_cost = col, cost
            dev[e] = best
        out[name] = dev
    return out


def _partial_cost(model: CostModel, name: str, dev: Assignment, partial: np.ndarray) -> float:
    """Objective of layer ``name`` with only the experts placed so far (``-1``: not yet)."""
    placed = partial >= 0
    stats = model.layers[name]
    keep = placed[:, None] & placed[None, :]
    sub = dataclasses.replace(
        stats,
        coactivation=stats.coactivation * keep,
        first_coactivation=stats.first_coactivation * keep,
        transition=None if stats.transition is None else stats.transition * placed[None, :],
    )
    trial = {**dev, name: np.where(placed, partial, 0)}
    return _objective(model.layer_figures(name, trial, sub))


def anneal(
    model: CostModel, start: Assignment, *, seed: int, iterations: int = 3000
) -> tuple[Assignment, list[float]]:
    """Simulated annealing from ``start`` (module docstring); returns the best assignment and
    the objective after every 100 iterations (a trace for the JSON)."""
    rng = np.random.default_rng(seed)
    dev = {n: d.copy() for n, d in start.items()}
    per_layer = {n: model.layer_figures(n, dev) for n in model.order}
    current = _objective(summarize(per_layer))
    best, best_dev = current, {n: d.copy() for n, d in dev.items()}
    names = [n for n in model.order if model.layout.ep > 1]
    trace = [current]
    if not names or current <= 0:
        return best_dev, trace
    t0, t1 = 0.05 * current, 1e-4 * current
    for i in range(iterations):
        temp = t0 * (t1 / t0) ** (i / max(iterations - 1, 1))
        name = names[rng.integers(len(names))]
        d = dev[name]
        a = rng.integers(len(d))
        others = np.nonzero(d != d[a])[0]
        b = others[rng.integers(len(others))]
        d[a], d[b] = d[b], d[a]
        changed = {n: model.layer_figures(n, dev) for n in model.affected(name)}
        trial = _objective(summarize({**per_layer, **changed}))
        if trial <= current or rng.random() < math.exp(-(trial - current) / temp):
            current = trial
            per_layer.update(changed)
            if current < best - 1e-12:
                best, best_dev = current, {n: x.copy() for n, x in dev.items()}
        else:
            d[a], d[b] = d[b], d[a]
        if (i + 1) % 100 == 0:
            trace.append(current)
    return best_dev, trace


def run_all(model: CostModel, *, seed: int = 0, iterations: int = 3000) -> dict[str, dict]:
    """Every placer's assignment and figures: ``{placer: {"dev", "figures"[, "trace"]}}``."""
    identity = model.identity()
    found: dict[str, dict] = {"identity": {"dev": identity}}
    found["random"] = {"dev": random_placement(model, seed)}
    found["greedy"] = {"dev": greedy(model)}
    start = min(
        (found[k]["dev"] for k in ("identity", "greedy")),
        key=lambda d: _objective(model.figures(d)),
    )
    dev, trace = anneal(model, start, seed=seed, iterations=iterations)
    found["annealing"] = {"dev": dev, "trace": trace}
    for result in found.values():
        result["figures"] = model.figures(result["dev"])
    return found


def choose(found: dict[str, dict]) -> str:
    """The placer with the lowest objective among those better than identity on the load or
    the exchange and not worse on both; ``identity`` when there is none."""
    base = found["identity"]["figures"]

    def ok(figures: dict) -> bool:
        keys = ("max_device_load", "projected_exchange_ms")
        better = [figures[k] < base[k] * (1 - 1e-9) for k in keys]
        worse = [figures[k] > base[k] * (1 + 1e-9) for k in keys]
        return any(better) and not all(worse) and figures["objective_ms"] <= base["objective_ms"]

    good = [k for k in found if k != "identity" and ok(found[k]["figures"])]
    return min(good, key=lambda k: found[k]["figures"]["objective_ms"]) if good else "identity"


def permutation(dev: np.ndarray) -> list[int]:
    """The take order of a layer: new expert ``j`` is old expert ``order[j]`` (column-major,
    old order kept within a column), so column ``c`` holds new experts ``[c E/EP, ...)``."""
    return [int(e) for e in np.lexsort((np.arange(len(dev)), dev))]
