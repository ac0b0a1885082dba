"""``report.md``: the run report as markdown, rendered from the ``moe.runfiles.Report`` that
``report.build`` writes to ``report.json``. Missing numbers print as "n/a"; BLEU of a
language-model task as "–"."""

from __future__ import annotations

from moe import runfiles as rf
from moe.report import many, pathways, serving
from moe.report.format import DASH, NA, cell, fmt, table


def _bleu(task: rf.ReportTask) -> str:
    if task.bleu is None and task.kind != "translate":
        return DASH
    return fmt(task.bleu)


def _final_label(report: rf.Report) -> str:
    """What the final column holds: 'test, final, step 450'; 'valid, step 8' for a `moe eval
    --split valid` (never called final: the final evaluation is on the test split)."""
    split, step = report.final_split, report.final_step
    at = f", step {fmt(step)}" if step is not None else ""
    if split == "test":
        return f"test, final{at}"
    return f"{split or 'split n/a'}{at}"


def _first_label(report: rf.Report) -> str:
    steps = {t.first_step for t in report.tasks.values() if t.first_step is not None}
    return f"valid, step {fmt(steps.pop())}" if len(steps) == 1 else "valid, first evaluation"


def _summary(report: rf.Report) -> str:
    train, experts, tasks = report.train, report.experts, report.tasks
    kinds = sorted({t.kind for t in tasks.values() if t.kind})
    parts = [
        f"Run `{report.name}` trained {len(tasks)} task(s)"
        + (f" ({', '.join(kinds)})" if kinds else "")
        + f" for {fmt(train.steps)} steps in {fmt(train.wall_time_s, 1)} s"
        + f" at {fmt(train.tokens_per_second, 0)} tokens/s."
    ]
    if experts.has_moe:
        parts.append(
            f"The model has {len(experts.layers) or NA} MoE layer(s) with "
            f"{fmt(experts.num_experts)} experts each."
        )
    else:
        parts.append("The model has no MoE layers (dense feed-forward blocks only).")
    for name, t in tasks.items() if report.many is None else ():
        text = f"`{name}`: perplexity {fmt(t.perplexity)} ({_final_label(report)}"
        if t.first_perplexity is not None:
            text += f"; valid at step {fmt(t.first_step)}: {fmt(t.first_perplexity)}"
        text += ")"
        if t.bleu is not None:
            text += f", BLEU {fmt(t.bleu)}, chrF {fmt(t.chrf)}"
        parts.append(text + ".")
    return " ".join(parts)


def _tasks(report: rf.Report) -> list[str]:
    rows = [
        [
            f"`{name}`",
            t.kind or NA,
            fmt(t.first_perplexity),
            fmt(t.perplexity),
            _bleu(t),
            DASH if t.chrf is None and t.kind != "translate" else fmt(t.chrf),
            fmt(t.examples_seen),
        ]
        for name, t in report.tasks.items()
    ]
    header = [
        "task",
        "kind",
        f"perplexity ({_first_label(report)})",
        f"perplexity ({_final_label(report)})",
        "BLEU",
        "chrF",
        "examples seen",
    ]
    lines = ["## Tasks", "", *table(header, rows), ""]
    lines += [f"**Warning**: {w}." for w in report.warnings] + ([""] if report.warnings else [])
    decoded = {n: t for n, t in report.tasks.items() if t.looping_fraction is not None}
    if decoded:
        shares = "; ".join(
            f"`{n}` {t.empty_fraction:.0%} empty, {t.looping_fraction:.0%} looping"
            for n, t in decoded.items()
        )
        lines += [f"Decoded lines (a word three times in a row is looping): {shares}.", ""]
    for name, t in report.tasks.items():
        if t.decoded is not None:
            lines.append(
                f"- `{name}` BLEU and chrF on a random sample of {fmt(t.decoded)} of the "
                f"{fmt(t.split_size)} {report.final_split or ''} sentences (seed {t.sample_seed})"
            )
        if t.bleu_signature:
            lines.append(f"- `{name}` BLEU signature: `{t.bleu_signature}`")
        if t.chrf_signature:
            lines.append(f"- `{name}` chrF signature: `{t.chrf_signature}`")
        if t.hypotheses:
            lines.append(f"- `{name}` decodes: `{t.hypotheses}` vs `{t.references}`")
    return lines + [""]


def _plot(report: rf.Report, key: str, alt: str) -> list[str]:
    name = report.plots.get(key)
    return [f"![{alt}]({name})", ""] if name else [f"_{alt}: no data to plot._", ""]


