"""``report.md``: the run report as markdown, rendered from the dict that ``report.build``
writes to ``report.json``. Missing numbers print as "n/a"; BLEU of a language-model task as "–"."""

from __future__ import annotations

from typing import Any

NA = "n/a"
DASH = "–"


def fmt(x: Any, digits: int = 2) -> str:
    """A number with thousands separators and ``digits`` decimals (none for integers); n/a."""
    if x is None or isinstance(x, bool):
        return NA
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _cell(text: Any) -> str:
    """Markdown-table-safe text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _bleu(task: dict) -> str:
    if task.get("bleu") is None and task.get("kind") != "translate":
        return DASH
    return fmt(task.get("bleu"))


def _summary(report: dict) -> str:
    train, experts, tasks = report["train"], report["experts"], report["tasks"]
    kinds = sorted({t["kind"] for t in tasks.values() if t.get("kind")})
    parts = [
        f"Run `{report['name']}` trained {len(tasks)} task(s)"
        + (f" ({', '.join(kinds)})" if kinds else "")
        + f" for {fmt(train.get('steps'))} steps in {fmt(train.get('wall_time_s'), 1)} s"
        + f" at {fmt(train.get('tokens_per_second'), 0)} tokens/s."
    ]
    if experts["has_moe"]:
        parts.append(
            f"The model has {len(experts['layers']) or NA} MoE layer(s) with "
            f"{fmt(experts.get('num_experts'))} experts each."
        )
    else:
        parts.append("The model has no MoE layers (dense feed-forward blocks only).")
    for name, t in tasks.items():
        text = f"`{name}`: perplexity {fmt(t['perplexity'])}"
        if t.get("first_perplexity") is not None:
            text += f" (first evaluation {fmt(t['first_perplexity'])})"
        if t.get("bleu") is not None:
            text += f", BLEU {fmt(t['bleu'])}"
        parts.append(text + ".")
    return " ".join(parts)


def _tasks(report: dict) -> list[str]:
    rows = [
        [
            f"`{name}`",
            t.get("kind") or NA,
            fmt(t.get("first_perplexity")),
            fmt(t.get("perplexity")),
            _bleu(t),
            fmt(t.get("examples_seen")),
        ]
        for name, t in report["tasks"].items()
    ]
    header = [
        "task",
        "kind",
        "perplexity (first eval)",
        "perplexity (final)",
        "BLEU",
        "examples seen",
    ]
    lines = ["## Tasks", "", *_table(header, rows), ""]
    for name, t in report["tasks"].items():
        if t.get("bleu_signature"):
            lines.append(f"- `{name}` BLEU signature: `{t['bleu_signature']}`")
        if t.get("hypotheses"):
            lines.append(f"- `{name}` decodes: `{t['hypotheses']}` vs `{t.get('references')}`")
    return lines + [""]


def _plot(report: dict, key: str, alt: str) -> list[str]:
    name = report["plots"].get(key)
    return [f"![{alt}]({name})", ""] if name else [f"_{alt}: no data to plot._", ""]


def _training(report: dict) -> list[str]:
    train = report["train"]
    rows = [
        ["steps", fmt(train.get("steps"))],
        ["wall time (s)", fmt(train.get("wall_time_s"), 1)],
        ["tokens / s", fmt(train.get("tokens_per_second"), 0)],
        ["step time (ms)", fmt(train.get("step_time_ms"), 1)],
        ["final training loss", fmt(train.get("final_loss"), 3)],
    ]
    if "skipped_steps" in train:
        rows.append(["skipped steps (non-finite)", fmt(train["skipped_steps"])])
    lines = ["## Training", "", *_table(["", "value"], rows), ""]
    lines += _plot(report, "loss", "Training loss per task")
    lines += _plot(report, "throughput", "Throughput and step time")
    data = report.get("data") or {}
    if data:
        keys = ["train", "valid", "test", "malformed", "duplicates"]
        rows = [
            [f"`{n}`", *(fmt(d.get(k) if isinstance(d, dict) else None) for k in keys)]
            for n, d in data.items()
        ]
        lines += ["### Data", "", *_table(["task", *keys], rows), ""]
    else:
        lines += ["Data counts: n/a (no train_summary.json).", ""]
    return lines


def _experts(report: dict) -> list[str]:
    experts = report["experts"]
    if not experts["has_moe"]:
        return ["## Experts", "", "The model has no MoE layers: no routing statistics.", ""]
    rows = [
        [
            f"`{layer}`",
            fmt(s.get("final_dropped_fraction"), 4),
            fmt(s.get("mean_dropped_fraction"), 4),
            fmt(s.get("final_load_cv"), 3),
            fmt(s.get("final_aux_loss"), 4),
            fmt(s.get("final_z_loss"), 4),
        ]
        for layer, s in experts["layers"].items()
    ]
    header = ["layer", "dropped (final)", "dropped (mean)", "load CV (final)", "aux loss", "z loss"]
    lines = ["## Experts", "", f"Experts per MoE layer: {fmt(experts.get('num_experts'))}.", ""]
    lines += _table(header, rows) if rows else ["Routing statistics: n/a (none logged)."]
    lines += ["", f"Expert usage ({experts.get('usage_source')}):", ""]
    lines += _plot(report, "expert_usage", "Expert usage, tasks x experts, per MoE layer")
    lines += _plot(report, "routing", "Drop rate and load CV per MoE layer")
    return lines


def _pod(report: dict) -> list[str]:
    pod = report["pod"]
    topology = pod.get("config_topology")
    slice_ = pod.get("slice") or pod.get("config_slice")
    rows = [
        ["pod slice", f"{topology or NA} {slice_ or ''}".strip()],
        ["devices", fmt(pod.get("devices"))],
        ["processes", fmt(pod.get("processes", pod.get("config_processes")))],
        ["measured step time here (ms)", fmt(pod.get("measured_step_ms"), 1)],
        ["projected step time on the slice (ms)", fmt(pod.get("projected_step_ms"), 3)],
        ["measured / projected", fmt(pod.get("measured_over_projected"), 1)],
    ]
    lines = ["## Pod", "", *_table(["", "value"], rows), ""]
    breakdown = pod.get("projected_breakdown")
    if isinstance(breakdown, dict) and breakdown:
        rows = [[k, fmt(v, 3) if isinstance(v, (int, float)) else v] for k, v in breakdown.items()]
        lines += ["Projected breakdown:", "", *_table(["part", "value"], rows), ""]
    return lines


def _examples(summary: dict, per_task: int = 3) -> list[str]:
    lines = ["## Decoded examples", ""]
    tasks = summary.get("tasks") if isinstance(summary.get("tasks"), dict) else {}
    shown = False
    for name, task in tasks.items():
        examples = task.get("examples") if isinstance(task, dict) else None
        if not isinstance(examples, list) or not examples:
            continue
        shown = True
        lines += [f"### `{name}`", ""]
        for ex in examples[:per_task]:
            ex = ex if isinstance(ex, dict) else {}
            for key in ("source", "reference", "hypothesis"):
                lines.append(f"- **{key}**: {_cell(ex.get(key, NA))}")
            lines.append("")
    return lines if shown else lines + ["n/a (no decoded examples in eval/summary.json).", ""]


def _pathways(report: dict) -> list[str]:
    from moe.training.report_pathways import markdown  # it renders with this module's helpers

    return markdown(report.get("pathways"), "pathways" in (report.get("plots") or {}))


def render(report: dict, summary: dict) -> str:
    """The whole report.md for a ``report.json`` dict and the run's ``eval/summary.json``."""
    lines = [f"# Run report: {report['name']}", "", _summary(report), ""]
    if report.get("problems"):
        lines += ["Missing or unreadable: " + "; ".join(report["problems"]) + ".", ""]
    lines += _tasks(report) + _training(report) + _experts(report) + _pathways(report)
    lines += _pod(report) + _examples(summary)
    return "\n".join(lines).rstrip() + "\n"
