"""The fault suite, part 3 (see tests/test_faults.py): interrupts at each phase and a 2-rank
job whose launcher is stopped or killed, with real processes (marked ``slow``): one true line,
exit 128 + signal, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import assert_one_line
from tinyrun import tiny_config

# --- interrupts and a 2-rank job stopped from outside (real processes) ----------------------------


def _start(args, root, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MOE_NO_TCMALLOC": "1"}
    err = open(root / "stderr.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "moe.cli", *map(str, args)],
        stdout=err, stderr=err, env=env, start_new_session=True, preexec_fn=_default_sigint, **kw,
    )  # fmt: skip


def _default_sigint() -> None:
    """A shell's background job (``cmd &``) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt; the processes under test get Ctrl-C as a terminal would give it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(root: Path, text: str, proc, timeout=300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if text in (root / "stderr.txt").read_text():
            return
        assert proc.poll() is None, (root / "stderr.txt").read_text()[-2000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{text!r} never appeared")


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    out = []
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        out += [int(child), *_descendants(int(child))]
    return out


INTERRUPTS = [
    ("SIGINT", "at start-up", None, 1.5),
    ("SIGINT", "during data preparation", "moe: task rev", 0.0),
    ("SIGINT", "while compiling", "parameters,", 0.5),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,phase,after,delay", INTERRUPTS, ids=[f"{i[0]} {i[1]}" for i in INTERRUPTS]
)
def test_an_interrupt_at_any_phase_is_one_true_line(tmp_path, name, phase, after, delay):
    config = tiny_config(tmp_path, checkpoint={"every": 0}, train={"steps": 400})
    proc = _start(["train", config, "--no-progress"], tmp_path)
    if after:
        _wait_for(tmp_path, after, proc)
    time.sleep(delay)
    proc.send_signal(getattr(signal, name))
    status = proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert status == 128 + getattr(signal, name), err[-2000:]  # not 139 (segfault)
    assert "Traceback" not in err and "Segmentation" not in err
    said = [x for x in err.splitlines() if "interrupted" in x or "stopped by" in x]
    assert len(said) == 1, err[-2000:]
    assert "checkpoint (step" not in said[0]  # none was written: the line does not claim one


TWO = {"topology": "cpu", "slice": "4", "mesh": {"data": 2, "expert": 2}, "processes": 2}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_stops_the_whole_job(tmp_path, how):
    config = tiny_config(
        tmp_path,
        pod=TWO,
        train={"steps": 3000},
        eval={"every": 0, "bleu_examples": 0},
        checkpoint={"every": 5},
    )
    launcher = _start(["train", config, "--no-progress"], tmp_path)
    _wait_for(tmp_path, "process(es)", launcher)
    job = _descendants(launcher.pid)
    assert len(job) >= 3, job  # mpirun and two ranks
    assert len([p for p in job if Path(f"/proc/{p}/comm").read_text().startswith("python")]) == 2
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    ranks = [p for p in job if Path(f"/proc/{p}/comm").read_text().startswith("python")]
    for line in listening.splitlines():
        if any(f"pid={p}," in line for p in ranks):  # the ranks listen on the loopback only
            assert line.split()[3].rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]"), line
    launcher.send_signal(getattr(signal, how))
    t0 = time.time()
    status = launcher.wait(timeout=60)
    while any(_alive(p) for p in job) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not any(_alive(p) for p in job), "a headless job kept running"
    assert time.time() - t0 < 15
    if how == "SIGTERM":
        err = (tmp_path / "stderr.txt").read_text()
        assert status == 143, err[-2000:]
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("moe: stopped by SIGTERM")


# --- the launcher, with a stand-in for mpirun ------------------------------------------------

FAKE_MPIRUN = """#!/bin/sh
trap 'echo "mpirun got TERM" >> "$FAKE_LOG"; exit 9' TERM
trap 'echo "mpirun got INT" >> "$FAKE_LOG"; exit 9' INT
trap 'echo "mpirun got HUP" >> "$FAKE_LOG"; exit 9' HUP
case "$FAKE_MODE" in
  user_error)
    echo "moe: error: tasks.0.source=tsv:x: no usable examples"
    echo "moe: error: tasks.0.source=tsv:x: no usable examples"
    echo "--------------------------------------------------------------------------"
    echo "prterun detected that one or more processes exited with non-zero status"
    exit 2 ;;
  *)
    echo "started" >> "$FAKE_LOG"
    while true; do sleep 0.1; done ;;
esac
"""


@pytest.fixture
def fake_mpirun(tmp_path, monkeypatch):
    from moe.parallel import distributed

    path = tmp_path / "mpirun"
    path.write_text(FAKE_MPIRUN)
    path.chmod(0o755)
    monkeypatch.setattr(distributed, "mpirun_path", lambda: str(path))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log"))
    return tmp_path / "log"


def test_a_user_error_on_every_rank_is_one_line_and_status_2(capfd, fake_mpirun, monkeypatch):
    from moe.parallel.distributed import launch

    monkeypatch.setenv("FAKE_MODE", "user_error")
    assert launch(2, ["train", "x.yaml"]) == 2
    lines = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert lines == ["moe: error: tasks.0.source=tsv:x: no usable examples"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_to_the_launcher_is_forwarded_to_mpirun(capfd, fake_mpirun, monkeypatch, name):
    import threading

    from moe.errors import Stopped
    from moe.parallel.distributed import launch

    monkeypatch.setenv("FAKE_MODE", "run")
    sig = getattr(signal, name)

    def send():
        for _ in range(200):
            if fake_mpirun.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    threading.Thread(target=send, daemon=True).start()
    with pytest.raises(Stopped) as stopped:
        launch(2, ["train", "x.yaml"], kill_after_s=5)
    assert stopped.value.signum == sig
    assert fake_mpirun.read_text().splitlines()[-1] == f"mpirun got {name[3:]}"
    assert signal.getsignal(sig) is not None  # the previous handler is back
    capfd.readouterr()


@pytest.mark.slow
def test_a_data_error_on_every_rank_ends_the_job_at_once(tmp_path):
    """A source that passes the launcher's checks but has no usable examples: both ranks fail
    alike; one line, status 2, no barrier timeout (it was 36 s, 59 lines, status 1)."""
    config = tiny_config(tmp_path, pod=TWO)
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    proc = _start(["train", config, f"tasks.0.source=tsv:{tmp_path / 'bad.tsv'}"], tmp_path)
    status = proc.wait(timeout=120)
    lines = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    lines = [x for x in lines if not x.startswith("moe: launching")]
    assert_one_line(status, lines, "no usable examples")
