"""The `moe` command line's arguments: the argparse parser of every command.

Kept apart from ``moe.cli`` (which runs the commands) so each stays a readable size; nothing
here reads argv or the environment.
"""

from __future__ import annotations

import argparse
from importlib import metadata


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe",
        description="Train sparsely-gated mixture-of-experts models on JAX.",
        epilog="Run `moe COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"moe {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="train an experiment (resumes if its run directory has a checkpoint)",
        description="Train the experiment in CONFIG. Overrides are key.path=value "
        "(e.g. model.d_model=64 train.steps=50). The run directory is <runs_dir>/<name>/; "
        "if it holds a checkpoint, training resumes exactly where it stopped.",
    )
    t.add_argument("config", help="experiment YAML file")
    t.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides")
    t.add_argument("--run-dir", help="run directory (default: <runs_dir>/<name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser(
        "eval",
        help="evaluate a run's latest (or a named) checkpoint",
        description="Evaluate RUN_DIR's checkpoint: per-task perplexity, BLEU and chrF for "
        "translation tasks (decoded outputs in RUN_DIR/eval/), print the scores, then "
        "regenerate the report. Overrides change the evaluation settings (eval.beam_size=4).",
    )
    e.add_argument("run_dir")
    e.add_argument(
        "overrides", nargs="*", default=[], help="eval.key=value overrides (eval.beam_size=4)"
    )
    e.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    e.add_argument("--split", choices=["valid", "test"], help="held-out split (default: config)")

    r = sub.add_parser(
        "report",
        help="regenerate report.json, report.md and plots of a run",
        description="Rebuild RUN_DIR/report.json, report.md and the PNG plots from its files.",
    )
    r.add_argument("run_dir")

    c = sub.add_parser("config", help="inspect experiment configs")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser(
        "show", help="print the resolved config (extends + overrides + defaults)"
    )
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", default=[])
    show.add_argument("--doc", action="store_true", help="every field with its description")

    la = sub.add_parser(
        "launch",
        help="run `moe train` as N MPI processes (wraps the venv's mpirun)",
        description="Start N processes with mpirun, each running `moe train CONFIG ...` on its "
        "share of the pod's virtual devices. Equivalent to `mpirun -np N moe train CONFIG`.",
    )
    la.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    la.add_argument("config")
    la.add_argument("overrides", nargs="*", default=[])

    _pathway_parsers(sub)
    _serving_parsers(sub)
    _place_parser(sub)

    pod = sub.add_parser("pod", help="pod slices and projected step times")
    psub = pod.add_subparsers(dest="pod_command", metavar="ACTION", required=True)
    plan = psub.add_parser(
        "plan",
        help="project the step time of CONFIG on a real slice without training",
        description="Compile one training step for the config's mesh and project its time on "
        "the slice (compute/memory rooflines, all-to-all and all-reduce on the torus).",
    )
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", default=[])
    plan.add_argument("--slice", help="target slice, e.g. tpu-v4:4x4x4 (default: the config's)")
    return p


