"""Node-to-node sharing, the serving side: ``mmfs mount --peer-listen HOST:PORT``.

A node that shares runs a small HTTP server next to its mount and tells the backend what
it holds. The reading side is :mod:`mmfs.remote.peer`; the backend's holder table is
:mod:`backend_server.holders`; the protocol is in docs/protocol.md ("Node-to-node sharing")::

    other node ─ GET /v1/peer/chunk?content=…&chunk_size=…&index=N ─▶ PeerServer
                                  engine.held_chunk: tiers, or a load already in flight
                                  verified copies only; never fetches for the asker
    heartbeat (every HEARTBEAT_INTERVAL s) ─ POST /v1/peers/heartbeat ─▶ backend
                                  {node, labels, held: {content:chunk size: index ranges}}

Only chunks verified against their file's map are served, so an honest node never passes
on bytes it could not vouch for, and the reader checks them again anyway. Only chunks of
repos known to be open are offered or served (:attr:`PeerServer.shareable`): a peer asks
by content id, which for a gated repo anyone can read in its public listing, and carries
no token, so restricted content never leaves a node this way (the backend does not send
nodes to peers for it either). The server also
answers ``GET /metrics`` (this node's sharing counters, Prometheus text) and ``/healthz``.

The HTTP server is the backend's (:mod:`backend_server.http`): same keep-alive, zero-copy
sends and slow-client limits, one implementation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from backend_server.http import HTTPServer, Request, Response

from .engine import FetchEngine
from .errors import MmfsError
from .manifest import MAX_CHUNK_SIZE, ChunkKey
from .remote.backend import VERIFIED_HEADER
from .remote.peer import PeerCounters, PeeringRemote
from .tiers.base import Chunk

log = logging.getLogger(__name__)

#: Seconds between heartbeats; the backend forgets a node it has not heard from for a few.
HEARTBEAT_INTERVAL = 2.0
#: Chunks sent to peers at once; more get 503 (the asker goes to the backend instead).
MAX_SERVING = 16
#: Longest a peer request waits for a chunk this node is itself still receiving, seconds
#: (less than the asker's read timeout, :class:`~mmfs.remote.peer.PeerTimeouts`).
JOIN_WAIT = 4.0


def parse_labels(text: str) -> dict[str, str]:
    """``zone=a,rack=3`` -> ``{"zone": "a", "rack": "3"}``; ``ValueError`` naming the bad part."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"peer label {part!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


@dataclass(frozen=True, slots=True)
class PeerOptions:
    #: Where the peer server listens.
    host: str
    port: int
    #: The URL other nodes reach it at (default: ``http://HOST:PORT``); also this node's id.
    advertise: str = ""
    #: Topology labels (``zone``, ``rack``, ...): the backend prefers peers sharing them.
    labels: dict[str, str] = field(default_factory=dict)


def held_ranges(keys: set[ChunkKey]) -> dict[str, list[list[int]]]:
    """Chunk keys as ``{"content:chunk_size": [[first, end), …]}``: a whole file is one range."""
    indices: dict[str, list[int]] = defaultdict(list)
    for key in keys:
        indices[f"{key.content_id}:{key.chunk_size}"].append(key.index)
    out: dict[str, list[list[int]]] = {}
    for name, found in indices.items():
        found.sort()
        ranges: list[list[int]] = []
        for index in found:
            if ranges and ranges[-1][1] == index:
                ranges[-1][1] = index + 1
            else:
                ranges.append([index, index + 1])
        out[name] = ranges
    return out


class PeerServer:
    """Serves this node's verified chunks to other nodes and heartbeats to the backend."""

    def __init__(self, engine: FetchEngine, remote: PeeringRemote, options: PeerOptions) -> None:
        self.engine = engine
        self.remote = remote
        self.options = options
        self.counters: PeerCounters = remote.counters
        self._http = HTTPServer(self.handle, max_connections=256)
        #: Whether a content id may go to peers: set to the VFS's answer once it exists
        #: (only content every repo of which is known open); nothing until then.
        self.shareable: Callable[[str], bool] = lambda content_id: False

    @property
    def node_id(self) -> str:
        return self.remote.node_id

    async def run(self, listeners: list[trio.SocketListener], task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve and heartbeat until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._http.serve, listeners, trio.Event())
            nursery.start_soon(self._heartbeats)
            task_status.started()

    # -- serving --------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path = request.path.rstrip("/")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "MethodNotAllowed", f"{request.method} is not allowed here; use GET")
        if path == "/v1/peer/chunk":
            return await self._chunk(request)
        if path == "/metrics":
            return Response.text(self.metrics_text(), content_type="text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return Response.json({"status": "ok", "node": self.node_id, "labels": self.options.labels})
        return _error(404, "NotFound", f"no such endpoint: {path} (see docs/protocol.md)")

    async def _chunk(self, request: Request) -> Response:
        try:
            key = _chunk_key(request)
        except ValueError as exc:
            return _error(400, "InvalidName", str(exc))
        if not self.shareable(key.content_id):  # restricted (or unknown): as if not held
            self.counters.serve_misses += 1
            return _error(404, "NotFound", f"chunk {key.index} of {key.content_id} is not held here")
        if self.counters.serving >= MAX_SERVING:
            return _error(503, "TransientError", f"{MAX_SERVING} chunks are being sent to peers; ask the backend")
        self.counters.serving += 1
        try:
            chunk = await self.engine.held_chunk(key, JOIN_WAIT)
        except MmfsError:
            chunk = None
        if chunk is None:
            self.counters.serving -= 1
            self.counters.serve_misses += 1
            return _error(404, "NotFound", f"chunk {key.index} of {key.content_id} is not held here")

        def done() -> None:
            self.counters.serving -= 1

        self.counters.chunks_served += 1
        self.counters.bytes_served += len(chunk.data)
        return Response(200, [("Content-Type", "application/octet-stream"), (VERIFIED_HEADER, "1")],
                        self._payload(chunk), on_close=done)

    def _payload(self, chunk: Chunk) -> bytes | bytearray:
        """The bytes sent for a chunk (:mod:`mmfs.testing.corrupt_peer` replaces this)."""
        return chunk.data

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """What the backend's holder table needs from this node."""
        held = {key for key in self.engine.held_keys() if self.shareable(key.content_id)}
        return {"node": self.node_id, "labels": self.options.labels, "held": held_ranges(held)}

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.remote.backend.post_json("peers/heartbeat", self.heartbeat())
                self.counters.heartbeats += 1
            except MmfsError as exc:
                self.counters.heartbeat_failures += 1
                log.warning("heartbeat to %s failed: %s (peers are not sent here until one arrives)",
                            self.remote.url, exc)
            except Exception:  # noqa: BLE001 - a bug here must not take the mount down with it
                self.counters.heartbeat_failures += 1
                log.exception("heartbeat to %s failed", self.remote.url)
            await trio.sleep(HEARTBEAT_INTERVAL)

    # -- observability ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``peers`` part of ``mmfs status``."""
        return {"node": self.node_id, "labels": self.options.labels, **self.counters.snapshot()}

    def metrics_text(self) -> str:
        c = self.counters
        samples = [
            ("mmfs_peer_chunks_received_total", "counter", "Chunks received from other nodes (verified).",
             c.chunks_from_peers),
            ("mmfs_peer_bytes_received_total", "counter", "Bytes received from other nodes (verified).",
             c.bytes_from_peers),
            ("mmfs_peer_backend_chunks_total", "counter", "Chunks received from the backend.", c.chunks_from_backend),
            ("mmfs_peer_backend_bytes_total", "counter", "Bytes received from the backend.", c.bytes_from_backend),
            ("mmfs_peer_redirects_total", "counter", "Chunk requests the backend sent to a peer.", c.redirects),
            ("mmfs_peer_fallbacks_total", "counter",
             "Redirected chunks read from the backend after all (peer slow, gone, or wrong).", c.fallbacks),
            ("mmfs_peer_bad_peers_total", "counter",
             "Peers caught sending bytes that did not match the chunk map (reported, avoided).", c.bad_peers),
            ("mmfs_peer_chunks_served_total", "counter", "Chunks sent to other nodes.", c.chunks_served),
            ("mmfs_peer_bytes_served_total", "counter", "Bytes sent to other nodes.", c.bytes_served),
            ("mmfs_peer_serve_misses_total", "counter", "Peer requests for chunks not held here.", c.serve_misses),
            ("mmfs_peer_serving", "gauge", "Chunks being sent to other nodes now.", c.serving),
            ("mmfs_peer_heartbeat_failures_total", "counter", "Heartbeats the backend did not take.",
             c.heartbeat_failures),
        ]
        lines: list[str] = []
        for name, kind, help_text, value in samples:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _chunk_key(request: Request) -> ChunkKey:
    content = request.query_value("content") or ""
    size, index = request.query_value("chunk_size") or "", request.query_value("index") or ""
    if not content or len(content) > 200 or not size.isdigit() or not index.isdigit() or len(index) > 12:
        raise ValueError("a peer chunk is ?content=ID&chunk_size=BYTES&index=N")
    if not 0 < int(size) <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size {size} is out of range")
    return ChunkKey(content, int(size), int(index))


def _error(status: int, code: str, message: str) -> Response:
    return Response.json({"error": message}, status, [("X-Error-Code", code), ("X-Error-Message", message)])


__all__ = ["HEARTBEAT_INTERVAL", "PeerOptions", "PeerServer", "held_ranges", "parse_labels"]
