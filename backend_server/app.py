"""The backend's HTTP API over one :class:`~mmfs.engine.FetchEngine` whose remote is the upstream
(the Hub, and the object stores of its ``--store`` list: docs/providers.md).

Three faces, one engine (the full reference is ``docs/protocol.md``):

* the node protocol (:mod:`mmfs.remote.backend` is its client): ``/v1/resolve``,
  ``/v1/manifest``, ``/v1/chunk`` (one chunk; ``X-Mmfs-Verified`` once the file is),
  ``/v1/map`` (a file's chunk map, docs/datapath.md), plus ``/v1/file`` (a whole file or a
  ``Range``, streamed) and ``POST /v1/prefetch``;
* with ``--nixl``, the NIXL data plane (:mod:`backend_server.nixl_plane`): ``/v1/nixl/agent``,
  ``/v1/nixl/chunk`` (the chunk lands in a leased slot the node READs), ``/v1/nixl/release``;
* the Hub's download API for models and datasets (``/api/models/...``,
  ``/api/datasets/...``, ``HEAD``/``GET /[datasets/]<org>/<name>/resolve/...``, ``POST
  .../paths-info/<rev>``), generated from the engine's manifest and served from the
  engine, so an unmodified ``huggingface_hub`` pointed at the backend with ``HF_ENDPOINT``
  reads through the cluster cache; the Hub's other read routes (commits, whoami, refs,
  expanded listings, spaces) go to the upstream as the caller (:mod:`.passthrough`);
* operations: ``/healthz``, ``/metrics``, ``/v1/files``;
* derived artifacts (:mod:`.artifact_api`): ``/v1/artifacts...`` to push, publish, lease
  builds and list them. Their files are read like a commit's through the node protocol,
  as the pseudo repo ``artifacts/mmfs/published`` whose commits are artifact ids; a reader
  must be allowed to read the artifact's model (:meth:`BackendApp._listing`).

Every name taken from a URL goes through :mod:`mmfs.names` before it reaches the engine,
and every answer about a repo, listings included, first passes :mod:`.access` (see
:meth:`BackendApp._listing`). The engine asks the upstream with the backend's own
``HF_TOKEN``; a caller's ``Authorization`` is forwarded only for repos that token cannot
read, after the caller's token was checked, because the engine shares one fetch per chunk
among all callers and a bad token must not fail the others' reads.
Streams send chunks in order while the next ones are fetched (:meth:`FetchEngine.prefetch`
into the shared memory tier), so a stream holds one chunk of its own at a time. A stream
is a reader like a FUSE handle (:class:`~mmfs.engine.Served`): its last chunk goes out only
once the file's map exists and every provisional chunk it sent matches it. A failure after
the headers went out aborts the connection mid-body, and a client that then resumes a file
that failed verification here gets the whole file again (``200``, not ``206``), so a client
never completes a wrong file, resumes included (docs/datapath.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qs, quote, unquote

import trio

from mmfs.budget import ByteBudget
from mmfs.engine import FetchEngine, Served
from mmfs.errors import (AccessDenied, EntryNotFound, FailureLog, IntegrityError, InvalidName, MmfsError, NotFound,
                         RepoNotFound, TransientError, first_error)
from mmfs.manifest import ChunkKey, FileEntry, Manifest
from mmfs.tiers.base import Chunk
from mmfs.artifacts import ArtifactKey
from mmfs.names import (ARTIFACTS, STORE_PROVIDERS, RepoRef, check_path, check_revision, hub_provider, is_commit,
                        make_repo)
from mmfs.remote.backend import ACCESS_HEADER, NODE_HEADER, PEER_HEADER, PEERS_HEADER, VERIFIED_HEADER
from mmfs.remote.base import FileSource
from mmfs.remote.hub import hub_path
from mmfs.remote.replicas import ReplicaRemote

from .access import ADMIN_HEADER, GATED, PRIVATE, AccessControl, check_admin
from .artifact_api import ArtifactApi
from .artifact_store import ArtifactNotFound, ArtifactStore
from .holders import HolderTable
from .http import Request, Response, Send
from .metrics import Metrics
from .passthrough import READ_POSTS, Passthrough

if TYPE_CHECKING:
    from .nixl_plane import NixlPlane
    from .versions import VersionRoutes

log = logging.getLogger(__name__)
#: Requests answered 5xx: the first of each kind at WARNING/ERROR with its cause.
failures = FailureLog(log)

#: Bytes of read-ahead a stream keeps in flight (in chunks: at least 2, at most 32).
READAHEAD_BYTES = 32 << 20
#: Bytes of chunk data responses may hold at once, all together: each file stream holds
#: the chunk it is sending, each ``/v1/chunk`` answer its chunk until sent (and a
#: ``/v1/nixl/chunk`` one until the chunk is in a slot). With 50 readers spread over a file
#: this, not the reader count, bounds their memory. Responses wait for their turn; one
#: stream is never slowed by it.
STREAM_MEMORY = 32 << 20
#: Seconds a stream waits for its share of ``STREAM_MEMORY`` before giving up (503 before
#: the headers, an aborted body after): twice the server's send timeout, so a waiting
#: stream outlasts any client that stopped reading while holding a share.
STREAM_WAIT = 60.0
#: Files warmed at once by ``POST /v1/prefetch``.
PREFETCH_FILES = 4
#: Seconds after a file failed verification during which resumes of it are refused.
RESUME_REFUSAL = 60.0
#: Longest ``/v1/map?wait=`` may hold a request, seconds.
MAX_MAP_WAIT = 30.0


class BadRange(InvalidName):
    """A ``Range`` header the backend cannot honour (malformed, multiple, or past the end)."""

    status = 416


class MethodNotAllowed(InvalidName):
    status = 405


class RestrictedOverTcp(TransientError):
    """A NIXL chunk request for a gated or private repo. The NIXL pool is registered whole
    and READs are one-sided, so any node holding the backend's agent metadata can read
    any slot: restricted bytes never enter it. The node fetches such chunks over TCP."""

    @classmethod
    def code(cls) -> str:
        return "RestrictedOverTcp"


class BackendApp:
    def __init__(self, engine: FetchEngine, access: AccessControl, metrics: Metrics, *,
                 upstream: str = "", data_dir: str = "", readahead_bytes: int = READAHEAD_BYTES,
                 stream_memory: int = STREAM_MEMORY, stream_wait: float = STREAM_WAIT,
                 stats: Callable[[], dict[str, int]] | None = None, nixl: NixlPlane | None = None,
                 holders: HolderTable | None = None, artifacts: ArtifactStore | None = None,
                 publish_token: str | None = None, admin_token: str | None = None) -> None:
        self.engine = engine
        self.holders = holders or HolderTable()
        self.admin_token = admin_token
        self.nixl = nixl
        self.access = access
        self.metrics = metrics
        self.upstream = upstream
        self.data_dir = data_dir
        self.readahead_bytes = readahead_bytes
        self.stream_budget = ByteBudget(stream_memory, "--stream-memory budget")
        self.stream_wait = stream_wait
        self.server_stats = stats or (lambda: {"connections": 0, "active_requests": 0})
        #: Ref watching, node updates and gc (:mod:`.versions`); set by the server.
        self.versions: VersionRoutes | None = None
        self.artifacts = ArtifactApi(artifacts, check_reader=self._check_artifact_reader,
                                     is_restricted=access.is_restricted,
                                     publish_token=publish_token,
                                     replica_count=self._replica_count) if artifacts is not None else None
        self.passthrough = Passthrough(upstream) if upstream else None

    async def aclose(self) -> None:
        """Close the pass-through's connections to the upstream."""
        if self.passthrough is not None:
            await self.passthrough.aclose()

    # -- dispatch -----------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        route = "other"
        try:
            segments = _segments(request.path)
            route, handler = self._route(request, segments)
            response = await handler(request, segments)
        except MmfsError as err:
            if err.status >= 500:  # the backend's or the upstream's failure, not the caller's
                failures.failed(f"{request.method} {route}", err)
            response = error_response(err)
        response.route = route
        return response

    def _route(self, request: Request, s: list[str]
               ) -> tuple[str, Callable[[Request, list[str]], Awaitable[Response]]]:
        method = request.method

        def allow(route: str, handler: Callable, *methods: str):  # type: ignore[type-arg]
            if method not in methods:
                raise MethodNotAllowed(f"{method} is not allowed on {route}; use {' or '.join(methods)}")
            return route, handler

        if s == ["healthz"]:
            return allow("healthz", self.healthz, "GET", "HEAD")
        if s == ["metrics"]:
            return allow("metrics", self.metrics_page, "GET")
        if s[:1] == ["v1"]:
            kind = s[1] if len(s) > 1 else ""
            if kind == "files" and len(s) == 2:
                return allow("files", self.files, "GET")
            if kind == "peers" and len(s) <= 3:
                if len(s) == 2:
                    return allow("peers", self.peers, "GET")
                if s[2] == "heartbeat":
                    return allow("peers_heartbeat", self.peers_heartbeat, "POST")
                if s[2] == "report":
                    return allow("peers_report", self.peers_report, "POST")
            if self.versions is not None:
                if s[1:] == ["refs", "watch"]:
                    return allow("refs_watch", self.versions.refs_watch, "POST")
                if s[1:] == ["refs"]:
                    return allow("refs", self.versions.refs, "GET")
                if s[1:] == ["gc"]:
                    return allow("gc", self.versions.gc, "POST")
                if kind == "watch" and len(s) >= 6:
                    return allow("watch", self.versions.watch, "POST")
            if kind == "artifacts" and self.artifacts is not None:
                found = self.artifacts.route(method, s[1:])
                if found is not None:
                    return allow(found[0], found[1], *found[2])
            if kind in ("resolve", "manifest", "prefetch") and len(s) >= 6:
                handler = {"resolve": self.v1_resolve, "manifest": self.v1_manifest,
                           "prefetch": self.v1_prefetch}[kind]
                return allow(kind, handler, "POST" if kind == "prefetch" else "GET")
            if kind == "nixl" and len(s) >= 3:
                if s[2] == "agent" and len(s) == 3:
                    return allow("nixl_agent", self.nixl_agent, "GET")
                if s[2] == "chunk" and len(s) >= 8:
                    return allow("nixl_chunk", self.nixl_chunk, "GET")
                if s[2] == "release" and len(s) == 4:
                    return allow("nixl_release", self.nixl_release, "POST")
            if kind in ("chunk", "file", "map") and len(s) >= 7:
                if kind == "chunk":
                    return allow("chunk", self.v1_chunk, "GET")
                if kind == "map":
                    return allow("map", self.v1_map, "GET")
                return allow("file", self.v1_file, "GET", "HEAD")
            raise NotFound(f"no such endpoint: /{'/'.join(s)} (see docs/protocol.md)")
        if s[:1] == ["api"] and len(s) >= 4 and s[1] in ("models", "datasets"):
            if len(s) == 4 or (s[4] == "revision" and len(s) >= 6):
                return allow("hub_repo_info", self.hub_repo_info, "GET")
            # Expanded listings carry last commits and security scans, which only the
            # upstream knows: those pass through.
            if s[4] == "tree" and len(s) >= 6 and not _true(request.query_value("expand")):
                return allow("hub_tree", self.hub_tree, "GET")
            if s[4:] == ["refs"] and self.versions is not None:
                return allow("hub_refs", self.versions.hub_refs, "GET")
            if s[4] == "paths-info" and len(s) >= 6 and method == "POST" and \
                    not _true(_form(request).get("expand", [""])[-1]):
                return "hub_paths_info", self.hub_paths_info
        if s[:1] == ["datasets"] and len(s) >= 6 and s[3] == "resolve":
            return allow("hub_resolve", self.hub_resolve, "GET", "HEAD")
        if s[:1] in (["api"], ["spaces"]) and len(s) >= 2:
            if method == "POST" and len(s) >= 3 and s[-2] in READ_POSTS:
                return "hub_passthrough", self.hub_passthrough
            return allow("hub_passthrough", self.hub_passthrough, "GET", "HEAD")
        if len(s) >= 5 and s[2] == "resolve":
            return allow("hub_resolve", self.hub_resolve, "GET", "HEAD")
        raise NotFound(f"no such endpoint: /{'/'.join(s)}")

    # -- operations ---------------------------------------------------------------------

    async def healthz(self, request: Request, s: list[str]) -> Response:
        stats = self.engine.statistics()
        return Response.json({"status": "ok", "upstream": self.upstream, "data_dir": self.data_dir,
                              "uptime_s": round(time.time() - self.metrics.started, 3),
                              "tiers": {t.name: {"used_bytes": t.used_bytes, "limit_bytes": t.limit_bytes,
                                                 "entries": t.entries} for t in stats.tiers},
                              "inflight_fetches": stats.inflight,
                              **({"artifacts": self.artifacts.statistics()} if self.artifacts else {}),
                              "stream_memory": {"used_bytes": self.stream_budget.total - self.stream_budget.free,
                                                "limit_bytes": self.stream_budget.total,
                                                "peak_used_bytes": self.stream_budget.peak,
                                                "waiting": self.stream_budget.waiting},
                              **({"replicas": self.engine.remote.status()}
                                 if isinstance(self.engine.remote, ReplicaRemote) else {})})

    async def metrics_page(self, request: Request, s: list[str]) -> Response:
        server = self.server_stats()
        self.metrics.access_checks.clear()
        self.metrics.access_checks.update(self.access.outcomes)
        remote = self.engine.remote
        replicas = (remote.replica_fetches, remote.replica_bytes) if isinstance(remote, ReplicaRemote) else (0, 0)
        text = self.metrics.render(self.engine.statistics(), connections=server["connections"],
                                   active_requests=server["active_requests"],
                                   nixl=self.nixl.statistics() if self.nixl else None,
                                   replica_fetches=replicas[0], replica_bytes=replicas[1],
                                   holders=self.holders.statistics(),
                                   versions=self.versions.metrics() if self.versions else None,
                                   artifacts=self.artifacts.statistics() if self.artifacts else None)
        return Response.text(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def files(self, request: Request, s: list[str]) -> Response:
        """What the caches hold. Entries of restricted repos only with the admin token
        (when one is set): their paths and commits are not every caller's to see."""
        metadata = self.engine.metadata
        if metadata is None:
            return Response.json({"files": [], "refs": {}})
        everything = bool(self.admin_token) and request.header(ADMIN_HEADER) is not None
        if everything:
            check_admin(self.admin_token, request.header(ADMIN_HEADER))

        def shown(repo_id: str | None) -> bool:
            return everything or (repo_id is not None and not self.access.is_restricted_id(repo_id))

        def collect() -> dict:
            return {"files": [asdict(r) for r in metadata.files() if shown(self._repo_of_url(r.source_url))],
                    "refs": {k: asdict(v) for k, v in metadata.refs().items()
                             if shown(_hub_path_of_key(k.partition("@")[0]))}}

        return Response.json(await trio.to_thread.run_sync(collect))

    def _repo_of_url(self, url: str) -> str | None:
        """The repo's Hub path (``org/name``, ``datasets/org/name``) of an upstream
        ``resolve`` URL the engine fetched from, else ``None``."""
        base = self.upstream.rstrip("/") + "/"
        if not url.startswith(base) or "/resolve/" not in url:
            return None
        return url[len(base):].split("/resolve/", 1)[0]

    # -- the node protocol --------------------------------------------------------------

    async def v1_resolve(self, request: Request, s: list[str]) -> Response:
        repo = _repo(s[2], s[3], s[4])
        revision = check_revision("/".join(s[5:]))
        manifest = await self._listing(repo, revision, request.header("authorization"))
        return Response.json({"commit": manifest.commit})

    async def v1_manifest(self, request: Request, s: list[str]) -> Response:
        repo = _repo(s[2], s[3], s[4])
        revision = check_revision("/".join(s[5:]))
        manifest = await self._listing(repo, revision, request.header("authorization"))
        return Response(200, [("Content-Type", "application/json"), ("X-Repo-Commit", manifest.commit)],
                        manifest.dumps())

    async def v1_chunk(self, request: Request, s: list[str]) -> Response:
        redirect = await self._peer_for(request, s[2:])
        if redirect is not None:
            return redirect
        held: list[int] = []  # this response's share of --stream-memory, until it is sent
        try:
            source, index, data, verified = await self._chunk(request, s[2:], held)
        except BaseException:
            self._give_back(held)
            raise
        start, end = source.entry.chunk_span(index)
        return Response(200, [("Content-Type", "application/octet-stream"),
                              ("X-Repo-Commit", source.commit), ("X-Mmfs-Chunk-Range", f"{start}-{end - 1}"),
                              ("X-Mmfs-Chunk-Size", str(source.entry.chunk_size)),
                              *([(VERIFIED_HEADER, "1")] if verified else [])], data,
                        on_close=lambda: self._give_back(held))

    async def _peer_for(self, request: Request, s: list[str]) -> Response | None:
        """For a node that shares (``X-Mmfs-Node``): a ``307`` to a peer holding the chunk,
        where :class:`~.holders.HolderTable` finds one worth it; ``None``: serve it here.
        Only for nodes that hold the file's map, which they check the peer's bytes against."""
        node = request.header(NODE_HEADER)
        if not node:
            return None
        source, _ = await self._file_of(request, s)  # access is checked before any redirect
        if self.access.is_restricted(source.repo):
            return None  # peers serve without tokens: restricted chunks come from here only
        raw_index = request.query_value("index") or ""
        if not raw_index.isdigit() or int(raw_index) >= source.entry.chunk_count:
            return None  # _chunk answers the error
        key = source.entry.chunk_key(int(raw_index))
        # "ok": the node holds the file's map (from whichever replica verified the file) and
        # checks the peer's bytes against it; this replica need not know the map itself.
        may_redirect = request.header(PEERS_HEADER) == "ok"
        peer = self.holders.choose(node, key, may_redirect=may_redirect)
        if peer is None:
            return None
        location = (f"{peer}/v1/peer/chunk?content={quote(key.content_id, safe='')}&chunk_size={key.chunk_size}"
                    f"&index={key.index}")
        return Response(307, [("Location", location), (PEER_HEADER, peer), ("Content-Type", "application/json")],
                        b'{"peer": true}')

    async def peers(self, request: Request, s: list[str]) -> Response:
        return Response.json(self.holders.describe())

    async def peers_heartbeat(self, request: Request, s: list[str]) -> Response:
        accepted = self.holders.heartbeat(_json_body(request))
        return Response.json({"ttl": self.holders.ttl, "banned": not accepted})

    async def peers_report(self, request: Request, s: list[str]) -> Response:
        payload = _json_body(request)
        self.holders.report(payload)
        log.warning("node %s reported peer %s: %s", str(payload.get("reporter"))[:200], payload.get("peer"),
                    payload.get("problem"))
        return Response.json({"forgotten": payload.get("peer")})

    def _give_back(self, held: list[int]) -> None:
        while held:
            self.stream_budget.release(held.pop())

    async def _chunk(self, request: Request, s: list[str], held: list[int] | None = None, *,
                     open_only: bool = False) -> tuple[FileSource, int, bytes, bool]:
        """One chunk for ``<provider>/<org>/<name>/<commit>/<path>?index=N`` (``s``), and
        whether its file is verified (its map exists). Not hashed here: nodes hash what
        they receive once and check it against the map (docs/datapath.md).

        With ``held``, the chunk's bytes are first taken from ``--stream-memory`` (waiting
        as streams do; :class:`TransientError` when they stay busy) and the share is
        appended to ``held``: the caller gives it back once the response is over.
        ``open_only`` refuses chunks of restricted repos (:class:`RestrictedOverTcp`)."""
        source, auth = await self._file_of(request, s)
        if open_only and self.access.is_restricted(source.repo):
            raise RestrictedOverTcp(f"{source.repo.repo_id} is gated or private: its chunks go over TCP only "
                                    "(/v1/chunk), never through the shared NIXL pool")
        raw_index = request.query_value("index")
        if raw_index is None or not _is_number(raw_index) or len(raw_index) > 12:
            raise InvalidName("the chunk endpoint needs ?index=N with N a chunk number (0, 1, ...)")
        index = int(raw_index)
        if index >= source.entry.chunk_count:
            raise InvalidName(f"chunk {index} is out of range: {source.entry.path} has {source.entry.chunk_count} "
                              f"chunks of {source.entry.chunk_size} bytes")
        if held is not None:
            start, end = source.entry.chunk_span(index)
            held.append(await self.stream_budget.acquire(end - start, self.stream_wait))
        tier = self._tier_of(source.entry.chunk_key(index))
        chunk = await self._read_chunk(source, index, auth)
        self.metrics.served_bytes[tier] += len(chunk.data)
        return source, index, chunk.data, chunk.verified or self.engine.is_verified(source.entry)

    async def _file_of(self, request: Request, s: list[str]) -> tuple[FileSource, str | None]:
        """The file ``<provider>/<org>/<name>/<commit>/<path>`` (``s``) names, access checked."""
        repo = _repo(s[0], s[1], s[2])
        revision = check_revision(s[3])
        path = check_path("/".join(s[4:]))
        return await self._source(repo, revision, path, request.header("authorization"))

    async def v1_map(self, request: Request, s: list[str]) -> Response:
        """A file's chunk map; ``?wait=SECONDS`` verifies the file first, answering ``202``
        with the progress so far if that takes longer (the node asks again)."""
        source, auth = await self._file_of(request, s[2:])
        raw_wait = request.query_value("wait") or "0"
        try:
            wait = min(float(raw_wait), MAX_MAP_WAIT)
        except ValueError:
            raise InvalidName(f"wait must be a number of seconds, not {raw_wait[:40]!r}") from None
        chunk_map = self.engine.known_map(source.entry)
        if chunk_map is None and wait > 0:
            with trio.move_on_after(wait):
                chunk_map = await self.engine.chunk_map(source, wait=True, auth=auth)
        if chunk_map is None:
            return Response.json({"verified_bytes": self.engine.verification_progress(source.entry),
                                  "size": source.entry.size, "progress": self.engine.activity}, 202,
                                 [("Retry-After", "1")])
        return Response(200, [("Content-Type", "application/octet-stream"), ("X-Repo-Commit", source.commit),
                              ("X-Mmfs-Chunk-Size", str(chunk_map.chunk_size))], chunk_map.digests)

    # -- the NIXL data plane (docs/protocol.md, "NIXL data plane") ------------------------

    def _plane(self) -> NixlPlane:
        if self.nixl is None:
            raise NotFound("this backend runs without a NIXL data plane (start it with --nixl); use /v1/chunk")
        return self.nixl

    async def nixl_agent(self, request: Request, s: list[str]) -> Response:
        return Response.json(self._plane().describe())

    async def nixl_chunk(self, request: Request, s: list[str]) -> Response:
        plane = self._plane()
        held: list[int] = []  # the chunk counts against --stream-memory until it is in a slot
        try:
            source, index, data, verified = await self._chunk(request, s[3:], held, open_only=True)
            start, end = source.entry.chunk_span(index)
            answer = await plane.lease(data, verified)
        finally:
            self._give_back(held)
        answer.update(commit=source.commit, start=start, end=end)
        return Response.json(answer)

    async def nixl_release(self, request: Request, s: list[str]) -> Response:
        failed = (request.query_value("failed") or "").lower() in ("1", "true")
        if not self._plane().release(s[3], failed=failed):
            raise NotFound(f"lease {s[3][:40]!r} is unknown or expired: do not trust bytes read under it")
        return Response.json({"released": True})

    async def v1_file(self, request: Request, s: list[str]) -> Response:
        repo = _repo(s[2], s[3], s[4])
        revision = check_revision(s[5])
        path = check_path("/".join(s[6:]))
        source, auth = await self._source(repo, revision, path, request.header("authorization"))
        response = await self._serve_file(request, source, auth)
        response.headers.append((ACCESS_HEADER, self.access.kind(repo)))
        return response

    async def v1_prefetch(self, request: Request, s: list[str]) -> Response:
        check_admin(self.admin_token, request.header(ADMIN_HEADER))
        repo = _repo(s[2], s[3], s[4])
        revision = check_revision("/".join(s[5:]))
        patterns = request.query_values("include")
        for pattern in patterns:
            if not pattern or "\0" in pattern or len(pattern) > 1024:
                raise InvalidName("include patterns must be 1 to 1024 characters without NUL")
        manifest = await self._listing(repo, revision, request.header("authorization"), content=True)
        auth = self._upstream_auth(repo, request.header("authorization"))
        chosen = [f for f in manifest.files if not patterns or any(fnmatch.fnmatchcase(f.path, p) for p in patterns)]
        started = time.perf_counter()
        upstream_before = self._upstream_bytes()
        errors, first = await self.warm_files(repo, manifest.commit, chosen, auth)
        summary = {"repo": str(repo), "revision": revision, "commit": manifest.commit, "files": len(chosen),
                   "bytes": sum(f.size for f in chosen),
                   "upstream_bytes": self._upstream_bytes() - upstream_before,
                   "seconds": round(time.perf_counter() - started, 3), "errors": errors}
        if first:
            err = first[0]
            summary["error"] = f"{len(errors)} of {len(chosen)} files failed; first: {errors[0]}"
            return Response.json(summary, err.status, [("X-Error-Code", err.code())])
        return Response.json(summary)

    def _replica_count(self) -> int:
        """Replicas of this backend now (DNS may add some later), 1 without ``--replicas``."""
        remote = self.engine.remote
        return len(remote.replicas.members) if isinstance(remote, ReplicaRemote) else 1

    def _upstream_bytes(self) -> int:
        """Bytes this process fetched from the upstream (not from other replicas)."""
        remote = self.engine.remote
        return self.engine.statistics().remote_bytes - \
            (remote.replica_bytes if isinstance(remote, ReplicaRemote) else 0)

    # -- the Hub's download API ---------------------------------------------------------

    async def hub_repo_info(self, request: Request, s: list[str]) -> Response:
        repo = _api_repo(s)
        revision = check_revision("/".join(s[5:])) if len(s) > 4 else "main"
        manifest = await self._listing(repo, revision, request.header("authorization"))
        blobs = (request.query_value("blobs") or "").lower() in ("true", "1")
        return Response.json(repo_info_json(manifest, blobs=blobs, kind=self.access.kind(repo)),
                             headers=[("X-Repo-Commit", manifest.commit)])

    async def hub_tree(self, request: Request, s: list[str]) -> Response:
        repo = _api_repo(s)
        revision = check_revision(s[5])
        path = "/".join(s[6:]).strip("/")
        if path:
            check_path(path)
        manifest = await self._listing(repo, revision, request.header("authorization"))
        recursive = _true(request.query_value("recursive"))
        return Response.json(tree_json(manifest, path, recursive), headers=[("X-Repo-Commit", manifest.commit)])

    async def hub_paths_info(self, request: Request, s: list[str]) -> Response:
        """``get_paths_info``: the entries of the listed paths that exist (others are left
        out, as the Hub does), shaped as tree entries."""
        repo = _api_repo(s)
        revision = check_revision("/".join(s[5:]))
        paths = [check_path(p.strip("/")) for p in _form(request).get("paths", []) if p.strip("/")]
        manifest = await self._listing(repo, revision, request.header("authorization"))
        return Response.json(path_entries(manifest, paths), headers=[("X-Repo-Commit", manifest.commit)])

    async def hub_passthrough(self, request: Request, s: list[str]) -> Response:
        if self.passthrough is None or self.engine.config.offline:
            raise TransientError(f"/{'/'.join(s)[:200]} is answered by the upstream only, and this backend "
                                 f"{'runs with HF_HUB_OFFLINE' if self.passthrough else 'has no upstream'}")
        return await self.passthrough.forward(request)

    async def hub_resolve(self, request: Request, s: list[str]) -> Response:
        if s[0] == "datasets":
            repo, s = _repo(hub_provider("dataset"), s[1], s[2]), s[1:]
        else:
            repo = _repo(hub_provider("model"), s[0], s[1])
        revision = check_revision(s[3])
        path = check_path("/".join(s[4:]))
        manifest = await self._listing(repo, revision, request.header("authorization"), path, content=True)
        entry = manifest.file(path)
        if entry is None:
            # The Hub names the commit even on a 404, so clients can cache the absence.
            err = EntryNotFound(f"{path} does not exist in {repo.repo_id} at {manifest.commit}")
            return error_response(err, [("X-Repo-Commit", manifest.commit)])
        source = FileSource(repo, manifest.commit, entry)
        return await self._serve_file(request, source, self._upstream_auth(repo, request.header("authorization")))

    # -- serving files ------------------------------------------------------------------

    async def _serve_file(self, request: Request, source: FileSource, auth: str | None) -> Response:
        entry = source.entry
        entry.check_empty()  # a zero-byte file has no chunk to verify: its hash is checked here
        span = parse_range(request.header("range"), entry.size)
        tainted_at = self.engine.tainted_at(entry)
        if span is not None and span[0] > 0 and span[1] == entry.size and tainted_at:
            # The shape of a resume, of a file readers were given wrong bytes of here: the
            # client's prefix may hold bytes of that attempt. Right after the failure it is
            # refused (a client resuming at once would otherwise loop on a corrupt upstream,
            # each pass a full upstream fetch); later the whole file goes out (200), which
            # makes Hub clients start over (huggingface_hub truncates on a 200 to a Range).
            since = time.time() - tainted_at
            if since < RESUME_REFUSAL:
                raise IntegrityError(f"{entry.path}: wrong bytes of this file were served {since:.0f} s ago (it "
                                     "failed verification); a resumed download could keep them: start again")
            log.warning("%s@%s %s: Range %s ignored (wrong bytes of this file were served here before; a resume "
                        "could complete a corrupt file): sending all of it", source.repo, source.commit,
                        entry.path, request.header("range"))
            span = None
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                   ("X-Repo-Commit", source.commit), ("ETag", f'"{entry.hash}"')]
        if entry.is_lfs:
            headers += [("X-Linked-Etag", f'"{entry.hash}"'), ("X-Linked-Size", str(entry.size))]
        status, start, end = 200, 0, entry.size
        if span is not None:
            status, (start, end) = 206, span
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{entry.size}"))
        if request.method == "HEAD" or end == start:
            return Response(status, headers, content_length=end - start)
        stream, release = await self._open_stream(source, start, end, auth)
        return Response(status, headers, stream=stream, content_length=end - start, on_close=release)

    async def _open_stream(self, source: FileSource, start: int, end: int, auth: str | None
                           ) -> tuple[Callable[[Send], Awaitable[None]], Callable[[], None]]:
        """Fetch the first chunk (so its errors still become a status); return the body
        writer and a function that gives back what the stream holds of the budget."""
        entry = source.entry
        size = entry.chunk_size
        first, last = start // size, (end - 1) // size
        ahead = max(2, min(32, self.readahead_bytes // size))
        labels: dict[int, str] = {}
        prefetched_to = first + 1

        def read_ahead(index: int) -> None:
            nonlocal prefetched_to
            stop = min(last + 1, index + 1 + ahead)
            if stop > prefetched_to:
                wanted = range(prefetched_to, stop)
                for j in wanted:
                    labels[j] = self._tier_of(entry.chunk_key(j))
                self.engine.prefetch(source, wanted, auth=auth)
                prefetched_to = stop

        labels[first] = self._tier_of(entry.chunk_key(first))
        read_ahead(first)
        budget = self.stream_budget
        served = Served()
        held_bytes = [await budget.acquire(size, self.stream_wait)]  # released by the body or on_close
        try:
            held: list[bytes] = [(await self._read_chunk(source, first, auth, served)).data]
        except BaseException:
            budget.release(held_bytes.pop())
            raise

        def release() -> None:
            while held_bytes:
                budget.release(held_bytes.pop())

        async def body(send: Send) -> None:
            try:
                for index in range(first, last + 1):
                    if index == first:
                        data = held.pop()
                    else:
                        read_ahead(index)
                        held_bytes.append(await budget.acquire(size, self.stream_wait))
                        data = (await self._read_chunk(source, index, auth, served)).data
                    base = index * size
                    lo, hi = max(start - base, 0), min(end - base, len(data))
                    await send(memoryview(data)[lo:hi])
                    self.metrics.served_bytes[labels.pop(index, "memory")] += hi - lo
                    del data
                    release()
            finally:
                held.clear()
                release()

        return body, release

    async def warm_files(self, repo: RepoRef, commit: str, entries: list[FileEntry], auth: str | None
                         ) -> tuple[list[str], list[MmfsError]]:
        """Read ``entries`` of ``commit`` into the tiers, verified, a few files at a time;
        return the failures (``"<path>: <error>"``) and their errors."""
        errors: list[str] = []
        first: list[MmfsError] = []
        queue = list(entries)

        async def worker() -> None:
            while queue:
                entry = queue.pop(0)
                try:
                    await self._warm(FileSource(repo, commit, entry), auth)
                except MmfsError as err:
                    errors.append(f"{entry.path}: {err}")
                    first.append(err)

        async with trio.open_nursery() as nursery:
            for _ in range(min(PREFETCH_FILES, len(entries))):
                nursery.start_soon(worker)
        return errors, first

    async def warm_commit(self, repo: RepoRef, revision: str, old: str, new: str) -> None:
        """Warm-on-update: a watched ref moved from ``old`` to ``new``; fetch the new
        commit's files (those unchanged since ``old`` are already here: no upstream bytes)."""
        manifest = await self.engine.manifest(repo, new)
        errors, first = await self.warm_files(repo, new, list(manifest.files), None)
        if first:
            raise first[0].__class__(f"{len(errors)} files of {repo}@{new} could not be warmed; first: {errors[0]}")

    async def _warm(self, source: FileSource, auth: str | None) -> None:
        """Read a whole file through the engine (and so verify it) without keeping it."""
        ahead = max(2, min(32, self.readahead_bytes // source.entry.chunk_size))
        try:
            await self.engine.warm(source, auth=auth, ahead=ahead)
        except AccessDenied:
            if not auth:
                self.access.mark_restricted(source.repo)
            raise

    def _tier_of(self, key: ChunkKey) -> str:
        """Which tier would answer ``key`` now; ``upstream`` when none holds it."""
        for tier in self.engine.tiers:
            if tier.contains(key):
                return tier.name
        return "upstream"

    # -- engine calls, with access checks and gated-repo bookkeeping ----------------------

    async def _listing(self, repo: RepoRef, revision: str, auth: str | None, path: str = "", *,
                       content: bool = False) -> Manifest:
        """The manifest of ``repo`` at ``revision``, once ``auth`` is known to may see the
        repo (``content``: read its files).

        Asked with the backend's own token first (shared by every caller, and enough for
        public and gated repos, whose listings the Hub shows to all); with the caller's
        token only when ours is refused (a private repo). Cached or not, it is returned
        only after :meth:`AccessControl.check`, which also establishes whether the repo
        is restricted (:meth:`AccessControl.upstream_auth` relies on that). ``path``, when
        the repo has it, is the file the check asks about.

        An artifact (``repo`` is :data:`ARTIFACTS`, ``revision`` its id) is listed to those
        who may read the model commit it was derived from.

        Object stores and local roots are read with this server's credentials for every
        caller: what it serves of them is the operator's ``--store`` list, enforced by
        the store remote (docs/providers.md); callers' tokens play no part.
        """
        if repo == ARTIFACTS:
            record = self.artifacts.store.record(revision) if self.artifacts is not None else None
            if record is None:
                raise ArtifactNotFound(f"no artifact {revision[:80]} is published on this backend")
            await self._check_artifact_reader(ArtifactKey.from_json(record["key"]), auth)
            return await self.engine.manifest(ARTIFACTS, revision)
        if repo.provider in STORE_PROVIDERS:
            return await self.engine.manifest(repo, revision)
        try:
            manifest = await self._manifest(repo, revision, None)
        except (AccessDenied, RepoNotFound):
            if not auth:
                raise
            manifest = await self._manifest(repo, revision, auth)
        if self.versions is not None and not is_commit(revision):
            self.versions.watcher.touch(repo, revision)  # in use: checked once per --ref-ttl from now on
        probe = path if path and manifest.file(path) is not None else \
            (manifest.files[0].path if manifest.files else ".gitattributes")
        await self.access.check(repo, manifest.commit, probe, auth, self.engine.nursery, content=content)
        return manifest

    async def _check_artifact_reader(self, key: ArtifactKey, auth: str | None) -> None:
        """Readers of an artifact need read access to its model commit (checked upstream
        like any content: :meth:`_listing` of the model)."""
        await self._listing(key.repo, key.commit, auth, content=True)

    def _upstream_auth(self, repo: RepoRef, auth: str | None) -> str | None:
        """The ``Authorization`` the engine sends upstream for ``repo`` (after :meth:`_listing`):
        the caller's, already checked, where our own token cannot read the repo; else none
        (the engine's own ``HF_TOKEN``), so one caller's bad token cannot fail the fetches
        other callers share. Artifacts come from the backend's own blob store, and stores are
        read with the backend's own credentials: none."""
        if repo == ARTIFACTS or repo.provider in STORE_PROVIDERS:
            return None
        return self.access.upstream_auth(repo, auth)

    async def _manifest(self, repo: RepoRef, revision: str, auth: str | None) -> Manifest:
        try:
            return await self.engine.manifest(repo, revision, auth=auth)
        except AccessDenied:
            if not auth:
                self.access.own_token_refused(repo)
            raise

    async def _source(self, repo: RepoRef, revision: str, path: str, auth: str | None
                      ) -> tuple[FileSource, str | None]:
        """The file and the ``Authorization`` to read it with upstream
        (:meth:`AccessControl.upstream_auth`), once the caller's access to its content is checked."""
        manifest = await self._listing(repo, revision, auth, path, content=True)
        entry = manifest.file(path)
        if entry is None:
            raise EntryNotFound(f"{path} does not exist in {repo.repo_id} at {manifest.commit}")
        return FileSource(repo, manifest.commit, entry), self._upstream_auth(repo, auth)

    async def _read_chunk(self, source: FileSource, index: int, auth: str | None,
                          served: Served | None = None) -> Chunk:
        try:
            return await self.engine.read_chunk(source, index, auth=auth, served=served)
        except AccessDenied:
            if not auth and source.repo.provider not in STORE_PROVIDERS:
                self.access.own_token_refused(source.repo)
            raise
        except BaseExceptionGroup as group:  # pragma: no cover - the engine unwraps its own groups
            error = first_error(group)
            if error is None:
                raise
            raise error from None


# -- helpers ------------------------------------------------------------------------------


def _hub_path_of_key(key: str) -> str | None:
    """The Hub path of a metadata key ``provider/org/name``, ``None`` if it is not one."""
    parts = key.split("/")
    if len(parts) != 3:
        return None
    try:
        return hub_path(RepoRef(*parts))
    except InvalidName:
        return key  # not a Hub repo: never restricted


def _segments(path: str) -> list[str]:
    """Split a percent-encoded path into decoded segments; bad encodings are a 400."""
    if not path.startswith("/"):
        raise InvalidName("the request target must be an absolute path")
    try:
        return [unquote(part, errors="strict") for part in path[1:].split("/")]
    except UnicodeDecodeError as exc:
        raise InvalidName(f"the path is not valid percent-encoded UTF-8: {exc.reason}") from None


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``'²'`` and other digits ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _form(request: Request) -> dict[str, list[str]]:
    """The fields of a form-encoded body (``paths=a&paths=b&expand=false``)."""
    try:
        return parse_qs(request.body.decode(), keep_blank_values=True, max_num_fields=100_000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidName(f"the body is not a form (application/x-www-form-urlencoded): {exc}") from None


def _repo(provider: str, org: str, name: str) -> RepoRef:
    if (provider, org, name) == (ARTIFACTS.provider, ARTIFACTS.org, ARTIFACTS.name):
        return ARTIFACTS
    return make_repo(provider, org, name)  # a store prefix arrives as one ``%2F`` segment


def _api_repo(s: list[str]) -> RepoRef:
    """The repo of ``/api/{models,datasets}/<org>/<name>/...``."""
    return _repo(hub_provider(s[1][:-1]), s[2], s[3])


def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.body)
    except ValueError:
        raise InvalidName("the body must be JSON") from None


def error_response(err: MmfsError, headers: list[tuple[str, str]] | None = None) -> Response:
    message = str(err) or type(err).__name__
    safe = message.encode("ascii", "replace").decode()[:1000]
    return Response.json({"error": message}, err.status,
                         [("X-Error-Code", err.code()), ("X-Error-Message", safe), *(headers or [])])


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for a ``Range`` header, ``None`` without one.

    One range only (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``); anything else, or a range
    outside the file, is :class:`BadRange` (416) with a message saying why.
    """
    if header is None:
        return None
    text = header.strip()
    unit, eq, spec = text.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        raise BadRange(f"malformed Range {header[:100]!r}: expected bytes=START-END")
    if "," in spec:
        raise BadRange("multiple ranges in one request are not supported; ask for one range at a time")
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not _is_number(first)) or (last and not _is_number(last)) or not (first or last) \
            or len(first) > 20 or len(last) > 20:
        raise BadRange(f"malformed Range {header[:100]!r}: expected bytes=START-END, bytes=START- or bytes=-N")
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            raise BadRange(f"range {header[:100]!r} is not satisfiable for a file of {size} bytes")
        return max(size - n, 0), size
    start = int(first)
    if last and int(last) < start:
        raise BadRange(f"malformed Range {header[:100]!r}: the end comes before the start")
    if start >= size:
        raise BadRange(f"range {header[:100]!r} starts past the end of a file of {size} bytes")
    return start, min(int(last) + 1, size) if last else size


def lfs_pointer(entry: FileEntry) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.hash}\nsize {entry.size}\n".encode()


def git_blob_id(entry: FileEntry) -> str:
    """The file's git blob id: its own hash, or for LFS files the id of its pointer file."""
    if not entry.is_lfs:
        return entry.hash
    pointer = lfs_pointer(entry)
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def repo_info_json(manifest: Manifest, *, blobs: bool, kind: str) -> dict:
    """``model_info``/``dataset_info`` as the Hub shapes them (the fields downloads read)."""
    siblings = []
    for entry in manifest.files:
        sibling: dict = {"rfilename": entry.path}
        if blobs:
            sibling.update(size=entry.size, blobId=git_blob_id(entry))
            if entry.is_lfs:
                sibling["lfs"] = {"sha256": entry.hash, "size": entry.size, "pointerSize": len(lfs_pointer(entry))}
        siblings.append(sibling)
    repo_id = manifest.repo.repo_id
    by_type = {"modelId": repo_id, "library_name": None, "spaces": []} \
        if manifest.repo.hub_repo_type == "model" else {"cardData": {}}
    return {"_id": hashlib.sha1(str(manifest.repo).encode()).hexdigest()[:24], "id": repo_id, **by_type,
            "author": manifest.repo.org, "sha": manifest.commit, "private": kind == PRIVATE,
            "gated": "manual" if kind == GATED else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings, "usedStorage": manifest.total_size}


def tree_json(manifest: Manifest, path: str, recursive: bool) -> list[dict]:
    prefix = f"{path}/" if path else ""
    directories = sorted(set(manifest.directories()))
    if path and path not in directories:
        if manifest.file(path) is not None:
            raise EntryNotFound(f"{path} is a file, not a folder, in {manifest.repo.repo_id} at {manifest.commit}")
        raise EntryNotFound(f"{path} does not exist in {manifest.repo.repo_id} at {manifest.commit}")

    def wanted(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

    paths = [d for d in directories if wanted(d)] + [f.path for f in manifest.files if wanted(f.path)]
    return sorted(path_entries(manifest, paths), key=lambda e: e["path"])


def path_entries(manifest: Manifest, paths: list[str]) -> list[dict]:
    """Tree entries (``type``, ``oid``, ``size``, ``path``, ``lfs``) of the ``paths`` that
    exist in ``manifest``, files and folders, in the order asked, each once."""
    directories = set(manifest.directories())
    entries: list[dict] = []
    for path in dict.fromkeys(paths):
        entry = manifest.file(path)
        if entry is not None:
            item: dict = {"type": "file", "oid": git_blob_id(entry), "size": entry.size, "path": entry.path}
            if entry.is_lfs:
                item["lfs"] = {"oid": entry.hash, "size": entry.size, "pointerSize": len(lfs_pointer(entry))}
            entries.append(item)
        elif path in directories:
            inside = sorted(git_blob_id(f) for f in manifest.files if f.path.startswith(path + "/"))
            oid = hashlib.sha1(f"{path}\0{''.join(inside)}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": path})
    return entries


__all__ = ["BackendApp", "BadRange", "error_response", "git_blob_id", "parse_range", "path_entries",
           "repo_info_json", "tree_json"]
