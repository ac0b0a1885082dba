import math
import subprocess
import sys
import textwrap

import pytest

from moe.pod.cost import Projection, collective_time, group_extent, project
from moe.pod.hlo import Collective, Kernel, ProgramCost
from moe.pod.topology import get_slice, parse_slice

MB = 1e6


def program(flops=0.0, nbytes=0.0, collectives=(), devices=1, kernels=()):
    return ProgramCost(flops, nbytes, 0.0, tuple(collectives), tuple(kernels), devices)


def a2a(pod, nbytes, group=None):
    group = tuple(range(pod.num_chips)) if group is None else group
    return Collective("all-to-all", int(nbytes), group, pod.num_chips // len(group))


def test_pure_matmul_is_its_flops_over_peak():
    pod = get_slice("tpu-v3")
    flops = 2 * 1024**3
    p = project(program(flops=flops, nbytes=3 * 1024**2 * 2), pod)
    assert p.compute_s == pytest.approx(flops / 123e12)
    assert p.memory_s == pytest.approx(6 * 1024**2 / 900e9)
    assert p.total_s == pytest.approx(max(p.compute_s, p.memory_s))
    assert p.collective_s == 0


def test_all_to_all_on_a_4x4_mesh_by_hand():
    # 4x4 v3 slice, no wraparound: per dim mean line distance (16-1)/12 = 1.25 hops over
    # 2 * 3/4 directed links per chip: t = B * 1.25 / (1.5 b) + latency * (1.25 + 1.25).
    pod = parse_slice("tpu-v3:4x4")
    b = pod.chip.link_bandwidth
    t = collective_time(a2a(pod, MB), pod)
    assert t == pytest.approx(MB * 1.25 / (1.5 * b) + 2.5 * pod.chip.link_latency)


def test_all_to_all_on_the_full_v3_torus_by_hand():
    # 32x32 with wraparound: mean ring distance 32/4 = 8 over 2 links: t = 4 B / b (+ latency).
    pod = parse_slice("tpu-v3:32x32")
    t = collective_time(a2a(pod, MB), pod)
    assert t == pytest.approx(4 * MB / pod.chip.link_bandwidth + 16 * pod.chip.link_latency)


def test_all_to_all_grows_like_sqrt_of_chips():
    times = {}
    for shape in ("4x4", "8x8", "16x16"):
        pod = parse_slice(f"tpu-v3:{shape}")
        times[pod.num_chips] = collective_time(a2a(pod, MB), pod)
    assert times[16] < times[64] < times[256]
    growth = times[256] / times[16]  # 16x the chips
    assert 0.6 * math.sqrt(16) < growth < 1.4 * math.sqrt(16)


def test_all_reduce_is_nearly_constant_in_chips():
    times = []
    for shape in ("4x4", "8x8", "16x16"):
        pod = parse_slice(f"tpu-v3:{shape}")
        c = Collective("all-reduce", int(100 * MB), tuple(range(pod.num_chips)), 1)
        times.append(collective_time(c, pod))
    assert times[0] < times[-1] < 1.5 * times[0]


def test_ring_all_reduce_on_one_dim_by_hand():
    # a group of 4 along the inner dim of a 4x4 slice (no wrap): 2 (n-1)/n B / b.
    pod = parse_slice("tpu-v3:4x4")
    c = Collective("all-reduce", int(MB), (0, 1, 2, 3), 4)
    lat = 2 * 3 * pod.chip.link_latency
    assert collective_time(c, pod) == pytest.approx(2 * 0.75 * MB / pod.chip.link_bandwidth + lat)


def test_strided_groups_span_the_outer_dim():
    pod = parse_slice("tpu-v3:4x4")
    assert group_extent(pod, (0, 4, 8, 12)) == [(4, 1, False), (1, 1, False)]
    assert group_extent(pod, (0, 1, 2, 3)) == [(1, 1, False), (4, 1, False)]
    assert group_extent(pod, (0, 2)) == [(1, 1, False), (2, 2, False)]


def test_switch_all_to_all_by_hand():
    pod = parse_slice("gpu-h100:8")
    c = a2a(pod, 8 * MB)
    bw = pod.chip.link_bandwidth * pod.chip.links_per_chip
    assert collective_time(c, pod) == pytest.approx(7 * MB / bw + 7 * pod.chip.link_latency)


def test_more_flops_more_time_and_collectives_add():
    pod = parse_slice("tpu-v4:2x2x4")
    base = project(program(flops=1e12, devices=16), pod)
    more = project(program(flops=2e12, devices=16), pod)
    with_a2a = project(program(flops=1e12, devices=16, collectives=[a2a(pod, MB)]), pod)
    assert more.total_s > base.total_s
    assert with_a2a.total_s == pytest.approx(base.total_s + with_a2a.collective_s)
    assert with_a2a.breakdown["all-to-all_bytes"] == MB
    assert isinstance(with_a2a, Projection)


def test_cpu_host_shares_work_and_counts_kernels():
    pod = get_slice("cpu", "8")
    chip = pod.chip
    kernels = [Kernel("fusion", 1000, False), Kernel("dot", 10**6, True)]
    p = project(program(flops=1e9, devices=8, kernels=kernels), pod)
    assert p.compute_s == pytest.approx(8 * 1e9 / chip.peak_flops)
    assert p.memory_s == pytest.approx(8 * 1000 / chip.hbm_bandwidth)  # matmul not streamed
    want = p.compute_s + p.memory_s + 2 * chip.op_overhead + chip.step_overhead
    assert p.total_s == pytest.approx(want)


def test_device_count_must_match_the_slice():
    with pytest.raises(ValueError, match="compiled for 8 device"):
        project(program(devices=8), parse_slice("tpu-v3:4x4"))


def test_bandwidth_curve_interpolates_between_cache_levels():
    chip = get_slice("cpu").chip
    import dataclasses

    chip = dataclasses.replace(chip, bandwidth_curve=((1e3, 1e10), (1e5, 1e11), (1e7, 1e9)))
    assert chip.bandwidth_at(10) == 1e10
    assert chip.bandwidth_at(1e4) == pytest.approx(math.sqrt(1e10 * 1e11))
    assert chip.bandwidth_at(1e9) == 1e9


EXCHANGE = textwrap.dedent(
    """
    from moe.pod.simulate import ensure_virtual_devices
    ensure_virtual_devices(8)
    import jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from moe.parallel.mesh import build_mesh
    from moe.pod.cost import project
    from moe.pod.hlo import program_cost
    from moe.pod.topology import parse_slice
    mesh = build_mesh({"data": 2, "expert": 4})
    def f(x):  # x: [E=8, C=3, d=16] per device
        return jax.shard_map(
            lambda b: jax.lax.all_to_all(b, "expert", 0, 1, tiled=True),
            mesh=mesh, in_specs=P(("data", "expert")), out_specs=P(("data", "expert")))(x)
    cost = program_cost(jax.jit(f).lower(jnp.ones((64, 3, 16))).compile())
    (c,) = cost.collectives
    assert (c.kind, c.bytes, c.group_size, c.num_groups) == ("all-to-all", 8 * 3 * 16 * 4, 4, 2), c
    p = project(cost, parse_slice("tpu-v4:2x2x2"))
    assert p.collective_s > 0 and p.breakdown["all-to-all_bytes"] == 8 * 3 * 16 * 4
    print("OK")
    """
)


def test_exchange_program_has_one_all_to_all_of_the_send_buffer():
    out = subprocess.run(
        [sys.executable, "-c", EXCHANGE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_calibration_is_measured_once_and_cached(tmp_path):
    from moe.pod.calibrate import calibrate_cpu

    path = tmp_path / "cpu.json"
    first = calibrate_cpu(path)
    assert path.is_file()
    again = calibrate_cpu(path)
    assert again == first
    assert first.peak_flops > 1e8 and first.hbm_bandwidth > 1e8
    footprints = [f for f, _ in first.bandwidth_curve]
    assert len(footprints) >= 4 and footprints == sorted(set(footprints))
    assert first.step_overhead > 0
    assert all("measured" in s for s in first.sources.values())
    assert first.for_devices(1).peak_flops == first.peak_flops
    assert [k for k, _ in first.variants] == [1]


def test_host_variant_is_chosen_by_device_count():
    import dataclasses

    base = get_slice("cpu").chip
    one = dataclasses.replace(base, peak_flops=1.0)
    many = dataclasses.replace(base, peak_flops=8.0)
    chip = dataclasses.replace(base, variants=((1, one), (8, many)))
    assert chip.for_devices(1) is one
    assert chip.for_devices(4) is many and chip.for_devices(8) is many
    assert base.for_devices(8) is base
    p = project(program(flops=8.0, devices=8), get_slice("cpu", "8").with_chip(chip))
    assert p.compute_s == pytest.approx(8.0)  # 8 devices x 8 FLOPs at 8 FLOP/s
