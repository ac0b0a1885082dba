"""The run report: ``report.json``, ``report.md`` and PNG plots, rebuilt from a run directory.

Inputs (the typed files of ``moe.runfiles``; any may be missing or incomplete, and the report
then says "n/a" instead of failing): ``config.yaml``, ``metrics.jsonl`` (train and eval lines),
``eval/summary.json`` (final evaluation: perplexity, BLEU, decoded examples, per-task expert
usage), ``train_summary.json`` (throughput, examples seen, data counts, pod measurement and
projection), and ``serving.json`` / ``distill.json`` where ``moe quantize`` / ``moe distill``
wrote them (``moe.report.serving``). ``report.json`` is a ``moe.runfiles.Report``; the
markdown is rendered from it by ``moe.report.markdown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe import runfiles as rf
from moe.eval import bleu
from moe.report import many, markdown, pathways, plots, serving

PLOTS = {
    "loss": "loss.png",
    "expert_usage": "expert_usage.png",
    "routing": "routing.png",
    "throughput": "throughput.png",
    "validation": "validation.png",
    "pathways": pathways.PLOT,
    "many_heatmap": many.HEATMAP,
    "bleu_vs_size": many.BLEU_PLOT,
}
LAYER_STATS = ("dropped_fraction", "load_cv", "aux_loss", "z_loss", "device_fanout")


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, parsed; ``problems`` lists files missing or unreadable."""

    run_dir: Path
    config: dict = field(default_factory=dict)  # config.yaml as written (any keys may be absent)
    train: list[rf.TrainLine] = field(default_factory=list)
    evals: list[rf.EvalLine] = field(default_factory=list)
    summary: rf.EvalSummary = field(default_factory=rf.EvalSummary)
    train_summary: rf.TrainSummary = field(default_factory=rf.TrainSummary)
    problems: list[str] = field(default_factory=list)


def _read_config(path: Path, problems: list[str]) -> dict:
    if not path.exists():
        problems.append("config.yaml: missing")
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"config.yaml: unreadable ({type(err).__name__})")
        return {}
    return value if isinstance(value, dict) else {}


def load(run_dir: str | Path) -> RunFiles:
    """Parse the files of ``run_dir``; never raises for missing or malformed files."""
    run_dir, problems = Path(run_dir), []
    config = _read_config(run_dir / "config.yaml", problems)
    train, evals, problem = rf.read_metrics(run_dir / "metrics.jsonl")
    if problem:
        problems.append(f"metrics.jsonl: {problem}")
    files = {}
    for name, model in (
        ("eval/summary.json", rf.EvalSummary),
        ("train_summary.json", rf.TrainSummary),
    ):
        files[name], problem = rf.read_json(run_dir / name, model)
        if problem:
            problems.append(f"{name}: {problem}")
    return RunFiles(
        run_dir, config, train, evals, files["eval/summary.json"], files["train_summary.json"],
        problems,
    )  # fmt: skip


def _config_tasks(config: dict) -> dict[str, str | None]:
    """``{name: kind}`` of the tasks in config.yaml, in order."""
    tasks = config.get("tasks") if isinstance(config.get("tasks"), list) else []
    return {str(t["name"]): t.get("kind") for t in tasks if isinstance(t, dict) and t.get("name")}


def task_names(run: RunFiles) -> list[str]:
    """Tasks in config order, then any others that appear only in the metrics or summaries."""
    names = list(_config_tasks(run.config))
    found = [*run.summary.tasks, *run.train_summary.examples_seen]
    for line in [*run.evals, *run.train]:
        found.extend(line.tasks)
    for name in found:
        if name not in names:
            names.append(name)
    return names


def _first_valid(evals: list[rf.EvalLine], task: str) -> tuple[float | None, int | None]:
    """(perplexity, step) of the task's first evaluation on the validation split."""
    for e in sorted(evals, key=lambda e: e.step or 0):
        t = e.tasks.get(task)
        # older metrics files wrote no split: their lines during training were valid ones
        if e.split in ("valid", None) and t is not None and t.perplexity is not None:
            return t.perplexity, e.step
    return None, None


