"""The holder table: which node holds which chunks, and which peer a node is sent to.

Nodes started with ``--peer-listen`` heartbeat what they hold (verified chunks, as index
ranges per content and chunk size; :mod:`mmfs.peer_server`). A node that asks for a chunk
is also noted as a holder to be (it will have the chunk in a moment, from here or from a
peer, and its peer server lets askers wait for a chunk it is still receiving): that is what
lets sixteen nodes that start at once form a tree instead of sixteen backend streams. The
first asker of a chunk is always served here; later askers are sent down the tree::

    GET /v1/chunk … X-Mmfs-Node: N, X-Mmfs-Peers: ok
        choose(N, chunk): holders and holders-to-be of the chunk
            minus N itself, nodes gone quiet (no heartbeat for --peer-ttl), banned nodes,
            and nodes at --peer-max-load chunks assigned now
            best first: most topology labels shared with N (zone, rack, …), then the
            fewest hops from a full copy (holders 0, a node served here 1, one sent to
            it 2, …: a shallow tree, not a chain), then least loaded
        ─▶ 307 to the best one, or (none left) the bytes from here

A redirect counts as load on its peer for the time a chunk takes at ``PEER_RATE``; the
table does not wait for the peer's report. A node reported for bytes that did not match
the chunk map is banned for ``BAN_SECONDS``; one reported unreachable is forgotten until
its next heartbeat. Reports are trusted as sent: the peer port belongs on a cluster network.

Only chunks of open repos come here (``BackendApp._peer_for`` serves a restricted repo's
chunks itself, after the access check): peers serve without tokens, and what nodes offer
is trusted for where to send askers, never for who may read.
"""

from __future__ import annotations

import bisect
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mmfs.errors import InvalidName
from mmfs.manifest import MAX_CHUNK_SIZE, ChunkKey

#: Bytes per second a peer is assumed to send one chunk at, to count a redirect as load.
PEER_RATE = 1e9
#: Seconds a node reported for corrupt bytes is never chosen.
BAN_SECONDS = 600.0
#: Seconds a holder-to-be stays one without a heartbeat saying so.
EXPECT_SECONDS = 10.0
#: Largest node id (its peer URL) and label text accepted.
_MAX_NAME = 256


@dataclass(slots=True)
class _Node:
    url: str
    labels: dict[str, str]
    last_seen: float
    #: "content:chunk_size" -> sorted, disjoint [start, end) index ranges held (verified).
    held: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: When each redirect to this node stops counting as its load.
    busy_until: list[float] = field(default_factory=list)

    def holds(self, name: str, index: int) -> bool:
        ranges = self.held.get(name)
        if not ranges:
            return False
        at = bisect.bisect_right(ranges, (index, float("inf"))) - 1
        return at >= 0 and ranges[at][0] <= index < ranges[at][1]

    def load(self, now: float) -> int:
        self.busy_until = [t for t in self.busy_until if t > now]
        return len(self.busy_until)


@dataclass(frozen=True, slots=True)
class HolderStatistics:
    nodes: int
    banned: int
    redirects: int
    served_here: int  # chunk requests from sharing nodes answered with bytes
    reports_corrupt: int
    reports_unreachable: int


