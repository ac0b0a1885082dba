"""The routing generation's config keys: the shared_expert migration, one-line cross-field
errors, and what reaches the MoE spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe import config as cfg
from moe.training.build import moe_spec

BASE = {"name": "t", "tasks": [{"name": "a", "kind": "lm", "source": "text:x.txt"}]}
ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(path, overrides=()):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_old_shared_expert_true_says_what_to_write(tmp_path):
    path = write(tmp_path, {**BASE, "moe": {"shared_expert": True}})
    message = one_line_error(path)
    assert str(path) in message and "`moe.num_shared_experts: 1`" in message
    override = one_line_error(write(tmp_path, BASE, "b.yaml"), ["moe.shared_expert=true"])
    assert "`moe.num_shared_experts: 1`" in override


def test_old_shared_expert_false_still_loads(tmp_path):
    # resolved config.yaml files of older runs hold `shared_expert: false`
    exp = cfg.load(write(tmp_path, {**BASE, "moe": {"shared_expert": False, "top_k": 1}}))
    assert exp.moe.num_shared_experts == 0 and exp.moe.top_k == 1
    assert "shared_expert" not in cfg.dump(exp).replace("num_shared_experts", "")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["moe.gate=sigmoid", "moe.router=noisy"],
            "moe.gate needs token-choice routing, not moe.router=noisy",
        ),
        (
            ["moe.bias_balance_rate=0.001", "moe.decoder_router=hierarchical", "moe.num_groups=2"],
            "moe.bias_balance_rate needs token-choice routing, not moe.decoder_router=hierarchical",
        ),
        (
            ["moe.device_limit=1", "moe.top_k=3", "pod.slice=2x4", "pod.mesh={data: 2, expert: 4}"],
            "moe.device_limit=1 of 4 expert-axis devices leaves 2 experts, fewer than moe.top_k=3",
        ),
        (["moe.bias_balance_rate=0.001", "tasks.0.frozen=true"], "frozen"),
        (["moe.gate=tanh"], "moe.gate"),
        (["moe.bias_balance_rate=-1"], "moe.bias_balance_rate"),
        (["moe.num_shared_experts=-1"], "moe.num_shared_experts"),
        (["moe.expert_d_ff=0"], "moe.expert_d_ff"),
    ],
)
def test_bad_routing_settings_give_one_line(tmp_path, overrides, expected):
    assert expected in one_line_error(write(tmp_path, BASE), overrides)


def test_the_deepseek_config_reaches_the_moe_spec():
    exp = cfg.load(ROOT / "configs" / "routing_deepseek.yaml")
    spec = moe_spec(exp, exp.moe_layers[0])
    assert spec.gate == "sigmoid" and spec.selection_bias and spec.device_limit == 2
    assert spec.expert_devices == exp.mesh_shape["expert"] == 4
    assert spec.num_experts == 32 and spec.top_k == 7 and spec.num_shared_experts == 1
    assert spec.expert_d_ff == exp.model.d_ff // 4
    plain = cfg.load(ROOT / "configs" / "quickstart.yaml")
    spec = moe_spec(plain, plain.moe_layers[0])
    assert (spec.gate, spec.selection_bias, spec.device_limit, spec.num_shared_experts) == (
        "softmax",
        False,
        0,
        0,
    )
    assert spec.expert_d_ff == 0  # the block's d_ff
