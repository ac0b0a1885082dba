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
from flax import nnx
from jax.sharding import AbstractMesh

from moe.layers.moe import MoeBlock, MoeSpec
from moe.parallel.expert_parallel import token_groups

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


def block(groups: str) -> MoeBlock:
    spec = MoeSpec(num_experts=8, top_k=2, routing_groups=groups)
    return MoeBlock(8, 16, spec, causal=False, rngs=nnx.Rngs(0))


def test_no_mesh_or_one_device_is_one_routing_group():
    assert token_groups(None) == 1
    assert block("device")._groups(jax.sharding.get_abstract_mesh(), rows=12) == 1
    with jax.set_mesh(jax.make_mesh((1, 1), ("data", "expert"))):
        assert block("device")._groups(jax.sharding.get_abstract_mesh(), rows=12) == 1


def test_per_device_groups_need_a_batch_that_splits_and_say_so():
    """No silent fallback to one whole-batch group: rows that do not split into the mesh's
    routing groups (or experts that do not split over the expert axis) are an error."""
    m = mesh(data=2, expert=4)
    assert block("device")._groups(m, rows=16) == 8
    assert block("batch")._groups(m, rows=12) == 1  # one group, whatever the mesh
    with pytest.raises(ValueError, match=r"12 rows do not split into the 8 routing groups"):
        block("device")._groups(m, rows=12)
    six = MoeBlock(
        8,
        16,
        MoeSpec(num_experts=6, top_k=2, routing_groups="device"),
        causal=False,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match=r"6 experts do not split over the expert axis \(4\)"):
        six._groups(m, rows=16)
    with pytest.raises(ValueError, match="routing_groups"):
        MoeSpec(num_experts=8, routing_groups="sometimes")
