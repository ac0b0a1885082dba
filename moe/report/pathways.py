"""The report's pathway section: which experts each task may use and does use, per MoE layer
(a diagram per task), and after ``moe grow`` the old tasks' metrics before and after.

Present only for runs that have something to show: configured pathways, frozen tasks, task
routing, a ``grow.json`` (grown run) or an ``extracted.json`` (extracted sub-network).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moe import config as cfg
from moe import runfiles as rf
from moe.pathways.usage import suggest
from moe.report.format import fmt, ids, table, yes_no
from moe.report.plots import new_figure, number, save
from moe.training import pathway_spec

PLOT = "pathways.png"
COVERAGE = 0.9


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def section(run_dir: Path, config: dict, summary: rf.EvalSummary) -> rf.ReportPathways | None:
    """The ``pathways`` entry of report.json, or None when the run has no pathway features."""
    grow = _json(Path(run_dir) / "grow.json")
    extracted = _json(Path(run_dir) / "extracted.json")
    try:
        exp = cfg.from_dict(config)
    except cfg.ConfigError:
        return None
    routed = (exp.moe.routing_input.encoder, exp.moe.routing_input.decoder) != ("token", "token")
    masked = pathway_spec.masks(exp) or pathway_spec.frozen_tasks(exp)
    if not (masked or routed or grow or extracted):
        return None
    usage = summary.expert_usage
    used = suggest(usage, COVERAGE, min_experts=exp.moe.top_k) if usage else {}
    tasks = {
        task.name: rf.PathwayTask(
            frozen=task.frozen,
            weight=task.weight,
            pathway={x: pathway_spec.task_experts(exp, t, x) for x in exp.moe_layers},
            used=used.get(task.name, {}),
        )
        for t, task in enumerate(exp.tasks)
    }
    return rf.ReportPathways(
        routing_input={
            "encoder": exp.moe.routing_input.encoder,
            "decoder": exp.moe.routing_input.decoder,
        },
        experts={layer: exp.experts_in(layer) for layer in exp.moe_layers},
        coverage=COVERAGE,
        tasks=tasks,
        grow=grow,
        extracted=extracted,
    )


def diagram(pw: rf.ReportPathways, usage: dict, path: Path) -> bool:
    """pathways.png: per task, MoE layers x experts; colour = share of the task's tokens, grey =
    outside its pathway; a red line marks where grown (new) experts begin."""
    layers = list(pw.experts)
    tasks = list(pw.tasks)
    if not layers or not tasks:
        return False
    width = max(pw.experts.values())
    grow = pw.grow or {}
    first_new = {layer: width - int(grow.get("add_experts", 0)) for layer in layers} if grow else {}
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = new_figure(ncols, nrows, width=4.2, height=0.9 + 0.45 * len(layers))
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    image = None
    for ax, name in zip(axes.flat, tasks):
        grid = np.full((len(layers), width), np.nan)  # [layers, E]
        allowed = np.zeros((len(layers), width), bool)
        for row, layer in enumerate(layers):
            allowed[row, pw.tasks[name].pathway[layer]] = True
            load = (usage.get(layer) or {}).get(name) or []
            values = [number(v) for v in load]
            grid[row, : len(values)] = [0.0 if v is None else v for v in values]
        grid = np.where(allowed, np.nan_to_num(grid), np.nan)
        ax.imshow(np.where(allowed, np.nan, 1.0), aspect="auto", cmap="Greys", vmin=0, vmax=4)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        for layer, start in first_new.items():
            row = layers.index(layer)
            ax.plot([start - 0.5] * 2, [row - 0.5, row + 0.5], color="red", linewidth=2)
        frozen = " (frozen)" if pw.tasks[name].frozen else ""
        ax.set_title(f"{name}{frozen}", fontsize="medium")
        ax.set_yticks(range(len(layers)), layers, fontsize="small")
        ax.set_xticks(range(width))
        ax.set_xlabel("expert", fontsize="small")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of the task's tokens", shrink=0.8)
    return save(fig, path)


def markdown(pw: rf.ReportPathways | None, plotted: bool) -> list[str]:
    if not pw:
        return []
    ri = pw.routing_input
    lines = [
        "## Pathways",
        "",
        f"Router input: encoder `{ri['encoder']}`, decoder `{ri['decoder']}`. Per task and MoE "
        f"layer: the experts it may use, and the fewest carrying {pw.coverage:.0%} of its "
        "tokens in the final evaluation.",
        "",
    ]
    layers = list(pw.experts)
    rows = []
    for name, t in pw.tasks.items():
        cells = [f"`{name}`", yes_no(t.frozen), fmt(t.weight)]
        for layer in layers:
            allowed = "all" if len(t.pathway[layer]) == pw.experts[layer] else ids(t.pathway[layer])
            cells.append(f"{allowed} / {ids(t.used.get(layer, []))}")
        rows.append(cells)
    header = ["task", "frozen", "weight", *(f"{layer}: pathway / used" for layer in layers)]
    lines += [*table(header, rows), ""]
    if plotted:
        lines += [f"![Pathways: experts per task and layer]({PLOT})", ""]
    return lines + _grow(pw.grow) + _extracted(pw.extracted)


def _grow(grow: dict | None) -> list[str]:
    if not grow:
        return []
    lines = [
        "### Growth",
        "",
        f"Grown from `{grow.get('parent')}` (step {fmt(grow.get('parent_step'))}) for task "
        f"`{grow.get('task')}`: {fmt(grow.get('add_experts'))} new expert(s) per layer, "
        f"{fmt(grow.get('params_before'))} -> {fmt(grow.get('params_after'))} parameters, "
        f"{fmt(grow.get('trainable_params'))} trainable.",
        "",
    ]
    rows = [
        [layer, ids(src), ids((grow.get("pathway") or {}).get(layer, []))]
        for layer, src in (grow.get("clones") or {}).items()
    ]
    lines += [*table(["layer", "new experts clone", "new task's pathway"], rows), ""]
    old = grow.get("old_tasks_after") or {}
    if old:
        rows = []
        for name, r in old.items():
            b, a = r.get("before") or {}, r.get("after") or {}
            rows.append(
                [f"`{name}`", fmt(b.get("perplexity"), 4), fmt(a.get("perplexity"), 4)]
                + [fmt(b.get("bleu")), fmt(a.get("bleu")), yes_no(r.get("identical"))]
            )
        header = ["old task", "ppl before", "ppl after", "BLEU before", "BLEU after", "identical"]
        lines += ["Old tasks, evaluated alone, before and after growing:", ""]
        lines += [*table(header, rows), ""]
        if grow.get("eval_differs"):
            lines += [f"Not comparable: {', '.join(grow['eval_differs'])} differ.", ""]
    return lines


def _extracted(ex: dict | None) -> list[str]:
    if not ex:
        return []
    kept = ", ".join(
        f"{layer}: {ids(kept_ids)} of {ex.get('experts_before', {}).get(layer, '?')}"
        for layer, kept_ids in (ex.get("experts") or {}).items()
    )
    return [
        "### Extracted sub-network",
        "",
        f"Task `{ex.get('task')}` of `{ex.get('parent')}` (step {fmt(ex.get('step'))}): experts "
        f"{kept}; {fmt(ex.get('params_before'))} -> {fmt(ex.get('params_after'))} parameters. "
        "Only this task's results above are meaningful.",
        "",
    ]