def _last_eval(run: RunFiles) -> rf.EvalLine:
    """The final evaluation's line when eval/summary.json is missing: the last one."""
    return max(run.evals, key=lambda e: e.step or 0, default=rf.EvalLine())


def _tasks_section(run: RunFiles, names: list[str]) -> dict[str, rf.ReportTask]:
    """Per task: the final evaluation (eval/summary.json: its split and step are the report's
    ``final_split``/``final_step``) and the first validation perplexity."""
    kinds = _config_tasks(run.config)
    seen = run.train_summary.examples_seen
    out = {}
    for name in names:
        final = run.summary.tasks.get(name, rf.TaskEval())
        if name not in run.summary.tasks:
            final = rf.TaskEval(**_last_eval(run).tasks.get(name, rf.EvalMetrics()).model_dump())
        first, first_step = _first_valid(run.evals, name)
        out[name] = rf.ReportTask(
            kind=final.kind or kinds.get(name),
            perplexity=final.perplexity,
            first_perplexity=first,
            first_step=first_step,
            examples_seen=seen.get(name),
            **final.model_dump(
                include={
                    "bleu", "bleu_signature", "chrf", "chrf_signature", "decoded", "sample_seed",
                    "split_size", "empty_fraction", "looping_fraction", "hypotheses", "references",
                }
            ),
        )  # fmt: skip
    return out


def _warnings(tasks: dict[str, rf.ReportTask]) -> list[str]:
    lines = (
        bleu.degenerate_warning(n, t.empty_fraction, t.looping_fraction) for n, t in tasks.items()
    )
    return [line for line in lines if line]


def _train_section(run: RunFiles) -> rf.ReportTrain:
    ts, last = run.train_summary, run.train[-1] if run.train else rf.TrainLine()
    return rf.ReportTrain(
        steps=ts.steps if ts.steps is not None else last.step,
        resumed_from=ts.resumed_from,
        wall_time_s=ts.wall_time_s,
        tokens_per_second=ts.tokens_per_second or last.tokens_per_second,
        step_time_ms=ts.step_time_ms or last.step_time_ms,
        skipped_steps=ts.skipped_steps,
        examples_per_step=ts.examples_per_step,
        padding_fraction=ts.padding_fraction,
        model_flops_per_step=ts.model_flops_per_step,
        flop_utilisation=ts.flop_utilisation,
        load_average=ts.load_average,
        timing=ts.timing,
        final_loss=last.loss,
        examples_seen=ts.examples_seen or None,
    )


def moe_layers(run: RunFiles) -> list[str]:
    """MoE layer names in the order they first appear in the train metrics or expert usage."""
    names: list[str] = []
    for source in [*(x.moe for x in run.train), run.summary.expert_usage]:
        names.extend(n for n in source if n not in names)
    return names


def _experts_section(run: RunFiles, layers: list[str]) -> rf.ReportExperts:
    moe_cfg = run.config.get("moe") if isinstance(run.config.get("moe"), dict) else {}
    dense_cfg = moe_cfg.get("every") == 0
    stats = {}
    for layer in layers:
        row = {}
        for key in LAYER_STATS:
            values = [v for v in (x.layer_stat(layer, key) for x in run.train) if v is not None]
            row[f"final_{key}"] = values[-1] if values else None
            row[f"mean_{key}"] = sum(values) / len(values) if values else None
        stats[layer] = rf.LayerStats(**row)
    bias = {}  # the last logged bias of each layer (the final step is always logged)
    for line in run.train:
        bias.update({k: v["router_bias"] for k, v in line.moe.items() if "router_bias" in v})
    return rf.ReportExperts(
        has_moe=bool(layers) or (bool(moe_cfg) and not dense_cfg),
        num_experts=None if dense_cfg else moe_cfg.get("num_experts"),
        layers=stats,
        usage=run.summary.expert_usage,
        router_bias={k: v for k, v in bias.items() if isinstance(v, list)},
    )


