"""`moe` command line: train | eval | report | config | launch | pod | pathways | extract | grow |
translate | quantize | distill | place.

This is the only module that reads argv and the environment. It sets up the simulated pod's
virtual devices *before* JAX is imported, so nothing heavy is imported at module level here.
User errors (bad config, missing files, bad data) print one line and exit with status 2.

Interrupts: Ctrl-C, SIGTERM or SIGHUP at any phase print one line saying what is kept and exit
``128 + signal`` (130 for Ctrl-C). The program (not a call of :func:`main` from Python) leaves
through ``os._exit`` after flushing, so no interpreter teardown runs while XLA's threads are
alive (that teardown segfaulted); see :func:`_guard_signals`. A launcher forwards the signal
to mpirun and waits for it first (``moe.parallel.distributed.launch``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from moe import cli_args, rundir
from moe.errors import UserError

EXIT_USER_ERROR = 2
LAUNCHER_ENV = "MOE_LAUNCHER_PID"  # = moe.parallel.distributed.LAUNCHER_ENV (no JAX import here)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_state = {"run_dir": None, "grace_s": 3.0}  # what an interrupt line reports; the watcher's wait
_said = threading.Lock()  # the interrupt line is printed once, by whichever thread comes first
# tcmalloc, preloaded when installed (scripts/_venv.sh installs Debian's libtcmalloc-minimal4):
# glibc's malloc gives XLA's freed buffers back to the kernel, and every step then page-faults
# them in again (~50k faults a step; 12-47% of the step time, docs/results.md).
TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def _preload_tcmalloc(argv: list[str]) -> None:
    """Re-run this command with tcmalloc preloaded (LD_PRELOAD only works from the start of a
    process), once; nothing when it is not installed, already preloaded, or MOE_NO_TCMALLOC is
    set. mpirun passes the environment on, so the ranks of a launched job get it too."""
    env = os.environ
    lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
    if lib is None or env.get("MOE_NO_TCMALLOC") or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return
    preload = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    os.execve(
        sys.executable, [sys.executable, "-m", "moe.cli", *argv], {**env, "LD_PRELOAD": preload}
    )


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
    program = argv is None
    if program:  # the program itself (not a call from Python): a faster allocator first
        _preload_tcmalloc(sys.argv[1:])
        _guard_signals()
    try:
        status = _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP (Stopped) at any phase
        status = _interrupted(getattr(err, "signum", signal.SIGINT))
    if program and (status >= 128 or (status and _launched_ranks() > 1)):
        # No interpreter teardown with XLA's threads alive, and no distributed shutdown barrier
        # for ranks whose peers are failing the same way (it waited 30 s, then a traceback).
        _flush()
        os._exit(status)
    return status


def _main(argv: list[str]) -> int:
    parser = cli_args.parser()
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


def _interrupted(signum: int) -> int:
    """Print the one interrupt line (once; not on the ranks of a launched job, whose launcher
    speaks for them) and return the exit status."""
    if _said.acquire(blocking=False) and _rank() == 0 and not os.environ.get(LAUNCHER_ENV):
        with contextlib.suppress(OSError):  # stderr may be a pipe to a launcher that is gone
            print(_interrupt_line(signum), file=sys.stderr, flush=True)
    return 128 + int(signum)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a broken pipe must not stop the exit
            stream.flush()


def _interrupt_line(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    run_dir = _state["run_dir"]
    if run_dir is None:
        return f"moe: {what}"
    steps = rundir.checkpoint_steps(run_dir)
    if not steps:
        return f"moe: {what} before the first checkpoint of {run_dir}; `moe train` starts it anew"
    return (
        f"moe: {what}; the last checkpoint (step {steps[-1]}) is kept in {run_dir}; "
        "`moe train` resumes from it"
    )


def _guard_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP (those not ignored: ``nohup``, a background job) end the
    program at once with the interrupt line: no exception unwinds through JAX (a
    KeyboardInterrupt raised while tracing came out as a SystemError traceback). Checkpoints
    are written atomically and a cut metrics line is dropped on resume, so nothing needs the
    unwinding. A Python handler runs only between bytecodes of the main thread; a thread woken
    by the C-level wakeup fd ends the process when the main thread is inside XLA (compiling)
    for more than ``grace_s``."""

    def stop(signum, _frame):
        status = _interrupted(signum)
        _flush()
        os._exit(status)

    watched = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
    for sig in watched:
        signal.signal(sig, stop)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch():
        while True:
            got = [b for b in os.read(read, 64) if b in watched]
            if got:
                time.sleep(_state["grace_s"])
                status = _interrupted(got[0])
                _flush()
                os._exit(status)

    threading.Thread(target=watch, name="moe-signals", daemon=True).start()


