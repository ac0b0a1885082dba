import subprocess
import sys

from moe.pod.simulate import xla_flags_for


def test_flags_merge_and_replace_device_count():
    flags = xla_flags_for(8, "--a=1 --xla_force_host_platform_device_count=2 --b")
    assert flags.split() == ["--a=1", "--b", "--xla_force_host_platform_device_count=8"]


def test_ensure_virtual_devices_before_and_after_jax_starts():
    code = (
        "from moe.pod.simulate import ensure_virtual_devices as e\n"
        "import jax\n"
        "e(4)\n"
        "assert len(jax.devices()) == 4\n"
        "e(2)\n"
        "try:\n"
        "    e(8)\n"
        "except RuntimeError as err:\n"
        "    print('ERR', err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "started with 4 CPU device(s) but the pod needs 8" in out
