"""``python -m bench simulate``: a discrete-event model of a cluster loading one model.

What it models, and how it maps to mmfs:

* the **upstream link** (the cluster's path to the Hub): every piece of the model crosses
  it once, when some node first asks for it (the backend's single-flight and shared cold
  tier: one upstream fetch per byte for the whole cluster, replicas included);
* **backend replicas**: each piece has an owner replica (rendezvous hashing, as
  ``--backend URL,URL`` does), which fetches it upstream and sends it from its NIC;
* **nodes**: a receive side (NIC, disk, and the CPU that hashes and stores what arrives)
  and a send side (NIC and CPU) for serving peers;
* the **P2P protocol** (docs/protocol.md, "Node-to-node sharing"): a node asks the backend
  for each piece in order; the backend sends it to a node that holds the piece or is
  receiving it, preferring the node's rack, where that node can start sooner than the
  backend and has fewer than ``max_load`` pieces queued; otherwise it serves the piece.

Each link is a FIFO queue with a rate; a transfer queues on the sender's and the receiver's
link and ends when both have carried it (bulk flows: each link is work-conserving, so
completion times match a fair-share network to within a piece). Pieces are the model cut
into ``pieces`` parts (coarser than real chunks: the time a piece takes on a node NIC is
what a tree of peers adds per hop, so keep pieces small against the whole).

``host`` mode models the loopback runs of bench/ on this machine instead: every daemon
shares the machine's cores, so each transfer queues on one CPU at the CPU-seconds per byte
measured for a node receiving and a daemon sending; links are free. That is what the
real 8-16 node runs are checked against (bench/sharing.py).

Calibration (per GB, measured by bench/ on this machine, bench/ANALYSIS.md): a cold node
spends 2.74 CPU-s receiving, hashing and storing; the backend 0.91 CPU-s sending chunks
from memory. A real node gives mmfs a few cores: ``--node-cores`` (default 8) makes a
node's receive rate min(NIC, disk, cores / 2.74 CPU-s per GB).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from mmfs.sizes import parse_size, rate_argument, size_argument

GB = 1e9
#: CPU-seconds per byte, measured here (bench/ANALYSIS.md, data path v2).
NODE_RECEIVE_CPU = 2.74 / GB
SEND_CPU = 0.91 / GB


@dataclass(frozen=True, slots=True)
class Hardware:
    """Rates in bytes per second; CPU costs in CPU-seconds per byte."""

    upstream: float = 10e9 / 8
    node_nic: float = 100e9 / 8
    backend_nic: float = 100e9 / 8
    node_disk: float = 6e9
    node_cores: float = 8.0
    backend_cores: float = 32.0
    receive_cpu: float = NODE_RECEIVE_CPU
    send_cpu: float = SEND_CPU
    nodes_per_rack: int = 32
    #: ``host``: all daemons on one machine with this many cores (links free), as bench/ runs.
    host_cores: float | None = None

    @property
    def node_in(self) -> float:
        return min(self.node_nic, self.node_disk, self.node_cores / self.receive_cpu)

    @property
    def node_out(self) -> float:
        return min(self.node_nic, self.node_cores / self.send_cpu)

    @property
    def backend_out(self) -> float:
        return min(self.backend_nic, self.backend_cores / self.send_cpu)


@dataclass(frozen=True, slots=True)
class Setup:
    nodes: int
    model: float
    #: ``backend`` (replicas=1), ``replicas``, or ``sharing`` (node-to-node, with ``replicas``).
    mode: str = "backend"
    replicas: int = 1
    pieces: int = 280
    max_load: int = 4


@dataclass(slots=True)
class Outcome:
    setup: Setup
    all_ready: float  # seconds until the last node has the whole model
    median_ready: float
    upstream_bytes: float
    backend_bytes: list[float]  # sent by each replica
    peer_bytes: float  # sent node to node
    cross_rack_bytes: float  # node to node across racks
    max_node_sent: float  # most bytes one node sent to peers

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "setup": asdict(self.setup)}


class _Link:
    """A FIFO queue with a rate: what is sent on it waits for what was sent before."""

    __slots__ = ("rate", "free", "carried")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free = 0.0
        self.carried = 0.0

    def take(self, earliest: float, size: float, seconds: float | None = None) -> float:
        start = max(earliest, self.free)
        self.free = start + (size / self.rate if seconds is None else seconds)
        self.carried += size
        return self.free


@dataclass(slots=True)
class _Piece:
    at_backend: float = -1.0  # -1: not fetched upstream yet
    #: rack -> heap of (earliest start it could send, when it has the piece, node): the
    #: nodes that hold the piece or are receiving it, whom the backend may send askers to.
    holders: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)


#: Busy holders looked past per rack before the backend serves instead (keeps the model fast).
_SCAN = 32


def owner(piece: int, replicas: int) -> int:
    """Rendezvous hashing: the replica with the highest hash of (piece, replica) owns it."""
    return max(range(replicas), key=lambda r: hashlib.blake2b(f"{piece}:{r}".encode(), digest_size=8).digest())


def simulate(setup: Setup, hw: Hardware) -> Outcome:
    n, pieces = setup.nodes, setup.pieces
    size = setup.model / pieces
    sharing = setup.mode == "sharing"
    replicas = setup.replicas if setup.mode in ("replicas", "sharing") else 1
    host = _Link((hw.host_cores or 1.0) / (hw.receive_cpu + hw.send_cpu)) if hw.host_cores else None
    free = float("inf")
    upstream = _Link(hw.upstream)
    backends = [_Link(free if host else hw.backend_out) for _ in range(replicas)]
    downs = [_Link(free if host else hw.node_in) for _ in range(n)]
    ups = [_Link(free if host else hw.node_out) for _ in range(n)]
    owners = [owner(i, replicas) for i in range(pieces)]
    state = [_Piece() for _ in range(pieces)]
    rack_of = [i // hw.nodes_per_rack for i in range(n)]
    cap = setup.max_load * size / (hw.node_out if not host else host.rate)
    ready = [0.0] * n
    peer_bytes = cross = 0.0

    def send(src: _Link, dst: _Link, earliest: float) -> tuple[float, float]:
        """Queue one piece on both links; (when it starts arriving, when it is complete)."""
        if host is not None:
            src.carried += size
            dst.carried += size
            done = host.take(earliest, size)
            return done - size / host.rate, done
        done = max(src.take(earliest, size), dst.take(earliest, size))
        return done - size / min(src.rate, dst.rate), done

    def best_peer(node: int, piece: _Piece, now: float) -> tuple[float, int] | None:
        """Like the backend's holder table: a holder below ``max_load``, own rack first;
        among them the one that can start soonest. (has it at, node) or ``None``."""
        racks = [rack_of[node]] + [r for r in piece.holders if r != rack_of[node]]
        for rack in racks:
            heap = piece.holders.get(rack)
            busy: list[tuple[float, float, int]] = []  # at max_load now: put back afterwards
            found = None
            while heap and len(busy) < _SCAN:
                start, has_at, peer = heap[0]
                current = max(has_at, ups[peer].free)
                if current > start:  # it took more work since: its place is further down
                    heapq.heapreplace(heap, (current, has_at, peer))
                    continue
                if ups[peer].free - max(now, has_at) < cap:  # fewer than max_load pieces queued
                    found = (has_at, peer)
                    break
                busy.append(heapq.heappop(heap))
            for entry in busy:
                heapq.heappush(heap, entry)  # type: ignore[arg-type]
            if found is not None:
                return found
        return None

    events = [(0.0, node, 0) for node in range(n)]
    heapq.heapify(events)
    while events:
        now, node, index = heapq.heappop(events)
        piece = state[index]
        replica = owners[index]
        if piece.at_backend < 0:
            piece.at_backend = upstream.take(now, size)
        peer = best_peer(node, piece, now) if sharing else None
        if peer is not None:
            has_at, source = peer
            start, done = send(ups[source], downs[node], max(now, has_at))
            peer_bytes += size
            if rack_of[source] != rack_of[node]:
                cross += size
        else:
            start, done = send(backends[replica], downs[node], max(now, piece.at_backend))
        if sharing:
            heapq.heappush(piece.holders.setdefault(rack_of[node], []), (max(done, ups[node].free), done, node))
        if index + 1 < pieces:
            # Read-ahead: the next piece is asked for as this one starts arriving.
            heapq.heappush(events, (max(now, start), node, index + 1))
        else:
            ready[node] = done
    ready.sort()
    return Outcome(setup, all_ready=ready[-1], median_ready=ready[len(ready) // 2], upstream_bytes=upstream.carried,
                   backend_bytes=[b.carried for b in backends], peer_bytes=peer_bytes, cross_rack_bytes=cross,
                   max_node_sent=max(u.carried for u in ups))


def alone(model: float, hw: Hardware, pieces: int) -> float:
    """Seconds one node alone needs (through one backend): the reference of the targets."""
    return simulate(Setup(1, model, "backend", pieces=pieces), hw).all_ready


def table(nodes: Sequence[int], model: float, hw: Hardware, *, replicas: int, pieces: int,
          max_load: int = 4) -> list[dict[str, Any]]:
    """One row per (node count, setup): one backend, ``replicas`` replicas, node sharing."""
    single = alone(model, hw, pieces)
    rows = []
    for n in nodes:
        for mode, r in (("backend", 1), ("replicas", replicas), ("sharing", 1)):
            got = simulate(Setup(n, model, mode, r, pieces, max_load), hw)
            rows.append({"nodes": n, "mode": mode, "replicas": r, "all_ready_s": got.all_ready,
                         "x_alone": got.all_ready / single, "median_ready_s": got.median_ready,
                         "upstream_x_model": got.upstream_bytes / model,
                         "backend_egress_x_model": sum(got.backend_bytes) / model,
                         "per_replica_egress_x_model": max(got.backend_bytes) / model,
                         "peer_x_model": got.peer_bytes / model,
                         "cross_rack_x_model": got.cross_rack_bytes / model,
                         "max_node_sent_x_model": got.max_node_sent / model})
    return rows


def format_rows(rows: list[dict[str, Any]], single: float) -> str:
    lines = [f"one node alone: {single:.1f} s",
             f"{'nodes':>6} {'setup':<14} {'all ready s':>11} {'× alone':>8} {'upstream ×':>10} "
             f"{'backend egress ×':>16} {'per replica ×':>13} {'peers ×':>8} {'cross-rack ×':>12} "
             f"{'max node sent ×':>15}"]
    for r in rows:
        setup = f"{r['replicas']} replicas" if r["mode"] == "replicas" else \
            "node sharing" if r["mode"] == "sharing" else "one backend"
        lines.append(f"{r['nodes']:>6} {setup:<14} {r['all_ready_s']:>11.1f} {r['x_alone']:>8.2f} "
                     f"{r['upstream_x_model']:>10.2f} {r['backend_egress_x_model']:>16.1f} "
                     f"{r['per_replica_egress_x_model']:>13.1f} {r['peer_x_model']:>8.1f} "
                     f"{r['cross_rack_x_model']:>12.1f} {r['max_node_sent_x_model']:>15.2f}")
    return "\n".join(lines)


def _nodes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes takes counts such as 10,100,1000, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("--nodes takes positive counts such as 10,100,1000")
    return values


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=_nodes, default=[10, 100, 1000], help="node counts (default 10,100,1000)")
    parser.add_argument("--model", type=size_argument, default=parse_size("140GB"), help="model size (default 140GB)")
    parser.add_argument("--upstream", type=rate_argument, default=None, metavar="RATE",
                        help="the cluster's link to the Hub (default 10 Gbit/s = 1.25GB/s)")
    parser.add_argument("--node-nic", type=rate_argument, default=None, metavar="RATE",
                        help="each node's NIC (default 100 Gbit/s = 12.5GB/s)")
    parser.add_argument("--backend-nic", type=rate_argument, default=None, metavar="RATE",
                        help="each backend replica's NIC (default 12.5GB/s)")
    parser.add_argument("--node-disk", type=rate_argument, default=None, metavar="RATE",
                        help="each node's disk write rate (default 6GB/s)")
    parser.add_argument("--node-cores", type=_positive(float), default=8.0, help="cores mmfs gets per node (default 8)")
    parser.add_argument("--replicas", type=_positive(int), default=8, help="replicas of the replicas rows (default 8)")
    parser.add_argument("--pieces", type=_positive(int), default=280,
                        help="pieces the model is cut into (default 280: 500 MB of 140 GB)")
    parser.add_argument("--max-load", type=_positive(int), default=4, help="the backend's --peer-max-load (default 4)")
    parser.add_argument("--quick", action="store_true", help="coarser pieces (56), for CI")
    parser.add_argument("--json", action="store_true", help="rows as JSON")
    args = parser.parse_args(argv)
    defaults = Hardware()
    hw = replace(defaults, upstream=args.upstream or defaults.upstream, node_nic=args.node_nic or defaults.node_nic,
                 backend_nic=args.backend_nic or defaults.backend_nic, node_disk=args.node_disk or defaults.node_disk,
                 node_cores=args.node_cores)
    pieces = 56 if args.quick else args.pieces
    rows = table(args.nodes, args.model, hw, replicas=args.replicas, pieces=pieces, max_load=args.max_load)
    if args.json:
        print(json.dumps({"hardware": asdict(hw), "pieces": pieces, "alone_s": alone(args.model, hw, pieces),
                          "rows": rows}, indent=2))
    else:
        print(format_rows(rows, alone(args.model, hw, pieces)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