class HolderTable:
    def __init__(self, *, ttl: float = 10.0, max_load: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_load = max_load
        self._clock = clock
        self._nodes: dict[str, _Node] = {}
        # chunk -> holder-to-be -> (until when, hops from a full copy)
        self._expected: dict[ChunkKey, dict[str, tuple[float, int]]] = {}
        self._banned: dict[str, float] = {}
        self._redirects = self._served_here = self._corrupt = self._unreachable = 0

    # -- what nodes tell -------------------------------------------------------------------

    def heartbeat(self, payload: Any) -> bool:
        """Replace what a node holds with what its heartbeat says (``False``: the node is
        banned, the heartbeat ignored); :class:`InvalidName` if malformed."""
        if not isinstance(payload, dict):
            raise InvalidName("a heartbeat is a JSON object")
        node_id = _name(payload.get("node"), "node")
        labels = payload.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   and len(k) + len(v) < _MAX_NAME for k, v in labels.items()):
            raise InvalidName("heartbeat labels must be an object of short strings")
        held_in = payload.get("held") or {}
        if not isinstance(held_in, dict):
            raise InvalidName("heartbeat 'held' must be an object of content:chunk_size -> ranges")
        held: dict[str, list[tuple[int, int]]] = {}
        for name, ranges in held_in.items():
            _content_name(name)
            try:
                pairs = sorted((int(a), int(b)) for a, b in ranges)
            except (TypeError, ValueError):
                raise InvalidName(f"heartbeat ranges of {name[:80]!r} must be [start, end) pairs") from None
            if any(not 0 <= a < b for a, b in pairs):
                raise InvalidName(f"heartbeat ranges of {name[:80]!r} must be non-empty and non-negative")
            held[name] = pairs
        now = self._clock()
        if self._banned.get(node_id, 0.0) > now:
            return False  # served bytes that failed a chunk map: not a holder until the ban ends
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(node_id, labels, now)
        node.labels, node.last_seen, node.held = labels, now, held
        self._sweep(now)
        return True

    def report(self, payload: Any) -> None:
        """A node says a peer sent bytes that did not match the map, or could not be reached."""
        if not isinstance(payload, dict):
            raise InvalidName("a report is a JSON object")
        peer = _name(payload.get("peer"), "peer")
        problem = payload.get("problem")
        if problem == "corrupt":
            self._corrupt += 1
            self._banned[peer] = self._clock() + BAN_SECONDS
        elif problem == "unreachable":
            self._unreachable += 1
        else:
            raise InvalidName("a report's problem is 'corrupt' or 'unreachable'")
        self._forget(peer)

    # -- choosing ----------------------------------------------------------------------------

    def choose(self, asker: str, key: ChunkKey, *, may_redirect: bool) -> str | None:
        """The peer ``asker`` should get ``key`` from (``None``: serve it here), noting
        ``asker`` as a holder to be either way when it is a sharing node."""
        now = self._clock()
        me = self._live(asker, now)
        if me is None:
            return None  # not a sharing node (no heartbeat yet): nobody will be sent to it
        best = self._best(asker, me, key, now) if may_redirect else None
        if best is None:
            self._expected.setdefault(key, {})[asker] = (now + EXPECT_SECONDS, 1)
            self._served_here += 1
            return None
        chosen, hops = best
        self._expected.setdefault(key, {})[asker] = (now + EXPECT_SECONDS, hops + 1)
        chosen.busy_until.append(now + key.chunk_size / PEER_RATE)
        self._redirects += 1
        return chosen.url

    def _best(self, asker: str, me: _Node, key: ChunkKey, now: float) -> tuple[_Node, int] | None:
        """The peer to send ``asker`` to and its hops from a full copy, or ``None``."""
        name = f"{key.content_id}:{key.chunk_size}"
        expected = self._expected.get(key, {})
        hops = {n: h for n, (until, h) in expected.items() if until > now}
        hops.update((n, 0) for n, node in self._nodes.items() if node.holds(name, key.index))
        hops.pop(asker, None)
        best: tuple[tuple[int, int, int, float], _Node, int] | None = None
        for node_id, distance in hops.items():
            node = self._live(node_id, now)
            if node is None or self._banned.get(node_id, 0.0) > now:
                continue
            load = node.load(now)
            if load >= self.max_load:
                continue
            shared = sum(1 for k, v in me.labels.items() if node.labels.get(k) == v)
            rank = (-shared, distance, load, random.random())
            if best is None or rank < best[0]:
                best = (rank, node, distance)
        return (best[1], best[2]) if best is not None else None

    def _live(self, node_id: str, now: float) -> _Node | None:
        node = self._nodes.get(node_id)
        return node if node is not None and now - node.last_seen <= self.ttl else None

    def _forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        for holders in self._expected.values():
            holders.pop(node_id, None)

    def _sweep(self, now: float) -> None:
        """Drop nodes gone quiet, expired holders-to-be and bans."""
        for node_id in [n for n, node in self._nodes.items() if now - node.last_seen > self.ttl]:
            self._forget(node_id)
        for key in list(self._expected):
            holders = {n: t for n, t in self._expected[key].items() if t[0] > now}
            if holders:
                self._expected[key] = holders
            else:
                del self._expected[key]
        self._banned = {n: t for n, t in self._banned.items() if t > now}

    # -- observability ----------------------------------------------------------------------

    def statistics(self) -> HolderStatistics:
        now = self._clock()
        return HolderStatistics(nodes=sum(1 for n in self._nodes if self._live(n, now)),
                                banned=sum(1 for t in self._banned.values() if t > now),
                                redirects=self._redirects, served_here=self._served_here,
                                reports_corrupt=self._corrupt, reports_unreachable=self._unreachable)

    def describe(self) -> dict[str, Any]:
        """``GET /v1/peers``: the live nodes, what they hold, and the banned ones."""
        now = self._clock()
        return {"nodes": [{"node": n, "labels": node.labels, "seen_s_ago": round(now - node.last_seen, 3),
                           "load": node.load(now),
                           "held_chunks": {k: sum(b - a for a, b in r) for k, r in node.held.items()}}
                          for n, node in sorted(self._nodes.items()) if self._live(n, now)],
                "banned": sorted(n for n, t in self._banned.items() if t > now)}


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or len(value) > _MAX_NAME:
        raise InvalidName(f"'{what}' must be the node's peer URL (http://HOST:PORT)")
    return value


def _content_name(name: Any) -> None:
    content, _, size = str(name).rpartition(":")
    if not content or len(content) > 200 or not size.isdigit() or not 0 < int(size) <= MAX_CHUNK_SIZE:
        raise InvalidName(f"heartbeat key {str(name)[:80]!r} must be CONTENT_ID:CHUNK_SIZE")


__all__ = ["HolderStatistics", "HolderTable"]
