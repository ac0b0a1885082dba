import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from moe.layers.params import param
from moe.parallel.mesh import param_specs, specs_as_strings


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w_edf = param(jnp.zeros((8, 4, 6)), ("expert", "embed", "mlp"))
        self.bias = nnx.Param(jnp.zeros((6,)))
        self.proj = nnx.Linear(
            4,
            6,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
        )


def abstract_state():
    with nnx.use_eager_sharding(False):  # Flax's own partitioning metadata, not sharded here
        return nnx.split(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))[1]


def mesh(**sizes):
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_param_specs_follow_logical_names():
    strings = specs_as_strings(param_specs(abstract_state(), mesh(data=1, expert=4, model=2)))
    assert strings == {
        "bias": "",
        "proj/bias": "",
        "proj/kernel": "None, 'model'",
        "w_edf": "'expert', None, 'model'",
    }


def test_param_that_does_not_divide_names_itself():
    with pytest.raises(ValueError, match="parameter w_edf has a dim of 8"):
        param_specs(abstract_state(), mesh(data=1, expert=16))


def test_replicated_leaf_gets_empty_spec():
    specs = param_specs({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, mesh(data=2))
    assert specs == {"x": PartitionSpec()}


MULTI = textwrap.dedent(
    """
    from moe.pod.simulate import ensure_virtual_devices
    ensure_virtual_devices(8)
    import jax, jax.numpy as jnp
    from flax import nnx
    from moe.layers.params import param
    from moe.parallel.mesh import build_mesh, named_shardings, param_specs, batch_sharding
    from jax.sharding import PartitionSpec as P

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.w = param(jax.random.normal(rngs.params(), (8, 4, 6)), ("expert", "embed", "mlp"))
            self.b = nnx.Param(jnp.ones((6,)))

    mesh = build_mesh({"data": -1, "expert": 4})
    assert dict(mesh.shape) == {"data": 2, "expert": 4}, mesh
    make = lambda: Tiny(nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = named_shardings(param_specs(abstract, mesh), mesh)
    born = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)
    m = nnx.merge(graphdef, born())
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
