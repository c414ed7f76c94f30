"""Several backend replicas as one remote: each chunk has an owner, found by rendezvous hashing.

A replica set is named by a list of URLs (``http://a:3000,http://b:3000``) or by one DNS
name that resolves to every replica (a Kubernetes headless Service); names are resolved
again every :data:`RESOLVE_EVERY` seconds, so replicas that come and go are followed.
A replica's identity is ``IP:port``, the same on every node and replica, so all of them
agree on the owners without talking to each other.

Ownership is rendezvous (highest random weight) hashing: every replica gets a score per
chunk, the highest score owns the chunk, and the others follow in score order. Adding or
removing a replica moves only the chunks it gains or loses; a replica that is not there
(:class:`~mmfs.remote.wire.Unreachable`: refused, reset, closed mid-answer) is skipped for
:data:`DOWN_FOR` seconds and its share goes to the next in each chunk's order, so reads
continue. A slow answer is retried on the same replica, not failed over: an overloaded
owner would otherwise push its chunks to the others, which fetch them upstream again
(measured: 16 nodes on this 2-core machine kept answers over 30 s). An HTTP error is an
answer too (a 404 is a 404 on every replica).

Who asks whom (``docs/protocol.md``, "Replicas"):

* a node sends each chunk request to the chunk's owner, and asks for a file's map (and
  its last chunk, which needs the map) from the owner of the last chunk, so one replica
  verifies each file;
* a replica runs the same routing with itself in the set: chunks it owns come from its
  ``local`` remote (the upstream), the others from their owner over ``/v1/chunk``. So a
  replica that verifies a file, or streams it to a Hub client, takes each other chunk from
  its owner, and each byte leaves the upstream once for the whole cluster. Requests only
  ever go to a replica ranked above the asker for that chunk (it stops at itself), so they
  never loop.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import trio

from ..chunkmap import ChunkMap
from ..errors import InvalidName, MmfsError, UpstreamError
from ..manifest import Manifest
from ..names import RepoRef
from ._http import RetryPolicy
from .backend import BackendRemote, PeerRedirect
from .base import FetchedChunk, FileSource, Remote
from .wire import Unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a replica that did not answer is passed over before it is asked again.
DOWN_FOR = 5.0
#: Seconds between DNS lookups of the names in a replica set.
RESOLVE_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class Replica:
    """One replica: ``id`` (``IP:port``) is what ownership is computed from."""

    id: str
    url: str


def parse_replica_urls(text: str) -> list[str]:
    """``URL[,URL…]`` to a list of base URLs; :class:`InvalidName` naming a bad one."""
    urls = [part.strip().rstrip("/") for part in text.split(",") if part.strip()]
    if not urls:
        raise InvalidName("no replica URL given")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise InvalidName(f"invalid replica URL {url!r}: expected http://HOST:PORT")
        try:
            parts.port
        except ValueError:
            raise InvalidName(f"invalid port in replica URL {url!r}") from None
    return urls


def expand(url: str) -> list[Replica]:
    """The replicas one URL names: one per address its host resolves to (blocking).

    IPv4 addresses only where there are any: a dual-stack name (``localhost``, a pod with
    an A and an AAAA record) is one server, not two replicas."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UpstreamError(f"cannot resolve replica host {host!r}: {exc.strerror or exc}") from exc
    if any(family == socket.AF_INET for family, *_ in infos):
        infos = [info for info in infos if info[0] == socket.AF_INET]
    found: dict[str, Replica] = {}
    for _, _, _, _, address in infos:
        ip = address[0]
        shown = f"[{ip}]" if ":" in ip else ip
        found.setdefault(f"{shown}:{port}", Replica(f"{shown}:{port}", f"{parts.scheme}://{shown}:{port}"))
    return sorted(found.values(), key=lambda r: r.id)


def score(replica_id: str, key: str) -> int:
    """The replica's rendezvous weight for ``key``: a stable 64-bit hash of both."""
    return int.from_bytes(hashlib.blake2b(f"{replica_id}\0{key}".encode(), digest_size=8).digest(), "big")


def rank(replicas: list[Replica], key: str) -> list[Replica]:
    """``replicas`` in ownership order for ``key``: the owner first."""
    return sorted(replicas, key=lambda r: (score(r.id, key), r.id), reverse=True)


