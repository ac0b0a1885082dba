"""The run report: ``report.json``, ``report.md`` and PNG plots, rebuilt from a run directory.

Inputs (all written by the training loop; any may be missing or incomplete, and the report
then says "n/a" instead of failing): ``config.yaml``, ``metrics.jsonl`` (train and eval lines,
see ``moe.training.metrics_log``), ``eval/summary.json`` (final evaluation: perplexity, BLEU,
decoded examples, per-task expert usage) and ``train_summary.json`` (throughput, examples seen,
data counts, pod measurement and projection).

``report.json`` follows docs/ARCHITECTURE.md: ``{"name", "tasks": {name: {"kind", "perplexity",
"bleu", "bleu_signature", "hypotheses", "references", "first_perplexity", "examples_seen"}},
"train": {...}, "data": {...}, "experts": {...}, "pod": {...}, "plots": {...}}``; missing values
are null. The markdown is rendered by ``moe.training.report_markdown``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe.training import report_markdown, report_pathways, report_plots
from moe.training.report_plots import number

PLOTS = {
    "loss": "loss.png",
    "expert_usage": "expert_usage.png",
    "routing": "routing.png",
    "throughput": "throughput.png",
    "pathways": report_pathways.PLOT,
}
POD_KEYS = (
    "slice",
    "devices",
    "processes",
    "measured_step_ms",
    "projected_step_ms",
    "projected_breakdown",
)


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, parsed; ``problems`` lists files missing or unreadable."""

    run_dir: Path
    config: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)  # metrics.jsonl lines with kind == train
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl lines with kind == eval
    summary: dict = field(default_factory=dict)  # eval/summary.json
    train_summary: dict = field(default_factory=dict)  # train_summary.json
    problems: list[str] = field(default_factory=list)


def _read(run_dir: Path, name: str, parse, problems: list[str]) -> Any:
    path = run_dir / name
    if not path.exists():
        problems.append(f"{name}: missing")
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"{name}: unreadable ({type(err).__name__})")
        return None
    return value if isinstance(value, dict) else None


def _metrics_lines(path: Path, problems: list[str]) -> list[dict]:
    """The JSON objects of ``metrics.jsonl``; blank and malformed lines (e.g. one cut short by
    an interrupted run) are skipped and counted in ``problems``."""
    if not path.exists():
        problems.append("metrics.jsonl: missing")
        return []
    lines, bad = [], 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if isinstance(line, dict):
            lines.append(line)
        else:
            bad += 1
    if bad:
        problems.append(f"metrics.jsonl: {bad} malformed line(s) skipped")
    return lines


def load(run_dir: str | Path) -> RunFiles:
    """Parse the files of ``run_dir``; never raises for missing or malformed files."""
    run_dir, problems = Path(run_dir), []
    config = _read(run_dir, "config.yaml", yaml.safe_load, problems) or {}
    lines = _metrics_lines(run_dir / "metrics.jsonl", problems)
    return RunFiles(
        run_dir=run_dir,
        config=config,
        train=[x for x in lines if x.get("kind") == "train"],
        evals=[x for x in lines if x.get("kind") == "eval"],
        summary=_read(run_dir, "eval/summary.json", json.loads, problems) or {},
        train_summary=_read(run_dir, "train_summary.json", json.loads, problems) or {},
        problems=problems,
    )


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def task_names(run: RunFiles) -> list[str]:
    """Tasks in config order, then any others that appear only in the metrics or summaries."""
    names = [str(t["name"]) for t in run.config.get("tasks") or [] if _dict(t).get("name")]
    found = [*_dict(run.summary.get("tasks")), *_dict(run.train_summary.get("examples_seen"))]
    for line in [*run.evals, *run.train]:
        found.extend(_dict(line.get("tasks")))
    for name in found:
        if name not in names:
            names.append(name)
    return names


def _eval_value(evals: list[dict], task: str, key: str, *, last: bool) -> float | None:
    values = [number(_dict(_dict(e.get("tasks")).get(task)).get(key)) for e in evals]
    values = [v for v in values if v is not None]
    return (values[-1] if last else values[0]) if values else None


def _count(x: Any) -> int | None:
    value = number(x)
    return int(value) if value is not None and value.is_integer() else None


def _tasks_section(run: RunFiles, names: list[str]) -> dict[str, dict]:
    kinds = {_dict(t).get("name"): _dict(t).get("kind") for t in run.config.get("tasks") or []}
    seen = _dict(run.train_summary.get("examples_seen"))
    out = {}
    for name in names:
        final = _dict(_dict(run.summary.get("tasks")).get(name))
        ppl = number(final.get("perplexity"))
        bleu = number(final.get("bleu"))
        out[name] = {
            "kind": final.get("kind") or kinds.get(name),
            "perplexity": ppl
            if ppl is not None
            else _eval_value(run.evals, name, "perplexity", last=True),
            "first_perplexity": _eval_value(run.evals, name, "perplexity", last=False),
            "bleu": bleu if bleu is not None else _eval_value(run.evals, name, "bleu", last=True),
            "bleu_signature": final.get("bleu_signature"),
            "hypotheses": final.get("hypotheses"),
            "references": final.get("references"),
            "examples_seen": _count(seen.get(name, final.get("examples_seen"))),
        }
    return out


