"""Multi-process runs under mpirun: 2 ranks x 4 virtual devices equal 1 process x 8."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe import config as cfg
from moe.config_io import ConfigError
from moe.parallel.distributed import (
    collectives_backend,
    failed_rank,
    launch,
    launch_command,
    launched_ranks,
)

WORKER = Path(__file__).with_name("dist_worker.py")


def run_launch(n: int, mode: str) -> subprocess.CompletedProcess:
    cmd, env = launch_command(n, [str(WORKER), mode], program=[sys.executable])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def checksums(text: str) -> dict[int, str]:
    return {int(r): c for r, c in re.findall(r"rank (\d) checksum (\S+ aux \S+)", text)}


def test_ranks_come_from_the_mpi_environment():
    assert launched_ranks({}) == 1
    assert launched_ranks({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert launched_ranks({"PMI_SIZE": "2"}) == 2


def test_launch_command_runs_the_cli_under_mpirun():
    cmd, env = launch_command(2, ["train", "x.yaml"], devices_per_process=4)
    assert Path(cmd[0]).name == "mpirun"
    assert cmd[cmd.index("-np") + 1] == "2" and "--oversubscribe" in cmd
    assert cmd[-4:] == ["-m", "moe.cli", "train", "x.yaml"]
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")


def test_collectives_default_to_gloo_and_mpi_is_an_explicit_opt_in(tmp_path):
    assert collectives_backend("auto", {}) == "gloo"
    assert collectives_backend("gloo", {"MPITRAMPOLINE_LIB": "/x"}) == "gloo"
    with pytest.raises(ValueError, match="MPITRAMPOLINE_LIB"):
        collectives_backend("mpi", {})
    with pytest.raises(ValueError, match="MPITRAMPOLINE_LIB"):
        collectives_backend("mpi", {"MPITRAMPOLINE_LIB": str(tmp_path / "missing.so")})
    lib = tmp_path / "libmpiwrapper.so"
    lib.write_bytes(b"")
    assert collectives_backend("mpi", {"MPITRAMPOLINE_LIB": str(lib)}) == "mpi"
    cmd, _ = launch_command(2, ["train", "x.yaml"])
    assert "MPITRAMPOLINE_LIB" not in cmd


def test_mpi_collectives_need_one_device_per_process():
    tasks = [{"name": "lm", "kind": "lm", "source": "gettext:de"}]

    def pod(slice_: str) -> dict:
        return {"pod": {"slice": slice_, "processes": 2, "collectives": "mpi"}, "tasks": tasks}

    assert cfg.from_dict(pod("2")).pod.collectives == "mpi"
    with pytest.raises(ConfigError, match="one device per process"):
        cfg.from_dict(pod("8"))


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    single = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=120
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run_launch(2, "ok")
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-3000:]
    assert "processes 2 devices 8" in multi.stdout
    want = checksums(single.stdout)[0]
    assert checksums(multi.stdout) == {0: want, 1: want}


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_and_is_named(capfd):
    status = launch(2, [str(WORKER), "die"], program=[sys.executable])
    out, err = capfd.readouterr()
    assert status == 3
    assert "should not have finished" not in out
    assert "moe launch: rank 1 exited with status 3; the job was stopped" in err, err[-2000:]


def test_failed_rank_reads_mpirun_reports():
    exited = "   Process name: [prterun-vm-15084@1,1]\n   Exit code:    3\n"
    assert failed_rank(exited) == "rank 1 exited with status 3"
    killed = "prterun noticed that process rank 0 with PID 4944 on node vm exited on\nsignal 9"
    assert failed_rank(killed) == "rank 0 (pid 4944 on vm) died of signal 9"
    assert failed_rank("nothing here") is None


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def test_watchdog_ends_a_rank_whose_launcher_is_gone(tmp_path):
    """The rank's parent (mpirun's daemon) is killed with SIGKILL: the parent-death signal
    ends the rank at once (the watchdog's poll is the fallback)."""
    child = textwrap.dedent(
        """
        import time
        from moe.parallel.distributed import start_watchdog
        start_watchdog(poll_s=0.1)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout,
                             stderr=open({str(tmp_path / "err")!r}, "w"))
        print(p.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child_pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # poll: the orphan is not our child, so we cannot wait() for it
        if not _alive(child_pid):
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the orphaned rank did not end")


def test_watchdog_ends_a_rank_whose_moe_launcher_is_gone(tmp_path):
    """The ``moe`` launcher (MOE_LAUNCHER_PID, not the rank's parent) dies: the watchdog ends
    the rank, saying so, although its own parent lives on."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = textwrap.dedent(
        """
        import time
        from moe.parallel.distributed import start_watchdog
        start_watchdog(poll_s=0.1)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "MOE_LAUNCHER_PID": str(launcher.pid)}
    rank = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    assert rank.stdout.readline().strip() == "ready"
    launcher.kill()
    launcher.wait()
    try:
        status = rank.wait(timeout=10)
    finally:
        rank.kill()
    assert status == 70
    assert f"launcher (pid {launcher.pid}) is gone; ending this rank" in rank.stderr.read()


def test_parent_death_signal_is_set_in_the_child():
    """``die_with_parent`` in a child of a process that then exits: the child gets SIGTERM."""
    code = textwrap.dedent(
        """
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "from moe.parallel.distributed import die_with_parent; import time, sys; "
            "assert die_with_parent(); print('set', flush=True); time.sleep(30)"],
            stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "set"
        print(child.pid, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[-1])
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the child outlived its parent")
