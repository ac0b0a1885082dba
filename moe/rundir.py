"""One run per run directory: an advisory lock (``fcntl.flock``) held while a run writes it.

A second ``moe train`` of the same name gets one line and exit 2 instead of interleaving
``metrics.jsonl`` with the first. The lock is the kernel's: it goes away with the process that
holds it (a crash or ``kill -9`` leaves nothing stale to clean up). A launcher that holds the
lock for its MPI ranks says so in ``MOE_RUN_DIR_LOCKED`` (the directory's absolute path), and
its rank 0 does not take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from moe.errors import UserError

LOCK_FILE = ".lock"
HELD_ENV = "MOE_RUN_DIR_LOCKED"


class RunDirBusy(UserError):
    """Another process holds the run directory's lock."""


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir/checkpoints`` (orbax names a finished
    step's directory by its number; unfinished ones carry a temporary suffix), ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def acquire(run_dir: Path) -> int | None:
    """Lock ``run_dir`` (created if missing) for this process; returns the lock's file
    descriptor (pass it to :func:`release`), or None when this process's launcher holds it.
    Raises :class:`RunDirBusy` naming the holder when another process has it."""
    run_dir = Path(run_dir)
    if os.environ.get(HELD_ENV) == str(run_dir.absolute()):
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirBusy(
            f"{run_dir} is in use by another run (pid {holder}); wait for it to finish or "
            "choose another name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """``with locked(run_dir):`` hold the run directory's lock for the block."""
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(fd)
