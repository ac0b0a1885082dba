"""The typed files of a run directory, shared by the code that writes them and the report that
reads them back.

    train_summary.json   TrainSummary   written by the training loop at the end of a run
    eval/summary.json    EvalSummary    written by the final evaluation (moe train / moe eval)
    eval/routing_stats.json  RoutingStats  co-activation counts of that evaluation (moe place)
    metrics.jsonl        TrainLine / EvalLine, one JSON object a line
    vocab.model          the run's SentencePiece vocabulary (a copy; ``moe translate`` reads it)
    serving.json         ServingSummary written by ``moe quantize`` (quantised vs float model)
    distill.json         DistillInfo    written by ``moe distill`` (the teacher, alpha, T)
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


VOCAB_FILE = "vocab.model"


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
    language: str | None = None  # the task's non-English language (or en)
    unk_rate: Number = None  # share of <unk> pieces in that language's held-out text


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


class Timing(RunFile):
    """Seconds spent in each phase of ``moe train`` (this run; a resumed run counts its own)."""

    data_s: Number = None  # reading sources, vocabulary, token stores
    init_s: Number = None  # mesh, parameters born sharded, checkpoint restore
    compile_s: Number = None  # the first step: compiling the train step, and running it once
    train_s: Number = None  # the other steps (steady state)
    eval_s: Number = None  # periodic evaluation during training
    checkpoint_s: Number = None
    final_eval_s: Number = None  # the final evaluation with decoding and BLEU
    total_s: Number = None


class TrainSummary(RunFile):
    steps: Count = None
    resumed_from: Count = None
    wall_time_s: Number = None
    tokens_per_second: Number = Field(
        None,
        description="Real target tokens per second of steady-state training (compile, "
        "evaluation and checkpoints excluded).",
    )
    step_time_ms: Number = Field(None, description="Steady-state step time.")
    skipped_steps: Count = None
    examples_per_step: Number = None
    target_tokens_per_step: Number = None
    padding_fraction: Number = Field(
        None, description="Share of the batch's source and target positions that are padding."
    )
    model_flops_per_step: Number = Field(
        None, description="FLOPs of one train step, all devices (XLA's cost analysis)."
    )
    host_matmul_flops: Number = Field(
        None, description="This host's f32 matmul rate (a jitted 2048x2048 matmul)."
    )
    flop_utilisation: Number = Field(
        None, description="model_flops_per_step / step time / host_matmul_flops."
    )
    load_average: Number = Field(
        None, description="The host's 1-minute load average when training ended (others' work)."
    )
    timing: Timing = Field(default_factory=Timing)
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
    bleu_signature: str | None = None  # names the tokenizer (tok:13a, tok:ja-mecab-...)
    chrf: Number = None
    chrf_signature: str | None = None
    decoded: Count = None  # sentences decoded: a random sample of the split (sample_seed)
    sample_seed: Count = None
    split_size: Count = None  # sentences in the split the sample was drawn from
    empty_fraction: Number = None  # of the decoded lines
    looping_fraction: Number = None  # lines with a word three times in a row
    hypotheses: str | None = None  # path relative to the run directory
    references: str | None = None
    examples: list[DecodedExample] = Field(default_factory=list)


class EvalSummary(RunFile):
    step: Count = None
    split: str | None = None
    tasks: dict[str, TaskEval] = Field(default_factory=dict)
    # {layer: {task: fraction of the task's routed tokens per expert [E]}}
    expert_usage: dict[str, dict[str, list[float]]] = Field(default_factory=dict)


# --- serving.json (moe quantize) and distill.json (moe distill) ------------------------------


class ServingTask(RunFile):
    kind: str | None = None
    float_perplexity: Number = None
    perplexity: Number = None
    float_bleu: Number = None
    bleu: Number = None


class ServingSummary(RunFile):
    """A quantised run next to the float run it came from (same checkpoint step and split)."""

    parent: str = ""  # the float run directory
    step: Count = None
    bits: Count = None
    quantize_dense: bool = False
    split: str | None = None
    expert_bytes: Count = None  # expert banks: integer kernels + scales + biases
    float_expert_bytes: Count = None
    total_bytes: Count = None  # every parameter
    float_total_bytes: Count = None
    decode_task: str | None = None  # the task whose sources were decoded for the speed
    decode_tokens_per_second: Number = None
    float_decode_tokens_per_second: Number = None
    tasks: dict[str, ServingTask] = Field(default_factory=dict)


class DistillInfo(RunFile):
    """How a student run was distilled: ``alpha * CE + (1 - alpha) * T^2 * KL``."""

    teacher: str = ""  # the teacher's run directory
    teacher_step: Count = None
    alpha: Number = None
    temperature: Number = None
    init_from_teacher: bool = False
    teacher_tasks: dict[str, EvalMetrics] = Field(default_factory=dict)  # its final evaluation


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
    chrf: Number = None


class EvalLine(RunFile):
    kind: Literal["eval"] = "eval"
    step: Count = None
    time: Number = None
    split: str | None = None
    tasks: dict[str, EvalMetrics] = Field(default_factory=dict)


# --- report.json ----------------------------------------------------------------------------


class ReportTask(RunFile):
    kind: str | None = None
    perplexity: Number = None  # of the final evaluation (Report.final_split at final_step)
    first_perplexity: Number = None  # the first evaluation on the validation split
    first_step: Count = None
    bleu: Number = None
    bleu_signature: str | None = None
    chrf: Number = None
    chrf_signature: str | None = None
    decoded: Count = None
    sample_seed: Count = None
    split_size: Count = None
    empty_fraction: Number = None
    looping_fraction: Number = None
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
    examples_per_step: Number = None
    padding_fraction: Number = None
    model_flops_per_step: Number = None
    flop_utilisation: Number = None
    load_average: Number = None
    timing: Timing = Field(default_factory=Timing)
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
    final_device_fanout: Number = None  # devices a token's experts lie on (expert axis)
    mean_device_fanout: Number = None


class ReportExperts(RunFile):
    has_moe: bool = False
    num_experts: Count = None
    layers: dict[str, LayerStats] = Field(default_factory=dict)
    usage: dict[str, dict[str, list[Number]]] = Field(default_factory=dict)
    usage_source: str = ""
    # {layer: final selection bias [E]} of auxiliary-loss-free balancing (moe.routing.balance)
    router_bias: dict[str, list[Number]] = Field(default_factory=dict)


class ReportPod(PodSummary):
    measured_over_projected: Number = None  # measured here / projected_cpu_step_ms (accuracy)


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


class GroupMean(RunFile):
    tasks: int = 0
    bleu: Number = None
    perplexity: Number = None


class ReportOverlap(RunFile):
    """Mean pathway overlap of same-direction task pairs within / across language families."""

    within: Number = None
    across: Number = None
    within_pairs: int = 0
    across_pairs: int = 0
    by_family: dict[str, Number] = Field(default_factory=dict)


class ReportMany(RunFile):
    """The many-task summary (``moe.report.many``): tasks ranked, group means, overlap."""

    by_bleu: list[str] = Field(default_factory=list)  # best first
    by_perplexity: list[str] = Field(default_factory=list)  # best (lowest) first
    groups: dict[str, GroupMean] = Field(default_factory=dict)
    overlap: ReportOverlap | None = None
    csv: str = "tasks.csv"


class Report(RunFile):
    name: str = ""
    final_split: str | None = None  # the split and step of eval/summary.json
    final_step: Count = None
    warnings: list[str] = Field(default_factory=list)  # degenerate decodes, ...
    tasks: dict[str, ReportTask] = Field(default_factory=dict)
    train: ReportTrain = Field(default_factory=ReportTrain)
    data: dict[str, TaskData] = Field(default_factory=dict)
    experts: ReportExperts = Field(default_factory=ReportExperts)
    pod: ReportPod = Field(default_factory=ReportPod)
    pathways: ReportPathways | None = None
    serving: ServingSummary | None = None  # serving.json (moe quantize)
    distill: DistillInfo | None = None  # distill.json (moe distill)
    many: ReportMany | None = None  # more than moe.report.many.MANY tasks
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
