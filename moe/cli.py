"""`moe` command line: train | eval | report | config | launch | pod | pathways | extract | grow |
place.

This is the only module that reads argv and the environment. It sets up the simulated pod's
virtual devices *before* JAX is imported, so nothing heavy is imported at module level here.
User errors (bad config, missing files, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moe.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe",
        description="Train sparsely-gated mixture-of-experts models on JAX.",
        epilog="Run `moe COMMAND --help` for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="train an experiment (resumes if its run directory has a checkpoint)",
        description="Train the experiment in CONFIG. Overrides are key.path=value "
        "(e.g. model.d_model=64 train.steps=50). The run directory is <runs_dir>/<name>/; "
        "if it holds a checkpoint, training resumes exactly where it stopped.",
    )
    t.add_argument("config", help="experiment YAML file")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides")
    t.add_argument("--run-dir", help="run directory (default: <runs_dir>/<name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser(
        "eval",
        help="evaluate a run's latest (or a named) checkpoint",
        description="Evaluate RUN_DIR's checkpoint: per-task perplexity, BLEU for translation "
        "tasks (decoded outputs in RUN_DIR/eval/), then regenerate the report.",
    )
    e.add_argument("run_dir")
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
    show.add_argument("overrides", nargs="*")

    la = sub.add_parser(
        "launch",
        help="run `moe train` as N MPI processes (wraps the venv's mpirun)",
        description="Start N processes with mpirun, each running `moe train CONFIG ...` on its "
        "share of the pod's virtual devices. Equivalent to `mpirun -np N moe train CONFIG`.",
    )
    la.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    la.add_argument("config")
    la.add_argument("overrides", nargs="*")

    _pathway_parsers(sub)
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
    plan.add_argument("overrides", nargs="*")
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
    g.add_argument("overrides", nargs="*", help="key.path=value overrides of the grow file")
    g.add_argument("--no-train", action="store_true", help="only write the grown run directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _place_command(args) -> int:
    """`moe place` (moe.placement.command)."""
    exp = _run_config(args.run_dir)
    if args.apply and not args.out:
        raise UserError("place --apply needs --out OUT_DIR (the placed run directory)")
    if args.iterations < 0:
        raise UserError(f"--iterations {args.iterations} must be >= 0")
    if args.apply:
        _start_jax(exp)  # one process holding all of the pod's devices
    import json

    from moe.placement import command

    report = command.place(
        Path(args.run_dir), slice_text=args.slice, schedule=args.schedule,
        host_gbps=args.host_gbps, seed=args.seed, iterations=args.iterations,
    )  # fmt: skip
    print(command.table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if args.apply:
        manifest = command.apply(Path(args.run_dir), report, Path(args.out))
        (Path(args.out) / "placed.json").write_text(json.dumps(report, indent=1), "utf-8")
        print(f"placed run ({report['chosen']}) at step {manifest['step']} in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`moe pod plan c.yaml --slice tpu-v3:4x4 moe.top_k=1`).
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args, argv)
    except UserError as err:  # ConfigError, DataError, ...: one line, exit 2
        return _fail(str(err))
    except FileNotFoundError as err:
        return _fail(f"{err.filename}: no such file or directory")
    except KeyboardInterrupt:
        print("moe: interrupted; the last checkpoint is kept, `moe train` resumes", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"moe: error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    return EXIT_USER_ERROR


def _load(config: str, overrides: list[str]):
    from moe import config as cfg

    return cfg.load(config, overrides)


def _dispatch(args, argv: list[str]) -> int:
    if args.command == "config":
        from moe import config as cfg

        print(cfg.dump(_load(args.config, args.overrides)), end="")
        return 0
    if args.command == "launch":
        exp = _load(args.config, args.overrides)
        if exp.pod_devices % args.processes:
            raise UserError(
                f"-n {args.processes} does not divide the pod's {exp.pod_devices} devices"
            )
        from moe.parallel.distributed import launch

        n = args.processes
        return launch(n, ["train", args.config, *args.overrides, f"pod.processes={n}"])
    if args.command == "train":
        exp = _load(args.config, args.overrides)
        if exp.pod.processes > 1 and _launched_ranks() == 1:
            # pod.processes > 1 outside mpirun: start the ranks ourselves (= moe launch).
            from moe.parallel.distributed import launch

            print(f"moe: launching {exp.pod.processes} processes with mpirun", file=sys.stderr)
            return launch(exp.pod.processes, argv)
        _start_jax(exp)
        from moe.training.loop import train

        run_dir = Path(args.run_dir) if args.run_dir else Path(exp.runs_dir) / exp.name
        train(exp, run_dir, progress=not args.no_progress and sys.stderr.isatty())
        _report(run_dir)
        return 0
    if args.command in ("eval", "report"):
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
        if args.command == "report":
            _report(run_dir, to=sys.stdout)
            return 0
        exp = _load(str(run_dir / "config.yaml"), [])
        _start_jax(exp)
        from moe.training.loop import evaluate_checkpoint

        evaluate_checkpoint(run_dir, step=args.step, split=args.split)
        _report(run_dir)
        return 0
    if args.command in ("pathways", "extract", "grow"):
        return _pathway_command(args)
    if args.command == "place":
        return _place_command(args)
    if args.command == "pod":
        overrides = list(args.overrides)
        if args.slice:  # compile for the target slice's device count, same expert axis
            topology, _, shape = args.slice.partition(":")
            overrides += [f"pod.topology={topology}", f"pod.slice={shape}", "pod.processes=1"]
        exp = _load(args.config, overrides)
        _start_jax(exp)
        from moe.training.projection import plan

        print(plan(exp))
        return 0
    raise UserError(f"unknown command {args.command}")


def _run_config(run_dir: str):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    return _load(str(path), [])


def _pathway_command(args) -> int:
    """`moe pathways | extract | grow` (moe.pathways.usage, extract, grow)."""
    exp = _run_config(args.run_dir)
    if args.command == "pathways":
        from moe import runfiles
        from moe.pathways.usage import describe

        path = Path(args.run_dir) / "eval" / "summary.json"
        summary, problem = runfiles.read_json(path, runfiles.EvalSummary)
        if problem:
            raise UserError(f"{path} is {problem}; run `moe eval {args.run_dir}` first")
        usage = summary.expert_usage
        if not 0 < args.coverage <= 1:
            raise UserError(f"--coverage {args.coverage} must be in (0, 1]")
        print(describe(exp, usage, args.coverage, as_yaml=args.yaml))
        return 0
    _start_jax(exp)  # one process holding all of the pod's devices
    if args.command == "extract":
        from moe.pathways.extract import extract

        m = extract(Path(args.run_dir), args.task, args.out and Path(args.out), args.step)
        kept = ", ".join(f"{k}: {len(v)}/{m['experts_before'][k]}" for k, v in m["experts"].items())
        print(
            f"extracted {m['task']}: {m['params_before'] / 1e6:.3f}M -> "
            f"{m['params_after'] / 1e6:.3f}M parameters (experts {kept}) in {m['out']}"
        )
        return 0
    from moe.pathways import grow

    gf = grow.load_grow_file(args.config, args.overrides)
    say = lambda *a, **k: print(*a, file=sys.stderr, **k)
    run_dir = grow.prepare_grown_run(Path(args.run_dir), gf, args.config, say=say)
    if args.no_train:
        print(f"grown run prepared in {run_dir}; train it with `moe train {run_dir}/config.yaml "
              f"--run-dir {run_dir}`")  # fmt: skip
        return 0
    child = _load(str(run_dir / "config.yaml"), [])
    if child.pod.processes > 1:
        from moe.parallel.distributed import launch

        rc = launch(
            child.pod.processes, ["train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
        )
        if rc:
            return rc
    else:
        from moe.training.loop import train

        train(child, run_dir, progress=not args.no_progress and sys.stderr.isatty())
    rows = grow.compare_old_tasks(run_dir)
    _report(run_dir)
    same = sum(r["identical"] is True for r in rows.values())
    unknown = sum(r["identical"] is None for r in rows.values())
    note = f" ({unknown} not comparable: eval settings differ)" if unknown else ""
    print(f"grown run {run_dir}: {same}/{len(rows)} old task(s) evaluate bit-identically{note}")
    return 0


def _report(run_dir: Path, to=sys.stderr) -> None:
    """Build the run's report (rank 0 only: the others have nothing to add)."""
    from moe.report.build import build

    if _rank() == 0:
        build(run_dir)
        print(f"moe: report: {run_dir / 'report.md'}", file=to)


def _rank() -> int:
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))


def _start_jax(exp) -> None:
    """Give this process its share of the pod's virtual devices, then join the job (MPI)."""
    from moe.pod.simulate import ensure_virtual_devices

    ranks = _launched_ranks()
    if ranks != exp.pod.processes and ranks > 1:
        raise UserError(
            f"launched with {ranks} processes but pod.processes={exp.pod.processes}; "
            f"add pod.processes={ranks}"
        )
    ensure_virtual_devices(exp.pod_devices // ranks)
    if ranks > 1:
        from moe.parallel.distributed import initialize

        initialize(ranks)


def _launched_ranks() -> int:
    from moe.parallel.distributed import launched_ranks

    return launched_ranks(os.environ)


if __name__ == "__main__":
    sys.exit(main())