class ReplicaSet:
    """The members of a replica set (re-resolved from DNS now and then) and which are down."""

    def __init__(self, urls: list[str], *, always: Replica | None = None, resolve_every: float = RESOLVE_EVERY,
                 down_for: float = DOWN_FOR) -> None:
        self.urls = urls
        self._always = always  # a replica counts itself in even before DNS lists it
        self._resolve_every = resolve_every
        self._down_for = down_for
        self._members = self._lookup()
        self._resolved_at = time.monotonic()
        self._down: dict[str, float] = {}  # replica id -> until when it is passed over

    def _lookup(self) -> list[Replica]:
        found: dict[str, Replica] = {self._always.id: self._always} if self._always else {}
        failed: list[MmfsError] = []
        for url in self.urls:
            try:
                for replica in expand(url):
                    found.setdefault(replica.id, replica)
            except MmfsError as exc:  # one name gone from DNS: the others still serve
                failed.append(exc)
                log.warning("replica set: %s", exc)
        if not found:
            raise failed[0]
        return sorted(found.values(), key=lambda r: r.id)

    @property
    def members(self) -> list[Replica]:
        return list(self._members)

    async def refresh(self) -> None:
        """Resolve the names again if it is time; keep the last members if DNS fails."""
        if time.monotonic() - self._resolved_at < self._resolve_every:
            return
        self._resolved_at = time.monotonic()
        try:
            members = await trio.to_thread.run_sync(self._lookup)
        except MmfsError as exc:
            log.warning("replica set %s: %s; keeping %d known replicas", ",".join(self.urls), exc,
                        len(self._members))
            return
        if members and members != self._members:
            log.info("replica set %s: now %s", ",".join(self.urls), ", ".join(r.id for r in members))
            self._members = members

    def order(self, key: str) -> list[Replica]:
        """Ownership order for ``key``, replicas currently passed over moved to the end
        (still tried, last: when every replica failed lately, one may be back)."""
        now = time.monotonic()
        ranked = rank(self._members, key)
        return [r for r in ranked if self._down.get(r.id, 0.0) <= now] + \
            [r for r in ranked if self._down.get(r.id, 0.0) > now]

    def mark_down(self, replica: Replica, why: str) -> None:
        if self._down.get(replica.id, 0.0) <= time.monotonic():
            log.warning("replica %s does not answer (%s): its chunks go to the next replicas for %gs",
                        replica.url, why, self._down_for)
        self._down[replica.id] = time.monotonic() + self._down_for

    def mark_up(self, replica: Replica) -> None:
        if self._down.pop(replica.id, None) is not None:
            log.info("replica %s answers again", replica.url)

    def down(self) -> list[str]:
        now = time.monotonic()
        return sorted(i for i, until in self._down.items() if until > now)


def chunk_owner_key(source: FileSource, index: int) -> str:
    """What a chunk's owner is computed from: its content, chunk size and index."""
    entry = source.entry
    return f"{entry.content_id}.{entry.chunk_size}.{index}"


