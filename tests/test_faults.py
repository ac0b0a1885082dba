"""The bad-input and fault suite (issue 14, item 20): every case is one line on stderr and exit
status 2 (128 + signal for interrupts), no traceback, no good checkpoint lost.

Most cases run in this process (``moe.cli.main(argv)`` with stderr captured), so the suite is
quick; the few that need real processes (interrupts at each phase, a 2-rank job whose launcher
is stopped or killed) are at the end and marked ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from tinyrun import tiny_config

from moe import cli, rundir
from moe.data import sources
from moe.errors import UserError

# --- helpers -------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """``moe ARGV`` in this process: (exit status, stderr lines)."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, [line for line in err.splitlines() if line.strip()]


def assert_one_line(status, lines, *fragments, code=2):
    assert status == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("moe: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny experiment (one process) with its data files."""
    return tiny_config(tmp_path_factory.mktemp("faults"))


# --- config values: non-finite floats, out-of-range settings, names leaving runs_dir -------------

NON_FINITE = [
    "train.learning_rate",
    "moe.capacity_factor_eval",
    "moe.capacity_factor_train",
    "model.dropout",
    "moe.jitter",
    "moe.aux_loss_weight",
    "moe.z_loss_weight",
    "moe.router_init_std",
    "moe.routed_scaling",
    "train.weight_decay",
    "train.grad_clip",
    "data.valid_fraction",
    "eval.length_penalty",
]
CONFIG_CASES = [(f"{key}={value}", key) for key in NON_FINITE for value in (".inf", ".nan")]
CONFIG_CASES += [
    ("train.learning_rate=-.inf", "train.learning_rate"),
    ("moe.second_expert_threshold=.nan", "moe.second_expert_threshold"),
    ("name=../../x", "name"),
    ("name=..", "name"),
    ("name=.", "name"),
    ("name=a/b", "name"),
    ("name=/etc", "name"),
    ("model.max_source_length=1", "model.max_source_length"),
    ("model.max_source_length=2", "model.max_source_length"),
    ("model.max_target_length=1", "model.max_target_length"),
    ("train.steps=-1", "train.steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.num_heads=3", "model.num_heads"),
    ("moe.top_k=9", "moe.top_k"),
    ("model.vocab_size=10", "model.vocab_size"),
    ("train.learning_rate=abc", "train.learning_rate"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.nonsense=1", "model.nonsense"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("model.kind=rnn", "model.kind"),
]


@pytest.mark.parametrize("override,key", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(capsys, tiny, override, key):
    assert_one_line(*run_cli(capsys, "config", "show", tiny, override), key)


def test_non_finite_float_in_the_yaml_file(capsys, tmp_path, tiny):
    raw = yaml.safe_load(tiny.read_text())
    raw["train"]["learning_rate"] = float("inf")
    (tmp_path / "inf.yaml").write_text(yaml.safe_dump(raw))
    assert_one_line(*run_cli(capsys, "config", "show", tmp_path / "inf.yaml"), "learning_rate")


# --- data sources: checked before any rank starts (pod.processes=2 goes through the launcher) ----

TWO_RANKS = ["pod.topology=cpu", "pod.slice=4", "pod.mesh={data: 2, expert: 2}", "pod.processes=2"]
SOURCE_CASES = [
    ("tasks.1.source=text:/nonexistent", "file not found"),
    ("tasks.0.source=tsv:/nonexistent.tsv", "file not found"),
    ("tasks.0.source=parallel:/a", "parallel:<src_path>,<tgt_path>"),
    ("tasks.0.source=parallel:/nonexistent.src,/nonexistent.tgt", "file not found"),
    ("tasks.0.source=gettext:xx", "no catalogues"),
    ("tasks.0.source=gettext:../etc", "not a language code"),
    ("tasks.0.source=gettext:", "tasks.0.source"),
    ("tasks.0.source=gettext:.de", "not a language code"),
    ("tasks.0.source=ftp:x", "unknown source scheme"),
    ("tasks.0.source=nocolon", "expected '<scheme>:<argument>'"),
    ("tasks.1.kind=translate", "has no translations"),
]


@pytest.mark.parametrize("override,fragment", SOURCE_CASES, ids=[c[0] for c in SOURCE_CASES])
def test_bad_source_fails_before_mpirun_starts(capsys, tiny, override, fragment, monkeypatch):
    from moe.parallel import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("mpirun started"))
    assert_one_line(*run_cli(capsys, "train", tiny, *TWO_RANKS, override), fragment)


def test_a_busy_run_directory_is_refused_before_mpirun_starts(capsys, tiny, monkeypatch):
    from moe.parallel import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("mpirun started"))
    run_dir = tiny.parent / "runs" / "busy"
    with rundir.locked(run_dir):
        status, lines = run_cli(capsys, "train", tiny, *TWO_RANKS, "name=busy")
    assert_one_line(status, lines, "in use by another run", f"pid {os.getpid()}")


# --- data files read in a process -----------------------------------------------------------------


def _mo_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


DAMAGED_MO = [
    b"",
    b"\xde\x12\x04\x95",  # magic only: shorter than the header (struct.error)
    b"\xde\x12\x04\x95" + b"\0" * 12,
    b"\x95\x04\x12\xde" + b"\0" * 8,
    b"not a catalogue at all",
    b"\xde\x12\x04\x95" + b"\0\0\0\0" + b"\x05\0\0\0" + b"\xff\xff\xff\x7f" * 4,
]


@pytest.mark.parametrize("data", DAMAGED_MO, ids=[f"mo{i}" for i in range(len(DAMAGED_MO))])
def test_a_damaged_mo_catalogue_is_skipped_and_counted(tmp_path, data):
    root = tmp_path / "locale"
    _mo_file(root / "de" / "LC_MESSAGES" / "bad.mo", data)
    with pytest.raises(sources.DataError, match="no usable examples"):  # the only catalogue
        sources.load_source("gettext:de", locale_root=root)


def test_a_damaged_catalogue_beside_good_data_is_only_counted(tmp_path):
    root = tmp_path / "locale"
    _mo_file(root / "de" / "LC_MESSAGES" / "bad.mo", b"\xde\x12\x04\x95")
    good = root / "de" / "LC_MESSAGES" / "good.mo"
    shutil.copyfile(_build_mo(tmp_path), good)
    examples, stats = sources.load_source("gettext:de", locale_root=root)
    assert stats.malformed == 1 and len(examples) == 2


def _build_mo(tmp_path: Path) -> Path:
    """A two-entry .mo catalogue (GNU format, little-endian)."""
    import struct

    entries = sorted({b"": b"", b"red cat": b"rote Katze", b"big dog": b"grosser Hund"}.items())
    ids = b"".join(k + b"\0" for k, _ in entries)
    strs = b"".join(v + b"\0" for _, v in entries)
    n, start = len(entries), 28
    offsets, o1, o2 = [], start + 16 * n, start + 16 * n + len(ids)
    for k, v in entries:
        offsets.append((len(k), o1, len(v), o2))
        o1, o2 = o1 + len(k) + 1, o2 + len(v) + 1
    head = struct.pack("<7I", 0x950412DE, 0, n, start, start + 8 * n, 0, 0)
    table = b"".join(struct.pack("<2I", a, b) for a, b, _, _ in offsets)
    table += b"".join(struct.pack("<2I", c, d) for _, _, c, d in offsets)
    path = tmp_path / "good.mo"
    path.write_bytes(head + table + ids + strs)
    return path


BAD_FILES = [
    ("tsv", b"", "no usable examples"),
    ("tsv", b"no tab here\nnor here\n", "no usable examples"),
    ("tsv", b"\xff\xfe\x00bad", "not UTF-8"),
    ("text", b"\n\n  \n", "no usable examples"),
    ("text", b"caf\xe9\n", "not UTF-8"),
]


@pytest.mark.parametrize("scheme,data,fragment", BAD_FILES, ids=[f[2] for f in BAD_FILES])
def test_a_bad_data_file_is_one_data_error(tmp_path, scheme, data, fragment):
    path = tmp_path / f"data.{scheme}"
    path.write_bytes(data)
    kind = "translate" if scheme == "tsv" else "lm"
    with pytest.raises(sources.DataError, match=fragment) as err:
        sources.load_source(f"{scheme}:{path}", kind=kind)
    assert "\n" not in str(err.value)


def test_misaligned_parallel_files(tmp_path):
    (tmp_path / "a").write_text("one\ntwo\n")
    (tmp_path / "b").write_text("eins\n")
    with pytest.raises(sources.DataError, match="line-aligned"):
        sources.load_source(f"parallel:{tmp_path / 'a'},{tmp_path / 'b'}")


# --- CLI misuse -----------------------------------------------------------------------------------


def test_launch_with_zero_processes(capsys, tiny):
    assert_one_line(*run_cli(capsys, "launch", "-n", "0", tiny), "-n 0")


def test_launch_with_negative_processes(capsys, tiny):
    assert_one_line(*run_cli(capsys, "launch", "-n", "-1", tiny), "-n -1")


def test_launch_with_processes_not_dividing_the_devices(capsys, tiny):
    assert_one_line(*run_cli(capsys, "launch", "-n", "3", tiny), "does not divide")


@pytest.mark.parametrize("command", ["eval", "report", "pathways", "translate", "quantize"])
def test_command_on_a_directory_that_is_not_a_run(capsys, tmp_path, command):
    extra = {"translate": ["--task", "rev"], "quantize": ["--out", tmp_path / "q"]}.get(command, [])
    argv = [command, tmp_path, *extra]
    assert_one_line(*run_cli(capsys, *argv), "not a run directory")


def test_train_with_a_missing_config(capsys, tmp_path):
    assert_one_line(*run_cli(capsys, "train", tmp_path / "missing.yaml"), "missing.yaml")


def test_config_that_is_not_yaml(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert_one_line(*run_cli(capsys, "config", "show", tmp_path / "bad.yaml"), "bad.yaml")


def test_config_that_is_a_list(capsys, tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_one_line(*run_cli(capsys, "config", "show", tmp_path / "list.yaml"), "list.yaml")


def _fake_run(tmp_path: Path, tiny: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    shutil.copyfile(tiny, run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize(
    "content", ["", "{", "[]", '{"tasks": 3}', "null", '{"expert_usage": "x"}']
)
def test_pathways_with_a_corrupt_summary(capsys, tmp_path, tiny, content):
    run_dir = _fake_run(tmp_path, tiny)
    (run_dir / "eval" / "summary.json").write_text(content)
    assert_one_line(*run_cli(capsys, "pathways", run_dir), "summary.json")


def test_pathways_without_a_summary(capsys, tmp_path, tiny):
    run_dir = _fake_run(tmp_path, tiny)
    assert_one_line(*run_cli(capsys, "pathways", run_dir), "summary.json")


def test_run_config_that_is_corrupt(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {d_model: -1}\n")
    assert_one_line(*run_cli(capsys, "pathways", run_dir), "config.yaml")


# --- run directory: one run at a time; a failed first run leaves no trace that blocks the next ----


def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    fd = rundir.acquire(run_dir)
    try:
        with pytest.raises(rundir.RunDirBusy, match=f"pid {os.getpid()}"):
            rundir.acquire(run_dir)
    finally:
        rundir.release(fd)
    rundir.release(rundir.acquire(run_dir))  # free again once released


def test_the_lock_goes_with_its_process(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    code = (
        "import sys, time; from moe import rundir; rundir.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirBusy, match=f"pid {holder.pid}"):
            rundir.acquire(run_dir)
    finally:
        holder.kill()
        holder.wait()
    rundir.release(rundir.acquire(run_dir))  # killed: the kernel dropped its lock


def test_train_refuses_a_run_directory_in_use(tmp_path, tiny):
    from moe import config as cfg
    from moe.training.loop import train

    exp = cfg.load(tiny)
    run_dir = tmp_path / "runs" / "tiny"
    with rundir.locked(run_dir), pytest.raises(rundir.RunDirBusy):
        train(exp, run_dir, progress=False)
    assert not (run_dir / "config.yaml").exists()


def test_a_failed_first_run_does_not_poison_its_directory(tmp_path, tiny):
    from moe import config as cfg
    from moe.training.loop import train

    run_dir = tmp_path / "runs" / "tiny"
    bad = cfg.load(tiny, ["tasks.0.source=gettext:xx"])
    with pytest.raises(UserError, match="gettext:xx"):
        train(bad, run_dir, progress=False)
    assert not (run_dir / "config.yaml").exists()
    # an old config.yaml without any checkpoint does not block a different experiment
    (run_dir / "config.yaml").write_text(cfg.dump(bad))
    from moe.training import loop

    loop._check_run_dir(cfg.load(tiny), run_dir)  # no error
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(UserError, match="different experiment"):
        loop._check_run_dir(cfg.load(tiny), run_dir)


# --- checkpoints: damaged newest falls back; another model's checkpoint is a clear error ---------

STATE = {"a": np.arange(600, dtype=np.float32), "b": {"c": np.ones((30, 20), np.float32)}}


ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ONE_DEVICE), tree)


def _checkpoints(root: Path):
    from moe.training.checkpoint import Checkpointer

    ck = Checkpointer(root, keep=5)
    for step in (4, 8):
        ck.save(step, jax.tree.map(lambda x, s=step: jnp.asarray(x) * s, STATE), {"step": step})
    ck.close()
    return root


def _truncate(files, keep=7):
    hit = 0
    for f in files:
        if f.is_file():
            f.write_bytes(f.read_bytes()[:keep])
            hit += 1
    assert hit


DAMAGE = {
    "truncated data files": lambda d: _truncate((d / "state").rglob("d/*")),
    "truncated manifest.ocdbt": lambda d: _truncate((d / "state").rglob("manifest.ocdbt"), 3),
    "truncated meta/metadata": lambda d: _truncate([d / "meta" / "metadata"]),
    "empty meta/metadata": lambda d: (d / "meta" / "metadata").write_text(""),
    "deleted state": lambda d: shutil.rmtree(d / "state"),
    "empty step directory": lambda d: (shutil.rmtree(d), d.mkdir()),
    "truncated _METADATA": lambda d: _truncate([d / "state" / "_METADATA"], 5),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    from moe.training.checkpoint import Checkpointer

    root = _checkpoints(tmp_path / "ck")
    DAMAGE[damage](root / "8")
    said = []
    ck = Checkpointer(root, keep=5)
    step, state, meta = ck.restore_newest(_abstract(STATE), said.append)
    ck.close()
    assert step == 4 and meta["step"] == 4
    np.testing.assert_array_equal(np.asarray(state["a"]), STATE["a"] * 4)
    assert len(said) == 1 and "step 8" in said[0] and "damaged" in said[0] and "\n" not in said[0]
    assert (root / "damaged-8").is_dir() and not (root / "8").exists()


def test_when_no_checkpoint_restores_the_error_is_one_line(tmp_path):
    from moe.training.checkpoint import Checkpointer

    root = _checkpoints(tmp_path / "ck")
    for step in ("4", "8"):
        DAMAGE["truncated data files"](root / step)
    with pytest.raises(UserError, match="no checkpoint in .* restores") as err:
        Checkpointer(root, keep=5).restore_newest(_abstract(STATE), print)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "other",
    [
        {"a": np.zeros(601, np.float32), "b": {"c": np.ones((30, 20), np.float32)}},
        {"a": np.zeros(600, np.float32), "b": {"c": np.ones((20, 30), np.float32)}},
        {"a": np.zeros(600, np.float32)},
        {"z": np.zeros(600, np.float32), "b": {"c": np.ones((30, 20), np.float32)}},
    ],
    ids=["longer", "transposed", "fewer arrays", "renamed"],
)
def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, other):
    from moe.training.checkpoint import Checkpointer, CheckpointMismatch

    root = _checkpoints(tmp_path / "ck")
    with pytest.raises(CheckpointMismatch, match="written for a different model") as err:
        Checkpointer(root, keep=5).restore_newest(_abstract(other), print)
    assert "\n" not in str(err.value)
    assert (root / "8").is_dir()  # not mistaken for damage: nothing set aside


def test_a_truncated_last_metrics_line_is_dropped_on_resume(tmp_path):
    from moe.training.metrics_log import MetricsLog

    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (2, 4, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[-1][:17])  # cut short by a kill
    MetricsLog(tmp_path, ["a"], enabled=True, start_step=4).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]


# --- caches: a damaged entry is rebuilt, not fatal ------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    from moe import config as cfg
    from moe.data.pipeline import prepare

    exp = cfg.load(tiny_config(tmp_path))
    data = prepare(exp, say=lambda *a, **k: None)
    return exp, Path(exp.data.cache_dir), data


def _batch(exp):
    from moe.data.pipeline import prepare

    return prepare(exp, say=lambda *a, **k: None).batcher.process_batch(0, 0, 1)


def test_a_truncated_vocabulary_model_is_retrained(prepared):
    exp, cache, data = prepared
    model = next((cache / "vocab").glob("*.model"))
    whole = model.read_bytes()
    model.write_bytes(whole[:100])
    _batch(exp)
    assert model.read_bytes() == whole


@pytest.mark.parametrize("what", ["src chunks", "tgt_len chunks", "meta.json", "no zarr.json"])
def test_a_damaged_token_store_is_rebuilt(prepared, what):
    exp, cache, data = prepared
    want = data.batcher.process_batch(0, 0, 1)
    stores = (cache / "stores").iterdir()
    store = next(p for p in stores if p.name.startswith("rev-train-") and p.is_dir())
    if what == "meta.json":
        (store / "meta.json").write_text('{"rows": ')
    elif what == "no zarr.json":
        (store / "src" / "zarr.json").unlink()
    else:
        name = what.split()[0]
        _truncate([f for f in (store / name).rglob("*") if f.name != "zarr.json"])
    got = _batch(exp)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("content", ["", "{", "[]", "[1]", '{"matmul_flops": "x"}'])
def test_a_damaged_calibration_file_is_measured_again(tmp_path, content):
    from moe.pod.calibrate import matmul_rate

    path = tmp_path / "matmul_rate.json"
    path.write_text(content)
    assert matmul_rate(path, size=64, repeats=1) > 0
    assert json.loads(path.read_text())["matmul_flops"] > 0


def test_a_damaged_cpu_calibration_is_measured_again(tmp_path, monkeypatch):
    from moe.pod import calibrate

    figures = {"devices": 1}
    monkeypatch.setattr(calibrate, "measure", lambda devices: figures)
    monkeypatch.setattr(calibrate, "_chip", lambda f, variants=(): (f, variants))
    path = tmp_path / "cpu_calibration.json"
    for content in ("", "{", "[]", "[1]"):
        path.write_text(content)
        calibrate.calibrate_cpu(path)
        assert json.loads(path.read_text())[0] == figures


# --- the non-finite guard -------------------------------------------------------------------------


def test_an_exploding_update_is_not_sane():
    from moe.training.step import sane_update

    old = {"w": jnp.ones((10, 10))}
    assert bool(sane_update(old, {"w": old["w"] * 1.5}))
    assert not bool(sane_update(old, {"w": old["w"] * 1e30}))  # finite, but blown up
    assert not bool(sane_update(old, {"w": old["w"].at[0, 0].set(jnp.nan)}))
    assert not bool(sane_update(old, {"w": old["w"].at[0, 0].set(jnp.inf)}))


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
