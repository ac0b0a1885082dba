import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

import moe.layers  # noqa: F401  (turns eager sharding off)
from moe.parallel.mesh import (
    check_divisible,
    param_specs,
    param_specs_as_strings,
    resolve_mesh_shape,
)


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w_edf = nnx.Param(jnp.zeros((8, 4, 6)), out_sharding=("expert", "embed", "mlp"))
        self.bias = nnx.Param(jnp.zeros((6,)))
        self.proj = nnx.Linear(
            4,
            6,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
        )


def abstract_state():
    return nnx.split(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))[1]


def mesh(**sizes):
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_resolve_fills_the_free_axis():
    assert resolve_mesh_shape({"data": -1, "expert": 4, "model": 1}, 16) == {
        "data": 4,
        "expert": 4,
        "model": 1,
    }
    assert resolve_mesh_shape({"expert": 8}, 8) == {"data": 1, "expert": 8}


@pytest.mark.parametrize(
    "shape, n, fragment",
    [
        ({"data": -1, "expert": 3}, 8, "does not divide 8"),
        ({"data": 2, "expert": 2}, 8, "uses 4 devices but there are 8"),
        ({"data": -1, "expert": -1}, 8, "at most one"),
        ({"tensor": 2}, 8, "unknown mesh axis 'tensor'"),
    ],
)
def test_resolve_errors(shape, n, fragment):
    with pytest.raises(ValueError) as err:
        resolve_mesh_shape(shape, n)
    assert fragment in str(err.value)


def test_param_specs_follow_logical_names():
    strings = param_specs_as_strings(abstract_state(), mesh(data=1, expert=4, model=2))
    assert strings == {
        "bias": "",
        "proj/bias": "",
        "proj/kernel": "None, 'model'",
        "w_edf": "'expert', None, 'model'",
    }


def test_param_that_does_not_divide_names_itself():
    with pytest.raises(ValueError, match="parameter w_edf has a dim of 8"):
        param_specs(abstract_state(), mesh(data=1, expert=16))


def test_divisibility_messages_name_field_and_axis():
    msgs = check_divisible(60, mesh(data=1, expert=8), 32)
    assert msgs == [
        "moe.num_experts=60 is not divisible by the expert axis (8); "
        "change moe.num_experts or pod.mesh.expert"
    ]
    msgs = check_divisible(8, mesh(data=2, expert=4, model=2), 12, d_ff=7, processes=8)
    assert any("train.batch_size=12" in m and "(8)" in m for m in msgs)
    assert any("pod.processes=8" in m for m in msgs)
    assert any(m.startswith("model.d_ff=7") for m in msgs)
    assert check_divisible(8, mesh(data=2, expert=4), 16) == []


def test_replicated_leaf_gets_empty_spec():
    specs = param_specs({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, mesh(data=2))
    assert specs == {"x": PartitionSpec()}


MULTI = textwrap.dedent(
    """
    from moe.pod.simulate import ensure_virtual_devices
    ensure_virtual_devices(8)
    import jax, jax.numpy as jnp
    from flax import nnx
    import moe.layers
    from moe.parallel.mesh import build_mesh, init_sharded, batch_sharding
    from jax.sharding import PartitionSpec as P

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4, 6)),
                               out_sharding=("expert", "embed", "mlp"))
            self.b = nnx.Param(jnp.ones((6,)))

    mesh = build_mesh({"data": -1, "expert": 4})
    assert dict(mesh.shape) == {"data": 2, "expert": 4}, mesh
    m = init_sharded(lambda: Tiny(nnx.Rngs(0)), mesh)
    assert m.w.get_value().sharding.spec == P("expert"), m.w.get_value().sharding
    assert len(m.w.get_value().addressable_shards[0].data) == 2
    ref = Tiny(nnx.Rngs(0))
    assert jnp.allclose(m.w.get_value(), ref.w.get_value())
    assert batch_sharding(mesh, 2).spec == P(("data", "expert"))
    print("OK")
    """
)


def test_mesh_and_born_sharded_init_on_8_devices():
    out = subprocess.run([sys.executable, "-c", MULTI], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
