"""The report of a run with many tasks (more than ``MANY``): what a reader can take in at 100+
tasks instead of one row and one heatmap line per task.

- ``tasks.csv`` beside report.md: one row per task (direction, language, family, training
  size, examples seen, perplexity, BLEU, <unk> rate), sortable in any spreadsheet;
- a summary: best / median / worst tasks by BLEU and by perplexity, per-family and
  per-direction means;
- pathway overlap: for two tasks, the mean over MoE layers of ``Σ_e min(p_e, q_e)`` (their
  expert-usage distributions' intersection, 1 = the same experts in the same shares), and its
  mean within language families vs across them (same direction only);
- ``expert_usage_clustered.png``: expert usage by task, tasks ordered by an average-linkage
  dendrogram of ``1 - overlap`` (scipy), the dendrogram beside it;
- ``bleu_vs_size.png``: BLEU against the task's training examples (log scale), by direction.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from moe import runfiles as rf
from moe.report import languages
from moe.report.format import fmt, table
from moe.report.plots import new_figure, save

MANY = 12  # more tasks than this: the many-task report
CSV = "tasks.csv"
HEATMAP = "expert_usage_clustered.png"
BLEU_PLOT = "bleu_vs_size.png"
COLUMNS = (
    "task", "kind", "direction", "language", "family", "train_examples", "examples_seen",
    "perplexity", "bleu", "unk_rate",
)  # fmt: skip


def direction(name: str, kind: str | None) -> str:
    if kind == "lm":
        return "lm"
    left, _, right = name.partition("-")
    return "en-x" if left == "en" else "x-en" if right == "en" else "other"


def rows(report: rf.Report) -> list[dict[str, Any]]:
    """One dict per task with the COLUMNS."""
    out = []
    for name, t in report.tasks.items():
        data = report.data.get(name, rf.TaskData())
        lang = languages.task_language(name, data.language)
        lang = None if lang == "en" else lang
        out.append(
            dict(
                task=name,
                kind=t.kind,
                direction=direction(name, t.kind),
                language=lang,
                family=languages.family(lang) if lang else None,
                train_examples=data.train,
                examples_seen=t.examples_seen,
                perplexity=t.perplexity,
                bleu=t.bleu,
                unk_rate=data.unk_rate,
            )
        )
    return out


def write_csv(table_rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table_rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def overlap_matrix(usage: dict[str, dict[str, Sequence[float]]]) -> tuple[list[str], np.ndarray]:
    """Tasks (those with usage in every layer) and their pathway overlap [N, N] (module doc)."""
    layers = [layer for layer, by_task in usage.items() if by_task]
    if not layers:
        return [], np.zeros((0, 0))
    tasks = [t for t in usage[layers[0]] if all(t in usage[x] for x in layers)]
    total = np.zeros((len(tasks), len(tasks)))
    for layer in layers:
        p = np.array([np.nan_to_num(np.asarray(usage[layer][t], float)) for t in tasks])
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        total += np.minimum(p[:, None, :], p[None, :, :]).sum(-1)
    return tasks, total / len(layers)


def family_overlap(
    tasks: Sequence[str], overlap: np.ndarray, table_rows: Sequence[dict[str, Any]]
) -> rf.ReportOverlap:
    """Mean overlap of task pairs of one direction within a family vs across families."""
    info = {r["task"]: r for r in table_rows}
    within: dict[str, list[float]] = {}
    across: list[float] = []
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            ra, rb = info.get(a, {}), info.get(tasks[j], {})
            if not ra.get("family") or not rb.get("family"):
                continue
            if ra["direction"] != rb["direction"] or ra["language"] == rb["language"]:
                continue
            if ra["family"] == rb["family"]:
                within.setdefault(ra["family"], []).append(float(overlap[i, j]))
            else:
                across.append(float(overlap[i, j]))
    pairs = [v for vs in within.values() for v in vs]
    return rf.ReportOverlap(
        within=statistics.fmean(pairs) if pairs else None,
        across=statistics.fmean(across) if across else None,
        within_pairs=len(pairs),
        across_pairs=len(across),
        by_family={f: statistics.fmean(v) for f, v in sorted(within.items())},
    )


def summary(
    table_rows: Sequence[dict[str, Any]], overlap: rf.ReportOverlap | None
) -> rf.ReportMany:
    def ranked(key: str, best_high: bool) -> list[str]:
        have = [r for r in table_rows if r.get(key) is not None]
        have.sort(key=lambda r: (-r[key] if best_high else r[key], r["task"]))
        return [r["task"] for r in have]

    groups: dict[str, dict[str, list[float]]] = {}
    for r in table_rows:
        for group in (f"family: {r['family']}", f"direction: {r['direction']}"):
            if r["family"] is None and group.startswith("family"):
                continue
            g = groups.setdefault(group, {"bleu": [], "perplexity": [], "tasks": []})
            g["tasks"].append(1.0)
            for key in ("bleu", "perplexity"):
                if r.get(key) is not None:
                    g[key].append(float(r[key]))
    means = {
        name: rf.GroupMean(
            tasks=len(g["tasks"]),
            bleu=statistics.fmean(g["bleu"]) if g["bleu"] else None,
            perplexity=statistics.fmean(g["perplexity"]) if g["perplexity"] else None,
        )
        for name, g in sorted(groups.items())
    }
    return rf.ReportMany(
        by_bleu=ranked("bleu", True),
        by_perplexity=ranked("perplexity", False),
        groups=means,
        overlap=overlap,
        csv=CSV,
    )


def _pick(order: list[str], values: dict[str, float | None]) -> list[list[str]]:
    if not order:
        return []
    mid = order[len(order) // 2]
    picks = [("best", order[0]), ("median", mid), ("worst", order[-1])]
    return [[which, f"`{task}`", fmt(values.get(task))] for which, task in picks]


def markdown(report: rf.Report, many: rf.ReportMany | None) -> list[str]:
    if many is None:
        return []
    bleu = {n: t.bleu for n, t in report.tasks.items()}
    ppl = {n: t.perplexity for n, t in report.tasks.items()}
    lines = [f"## {len(report.tasks)} tasks at a glance", ""]
    lines += [f"Every task, sortable: [`{many.csv}`]({many.csv}).", ""]
    rows_ = _pick(many.by_bleu, bleu) + _pick(many.by_perplexity, ppl)
    if rows_:
        lines += [*table(["", "task", "BLEU / perplexity"], rows_), ""]
    group_rows = [
        [name, g.tasks, fmt(g.bleu), fmt(g.perplexity)] for name, g in many.groups.items()
    ]
    lines += [*table(["group", "tasks", "mean BLEU", "mean perplexity"], group_rows), ""]
    ov = many.overlap
    if ov is not None and ov.within is not None:
        lines += [
            f"Pathway overlap (expert-usage intersection, 1 = same experts): within a "
            f"language family {fmt(ov.within, 3)} ({ov.within_pairs} pairs), across families "
            f"{fmt(ov.across, 3)} ({ov.across_pairs} pairs); same direction only.",
            "",
        ]
    for key, alt in ((HEATMAP, "expert usage by task, clustered"), (BLEU_PLOT, "BLEU vs size")):
        if key in report.plots.values():
            lines += [f"![{alt}]({key})", ""]
    return lines


def heatmap(usage: dict[str, dict[str, Sequence[float]]], path: Path) -> bool:
    """Expert usage by task (layers side by side), rows ordered by the overlap dendrogram."""
    tasks, overlap = overlap_matrix(usage)
    if len(tasks) < 3:
        return False
    distance = np.clip(1.0 - overlap, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    link = hierarchy.linkage(squareform((distance + distance.T) / 2), method="average")
    layers = [layer for layer, by_task in usage.items() if by_task]
    grid = np.concatenate(
        [np.array([np.asarray(usage[x][t], float) for t in tasks]) for x in layers], axis=1
    )
    fig, axes = new_figure(1, 1, width=14.0, height=max(6.0, 0.12 * len(tasks)))
    axes[0, 0].remove()
    ax_d, ax_h = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 5]})
    tree = hierarchy.dendrogram(link, orientation="left", no_labels=True, ax=ax_d)
    order = tree["leaves"][::-1]
    ax_d.set(xlabel="1 - pathway overlap", yticks=[])
    image = ax_h.imshow(grid[order], aspect="auto", cmap="viridis", vmin=0.0)
    ax_h.set_yticks(range(len(tasks)), [tasks[i] for i in order], fontsize=5)
    edges = np.cumsum([len(next(iter(usage[x].values()))) for x in layers])[:-1]
    for edge in edges:
        ax_h.axvline(edge - 0.5, color="white", linewidth=1.0)
    ax_h.set(xlabel=f"expert ({' | '.join(layers)})", title="expert usage by task")
    fig.colorbar(image, ax=ax_h, label="fraction of tokens")
    return save(fig, path)


def bleu_vs_size(table_rows: Sequence[dict[str, Any]], path: Path) -> bool:
    have = [r for r in table_rows if r.get("bleu") is not None and r.get("train_examples")]
    if not have:
        return False
    fig, axes = new_figure(1, 1, width=7.0, height=4.5)
    ax = axes.flat[0]
    for d, marker in (("en-x", "o"), ("x-en", "s"), ("other", "^")):
        pts = [r for r in have if r["direction"] == d]
        if pts:
            ax.scatter([r["train_examples"] for r in pts], [r["bleu"] for r in pts],
                       marker=marker, label=d, alpha=0.7)  # fmt: skip
    ax.set(xscale="log", xlabel="training examples of the task", ylabel="BLEU")
    ax.legend()
    return save(fig, path)
