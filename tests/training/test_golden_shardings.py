"""Golden sharding tests: every array of every config's training state and batch keeps the
partition spec stored in tests/training/golden/ (regenerate with
scripts/update_golden_shardings.py after an intended change, and review the diff)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moe import config as cfg
from moe.training.sharding import state_specs

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "update_golden", ROOT / "scripts" / "update_golden_shardings.py"
)
update_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_golden)
CONFIGS = update_golden.experiment_configs()


def test_every_experiment_config_has_a_golden_file():
    assert CONFIGS, "no experiment configs found"
    missing = [p.stem for p in CONFIGS if not (update_golden.GOLDEN / f"{p.stem}.json").is_file()]
    assert not missing, f"run scripts/update_golden_shardings.py for {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_partition_specs_match_the_golden_file(path):
    golden = json.loads((update_golden.GOLDEN / f"{path.stem}.json").read_text())
    specs = state_specs(cfg.load(path))
    assert sorted(specs) == sorted(golden), "the set of arrays changed"
    changed = {k: (golden[k], specs[k]) for k in specs if specs[k] != golden[k]}
    assert not changed, f"partition specs changed (golden, now): {changed}"


def test_expert_weights_are_split_over_the_expert_axis_where_it_exists():
    specs = state_specs(cfg.load(ROOT / "configs" / "pod_v3_16.yaml"))
    experts = {k: v for k, v in specs.items() if k.startswith("params/") and "/experts/w_" in k}
    assert experts and all(v.startswith("'expert'") for v in experts.values())
    assert specs["batch/src"].startswith("('data','expert')")
    dense = {k: v for k, v in specs.items() if k.startswith("params/") and "experts" not in k}
    assert all("expert" not in v for v in dense.values()), "non-expert params are replicated"
