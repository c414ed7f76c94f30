"""Node-to-node sharing, the reading side: chunks from other nodes, checked against the map.

A node started with ``--peer-listen`` reads through this remote, which wraps its backend
remote. For a chunk of a file whose chunk map it holds, it tells the backend who it is
and that it may be sent elsewhere; the backend answers with the bytes or with ``307`` to
a peer that holds the chunk (docs/protocol.md, "Node-to-node sharing")::

    fetch_chunk ─▶ backend: GET /v1/chunk …  X-Mmfs-Node, X-Mmfs-Peers: ok
                     ├─ 200: the bytes (the backend served them)
                     └─ 307 Location: peer ─▶ GET peer … ─▶ blake3 per block == map?
                                                   ├─ yes: the chunk (verified)
                                                   ├─ no: report "corrupt", avoid the peer ─┐
                                                   └─ slow, gone, 404: report if gone ──────┤
                                                                                             ▼
                                     backend again with X-Mmfs-Peers: no ─▶ the bytes

Peers are untrusted carriers: nothing a peer sends is used unless every block matches the
map this node got from the backend, and a file whose map is not known here yet is read
from the backend only. A peer gets one try with short timeouts; the backend is always the
fallback, so a slow or dead peer costs a reader a little time, never an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import trio

from ..chunkmap import ChunkMap, block_digests
from ..errors import MmfsError
from ..manifest import FileEntry, Manifest
from ..names import RepoRef
from .backend import NODE_HEADER, PEERS_HEADER, BackendRemote, PeerRedirect
from .base import FetchedChunk, FileSource, Remote
from .replicas import ReplicaRemote
from .wire import WireClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerTimeouts:
    """How long a peer gets before the backend is asked instead (seconds)."""

    connect: float = 1.0
    #: Between bytes; also covers a peer waiting for a chunk it is itself still receiving.
    read: float = 5.0
    #: For one whole chunk.
    request: float = 15.0


@dataclass(slots=True)
class PeerCounters:
    """What node-to-node sharing did on this node (``mmfs status``, the node's ``/metrics``)."""

    chunks_from_peers: int = 0
    bytes_from_peers: int = 0
    chunks_from_backend: int = 0
    bytes_from_backend: int = 0
    redirects: int = 0  # 307s the backend answered
    fallbacks: int = 0  # redirects that ended at the backend after all (peer slow, gone, wrong)
    bad_peers: int = 0  # peers caught serving bytes that did not match the map (reported)
    chunks_served: int = 0  # to other nodes
    bytes_served: int = 0
    serve_misses: int = 0  # peer requests for chunks not held here (404)
    serving: int = 0  # peer requests being answered now
    heartbeats: int = 0
    heartbeat_failures: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class PeeringRemote(Remote):
    """The backend remote (one backend, or replicas: then each chunk's owner decides and
    heartbeats go to every replica), with chunks of verified files fetched from peers where
    the backend says so. Everything but chunks goes to the backend unchanged."""

    verifies_files = True

    def __init__(self, backend: BackendRemote | ReplicaRemote, node_id: str, *,
                 timeouts: PeerTimeouts = PeerTimeouts()) -> None:
        self.backend = backend
        self.url = backend.url
        self.node_id = node_id
        self.counters = PeerCounters()
        self._client = WireClient(connect_timeout=timeouts.connect, read_timeout=timeouts.read,
                                  request_timeout=timeouts.request)
        self._known_map: Callable[[FileEntry], ChunkMap | None] = lambda entry: None
        self._ask_map: Callable[[FileSource], Any] | None = None
        self._bad: set[str] = set()  # peers caught serving wrong bytes: never asked again

    def attach(self, known_map: Callable[[FileEntry], ChunkMap | None],
               ask_map: Callable[[FileSource], Any]) -> None:
        """Where to find a file's map: the engine that reads through this remote (it asks
        the backend for maps, at most every poll interval)."""
        self._known_map, self._ask_map = known_map, ask_map

    # -- the backend, unchanged ---------------------------------------------------------

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        return await self.backend.resolve(repo, revision, auth=auth)

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        return await self.backend.manifest(repo, commit, auth=auth)

    async def fetch_map(self, source: FileSource, *, wait: float = 0.0, auth: str | None = None) -> ChunkMap | int:
        return await self.backend.fetch_map(source, wait=wait, auth=auth)

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        return await self.backend.check_access(source, auth=auth)

    @property
    def received_bytes(self) -> int:
        return self.backend.received_bytes + self._client.received_bytes

    async def aclose(self) -> None:
        await self._client.aclose()
        await self.backend.aclose()

    # -- chunks -------------------------------------------------------------------------

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        chunk_map = self._known_map(source.entry)
        if chunk_map is None and self._ask_map is not None:
            chunk_map = await self._map_now(source)
        if chunk_map is None:
            # Not verifiable here yet: from the backend, and not offered to others (this
            # node's copy will be provisional, which its peer server does not serve).
            return self._from_backend(await self.backend.fetch_chunk(source, index, auth=auth))
        answer = await self.backend.fetch_chunk_or_redirect(
            source, index, auth=auth, peering={NODE_HEADER: self.node_id, PEERS_HEADER: "ok"})
        if isinstance(answer, FetchedChunk):
            return self._from_backend(answer)
        self.counters.redirects += 1
        if answer.peer not in self._bad:
            got = await self._from_peer(answer, source, index, chunk_map)
            if got is not None:
                return got
        self.counters.fallbacks += 1
        answer = await self.backend.fetch_chunk_or_redirect(
            source, index, auth=auth, peering={NODE_HEADER: self.node_id, PEERS_HEADER: "no"})
        assert isinstance(answer, FetchedChunk)  # "no": the backend serves
        return self._from_backend(answer)

    async def _map_now(self, source: FileSource) -> ChunkMap | None:
        """The file's map if the backend has one (asked at most every poll interval)."""
        assert self._ask_map is not None
        try:
            found = await self._ask_map(source)
        except MmfsError:
            return None
        return found if isinstance(found, ChunkMap) else None

    def _from_backend(self, fetched: FetchedChunk) -> FetchedChunk:
        self.counters.chunks_from_backend += 1
        self.counters.bytes_from_backend += len(fetched.data)
        return fetched

    async def _from_peer(self, redirect: PeerRedirect, source: FileSource, index: int,
                         chunk_map: ChunkMap) -> FetchedChunk | None:
        """The chunk from the peer, verified; ``None`` (after reporting where due) otherwise."""
        start, end = source.entry.chunk_span(index)
        try:
            response = await self._client.request("GET", redirect.url, max_body=end - start,
                                                  follow_redirects=False)
        except MmfsError as exc:
            log.info("peer %s did not answer for %s chunk %d (%s); reading from the backend", redirect.peer,
                     source.entry.path, index, exc)
            await self._report(redirect.peer, "unreachable", source, index)
            return None
        if response.status_code != 200 or len(response.content) != end - start:
            log.info("peer %s answered HTTP %d (%d bytes) for %s chunk %d; reading from the backend",
                     redirect.peer, response.status_code, len(response.content), source.entry.path, index)
            return None
        digests = await trio.to_thread.run_sync(block_digests, response.content)
        if not chunk_map.matches(index, digests):
            self._bad.add(redirect.peer)
            self.counters.bad_peers += 1
            log.error("integrity: peer %s sent %s chunk %d with bytes that do not match the file's chunk map; "
                      "reported and avoided", redirect.peer, source.entry.path, index)
            await self._report(redirect.peer, "corrupt", source, index)
            return None
        self.counters.chunks_from_peers += 1
        self.counters.bytes_from_peers += len(response.content)
        return FetchedChunk(data=response.content, file_verified=True, source_url=redirect.url, digests=digests)

    async def _report(self, peer: str, problem: str, source: FileSource, index: int) -> None:
        """Tell the backend (best effort, briefly): it stops sending nodes to that peer."""
        with trio.move_on_after(2.0):
            try:
                await self.backend.post_json("peers/report", {
                    "reporter": self.node_id, "peer": peer, "problem": problem,
                    "content": source.entry.content_id, "chunk_size": source.entry.chunk_size, "index": index,
                    "at": time.time()})
            except MmfsError as exc:
                log.warning("could not report peer %s to the backend: %s", peer, exc)


__all__ = ["PeerCounters", "PeerTimeouts", "PeeringRemote"]
