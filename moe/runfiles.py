"""The typed files of a run directory, shared by the code that writes them and the report that
reads them back.

    train_summary.json   TrainSummary   written by the training loop at the end of a run
    eval/summary.json    EvalSummary    written by the final evaluation (moe train / moe eval)
    eval/routing_stats.json  RoutingStats  co-activation counts of that evaluation (moe place)
    metrics.jsonl        TrainLine / EvalLine, one JSON object a line
    report.json          Report         written by ``moe.report.build``

Every field has a default, so a file written by an older version (or cut short) still reads;
unknown keys are ignored; non-finite numbers read as None (JSON has no NaN). Writers build the
models and call :func:`write_json`, so the keys cannot drift from what readers expect.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


Number = Annotated[float | None, BeforeValidator(_finite)]
Count = Annotated[int | None, BeforeValidator(_finite)]


class RunFile(BaseModel):
    model_config = ConfigDict(extra="ignore")


M = TypeVar("M", bound=BaseModel)


# --- train_summary.json ---------------------------------------------------------------------


class TaskData(RunFile):
    """Examples per split of one task, and what the source reader skipped."""

    train: Count = None
    valid: Count = None
    test: Count = None
    malformed: Count = None
    duplicates: Count = None
    too_long: Count = None
    fallback_used: bool | None = None


class PodSummary(RunFile):
    """Measured step time on this host and the cost model's projections (``moe.pod``)."""

    topology: str | None = None
    slice: str | None = None
    devices: Count = None
    processes: Count = None
    mesh: dict[str, int] = Field(default_factory=dict)
    measured_step_ms: Number = None
    projected_cpu_step_ms: Number = None
    target: str | None = None
    projected_step_ms: Number = None
    projected_breakdown: dict[str, Number] = Field(default_factory=dict)


class TrainSummary(RunFile):
    steps: Count = None
    resumed_from: Count = None
    wall_time_s: Number = None
    tokens_per_second: Number = None
    step_time_ms: Number = None
    skipped_steps: Count = None
    examples_seen: dict[str, int] = Field(
        default_factory=dict, description="Training examples per task, all processes together."
    )
    data: dict[str, TaskData] = Field(default_factory=dict)
    pod: PodSummary | None = None


# --- eval/summary.json ----------------------------------------------------------------------


class DecodedExample(RunFile):
    source: str = ""
    reference: str = ""
    hypothesis: str = ""


class TaskEval(RunFile):
    kind: str | None = None
    loss: Number = None
    perplexity: Number = None
    tokens: Number = None
    bleu: Number = None
    bleu_signature: str | None = None
    hypotheses: str | None = None  # path relative to the run directory
    references: str | None = None
    examples: list[DecodedExample] = Field(default_factory=list)


class EvalSummary(RunFile):
    step: Count = None
    split: str | None = None
    tasks: dict[str, TaskEval] = Field(default_factory=dict)
    # {layer: {task: fraction of the task's routed tokens per expert [E]}}
    expert_usage: dict[str, dict[str, list[float]]] = Field(default_factory=dict)


# --- eval/routing_stats.json ----------------------------------------------------------------


class LayerRouting(RunFile):
    """One MoE layer's co-activation counts (``moe.routing.coactivation``) for one task: means
    per routing group (one group per data x expert device) and per evaluation batch."""

    batches: int = 0
    routed_tokens: Number = None
    coactivation: list[list[float]] = Field(default_factory=list)  # [E][E]
    first_coactivation: list[list[float]] = Field(default_factory=list)  # [E][E]
    previous: str | None = None  # the previous MoE layer of the same stack
    transition: list[list[float]] | None = None  # [E_previous][E]


class RoutingStats(RunFile):
    step: Count = None
    split: str | None = None
    groups: Count = None  # routing groups of an evaluation batch
    batch_size: Count = None  # rows of an evaluation batch
    tasks: dict[str, dict[str, LayerRouting]] = Field(default_factory=dict)  # {task: {layer: }}


# --- metrics.jsonl --------------------------------------------------------------------------


class TaskLoss(RunFile):
    loss: Number = None
    tokens: Number = None


class TrainLine(RunFile):
    """One training log line: losses, throughput, per-task loss, per-MoE-layer routing stats
    (``moe``: {layer: {stat: number or [E] list}}, e.g. ``dropped_fraction``, ``load_cv``,
    ``expert_load``)."""

    kind: Literal["train"] = "train"
    step: Count = None
    time: Number = None
    loss: Number = None
    ce: Number = None
    aux_loss: Number = None
    z_loss: Number = None
    grad_norm: Number = None
    lr: Number = None
    tokens_per_second: Number = None
    step_time_ms: Number = None
    tasks: dict[str, TaskLoss] = Field(default_factory=dict)
    moe: dict[str, dict[str, Number | list[Number]]] = Field(default_factory=dict)

    def layer_stat(self, layer: str, stat: str) -> float | None:
        value = self.moe.get(layer, {}).get(stat)
        return value if isinstance(value, float) else None


