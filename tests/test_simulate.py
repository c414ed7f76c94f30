"""The cluster simulator (bench/simulate.py): the model obeys the physics it claims (fast, no processes)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench.__main__ import main as bench_main
from bench.simulate import Hardware, Setup, owner, simulate

GB = 1e9
HW = Hardware(upstream=1 * GB, node_nic=10 * GB, backend_nic=10 * GB, node_disk=100 * GB, node_cores=1000,
              backend_cores=1000, nodes_per_rack=4)


def test_one_node_is_bound_by_the_upstream_link() -> None:
    got = simulate(Setup(1, 100 * GB, pieces=100), HW)
    assert got.upstream_bytes == pytest.approx(100 * GB)
    assert 100 <= got.all_ready <= 100 * 1.02  # the link time, plus one piece at the node
    assert got.backend_bytes == [pytest.approx(100 * GB)] and got.peer_bytes == 0


def test_one_backend_is_bound_by_its_nic_and_replicas_share_it() -> None:
    one = simulate(Setup(40, 100 * GB, "backend", pieces=50), HW)
    assert one.all_ready == pytest.approx(40 * 100 / 10, rel=0.05)  # N × model / backend NIC
    four = simulate(Setup(40, 100 * GB, "replicas", replicas=4, pieces=50), HW)
    assert sum(four.backend_bytes) == pytest.approx(40 * 100 * GB)
    assert max(four.backend_bytes) < 0.4 * 40 * 100 * GB  # spread over the replicas by rendezvous hashing
    assert four.all_ready < one.all_ready / 2
    for got in (one, four):
        assert got.upstream_bytes == pytest.approx(100 * GB)  # each byte upstream once, replicas or not


def test_sharing_takes_one_copy_from_the_backend_and_prefers_the_rack() -> None:
    got = simulate(Setup(40, 100 * GB, "sharing", pieces=50), HW)
    assert got.upstream_bytes == pytest.approx(100 * GB)
    assert sum(got.backend_bytes) == pytest.approx(100 * GB)
    assert got.peer_bytes == pytest.approx(39 * 100 * GB)
    assert got.cross_rack_bytes == pytest.approx((40 // 4 - 1) * 100 * GB)  # one copy into each other rack
    assert got.all_ready < 1.2 * simulate(Setup(1, 100 * GB, pieces=50), HW).all_ready


def test_peers_at_max_load_send_askers_to_the_backend() -> None:
    hw = replace(HW, node_cores=1, send_cpu=10 / GB, receive_cpu=0.01 / GB)  # peers send at 0.1 GB/s
    got = simulate(Setup(40, 10 * GB, "sharing", pieces=20, max_load=1), hw)
    assert 10 * GB < sum(got.backend_bytes) < 40 * 10 * GB
    assert sum(got.backend_bytes) + got.peer_bytes == pytest.approx(40 * 10 * GB)


def test_host_mode_is_one_cpu_queue() -> None:
    hw = Hardware(host_cores=2, receive_cpu=3 / GB, send_cpu=1 / GB, upstream=math.inf)
    for mode in ("backend", "sharing"):
        got = simulate(Setup(8, 1 * GB, mode, pieces=64), hw)
        assert got.all_ready == pytest.approx(8 * 1 * (3 + 1) / 2, rel=0.01)  # all bytes × CPU s per byte / cores


def test_rendezvous_owners_are_stable_and_spread() -> None:
    owners = [owner(i, 4) for i in range(400)]
    assert owners == [owner(i, 4) for i in range(400)]
    assert all(60 < owners.count(r) < 140 for r in range(4))
    # A fifth replica takes pieces from the others, and moves no piece between the first four.
    assert all(owner(i, 5) in (owners[i], 4) for i in range(400))


def test_simulate_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["simulate", "--nodes", "10,100", "--quick", "--model", "14GB"]) == 0
    out = capsys.readouterr().out
    assert "one node alone" in out and "node sharing" in out and "8 replicas" in out
    with pytest.raises(SystemExit):
        bench_main(["simulate", "--nodes", "ten"])
