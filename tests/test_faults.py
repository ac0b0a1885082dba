"""The bad-input and fault suite (issue 14, item 20), part 1: bad input — config values, data
sources and files, CLI misuse. Every case is one line on stderr and exit status 2, no traceback.

Part 2 (run directory, checkpoints, caches, the update guard) is tests/test_faults_state.py;
part 3 (interrupts and a 2-rank job stopped from outside, real processes, ``slow``) is
tests/test_faults_processes.py. Most cases run in this process (``moe.cli.main(argv)``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from faultkit import assert_one_line, run_cli

from moe import rundir
from moe.data import sources

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
    ("moe.grown_experts=[0]", "moe.grown_experts"),
    ("moe.grown_experts=[4, 4]", "moe.grown_experts"),
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