class ReplicaRemote(Remote):
    """The replica set as one remote, failing over to the next replica in each key's order.

    On a node, every replica is a :class:`BackendRemote`. On a replica, ``self_id`` names
    it in the set and ``local`` (the upstream) answers for it: the replica then verifies
    files itself (``verifies_files`` is that of ``local``)."""

    def __init__(self, replicas: ReplicaSet, *, policy: RetryPolicy = RetryPolicy(), auth: str | None = None,
                 self_id: str | None = None, local: Remote | None = None) -> None:
        if (self_id is None) != (local is None):
            raise ValueError("a replica needs both self_id and local")
        self.replicas = replicas
        self.self_id = self_id
        self.local = local
        self.verifies_files = local is None or local.verifies_files
        self.url = ",".join(replicas.urls)
        self._policy = replace(policy, fail_over=True)
        self._auth = auth
        self._remotes: dict[str, BackendRemote] = {}
        #: Requests answered per replica id (``mmfs status``, tests).
        self.answered: dict[str, int] = {}
        #: Chunks, and their bytes, that came from other replicas (not from ``local``).
        self.replica_fetches = self.replica_bytes = 0

    def _remote(self, replica: Replica) -> BackendRemote:
        remote = self._remotes.get(replica.id)
        if remote is None:
            remote = self._remotes[replica.id] = BackendRemote(replica.url, policy=self._policy, auth=self._auth)
        return remote

    async def _route(self, key: str, call: Callable[[BackendRemote], Awaitable[T]],
                     local_call: Callable[[], Awaitable[T]] | None = None) -> T:
        """``call(remote)`` on the first replica in ``key``'s order that answers; on this
        replica itself, ``local_call()`` instead."""
        await self.replicas.refresh()
        last: Unreachable | None = None
        for replica in self.replicas.order(key):
            if replica.id == self.self_id and local_call is not None:
                self.answered[replica.id] = self.answered.get(replica.id, 0) + 1
                return await local_call()
            try:
                answer = await call(self._remote(replica))
            except Unreachable as exc:
                last = exc
                self.replicas.mark_down(replica, str(exc))
                continue
            self.replicas.mark_up(replica)
            self.answered[replica.id] = self.answered.get(replica.id, 0) + 1
            return answer
        raise UpstreamError(f"no replica of {self.url} answers: {last}") from last

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        if self.local is not None:
            return await self.local.resolve(repo, revision, auth=auth)
        return await self._route(f"repo:{repo}", lambda r: r.resolve(repo, revision, auth=auth))

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        if self.local is not None:
            return await self.local.manifest(repo, commit, auth=auth)
        return await self._route(f"repo:{repo}", lambda r: r.manifest(repo, commit, auth=auth))

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        if self.local is not None:
            return await self.local.check_access(source, auth=auth)
        return await self._route(f"repo:{source.repo}", lambda r: r.check_access(source, auth=auth))

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        local = self.local

        async def from_replica(remote: BackendRemote) -> FetchedChunk:
            fetched = await remote.fetch_chunk(source, index, auth=auth)
            self.replica_fetches += 1
            self.replica_bytes += len(fetched.data)
            return fetched

        return await self._route(chunk_owner_key(source, index), from_replica,
                                 (lambda: local.fetch_chunk(source, index, auth=auth)) if local else None)

    async def fetch_map(self, source: FileSource, *, wait: float = 0.0, auth: str | None = None) -> ChunkMap | int:
        """From the owner of the file's last chunk: it verifies the file (it must, to serve
        that chunk), so asking it keeps one verification per file in the cluster."""
        last = max(source.entry.chunk_count - 1, 0)
        return await self._route(chunk_owner_key(source, last), lambda r: r.fetch_map(source, wait=wait, auth=auth))

    async def fetch_chunk_or_redirect(self, source: FileSource, index: int, *, auth: str | None = None,
                                      peering: dict[str, str] | None = None) -> FetchedChunk | PeerRedirect:
        """Node-to-node sharing (:mod:`mmfs.remote.peer`): the chunk's owner answers, with
        the bytes or a peer, from its own holder table."""
        return await self._route(chunk_owner_key(source, index),
                                 lambda r: r.fetch_chunk_or_redirect(source, index, auth=auth, peering=peering))

    async def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        """To every replica (each keeps the holder table for the chunks it owns); the
        first answer. :class:`UpstreamError` only when no replica took it."""
        await self.replicas.refresh()
        answers, errors = [], []
        for replica in self.replicas.members:
            try:
                answers.append(await self._remote(replica).post_json(path, payload))
            except MmfsError as exc:
                errors.append(f"{replica.id}: {exc}")
        if not answers:
            raise UpstreamError(f"no replica of {self.url} took /v1/{path}: {'; '.join(errors)}")
        return answers[0]

    @property
    def received_bytes(self) -> int:
        return sum(r.received_bytes for r in self._remotes.values()) + \
            (self.local.received_bytes if self.local is not None else 0)

    def status(self) -> dict[str, object]:
        return {"replicas": [r.id for r in self.replicas.members], "down": self.replicas.down(),
                "answered": dict(self.answered)}

    async def aclose(self) -> None:
        for remote in self._remotes.values():
            await remote.aclose()
        if self.local is not None:
            await self.local.aclose()


__all__ = ["DOWN_FOR", "Replica", "ReplicaRemote", "ReplicaSet", "chunk_owner_key", "expand",
           "parse_replica_urls", "rank", "score"]