def _fail(message: str) -> int:
    print(f"moe: error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    return EXIT_USER_ERROR


def _load(config: str, overrides: list[str]):
    from moe import config as cfg

    return cfg.load(config, overrides)


def _dispatch(args, argv: list[str]) -> int:
    if args.command == "config":
        from moe import config as cfg

        exp = _load(args.config, args.overrides)
        print(cfg.describe(exp) if args.doc else cfg.dump(exp), end="")
        return 0
    if args.command == "launch":
        if args.processes < 1:
            raise UserError(f"-n {args.processes}: the number of processes must be >= 1")
        exp = _load(args.config, args.overrides)
        if exp.pod_devices % args.processes:
            raise UserError(
                f"-n {args.processes} does not divide the pod's {exp.pod_devices} devices"
            )
        n = args.processes
        exp = _load(args.config, [*args.overrides, f"pod.processes={n}"])
        train_argv = ["train", args.config, *args.overrides, f"pod.processes={n}"]
        return _launch_training(exp, n, train_argv, _train_dir(exp, None))
    if args.command == "train":
        exp = _load(args.config, args.overrides)
        run_dir = _train_dir(exp, args.run_dir)
        if exp.pod.processes > 1 and _launched_ranks() == 1:
            # pod.processes > 1 outside mpirun: start the ranks ourselves (= moe launch).
            return _launch_training(exp, exp.pod.processes, argv, run_dir)
        _start_jax(exp)
        from moe.training.loop import train

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
        exp = _load(str(run_dir / "config.yaml"), args.overrides)  # bad overrides fail here
        _start_jax(exp)
        from moe.training.evaluation import score_lines
        from moe.training.loop import evaluate_checkpoint

        result = evaluate_checkpoint(
            run_dir, step=args.step, split=args.split, overrides=tuple(args.overrides)
        )
        if _rank() == 0:
            print("\n".join(score_lines(result)))
        _report(run_dir)
        return 0
    if args.command in ("pathways", "extract", "grow"):
        return _pathway_command(args)
    if args.command in ("translate", "quantize", "distill"):
        return _serving_command(args, argv)
    if args.command == "place":
        return _place_command(args)
    if args.command == "pod":
        overrides = list(args.overrides)
        if args.slice:  # compile for the target slice: its chips on the data axis
            from moe.training.projection import scale_to_slice

            keep = tuple(o.partition("=")[0] for o in overrides)
            try:
                extra, note = scale_to_slice(_load(args.config, overrides), args.slice, keep)
            except ValueError as err:
                raise UserError(f"--slice {args.slice}: {err}") from None
            print(f"moe: {note}", file=sys.stderr)
            overrides = [*extra, *overrides]
        exp = _load(args.config, overrides)
        _start_jax(exp)
        from moe.training.projection import plan

        print(plan(exp))
        return 0
    raise UserError(f"unknown command {args.command}")


def _train_dir(exp, run_dir: str | None) -> Path:
    """The run directory a training command writes; an interrupt line reports on it."""
    _state["run_dir"] = Path(run_dir) if run_dir else Path(exp.runs_dir) / exp.name
    return _state["run_dir"]


def _launch_training(exp, n: int, argv: list[str], run_dir: Path) -> int:
    """Start ``n`` ranks of a training command with mpirun, after the checks that would fail
    on every rank alike (the data sources: one line now rather than a rank's traceback after a
    barrier's timeout), holding the run directory's lock for them."""
    from moe.data.sources import check_source
    from moe.parallel.distributed import launch

    for task in exp.tasks:
        check_source(task.source, kind=task.kind, locale_root=exp.data.locale_dir)
    with rundir.locked(run_dir):
        print(f"moe: launching {n} processes with mpirun", file=sys.stderr)
        os.environ[rundir.HELD_ENV] = str(run_dir.absolute())
        _state["grace_s"] = 20.0  # launch() forwards the signal and waits up to 10 s for mpirun
        try:
            return launch(n, argv)
        finally:
            os.environ.pop(rundir.HELD_ENV, None)


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


def _serving_command(args, argv: list[str]) -> int:
    """`moe translate | quantize | distill` (moe.serving)."""
    exp = _run_config(args.run_dir)
    say = lambda *a, **k: print(*a, file=sys.stderr, **k)
    if args.command == "translate":
        if args.task not in [t.name for t in exp.tasks]:
            names = ", ".join(t.name for t in exp.tasks)
            raise UserError(f"no task named {args.task!r} in {args.run_dir} (tasks: {names})")
        if sys.stdin.isatty():
            say("moe: reading lines from stdin (end with Ctrl-D)")
        lines = sys.stdin.read().splitlines()
        if not any(line.strip() for line in lines):
            raise UserError("no input: give the sentences on stdin, one per line")
        _start_jax(exp)
        from moe.serving.translate import Translator

        tr = Translator.load(Path(args.run_dir), args.task, step=args.step, beam=args.beam, say=say)
        for chunk in tr.stream(lines, say):
            print(chunk, flush=True)
        return 0
    if args.command == "quantize":
        _start_jax(exp)
        from moe.serving.quantize import describe, quantize_run

        summary = quantize_run(
            Path(args.run_dir), Path(args.out), bits=args.bits, dense=args.dense, step=args.step,
            say=say,
        )  # fmt: skip
        _report(Path(args.out))
        print(describe(summary, args.out))
        return 0
    student = _load(args.student, args.overrides)
    if student.pod.processes > 1 and _launched_ranks() == 1:
        from moe.parallel.distributed import launch

        say(f"moe: launching {student.pod.processes} processes with mpirun")
        return launch(student.pod.processes, argv)
    _start_jax(student)
    from moe.serving.distill import distill

    distill(
        Path(args.run_dir), student, Path(args.out), alpha=args.alpha,
        temperature=args.temperature, step=args.step, init_from_teacher=args.init_from_teacher,
        progress=not args.no_progress and sys.stderr.isatty(), say=say,
    )  # fmt: skip
    _report(Path(args.out))
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
        from moe.parallel.distributed import collectives_backend, initialize

        try:
            collectives_backend(exp.pod.collectives, os.environ)
        except ValueError as err:
            raise UserError(str(err)) from None
        initialize(ranks, collectives=exp.pod.collectives)


def _launched_ranks() -> int:
    from moe.parallel.distributed import launched_ranks

    return launched_ranks(os.environ)


if __name__ == "__main__":
    sys.exit(main())
