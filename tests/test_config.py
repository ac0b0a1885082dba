"""The experiment schema: loading, extends, overrides, one-line errors, cross-field checks."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moe import config as cfg

BASE = {"name": "t", "tasks": [{"name": "a", "kind": "lm", "source": "text:x.txt"}]}


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_fill_in_and_the_result_is_frozen(tmp_path):
    exp = cfg.load(write(tmp_path, yaml.safe_dump(BASE)))
    assert (
        exp.model.d_model == 128
        and exp.moe.top_k == 2
        and exp.mesh_shape
        == {
            "data": 1,
            "expert": 1,
        }
    )
    with pytest.raises(ValidationError):
        exp.model.d_model = 3  # frozen


def test_extends_merges_sections_and_overrides_win(tmp_path):
    write(tmp_path, yaml.safe_dump({**BASE, "model": {"d_model": 64, "num_heads": 2}}), "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nmodel: {d_ff: 96}\n")
    exp = cfg.load(child, ["model.d_model=32", "tasks.0.weight=2.5"])
    assert (exp.model.d_model, exp.model.num_heads, exp.model.d_ff) == (32, 2, 96)
    assert exp.tasks[0].weight == 2.5


def test_dump_round_trips(tmp_path):
    exp = cfg.load(write(tmp_path, yaml.safe_dump(BASE)), ["moe.num_experts=4"])
    again = cfg.load(write(tmp_path, cfg.dump(exp), "again.yaml"))
    assert again == exp


@pytest.mark.parametrize(
    "override, expected",
    [
        ("modle.d_model=64", "did you mean 'model.d_model'"),
        ("model.d_modle=64", "did you mean 'model.d_model'"),
        ("train.steps=-5", "train.steps"),
        ("model.d_model=abc", "model.d_model"),
        ("moe.router=expert_choice", "moe.decoder_router=token_choice"),
        ("tasks.4.kind=lm", "tasks.4"),
        ("nonsense", "key.path=value"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(tmp_path, override, expected):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(write(tmp_path, yaml.safe_dump(BASE)), [override])
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_unknown_key_in_file_suggests_the_full_path(tmp_path):
    path = write(tmp_path, yaml.safe_dump({**BASE, "modle": {"d_model": 3}}))
    with pytest.raises(cfg.ConfigError, match=r"did you mean 'model.d_model'"):
        cfg.load(path)


def test_cross_field_checks_name_both_fields_and_the_fix(tmp_path):
    path = write(tmp_path, yaml.safe_dump(BASE))
    with pytest.raises(cfg.ConfigError, match=r"moe.num_experts=60 .* expert axis \(8\)"):
        cfg.load(path, ["moe.num_experts=60", "pod.slice=2x4", "pod.mesh={data: 1, expert: 8}"])
    with pytest.raises(cfg.ConfigError, match=r"model.d_model=30 .* model.num_heads=4"):
        cfg.load(path, ["model.d_model=30"])
    with pytest.raises(cfg.ConfigError, match=r"train.batch_size=30 .* \(8\)"):
        cfg.load(path, ["train.batch_size=30", "pod.slice=4x2", "pod.mesh={data: -1, expert: 4}"])


def test_mesh_divisibility_names_the_field_and_the_axis(tmp_path):
    path = write(tmp_path, yaml.safe_dump(BASE))
    mesh = ["pod.slice=2x2x2", "pod.mesh={data: 2, expert: 2, model: 2}"]
    with pytest.raises(cfg.ConfigError, match=r"model.d_ff=7 .* model axis \(2\)"):
        cfg.load(path, [*mesh, "model.d_ff=7"])
    with pytest.raises(cfg.ConfigError, match=r"eval.batch_size=10 .* \(4\)"):
        cfg.load(path, [*mesh, "train.batch_size=16", "eval.batch_size=10"])
    with pytest.raises(cfg.ConfigError, match=r"pod.processes=3 does not divide the 8 devices"):
        cfg.load(path, [*mesh, "pod.processes=3"])
    with pytest.raises(cfg.ConfigError, match=r"pod.mesh: .*uses 4 devices but there are 8"):
        cfg.load(path, ["pod.slice=2x2x2", "pod.mesh={data: 2, expert: 2}"])


def test_mesh_minus_one_takes_the_rest_of_the_slice(tmp_path):
    exp = cfg.load(
        write(tmp_path, yaml.safe_dump(BASE)), ["pod.slice=4x4", "pod.mesh={data: -1, expert: 4}"]
    )
    assert exp.pod_devices == 16 and exp.mesh_shape == {"data": 4, "expert": 4}


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.yaml")
    with pytest.raises(cfg.ConfigError, match=r"line \d"):
        cfg.load(write(tmp_path, "name: [unclosed\n"))


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
_keys = st.sampled_from(
    ["name", "model", "moe", "pod", "tasks", "train", "eval", "data", "mixtrue", "x"]
)
_subkeys = st.sampled_from(
    ["d_model", "num_experts", "top_k", "steps", "slice", "mesh", "kind", "source", "every", "zz"]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    top=st.dictionaries(
        _keys, st.one_of(_values, st.dictionaries(_subkeys, _values, max_size=3)), max_size=4
    ),
)
def test_random_bad_configs_never_raise_anything_but_a_one_line_config_error(tmp_path, top):
    raw = {**BASE, **top}
    try:
        cfg.from_dict(raw)
    except cfg.ConfigError as err:
        assert str(err) and "\n" not in str(err)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.text(min_size=1, max_size=20), value=st.text(max_size=10))
def test_random_overrides_never_raise_anything_but_a_config_error(tmp_path, key, value):
    path = write(tmp_path, yaml.safe_dump(BASE))
    try:
        cfg.load(path, [f"{key}={value}"])
    except cfg.ConfigError as err:
        assert "\n" not in str(err)