class EvalMetrics(RunFile):
    loss: Number = None
    perplexity: Number = None
    bleu: Number = None


class EvalLine(RunFile):
    kind: Literal["eval"] = "eval"
    step: Count = None
    time: Number = None
    split: str | None = None
    tasks: dict[str, EvalMetrics] = Field(default_factory=dict)


# --- report.json ----------------------------------------------------------------------------


class ReportTask(RunFile):
    kind: str | None = None
    perplexity: Number = None
    first_perplexity: Number = None
    bleu: Number = None
    bleu_signature: str | None = None
    hypotheses: str | None = None
    references: str | None = None
    examples_seen: Count = None


class ReportTrain(RunFile):
    steps: Count = None
    resumed_from: Count = None
    wall_time_s: Number = None
    tokens_per_second: Number = None
    step_time_ms: Number = None
    skipped_steps: Count = None
    final_loss: Number = None
    examples_seen: dict[str, int] | None = None


class LayerStats(RunFile):
    final_dropped_fraction: Number = None
    mean_dropped_fraction: Number = None
    final_load_cv: Number = None
    mean_load_cv: Number = None
    final_aux_loss: Number = None
    mean_aux_loss: Number = None
    final_z_loss: Number = None
    mean_z_loss: Number = None


class ReportExperts(RunFile):
    has_moe: bool = False
    num_experts: Count = None
    layers: dict[str, LayerStats] = Field(default_factory=dict)
    usage: dict[str, dict[str, list[Number]]] = Field(default_factory=dict)
    usage_source: str = ""


class ReportPod(PodSummary):
    measured_over_projected: Number = None


class PathwayTask(RunFile):
    frozen: bool = False
    weight: float = 1.0
    pathway: dict[str, list[int]] = Field(default_factory=dict)
    used: dict[str, list[int]] = Field(default_factory=dict)


class ReportPathways(RunFile):
    routing_input: dict[str, str] = Field(default_factory=dict)
    experts: dict[str, int] = Field(default_factory=dict)
    coverage: float = 0.9
    tasks: dict[str, PathwayTask] = Field(default_factory=dict)
    grow: dict[str, Any] | None = None  # grow.json
    extracted: dict[str, Any] | None = None  # extracted.json


class Report(RunFile):
    name: str = ""
    tasks: dict[str, ReportTask] = Field(default_factory=dict)
    train: ReportTrain = Field(default_factory=ReportTrain)
    data: dict[str, TaskData] = Field(default_factory=dict)
    experts: ReportExperts = Field(default_factory=ReportExperts)
    pod: ReportPod = Field(default_factory=ReportPod)
    pathways: ReportPathways | None = None
    plots: dict[str, str] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)


# --- reading and writing --------------------------------------------------------------------


def write_json(path: str | Path, model: BaseModel) -> None:
    """Write ``model`` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(model.model_dump_json(indent=1), encoding="utf-8")
    tmp.replace(path)


def read_json(path: str | Path, model: type[M]) -> tuple[M, str | None]:
    """``(model read from path, None)``, or ``(empty model, problem)`` when the file is missing
    or unreadable; never raises for either."""
    path = Path(path)
    if not path.exists():
        return model(), "missing"
    try:
        return model.model_validate_json(path.read_bytes()), None
    except (OSError, ValidationError, ValueError) as err:
        return model(), f"unreadable ({type(err).__name__})"


def read_metrics(path: str | Path) -> tuple[list[TrainLine], list[EvalLine], str | None]:
    """The train and eval lines of ``metrics.jsonl``; blank and malformed lines (e.g. one cut
    short by an interrupted run) are skipped and counted in the problem string."""
    path = Path(path)
    if not path.exists():
        return [], [], "missing"
    train, evals, bad = [], [], 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            kind = raw.get("kind") if isinstance(raw, dict) else None
            if kind == "train":
                train.append(TrainLine.model_validate(raw))
            elif kind == "eval":
                evals.append(EvalLine.model_validate(raw))
            else:
                bad += 1
        except (ValueError, ValidationError):
            bad += 1
    return train, evals, f"{bad} malformed line(s) skipped" if bad else None