def _pod_section(run: RunFiles) -> rf.ReportPod:
    measured = run.train_summary.pod or rf.PodSummary()
    pod = rf.ReportPod(**measured.model_dump())
    config = run.config.get("pod") if isinstance(run.config.get("pod"), dict) else {}
    pod.topology = pod.topology or config.get("topology")
    pod.slice = pod.slice or (str(config["slice"]) if config.get("slice") else None)
    pod.processes = pod.processes or config.get("processes")
    # the cost model's accuracy: like with like, this host's measured step over its
    # projection for this host (the slice's projection is a different machine)
    m, p = pod.measured_step_ms, pod.projected_cpu_step_ms
    pod.measured_over_projected = m / p if m and p else None
    return pod


def _usage_for_plot(run: RunFiles) -> tuple[dict[str, dict[str, Any]], str]:
    """Per-task expert usage from the final eval, else the last train step's overall load."""
    if run.summary.expert_usage:
        return run.summary.expert_usage, "final evaluation, per task"
    last = {}
    for line in run.train:
        for layer, stats in line.moe.items():
            if isinstance(stats.get("expert_load"), list):
                last[layer] = {"all tasks": stats["expert_load"]}
    return last, "last training step, all tasks together"


def build(run_dir: str | Path) -> rf.Report:
    """Write ``report.json``, ``report.md`` and the plots into ``run_dir``; return the report."""
    run = load(run_dir)
    names, layers = task_names(run), moe_layers(run)
    usage, usage_source = _usage_for_plot(run)
    path = run.run_dir
    crowded = len(names) > many.MANY
    written = {
        "loss": plots.loss_curves(run.train, names, path / PLOTS["loss"]),
        "expert_usage": not crowded and plots.expert_usage(usage, path / PLOTS["expert_usage"]),
        "routing": plots.routing_curves(run.train, layers, path / PLOTS["routing"]),
        "throughput": plots.throughput(run.train, path / PLOTS["throughput"]),
        "validation": plots.validation_curves(run.evals, names, path / PLOTS["validation"]),
    }
    section = pathways.section(path, run.config, run.summary)
    if section and not crowded:  # one panel per task: the clustered heatmap replaces it
        written["pathways"] = pathways.diagram(section, usage, path / PLOTS["pathways"])
    quantised, distilled = serving.load(path)  # serving.json, distill.json
    experts = _experts_section(run, layers)
    experts.usage_source = usage_source
    tasks = _tasks_section(run, names)
    summary = None
    if crowded:  # the many-task report: tasks.csv, summary, clustered heatmap, BLEU vs size
        table_rows = many.rows(rf.Report(tasks=tasks, data=run.train_summary.data))
        many.write_csv(table_rows, path / many.CSV)
        order, overlap = many.overlap_matrix(run.summary.expert_usage)
        fam = many.family_overlap(order, overlap, table_rows) if order else None
        summary = many.summary(table_rows, fam)
        written["many_heatmap"] = many.heatmap(run.summary.expert_usage, path / many.HEATMAP)
        written["bleu_vs_size"] = many.bleu_vs_size(table_rows, path / many.BLEU_PLOT)
    report = rf.Report(
        name=run.config.get("name") or path.name,
        many=summary,
        final_split=run.summary.split if run.summary.tasks else _last_eval(run).split,
        final_step=run.summary.step if run.summary.tasks else _last_eval(run).step,
        warnings=_warnings(tasks),
        tasks=tasks,
        train=_train_section(run),
        data=run.train_summary.data,
        experts=experts,
        pod=_pod_section(run),
        pathways=section,
        serving=quantised,
        distill=distilled,
        plots={k: PLOTS[k] for k, ok in written.items() if ok},
        problems=run.problems,
    )
    rf.write_json(path / "report.json", report)
    (path / "report.md").write_text(markdown.render(report, run.summary), encoding="utf-8")
    return report
