import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from moe.parallel.axes import RULES, logical_to_mesh, resolve_mesh_shape, spec_to_str


def mesh(**sizes):
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_batch_is_split_over_data_and_expert():
    assert logical_to_mesh(("batch", "length"), mesh(data=2, expert=4)) == PartitionSpec(
        ("data", "expert")
    )


def test_expert_weights_split_experts_and_hidden():
    spec = logical_to_mesh(("expert", "embed", "mlp"), mesh(data=1, expert=4, model=2))
    assert spec == PartitionSpec("expert", None, "model")


def test_size_one_and_absent_axes_are_dropped():
    assert logical_to_mesh(("batch",), mesh(data=8, expert=1)) == PartitionSpec("data")
    assert logical_to_mesh(("embed", "mlp"), mesh(data=2, expert=4)) == PartitionSpec()
    assert logical_to_mesh(("vocab", "embed"), mesh(data=8)) == PartitionSpec()


def test_a_mesh_axis_is_used_once_per_spec():
    spec = logical_to_mesh(("mlp", "heads"), mesh(data=1, expert=1, model=2))
    assert spec == PartitionSpec("model")


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
        logical_to_mesh(("embedding",), mesh(data=2))


def test_rules_table_covers_the_names_in_use():
    assert set(RULES) >= {"embed", "mlp", "heads", "kv", "vocab", "expert", "batch", "length"}


def test_spec_strings_are_plain_text():
    assert spec_to_str(PartitionSpec(("data", "expert"), None)) == "('data','expert'), None"
    assert spec_to_str(PartitionSpec()) == ""
    assert spec_to_str(PartitionSpec("expert", None, "model")) == "'expert', None, 'model'"


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
