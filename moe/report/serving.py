"""The report's serving sections: a quantised run next to its float parent (``serving.json``,
``moe quantize``) and a distilled student's teacher (``distill.json``, ``moe distill``)."""

from __future__ import annotations

from pathlib import Path

from moe import runfiles as rf
from moe.report.format import DASH, fmt, table


def load(run_dir: Path) -> tuple[rf.ServingSummary | None, rf.DistillInfo | None]:
    """The run's serving.json and distill.json, None where absent or unreadable."""
    serving, problem = rf.read_json(Path(run_dir) / "serving.json", rf.ServingSummary)
    distill, problem2 = rf.read_json(Path(run_dir) / "distill.json", rf.DistillInfo)
    return (None if problem else serving), (None if problem2 else distill)


def _ratio(a, b) -> str:
    return fmt(a / b) + "x" if a is not None and b else DASH


def markdown(report: rf.Report) -> list[str]:
    lines = []
    s = report.serving
    if s is not None:
        what = "expert, attention and dense kernels" if s.quantize_dense else "expert kernels"
        lines += [
            "## Serving: quantised weights",
            "",
            f"The {what} of `{s.parent}` (step {fmt(s.step)}) stored as {fmt(s.bits)}-bit "
            f"integers with per-output-channel scales, evaluated next to the float model on the "
            f"{s.split or 'n/a'} split.",
            "",
        ]
        rows = [
            ["expert bytes", fmt(s.float_expert_bytes), fmt(s.expert_bytes)],
            ["all parameter bytes", fmt(s.float_total_bytes), fmt(s.total_bytes)],
            [
                f"decode tokens / s (`{s.decode_task}`)",
                fmt(s.float_decode_tokens_per_second, 0),
                fmt(s.decode_tokens_per_second, 0),
            ],
        ]
        rows = [[*r, _ratio(*_numbers(s, i))] for i, r in enumerate(rows)]
        lines += [*table(["", "float", "quantised", "quantised / float"], rows), ""]
        bleu = lambda t, x: DASH if t.kind == "lm" else fmt(x)
        rows = [
            [f"`{n}`", fmt(t.float_perplexity), fmt(t.perplexity)]
            + [bleu(t, t.float_bleu), bleu(t, t.bleu)]
            for n, t in s.tasks.items()
        ]
        header = ["task", "perplexity (float)", "perplexity", "BLEU (float)", "BLEU"]
        lines += [*table(header, rows), ""]
    d = report.distill
    if d is not None:
        lines += [
            "## Distillation",
            "",
            f"Student of `{d.teacher}` (step {fmt(d.teacher_step)}): alpha = {fmt(d.alpha)} on "
            f"the labels, T = {fmt(d.temperature)}"
            + (", started from the teacher's shared weights." if d.init_from_teacher else "."),
            "",
        ]
        rows = [
            [
                f"`{n}`",
                fmt(t.perplexity),
                fmt(d.teacher_tasks.get(n, rf.EvalMetrics()).perplexity),
                DASH if t.kind == "lm" else fmt(t.bleu),
                DASH if t.kind == "lm" else fmt(d.teacher_tasks.get(n, rf.EvalMetrics()).bleu),
            ]
            for n, t in report.tasks.items()
        ]
        header = ["task", "perplexity", "teacher perplexity", "BLEU", "teacher BLEU"]
        lines += [*table(header, rows), ""]
    return lines


def _numbers(s: rf.ServingSummary, row: int):
    """(quantised, float) of a bytes/speed row, for the ratio column."""
    return [
        (s.expert_bytes, s.float_expert_bytes),
        (s.total_bytes, s.float_total_bytes),
        (s.decode_tokens_per_second, s.float_decode_tokens_per_second),
    ][row]
