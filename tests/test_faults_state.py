"""The fault suite, part 2 (see tests/test_faults.py): one run per directory, a failed first
run leaves nothing that blocks the next, damaged checkpoints fall back, damaged caches are
rebuilt, and the update guard rejects an exploding step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinyrun import tiny_config

from moe import rundir
from moe.errors import UserError

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
