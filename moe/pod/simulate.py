"""Virtual devices for a pod slice on one CPU host.

XLA's host platform can pretend to be ``n`` devices (``--xla_force_host_platform_device_count``).
The flag is read once, when JAX's CPU backend starts, so ``ensure_virtual_devices`` must run
before anything touches ``jax.devices()`` (importing jax alone is fine). ``moe/cli.py`` calls it
from the config's ``pod`` section; tests and scripts call it at the top.
"""

from __future__ import annotations

import os
import re
import sys

_FLAG = "--xla_force_host_platform_device_count"


def xla_flags_for(num_devices: int, existing: str = "") -> str:
    """``existing`` XLA flags with the host device count set to ``num_devices`` (others kept)."""
    if num_devices < 1:
        raise ValueError(f"need at least 1 virtual device, got {num_devices}")
    kept = [f for f in existing.split() if not re.match(rf"{_FLAG}(=|$)", f)]
    return " ".join([*kept, f"{_FLAG}={num_devices}"])


def _backend_started() -> bool:
    """Whether JAX has already created its backends (after which the flag is ignored)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved
        return True
    return bool(getattr(xla_bridge, "_backends", {}))


def ensure_virtual_devices(num_devices: int, environ: dict | None = None) -> None:
    """Make JAX's CPU platform expose ``num_devices`` devices in this process.

    Sets ``XLA_FLAGS`` (merging flags already there) if the backend has not started. If it has,
    checks that it started with enough devices and raises ``RuntimeError`` naming the fix
    otherwise. On a machine with accelerators the flag only affects the CPU platform.
    """
    env = os.environ if environ is None else environ
    if not _backend_started():
        env["XLA_FLAGS"] = xla_flags_for(num_devices, env.get("XLA_FLAGS", ""))
        return
    import jax

    have = len(jax.local_devices(backend="cpu"))
    if have < num_devices:
        raise RuntimeError(
            f"JAX started with {have} CPU device(s) but the pod needs {num_devices}; call "
            f"moe.pod.simulate.ensure_virtual_devices({num_devices}) before JAX initialises "
            f"(or set XLA_FLAGS={_FLAG}={num_devices})"
        )
