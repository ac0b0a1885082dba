"""The expert exchange equals the single-device layer routed group by group.

The multi-device runs happen in a subprocess (``ep_equivalence.py``) so this process keeps
its one CPU device; the subprocess prints max errors as JSON.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh

from moe.parallel.expert_parallel import can_exchange, expert_mesh, token_groups

SCRIPT = Path(__file__).with_name("ep_equivalence.py")
CASES = ["token_choice/1x8", "expert_choice/4x2", "random/2x4", "model/2x2x2"]


@pytest.fixture(scope="module")
def errors():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_exchange_matches_single_device_groups(errors, case):
    e = errors[case]
    assert e["scale"] > 0.5 and e["grad_scale"] > 0.5  # the layer did something
    assert e["forward"] <= 1e-5 * max(1.0, e["scale"])
    assert e["grad"] <= 1e-5 * max(1.0, e["grad_scale"])


def mesh(**sizes):
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_groups_are_data_times_expert_devices():
    assert token_groups(mesh(data=2, expert=4)) == 8
    assert token_groups(mesh(data=1, expert=4, model=2)) == 4


def test_exchange_needs_expert_axis_and_divisible_batch():
    assert can_exchange(mesh(data=2, expert=4), batch=16, num_experts=8)
    assert can_exchange(mesh(data=8, expert=1), batch=16, num_experts=8)  # groups, no a2a
    assert not can_exchange(mesh(data=1, expert=1), batch=16, num_experts=8)
    assert not can_exchange(mesh(data=2, expert=4), batch=12, num_experts=8)
    assert not can_exchange(mesh(data=2, expert=4), batch=16, num_experts=6)
    assert not can_exchange(None, batch=16, num_experts=8)


def test_no_ambient_mesh_means_local_path():
    assert expert_mesh() is None
    with jax.set_mesh(jax.make_mesh((1, 1), ("data", "expert"))):
        assert expert_mesh() is None  # one device: nothing to split
