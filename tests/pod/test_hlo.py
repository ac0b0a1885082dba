import jax
import jax.numpy as jnp

from moe.pod.hlo import entry_kernels, parse_collectives, program_cost, replica_groups, shape_bytes

HLO = """HloModule jit_f, num_partitions=8

%region (a: f32[], b: f32[]) -> f32[] {
  ROOT %add = f32[] add(%a, %b)
}

ENTRY %main (param.7: f32[2,4,8], param.6: f32[8,8]) -> f32[2,3,8] {
  %param.6 = f32[8,8]{1,0} parameter(1)
  %param.7 = f32[2,4,8]{2,1,0} parameter(0)
  %bitcast = f32[8,8]{1,0} bitcast(%param.7)
  %ynn_fusion.2 = f32[8,8]{1,0} fusion(%bitcast, %param.6), kind=kCustom, calls=%c, \
metadata={op_name="jit(f)/dot_general"}
  %exp = f32[8,8]{1,0} exponential(%ynn_fusion.2)
  %all-reduce = (f32[], bf16[4]) all-reduce(%x, %y), channel_id=1, \
replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%region
  %all-to-all = (f32[2,3,8]{2,1,0}, f32[2,3,8]{2,1,0}) all-to-all(%a, %b), channel_id=2, \
replica_groups=[4,2]<=[2,4]T(1,0)
  ROOT %ag = f32[16,8]{1,0} all-gather(%exp), channel_id=3, replica_groups={{0,1},{2,3}}, \
dimensions={0}
}
""".replace("\\\n", "")


def test_shape_bytes_sums_tuples_and_dtypes():
    assert shape_bytes("f32[2,3]{1,0}") == 24
    assert shape_bytes("(f32[], bf16[4], s8[2,2])") == 4 + 8 + 4
    assert shape_bytes("pred[]") == 1


def test_replica_groups_explicit_and_iota():
    assert replica_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
    ]
    assert replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups={}", 3) == [[0, 1, 2]]


def test_collectives_are_found_with_sizes_and_groups():
    got = [(c.kind, c.bytes, c.group, c.num_groups) for c in parse_collectives(HLO, 8)]
    assert got == [
        ("all-reduce", 12, tuple(range(8)), 1),
        ("all-to-all", 2 * 2 * 3 * 8 * 4, (0, 4), 4),
        ("all-gather", 16 * 8 * 4, (0, 1), 2),
    ]


def test_kernels_skip_bookkeeping_and_mark_matmuls():
    kernels = entry_kernels(HLO)
    assert [(k.op, k.matmul) for k in kernels] == [("fusion", True), ("exponential", False)]
    assert kernels[0].bytes == 3 * 256  # two operands + result
    assert kernels[1].bytes == 2 * 256


def test_program_cost_of_a_matmul_counts_its_flops():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    cost = program_cost(jax.jit(jnp.dot).lower(a, b).compile())
    assert cost.flops == 2 * 64 * 32 * 16
    assert cost.num_devices == 1 and cost.collectives == ()
    assert any(k.matmul for k in cost.kernels)
