"""``moe place RUN_DIR [--json FILE] [--apply --out OUT_DIR]``: an expert-to-device placement
from a run's routing statistics, compared across placers, and optionally applied.

Inputs: the run's config (mesh, slice, processes), ``eval/routing_stats.json`` (written by the
final evaluation: ``moe train`` or ``moe eval``) and ``train_summary.json`` (how many training
examples each task had: the counts are mixed in those proportions, else equally). Output: per
placer (identity / random / greedy / annealing) the figures of ``moe.placement.model``, the
chosen placement (``search.choose``) and ``{"before": identity, "after": chosen}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe import config as cfg
from moe import runfiles as rf
from moe.errors import UserError
from moe.placement import search
from moe.placement.apply import apply_placement, check_placeable
from moe.placement.model import FIGURES, CostModel, LayerStats, Layout
from moe.pod.topology import PodSlice, get_slice, parse_slice
from moe.training.restore import run_config

# Chips a host drives, where the slice does not say (pod.processes > 1 overrides): TPU
# v2/v3/v4 hosts drive 4 chips [D, Cloud TPU system architecture]; v5e hosts 1, 4 or 8
# (UNVERIFIED, 4 assumed); an H100 node is one host of 8 GPUs.
HOST_CHIPS = {"tpu-v2": 4, "tpu-v3": 4, "tpu-v4": 4, "tpu-v5e": 4, "gpu-h100": 8}


def read_stats(run_dir: Path) -> rf.RoutingStats:
    path = Path(run_dir) / "eval" / "routing_stats.json"
    stats, problem = rf.read_json(path, rf.RoutingStats)
    if problem or not stats.tasks:
        state = problem or "empty"
        raise UserError(f"{path} is {state}; run `moe eval {run_dir}` first")
    return stats


def task_weights(run_dir: Path, stats: rf.RoutingStats) -> dict[str, float]:
    """Each task's share of the training examples (``train_summary.json``), else equal."""
    summary, _ = rf.read_json(Path(run_dir) / "train_summary.json", rf.TrainSummary)
    seen = {t: float(summary.examples_seen.get(t, 0)) for t in stats.tasks}
    total = sum(seen.values())
    if total <= 0:
        return {t: 1.0 / len(stats.tasks) for t in stats.tasks}
    return {t: n / total for t, n in seen.items()}


def layer_stats(exp: cfg.Experiment, stats: rf.RoutingStats, weights: dict) -> list[LayerStats]:
    """Per MoE layer, the tasks' counts mixed by ``weights`` and scaled to a training step."""
    scale = exp.train.batch_size / (stats.batch_size or exp.eval.batch_size)
    out = []
    for layer in exp.moe_layers:
        rows = [(w, stats.tasks[t][layer]) for t, w in weights.items() if layer in stats.tasks[t]]
        if not rows:
            raise UserError(f"{layer} has no routing statistics; run `moe eval` again")
        mix = lambda get, rows=rows: scale * sum(w * np.asarray(get(r), float) for w, r in rows)
        transitions = [r.transition for _, r in rows]
        known = all(t is not None for t in transitions)
        out.append(
            LayerStats(
                name=layer,
                coactivation=mix(lambda r: r.coactivation),
                first_coactivation=mix(lambda r: r.first_coactivation),
                previous=rows[0][1].previous if known else None,
                transition=mix(lambda r: r.transition) if known else None,
            )
        )
    return out


def target_slice(exp: cfg.Experiment, slice_text: str | None) -> PodSlice:
    pod = get_slice(exp.pod.topology, exp.pod.slice)
    if slice_text is None:
        return pod
    try:
        target = parse_slice(slice_text)
    except ValueError as err:
        raise UserError(f"--slice: {err}") from None
    if target.num_chips != pod.num_chips:
        raise UserError(
            f"--slice {slice_text} has {target.num_chips} chips but the run's mesh has "
            f"{pod.num_chips} devices; project onto a slice of the same size"
        )
    return target