def _training(report: rf.Report) -> list[str]:
    train = report.train
    rows = [
        ["steps", fmt(train.steps)],
        ["wall time (s)", fmt(train.wall_time_s, 1)],
        ["target tokens / s (steady state)", fmt(train.tokens_per_second, 0)],
        ["step time (ms, steady state)", fmt(train.step_time_ms, 1)],
        ["examples / step", fmt(train.examples_per_step, 1)],
        ["padding (share of positions)", fmt(train.padding_fraction, 3)],
        ["model FLOPs / step (all devices)", _sci(train.model_flops_per_step)],
        ["FLOP utilisation (of the host's matmul rate)", fmt(train.flop_utilisation, 3)],
        ["host load average (1 min, at the end)", fmt(train.load_average, 1)],
        ["final training loss", fmt(train.final_loss, 3)],
    ]
    if train.skipped_steps is not None:
        rows.append(["skipped steps (non-finite)", fmt(train.skipped_steps)])
    lines = ["## Training", "", *table(["", "value"], rows), ""]
    phases = [(k.removesuffix("_s"), v) for k, v in train.timing.model_dump().items() if v]
    if phases:
        lines += ["Where the time went (s): " + ", ".join(f"{k} {v:,.1f}" for k, v in phases), ""]
    lines += _plot(report, "loss", "Training loss per task")
    lines += _plot(report, "validation", "Validation perplexity per task")
    lines += _plot(report, "throughput", "Throughput and step time")
    if report.data:
        keys = ["train", "valid", "test", "malformed", "duplicates"]
        rows = [[f"`{n}`", *(fmt(getattr(d, k)) for k in keys)] for n, d in report.data.items()]
        lines += ["### Data", "", *table(["task", *keys], rows), ""]
    else:
        lines += ["Data counts: n/a (no train_summary.json).", ""]
    return lines


def _sci(x: float | None) -> str:
    return NA if x is None else f"{x:.3e}"


def _experts(report: rf.Report) -> list[str]:
    experts = report.experts
    if not experts.has_moe:
        return ["## Experts", "", "The model has no MoE layers: no routing statistics.", ""]
    fanout = any(s.final_device_fanout is not None for s in experts.layers.values())
    rows = [
        [
            f"`{layer}`",
            fmt(s.final_dropped_fraction, 4),
            fmt(s.mean_dropped_fraction, 4),
            fmt(s.final_load_cv, 3),
            fmt(s.final_aux_loss, 4),
            fmt(s.final_z_loss, 4),
            *([fmt(s.final_device_fanout, 2)] if fanout else []),
        ]
        for layer, s in experts.layers.items()
    ]
    header = ["layer", "dropped (final)", "dropped (mean)", "load CV (final)", "aux loss", "z loss"]
    header += ["device fan-out"] if fanout else []  # logged by token-choice routers
    lines = ["## Experts", "", f"Experts per MoE layer: {fmt(experts.num_experts)}.", ""]
    lines += table(header, rows) if rows else ["Routing statistics: n/a (none logged)."]
    lines += _router_bias(experts.router_bias)
    lines += ["", f"Expert usage ({experts.usage_source}):", ""]
    lines += _plot(report, "expert_usage", "Expert usage, tasks x experts, per MoE layer")
    lines += _plot(report, "routing", "Drop rate and load CV per MoE layer")
    return lines


def _router_bias(bias: dict[str, list]) -> list[str]:
    """The final selection bias of each layer (auxiliary-loss-free balancing), if any."""
    if not bias:
        return []
    rows = []
    for layer, values in bias.items():
        b = [v for v in values if v is not None]
        low, high = (min(b), max(b)) if b else (None, None)
        rows.append([f"`{layer}`", fmt(low, 4), fmt(high, 4), " ".join(fmt(v, 3) for v in b)])
    header = ["layer", "min", "max", "bias per expert"]
    return ["", "Router bias (loss-free balancing), final:", "", *table(header, rows)]


def _pod(report: rf.Report) -> list[str]:
    pod = report.pod
    target = pod.target or f"{pod.topology or NA} {pod.slice or ''}".strip()
    rows = [
        ["pod slice", f"{pod.topology or NA} {pod.slice or ''}".strip()],
        ["devices", fmt(pod.devices)],
        ["processes", fmt(pod.processes)],
        ["measured step time on this CPU host (ms)", fmt(pod.measured_step_ms, 1)],
        ["projected step time on this CPU host (ms)", fmt(pod.projected_cpu_step_ms, 1)],
        ["cost model accuracy here (measured / projected)", fmt(pod.measured_over_projected, 2)],
    ]
    lines = ["## Pod", "", *table(["", "value"], rows), ""]
    lines += [
        f"Projected step time on the real slice ({target}): "
        f"{fmt(pod.projected_step_ms, 3)} ms (the same program, priced on that hardware).",
        "",
    ]
    if pod.projected_breakdown:
        rows = [[k, fmt(v, 3)] for k, v in pod.projected_breakdown.items()]
        lines += ["Projected breakdown:", "", *table(["part", "value"], rows), ""]
    return lines


def _examples(summary: rf.EvalSummary, per_task: int = 3) -> list[str]:
    lines = ["## Decoded examples", ""]
    shown = False
    for name, task in summary.tasks.items():
        if not task.examples:
            continue
        shown = True
        lines += [f"### `{name}`", ""]
        for ex in task.examples[:per_task]:
            for key in ("source", "reference", "hypothesis"):
                lines.append(f"- **{key}**: {cell(getattr(ex, key))}")
            lines.append("")
    return lines if shown else lines + ["n/a (no decoded examples in eval/summary.json).", ""]


def render(report: rf.Report, summary: rf.EvalSummary) -> str:
    """The whole report.md for a report and the run's final evaluation summary."""
    lines = [f"# Run report: {report.name}", "", _summary(report), ""]
    if report.problems:
        lines += ["Missing or unreadable: " + "; ".join(report.problems) + ".", ""]
    lines += _tasks(report) if report.many is None else many.markdown(report, report.many)
    lines += _training(report) + _experts(report)
    lines += pathways.markdown(report.pathways, "pathways" in report.plots)
    lines += serving.markdown(report)
    lines += _pod(report) + (_examples(summary) if report.many is None else [])
    return "\n".join(lines).rstrip() + "\n"
