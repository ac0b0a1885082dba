"""The command line: exit codes and one-line errors for user mistakes, useful --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK, POD16 = str(CONFIGS / "quickstart.yaml"), str(CONFIGS / "pod_v3_16.yaml")
BASE = {"name": "t", "tasks": [{"name": "a", "kind": "lm", "source": "text:x.txt"}]}


def moe(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "moe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_typo_in_override_suggests_the_key(config):
    assert_user_error(moe("train", config, "modle.d_model=64"), "did you mean 'model.d_model'")


def test_missing_config_file(tmp_path):
    assert_user_error(moe("train", tmp_path / "none.yaml"), "none.yaml", "does not exist")


def test_negative_step_count(config):
    assert_user_error(moe("train", config, "train.steps=-3"), "train.steps")


def test_task_source_that_does_not_exist(config, tmp_path):
    result = moe(
        "train", config, f"tasks.0.source=text:{tmp_path}/missing.txt", f"runs_dir={tmp_path}/runs"
    )
    assert_user_error(result, "missing.txt")


def test_impossible_mesh(config):
    assert_user_error(
        moe("train", config, "pod.slice=2x2", "pod.mesh={data: 3, expert: 1}"), "pod.mesh"
    )


def test_report_of_a_directory_that_is_not_a_run(tmp_path):
    assert_user_error(moe("report", tmp_path), "not a run directory")


def test_config_show_prints_the_resolved_config(config):
    result = moe("config", "show", config, "moe.num_experts=16")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["moe"]["num_experts"] == 16 and shown["model"]["d_model"] == 128


@pytest.mark.parametrize("command", ["train", "eval", "report", "launch", "config", "pod"])
def test_every_command_has_help(command):
    result = moe(command, "--help")
    assert result.returncode == 0 and "usage: moe" in result.stdout


def test_version():
    result = moe("--version")
    assert result.returncode == 0 and result.stdout.startswith("moe ")


def test_train_without_a_config_asks_for_the_config_only():
    result = moe("train")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "moe train: error: the following arguments are required: config"
    )


def test_config_show_doc_prints_every_field_with_its_description(config):
    result = moe("config", "show", config, "--doc", "model.d_model=64")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "model.d_model: 64  # Model (residual stream) width." in lines
    assert "model.quantize_dense: false  # With weight_bits" in result.stdout
    assert any(line.startswith("tasks[].bleu_tokenize  # sacrebleu tokenizer") for line in lines)
    assert any(line.startswith("eval.sample_seed: 0  # Seed") for line in lines)
    assert all("  # " in line for line in lines if line != "tasks:  # The tasks trained together.")


def test_eval_accepts_only_eval_overrides_and_checks_them_first(config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config.read_text())
    assert_user_error(moe("eval", run, "eval.beam_sise=4"), "beam_size")
    assert_user_error(moe("eval", run, "model.d_model=64"), "eval.* overrides only")


def test_pod_plan_slice_scales_the_data_axis_and_the_batch():
    from moe import config as cfg
    from moe.training.projection import scale_to_slice

    quick = cfg.load(QUICK)
    overrides, note = scale_to_slice(quick, "tpu-v4:4x4x4")
    exp = cfg.load(QUICK, overrides)
    assert exp.pod_devices == 64 and exp.mesh_shape == {"data": 16, "expert": 4}
    train, ev = quick.train.batch_size, quick.eval.batch_size  # the same rows per device
    assert (exp.train.batch_size, exp.eval.batch_size) == (8 * train, 8 * ev)
    assert "data axis 2 -> 16" in note and f"global batch {train} -> {8 * train}" in note
    kept, _ = scale_to_slice(quick, "tpu-v4:4x4x4", keep=("train.batch_size",))
    assert not any(o.startswith("train.batch_size") for o in kept)
    pod16 = cfg.load(POD16)  # its header's command
    exp = cfg.load(POD16, scale_to_slice(pod16, "tpu-v3:8x8")[0])
    assert exp.mesh_shape == {"data": 16, "expert": 4}
    assert exp.train.batch_size == 4 * pod16.train.batch_size
    with pytest.raises(ValueError, match="not a multiple of the mesh's expert x model axes"):
        scale_to_slice(quick, "cpu:6")


def test_pod_plan_onto_a_slice_too_small_for_the_experts_is_one_line():
    assert_user_error(moe("pod", "plan", QUICK, "--slice", "cpu:6"), "expert x model")