def hosts_of(exp: cfg.Experiment, pod: PodSlice) -> int:
    if exp.pod.processes > 1:
        return exp.pod.processes
    chips = HOST_CHIPS.get(pod.kind.name, pod.num_chips)
    return max(1, pod.num_chips // chips) if pod.num_chips % chips == 0 else 1


def cost_model(
    exp: cfg.Experiment, stats: rf.RoutingStats, weights: dict, pod: PodSlice, **options
) -> CostModel:
    m = exp.model
    layout = Layout.for_mesh(exp.mesh_shape, hosts_of(exp, pod))
    return CostModel(
        layer_stats(exp, stats, weights),
        layout,
        pod,
        bytes_per_token=m.d_model * (2 if exp.train.precision == "bfloat16" else 4),
        flops_per_choice=12.0 * m.d_model * m.d_ff,  # 2 matmuls, forward 4df + backward 8df
        **options,
    )


def place(
    run_dir: Path,
    *,
    slice_text: str | None = None,
    schedule: str = "home",
    host_gbps: float | None = None,
    seed: int = 0,
    iterations: int = 3000,
) -> dict:
    """The placement report of ``run_dir`` (module docstring)."""
    run_dir = Path(run_dir)
    exp = run_config(run_dir)
    check_placeable(exp, apply=False)
    stats = read_stats(run_dir)
    weights = task_weights(run_dir, stats)
    pod = target_slice(exp, slice_text)
    host_bandwidth = None if host_gbps is None else host_gbps * 1e9 / 8
    model = cost_model(exp, stats, weights, pod, schedule=schedule, host_bandwidth=host_bandwidth)
    found = search.run_all(model, seed=seed, iterations=iterations)
    chosen = search.choose(found)
    before, after = found["identity"], found[chosen]
    figures = lambda f: {k: f[k] for k in (*FIGURES, "objective_ms")}
    return {
        "run": str(run_dir),
        "step": stats.step,
        "slice": pod.name,
        "mesh": exp.mesh_shape,
        "hosts": len(set(model.layout.hosts)),
        "schedule": schedule,
        "task_weights": weights,
        "chosen": chosen,
        "permutation": {n: search.permutation(d) for n, d in after["dev"].items()},
        "devices": {n: _columns(d) for n, d in after["dev"].items()},
        "before": figures(before["figures"]),
        "after": figures(after["figures"]),
        "placers": {
            name: {
                **figures(r["figures"]),
                "permutation": {n: search.permutation(d) for n, d in r["dev"].items()},
                **({"trace": r["trace"]} if "trace" in r else {}),
            }
            for name, r in found.items()
        },
        "layers": {
            n: {
                "before": model.layer_figures(n, before["dev"]),
                "after": model.layer_figures(n, after["dev"]),
            }
            for n in model.order
        },
        "units": "per training step (forward + backward); loads are max/mean over expert columns",
    }


def _columns(dev: np.ndarray) -> list[list[int]]:
    """Old expert ids on each expert-axis column."""
    return [[int(e) for e in np.nonzero(dev == c)[0]] for c in range(int(dev.max()) + 1)]


def apply(run_dir: Path, report: dict, out: Path) -> dict:
    """Write the report's chosen permutation of ``run_dir`` to ``out``."""
    return apply_placement(Path(run_dir), report["permutation"], Path(out))


def table(report: dict) -> str:
    """The placers side by side, as text."""
    head = f"{'placer':<10} {'max load':>9} {'exchange ms':>12} {'expert ms':>10} {'MB moved':>10}"
    lines = [f"moe place: {report['run']} on {report['slice']} ({report['schedule']})", head]
    for name, f in report["placers"].items():
        mark = "  <- chosen" if name == report["chosen"] else ""
        lines.append(
            f"{name:<10} {f['max_device_load']:>9.3f} {f['projected_exchange_ms']:>12.4f} "
            f"{f['projected_expert_ms']:>10.4f} {f['cross_device_bytes'] / 1e6:>10.3f}{mark}"
        )
    return "\n".join(lines)
