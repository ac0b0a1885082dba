"""Compare growing a model for a new task with training every task jointly from scratch.

    python scripts/grow_compare.py runs/grow_base runs/grow_pt runs/grow_joint [--json out.json]

Reads the three run directories (their train_summary.json, eval/summary.json, metrics.jsonl and
the grown run's grow.json) and prints a JSON record and a markdown table: the new task's BLEU
and perplexity in the grown and the joint model, the compute each path used (optimizer steps,
target tokens, and steps x FLOPs of one compiled train step, per device, from XLA's cost
analysis in ``train_summary.json``), and the old tasks before/after growing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe import runfiles as rf


def _read(run: Path, name: str, model):
    value, problem = rf.read_json(run / name, model)
    if problem:
        raise SystemExit(f"{run / name} is {problem}")
    return value


def _compute(run: Path, task: str | None = None) -> dict:
    """Steps, target tokens (all tasks, or ``task``'s share by examples seen) and FLOPs."""
    ts = _read(run, "train_summary.json", rf.TrainSummary)
    train, _, _ = rf.read_metrics(run / "metrics.jsonl")
    every = train[1].step - train[0].step if len(train) > 1 else 1
    tokens = sum(sum(t.tokens or 0 for t in x.tasks.values()) for x in train) * every
    task_tokens = sum((x.tasks[task].tokens or 0) for x in train if task in x.tasks) * every
    flops = (ts.pod.projected_breakdown if ts.pod else {}).get("flops")
    return {
        "steps": ts.steps,
        "wall_time_s": ts.wall_time_s,
        "step_time_ms": ts.step_time_ms,
        "target_tokens_est": tokens,  # logged steps x log interval: an estimate
        "new_task_tokens_est": task_tokens if task else None,
        "flops_per_step": flops,
        "flops": flops * ts.steps if flops else None,
        "examples_seen": ts.examples_seen,
    }


def compare(base: Path, grown: Path, joint: Path) -> dict:
    record = json.loads((grown / "grow.json").read_text(encoding="utf-8"))
    task = record["task"]
    g_eval, j_eval, b_eval = (
        _read(run, "eval/summary.json", rf.EvalSummary).tasks for run in (grown, joint, base)
    )
    scores = lambda t: {"bleu": t.bleu, "perplexity": t.perplexity}  # noqa: E731
    out = {
        "task": task,
        "grown": {**scores(g_eval[task]), **_compute(grown, task)},
        "joint": {**scores(j_eval[task]), **_compute(joint, task)},
        "base": {**scores(b_eval[task]), **_compute(base)},
        "old_tasks": {},
    }
    g, j = out["grown"], out["joint"]
    out["bleu_ratio"] = g["bleu"] / j["bleu"] if j["bleu"] else None
    out["flops_ratio"] = g["flops"] / j["flops"] if g["flops"] and j["flops"] else None
    out["steps_ratio"] = g["steps"] / j["steps"]
    for name, row in (record.get("old_tasks_after") or {}).items():
        out["old_tasks"][name] = {
            "bleu_before": row["before"]["bleu"],
            "bleu_after": row["after"]["bleu"],
            "ppl_before": row["before"]["perplexity"],
            "ppl_after": row["after"]["perplexity"],
            "identical": row["identical"],
            "bleu_joint": j_eval[name].bleu if name in j_eval else None,
        }
    return out


def table(out: dict) -> str:
    def f(x, d=2):
        return "n/a" if x is None else (f"{x:.{d}e}" if abs(x) >= 1e6 else f"{x:.{d}f}")

    rows = ["| path | new-task BLEU | new-task ppl | steps | FLOPs/step | FLOPs | wall (s) |"]
    rows.append("|---|---|---|---|---|---|---|")
    for key in ("base", "grown", "joint"):
        r = out[key]
        rows.append(
            f"| {key} | {f(r['bleu'])} | {f(r['perplexity'])} | {r['steps']} | "
            f"{f(r['flops_per_step'])} | {f(r['flops'])} | {f(r['wall_time_s'], 0)} |"
        )
    rows += [
        "",
        "| old task | BLEU before | BLEU after | ppl before | ppl after | identical | joint BLEU |",
    ]
    rows.append("|---|---|---|---|---|---|---|")
    for name, r in out["old_tasks"].items():
        rows.append(
            f"| {name} | {f(r['bleu_before'])} | {f(r['bleu_after'])} | {f(r['ppl_before'])} | "
            f"{f(r['ppl_after'])} | {r['identical']} | {f(r['bleu_joint'])} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("grown", type=Path)
    p.add_argument("joint", type=Path)
    p.add_argument("--json", type=Path, help="also write the record here")
    args = p.parse_args()
    out = compare(args.base, args.grown, args.joint)
    print(json.dumps(out, indent=1))
    print()
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
