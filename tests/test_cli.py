"""The command line: exit codes and one-line errors for user mistakes, useful --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

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
