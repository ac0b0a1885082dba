"""Pricing an all-to-all with uneven per-pair traffic (``moe.pod.cost.traffic_time``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe.pod.cost import collective_time, traffic_pricer, traffic_time
from moe.pod.hlo import Collective
from moe.pod.topology import parse_slice

MB = 1e6


def no_latency(pod):
    return pod.with_chip(dataclasses.replace(pod.chip, link_latency=0.0))


@pytest.mark.parametrize("slice_, group", [("tpu-v4:4x4x4", (0, 1, 2, 3)), ("tpu-v4:2x2x2", None)])
def test_uniform_traffic_is_the_uniform_all_to_all(slice_, group):
    # rings with wraparound and 2-chip lines: the busiest link carries the mean load
    pod = no_latency(parse_slice(slice_))
    group = tuple(range(pod.num_chips)) if group is None else group
    n = len(group)
    traffic = np.full((n, n), MB / n)
    want = collective_time(Collective("all-to-all", int(MB), group, 1), pod)
    assert traffic_time(traffic, pod, group) == pytest.approx(want)


def test_torus_messages_by_hand():
    # 2x2x2, no wraparound; chips (x, y, z) row-major: 0 = (0,0,0), 1 = (0,0,1), 2 = (0,1,0),
    # 3 = (0,1,1), 7 = (1,1,1).
    pod = parse_slice("tpu-v4:2x2x2")
    b, lat = pod.chip.link_bandwidth, pod.chip.link_latency
    t = np.zeros((8, 8))
    t[0, 1] = MB
    assert traffic_time(t, pod) == pytest.approx(MB / b + lat)
    t = np.zeros((8, 8))
    t[0, 7] = MB  # three hops, one message per link
    assert traffic_time(t, pod) == pytest.approx(MB / b + 3 * lat)
    t = np.zeros((8, 8))
    t[0, 2] = t[0, 3] = MB  # both leave 0 along y first: that link carries 2 MB
    assert traffic_time(t, pod) == pytest.approx(2 * MB / b + 2 * lat)
    t = np.zeros((8, 8))
    t[1, 3] = t[0, 2] = MB  # parallel links, no sharing
    assert traffic_time(t, pod) == pytest.approx(MB / b + lat)


def test_wrapped_ring_splits_the_antipode_both_ways():
    # 4x4x4 torus: chip 0 -> chip 2 along z is 2 hops either way round; half each way.
    pod = parse_slice("tpu-v4:4x4x4")
    t = np.zeros((4, 4))
    t[0, 2] = MB
    want = MB / 2 / pod.chip.link_bandwidth + 2 * pod.chip.link_latency
    assert traffic_time(t, pod, [0, 1, 2, 3]) == pytest.approx(want)


def test_traffic_that_stays_on_its_device_is_free():
    for slice_ in ("tpu-v4:2x2x2", "gpu-h100:8", "cpu:8"):
        pod = parse_slice(slice_)
        assert traffic_time(np.diag(np.full(8, MB)), pod) == 0.0


def test_switch_is_the_busiest_device_in_or_out():
    pod = parse_slice("gpu-h100:4")
    c = pod.chip
    t = np.zeros((4, 4))
    t[0, 3] = t[1, 3] = t[2, 3] = MB  # 3 MB into device 3
    want = 3 * MB / (c.link_bandwidth * c.links_per_chip) + 3 * c.link_latency
    assert traffic_time(t, pod) == pytest.approx(want)


def test_cpu_host_copies_every_byte_that_moves():
    pod = parse_slice("cpu:4")
    host = pod.chip.for_devices(4)
    t = np.full((4, 4), MB)
    assert traffic_time(t, pod) == pytest.approx(12 * MB / host.link_bandwidth + host.link_latency)


def test_a_network_between_hosts_adds_the_busiest_host():
    pod = parse_slice("tpu-v4:2x2x2")
    t = np.zeros((8, 8))
    t[0, 1] = MB  # same host (devices 0-3)
    t[0, 4] = t[1, 5] = MB  # host 0 -> host 1: 2 MB out of host 0
    hosts = [0, 0, 0, 0, 1, 1, 1, 1]
    base = traffic_time(t, pod)
    assert traffic_time(t, pod, hosts=hosts) == base  # no network figure: ICI spans hosts
    got = traffic_time(t, pod, hosts=hosts, host_bandwidth=1e9)
    assert got == pytest.approx(base + 2 * MB / 1e9)


def test_pricer_checks_the_shape():
    price = traffic_pricer(parse_slice("tpu-v4:2x2x2"), range(4))
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        price(np.zeros((8, 8)))