def _pathway_parsers(sub) -> None:
    pw = sub.add_parser(
        "pathways",
        help="show which experts carry each task's tokens, per MoE layer",
        description="Per MoE layer and task: its configured pathway, the experts its tokens went "
        "to in RUN_DIR's final evaluation (eval/summary.json), and the fewest experts carrying "
        "--coverage of them. --yaml prints those as tasks[i].experts (learned pathways).",
    )
    pw.add_argument("run_dir")
    pw.add_argument("--coverage", type=float, default=0.9, help="share of tokens (default 0.9)")
    pw.add_argument("--yaml", action="store_true", help="print learned pathways as config YAML")

    ex = sub.add_parser(
        "extract",
        help="write one task's sub-network (only the experts it uses) as a smaller run",
        description="Keep, per MoE layer, only the experts task NAME can reach (its k experts "
        "under task routing, else its pathway) and write a run directory with that checkpoint "
        "and config; `moe eval OUT` then gives the task's outputs of the full model.",
    )
    ex.add_argument("run_dir")
    ex.add_argument("--task", required=True, help="task name")
    ex.add_argument("--out", help="output run directory (default: RUN_DIR-NAME)")
    ex.add_argument("--step", type=int, help="checkpoint step (default: latest)")

    g = sub.add_parser(
        "grow",
        help="add experts and a new task to a trained run; old tasks' outputs stay unchanged",
        description="Clone the experts the new task routes to most into new experts, give the "
        "new task a pathway over them plus shared frozen old experts, freeze everything the old "
        "tasks use, and train a new run (<runs_dir>/<name> of the grow file). The task must be "
        "in RUN_DIR's config with weight 0. Overrides (key.path=value) apply to the grow file.",
    )
    g.add_argument("run_dir", help="the trained parent run")
    g.add_argument("--config", required=True, help="grow file (name, grow:, train:, eval:)")
    g.add_argument(
        "overrides", nargs="*", default=[], help="key.path=value overrides of the grow file"
    )
    g.add_argument("--no-train", action="store_true", help="only write the grown run directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _serving_parsers(sub) -> None:
    tr = sub.add_parser(
        "translate",
        help="translate lines from stdin with a trained run (an lm task continues them)",
        description="Read sentences from stdin, one per line, and print one output per line on "
        "stdout (notes on stderr): the translation for a translate task, the line continued "
        "for an lm task. Uses the run's vocabulary and eval decoding settings.",
    )
    tr.add_argument("run_dir")
    tr.add_argument("--task", required=True, help="task name")
    tr.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    tr.add_argument("--beam", type=int, help="beam size (default: the run's eval.beam_size)")

    q = sub.add_parser(
        "quantize",
        help="store a run's expert weights as 8- or 4-bit integers (inference only)",
        description="Write OUT, a run whose expert kernels (with --dense also attention and "
        "dense feed-forward kernels) are integers with per-output-channel scales; evaluate it "
        "next to the float run and record bytes, decode speed, perplexity and BLEU in "
        "OUT/serving.json and the report.",
    )
    q.add_argument("run_dir")
    q.add_argument("--bits", type=int, default=8, help="8 or 4 (default 8)")
    q.add_argument("--out", required=True, help="output run directory")
    q.add_argument("--dense", action="store_true", help="also attention and dense FFN kernels")
    q.add_argument("--step", type=int, help="checkpoint step (default: latest)")

    d = sub.add_parser(
        "distill",
        help="train a (dense) student on a trained run's soft outputs",
        description="Train the student experiment STUDENT.yaml (key.path=value overrides "
        "allowed) in OUT with alpha*CE(labels) + (1-alpha)*T^2*KL(teacher_T || student_T), "
        "the teacher being RUN_DIR in evaluation mode. Re-run the same command to resume.",
    )
    d.add_argument("run_dir", help="the trained teacher run")
    d.add_argument("--student", required=True, help="student experiment YAML")
    d.add_argument(
        "overrides", nargs="*", default=[], help="key.path=value overrides of the student"
    )
    d.add_argument("--out", required=True, help="the student's run directory")
    d.add_argument("--alpha", type=float, default=0.75, help="weight of the labels (0.75)")
    d.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (1)")
    d.add_argument("--step", type=int, help="teacher checkpoint step (default: latest)")
    d.add_argument(
        "--init-from-teacher", action="store_true",
        help="start from the teacher's weights where the shapes match (Switch §4.2)",
    )  # fmt: skip
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def _place_parser(sub) -> None:
    pl = sub.add_parser(
        "place",
        help="place experts on devices from a run's routing statistics (and apply it)",
        description="From RUN_DIR's eval/routing_stats.json (expert load and co-activation, "
        "written by `moe eval`), compare expert-to-device placements (identity, random, greedy "
        "partitioning of the co-activation graph, simulated annealing) by the max device load "
        "and the exchange time the pod cost model projects; print them, write the report with "
        "--json, and with --apply write RUN_DIR's checkpoint with its experts permuted to OUT.",
    )
    pl.add_argument("run_dir")
    pl.add_argument("--json", help="write the report (before/after, permutations) here")
    pl.add_argument("--apply", action="store_true", help="write the placed run to --out")
    pl.add_argument("--out", help="output run directory for --apply")
    pl.add_argument("--slice", help="project on this slice, e.g. tpu-v4:2x2x2 (default: run's)")
    pl.add_argument(
        "--schedule",
        choices=["home", "affinity"],
        default="home",
        help="exchange schedule priced (default home: tokens return after every MoE layer)",
    )
    pl.add_argument("--host-gbps", type=float, help="price bytes between hosts at this Gbit/s")
    pl.add_argument("--iterations", type=int, default=3000, help="annealing iterations")
    pl.add_argument("--seed", type=int, default=0, help="seed of the random and annealing placers")


def _version() -> str:
    try:
        return metadata.version("moe")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"