def _train_section(run: RunFiles) -> dict[str, Any]:
    ts = run.train_summary
    last = run.train[-1] if run.train else {}
    out = {k: v for k, v in ts.items() if number(v) is not None}  # steps, wall_time_s, ...
    out.setdefault("steps", _count(last.get("step")))
    for key in ("tokens_per_second", "step_time_ms"):
        out.setdefault(key, number(last.get(key)))
    out["final_loss"] = number(last.get("loss"))
    out["examples_seen"] = _dict(ts.get("examples_seen")) or None
    return out


def moe_layers(run: RunFiles) -> list[str]:
    """MoE layer names in the order they first appear in the train metrics or expert usage."""
    names: list[str] = []
    for source in [
        *(_dict(x.get("moe")) for x in run.train),
        _dict(run.summary.get("expert_usage")),
    ]:
        names.extend(n for n in source if n not in names)
    return names


def _experts_section(run: RunFiles, layers: list[str]) -> dict[str, Any]:
    moe_cfg = _dict(run.config.get("moe"))
    dense_cfg = moe_cfg.get("every") == 0
    out: dict[str, Any] = {
        "has_moe": bool(layers) or (bool(moe_cfg) and not dense_cfg),
        "num_experts": None if dense_cfg else moe_cfg.get("num_experts"),
        "layers": {},
        "usage": _dict(run.summary.get("expert_usage")),
    }
    for layer in layers:
        rows = [x["moe"][layer] for x in run.train if layer in _dict(x.get("moe"))]
        stats = {}
        for key in ("dropped_fraction", "load_cv", "aux_loss", "z_loss"):
            values = [v for v in (number(_dict(r).get(key)) for r in rows) if v is not None]
            stats[f"final_{key}"] = values[-1] if values else None
            stats[f"mean_{key}"] = sum(values) / len(values) if values else None
        out["layers"][layer] = stats
    return out


def _pod_section(run: RunFiles) -> dict[str, Any]:
    pod = {key: None for key in POD_KEYS} | _dict(run.train_summary.get("pod"))
    for key, value in _dict(run.config.get("pod")).items():
        pod.setdefault(f"config_{key}", value)
    measured, projected = number(pod.get("measured_step_ms")), number(pod.get("projected_step_ms"))
    pod["measured_over_projected"] = measured / projected if measured and projected else None
    return pod


def _usage_for_plot(run: RunFiles, layers: list[str]) -> tuple[dict, str]:
    """Per-task expert usage from the final eval, else the last train step's overall load."""
    usage = _dict(run.summary.get("expert_usage"))
    if usage:
        return usage, "final evaluation, per task"
    last = {}
    for line in run.train:
        for layer, stats in _dict(line.get("moe")).items():
            if isinstance(_dict(stats).get("expert_load"), list):
                last[layer] = {"all tasks": stats["expert_load"]}
    return last, "last training step, all tasks together"


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build(run_dir: str | Path) -> dict:
    """Write ``report.json``, ``report.md`` and the plots into ``run_dir``; return the report."""
    run = load(run_dir)
    names, layers = task_names(run), moe_layers(run)
    usage, usage_source = _usage_for_plot(run, layers)
    path = run.run_dir
    written = {
        "loss": report_plots.loss_curves(run.train, names, path / PLOTS["loss"]),
        "expert_usage": report_plots.expert_usage(usage, path / PLOTS["expert_usage"]),
        "routing": report_plots.routing_curves(run.train, layers, path / PLOTS["routing"]),
        "throughput": report_plots.throughput(run.train, path / PLOTS["throughput"]),
    }
    pathways = report_pathways.section(path, run.config, run.summary)
    if pathways:
        written["pathways"] = report_pathways.diagram(pathways, usage, path / PLOTS["pathways"])
    report = _clean(
        {
            "name": run.config.get("name") or path.name,
            "tasks": _tasks_section(run, names),
            "train": _train_section(run),
            "data": _dict(run.train_summary.get("data")),
            "experts": {**_experts_section(run, layers), "usage_source": usage_source},
            "pod": _pod_section(run),
            "pathways": pathways,
            "plots": {k: PLOTS[k] for k, ok in written.items() if ok},
            "problems": run.problems,
        }
    )
    (path / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    markdown = report_markdown.render(report, run.summary)
    (path / "report.md").write_text(markdown, encoding="utf-8")
    return report
