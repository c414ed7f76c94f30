"""The backend's holder table: who a node is sent to for a chunk (backend_server/holders.py)."""

from __future__ import annotations

import pytest

from backend_server.holders import BAN_SECONDS, HolderTable
from mmfs.errors import InvalidName
from mmfs.manifest import ChunkKey
from mmfs.peer_server import held_ranges, parse_labels

CHUNK = 4 << 20
KEY = ChunkKey("sha256:ab", CHUNK, 7)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(n: int) -> str:
    return f"http://127.0.0.{n}:3001"


def beat(table: HolderTable, n: int, held: dict | None = None, **labels: str) -> None:
    table.heartbeat({"node": node(n), "url": node(n), "labels": labels, "held": held or {}})


def holding(*indices: int) -> dict:
    return held_ranges({ChunkKey(KEY.content_id, CHUNK, i) for i in indices})


def test_first_asker_is_served_later_askers_are_sent_to_it() -> None:
    table = HolderTable(clock=Clock())
    for n in (1, 2, 3):
        beat(table, n)
    assert table.choose(node(1), KEY, may_redirect=True) is None  # nobody holds it: served here
    assert table.choose(node(2), KEY, may_redirect=True) == node(1)  # node 1 is receiving it
    assert table.choose(node(3), KEY, may_redirect=False) is None  # "no": always served here
    stats = table.statistics()
    assert (stats.redirects, stats.served_here, stats.nodes) == (1, 2, 3)


def test_unknown_nodes_are_served_and_never_sent_to() -> None:
    table = HolderTable(clock=Clock())
    beat(table, 1, holding(7))
    assert table.choose(node(9), KEY, may_redirect=True) is None  # no heartbeat from 9: not sharing
    beat(table, 2)
    assert table.choose(node(2), KEY, may_redirect=True) == node(1)
    assert table.choose(node(1), KEY, may_redirect=True) in (None, node(2))  # never itself


def test_topology_then_load() -> None:
    table = HolderTable(clock=Clock(), max_load=2)
    beat(table, 1, holding(7), zone="a", rack="1")
    beat(table, 2, holding(7), zone="b", rack="1")
    beat(table, 3, holding(7), zone="a", rack="2")
    beat(table, 4, zone="a", rack="2")
    assert table.choose(node(4), KEY, may_redirect=True) == node(3)  # zone and rack shared
    assert table.choose(node(4), KEY, may_redirect=True) == node(3)
    assert table.choose(node(4), KEY, may_redirect=True) == node(1)  # node 3 at --peer-max-load: same zone next


def test_a_tree_not_a_chain_and_full_peers_mean_the_backend_serves() -> None:
    clock = Clock()
    table = HolderTable(clock=clock, max_load=2)
    for n in range(1, 9):
        beat(table, n)
    sources = [table.choose(node(n), KEY, may_redirect=True) for n in range(1, 8)]
    # 1 served here; 2 and 3 sent to it (1 hop), then 4-7 to 2 and 3 (2 hops): fan-out 2.
    assert sources[:3] == [None, node(1), node(1)]
    assert sorted(sources[3:]) == [node(2), node(2), node(3), node(3)]
    table = HolderTable(clock=clock, max_load=1)
    beat(table, 1, holding(7))
    beat(table, 2, holding(7))
    beat(table, 3)
    beat(table, 4)
    assert table.choose(node(3), KEY, may_redirect=True) in (node(1), node(2))
    assert table.choose(node(4), KEY, may_redirect=True) in (node(1), node(2))  # holders before receivers
    beat(table, 5)
    assert table.choose(node(5), KEY, may_redirect=True) in (node(3), node(4))
    for n in (3, 4, 5):
        table.report({"peer": node(n), "problem": "unreachable"})
    beat(table, 6)
    assert table.choose(node(6), KEY, may_redirect=True) is None  # 1 and 2 busy, the rest gone: served here
    clock.now += 1.0
    assert table.choose(node(6), KEY, may_redirect=True) in (node(1), node(2))  # their chunk is sent by now


def test_quiet_nodes_are_forgotten() -> None:
    clock = Clock()
    table = HolderTable(clock=clock, ttl=10.0)
    beat(table, 1, holding(7, 8))
    beat(table, 2)
    clock.now += 9.0
    beat(table, 2)
    assert table.choose(node(2), KEY, may_redirect=True) == node(1)
    clock.now += 2.0  # 11 s since node 1's heartbeat, 2 s since node 2's
    other = ChunkKey(KEY.content_id, CHUNK, 8)
    assert table.choose(node(2), other, may_redirect=True) is None  # node 1 holds it, but went quiet
    beat(table, 3)
    assert table.choose(node(3), KEY, may_redirect=True) == node(2)  # node 2 asked: receiving it
    assert node(1) not in [n["node"] for n in table.describe()["nodes"]]


def test_reports() -> None:
    clock = Clock()
    table = HolderTable(clock=clock)
    beat(table, 1, holding(7))
    beat(table, 2, holding(7))
    beat(table, 3)
    table.report({"peer": node(1), "problem": "corrupt", "reporter": node(3)})
    table.report({"peer": node(2), "problem": "unreachable", "reporter": node(3)})
    assert table.choose(node(3), KEY, may_redirect=True) is None
    beat(table, 1, holding(7))  # a banned node's heartbeats do not bring it back ...
    beat(table, 2, holding(7))  # ... an unreachable one's do
    assert table.choose(node(3), KEY, may_redirect=True) == node(2)
    assert table.describe()["banned"] == [node(1)]
    clock.now += BAN_SECONDS + 1
    beat(table, 1, holding(7))
    beat(table, 3)
    assert table.statistics().banned == 0
    with pytest.raises(InvalidName):
        table.report({"peer": node(1), "problem": "rude"})


@pytest.mark.parametrize("payload", [
    [], {"node": "127.0.0.1:1"}, {"node": node(1), "labels": {"a": 1}},
    {"node": node(1), "held": {"nocolon": [[0, 1]]}}, {"node": node(1), "held": {"x:4096": [[3, 1]]}},
    {"node": node(1), "held": {"x:4096": [["a"]]}},
])
def test_malformed_heartbeats_are_refused(payload: object) -> None:
    with pytest.raises(InvalidName):
        HolderTable().heartbeat(payload)


def test_held_ranges_and_labels() -> None:
    keys = {ChunkKey("c", CHUNK, i) for i in (0, 1, 2, 5, 7, 8)}
    assert held_ranges(keys) == {f"c:{CHUNK}": [[0, 3], [5, 6], [7, 9]]}
    assert parse_labels("zone=a, rack=3") == {"zone": "a", "rack": "3"}
    with pytest.raises(ValueError, match="rack"):
        parse_labels("zone=a,rack")
