"""The backend's artifact routes: push, publish, build leases and listings (docs/artifacts.md).

Reading an artifact is not here: its files are served by the node protocol like a
commit's (``/v1/manifest|chunk|map/artifacts/mmfs/published/<id>/...``, see
:meth:`BackendApp._listing`), from the engine. Here:

* ``GET /v1/artifacts``: published artifacts (key, size, files) and builds in progress;
* ``GET /v1/artifacts/<id>``: one artifact's record, for callers who may read its model;
* ``POST /v1/artifacts/upload`` ``{key, files}``: which blobs the backend lacks, and how
  much of each it already staged (a push resumes there);
* ``PUT /v1/artifacts/blobs/<sha256>?offset=N&size=S``: the next piece of a blob;
* ``POST /v1/artifacts/publish`` ``{key, files}``: make it visible, whole;
* ``POST /v1/artifacts/lease|renew|release``: build leases (:mod:`.builds`).

Everything but the two ``GET`` needs the publish token (:func:`.access.check_publisher`),
and a backend of one replica: each replica keeps its own artifact records, blobs and
leases, so with several an artifact would be published on one and looked for on another.
Such a backend refuses pushes and builds with 501 (:class:`~mmfs.errors.NotSupported`)
rather than publish what its nodes cannot read (docs/artifacts.md, "Limits").
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Awaitable, Callable

import trio

from mmfs.artifacts import PUBLISH_TOKEN_HEADER, ArtifactKey
from mmfs.errors import InvalidName, MmfsError, NotSupported
from mmfs.names import RepoRef

from .access import check_publisher
from .artifact_store import ArtifactNotFound, ArtifactStore, Conflict, check_sha256, parse_files
from .builds import BuildLeases
from .http import MAX_BODY_BYTES, Request, Response

#: Largest piece of a blob one ``PUT`` carries (the server reads request bodies whole).
UPLOAD_PIECE = MAX_BODY_BYTES


class ArtifactApi:
    def __init__(self, store: ArtifactStore, *, check_reader: Callable[[ArtifactKey, str | None], Awaitable[None]],
                 is_restricted: Callable[[RepoRef], bool], publish_token: str | None = None,
                 leases: BuildLeases | None = None, replica_count: Callable[[], int] = lambda: 1) -> None:
        self.store = store
        self.leases = leases or BuildLeases()
        self._check_reader = check_reader
        self._is_restricted = is_restricted
        self._replica_count = replica_count
        self._publish_token = publish_token if publish_token is not None else os.environ.get("MMFS_PUBLISH_TOKEN")
        self.pushes: dict[str, int] = {"published": 0, "refused": 0}

    def route(self, method: str, s: list[str]) -> tuple[str, Callable[[Request, list[str]], Awaitable[Response]],
                                                          tuple[str, ...]] | None:
        """``(route name, handler, methods)`` for ``/v1/artifacts...`` (``s`` from ``artifacts`` on;
        handlers get the whole path's segments, so they read names from its end)."""
        if s == ["artifacts"]:
            return "artifacts", self.listing, ("GET",)
        if len(s) == 2 and s[1] in ("upload", "publish", "lease", "renew", "release"):
            handler = {"upload": self.upload, "publish": self.publish, "lease": self.lease,
                       "renew": self.renew, "release": self.release}[s[1]]
            return f"artifact_{s[1]}", handler, ("POST",)
        if len(s) == 3 and s[1] == "blobs":
            return "artifact_blob", self.put_blob, ("PUT",)
        if len(s) == 2:
            return "artifact", self.record, ("GET",)
        return None

    # -- reading --------------------------------------------------------------------------

    async def listing(self, request: Request, s: list[str]) -> Response:
        """Published artifacts and builds in progress. Publishers see all; others those of
        models the backend's own token reads (no private repo names leak)."""
        everything = self._is_publisher(request)
        records = await trio.to_thread.run_sync(self.store.metadata.artifacts)

        def shown(key: dict[str, str]) -> bool:
            return everything or not self._is_restricted(ArtifactKey.from_json(key).repo)

        artifacts = [{"id": i, **r} for i, r in sorted(records.items()) if shown(r["key"])]
        return Response.json({"artifacts": artifacts,
                              "building": [b for b in self.leases.in_progress() if shown(b["key"])],
                              "failed": [b for b in self.leases.failed() if shown(b["key"])]})

    async def record(self, request: Request, s: list[str]) -> Response:
        artifact_id = s[-1]
        record = await trio.to_thread.run_sync(self.store.record, artifact_id)
        if record is None:
            raise ArtifactNotFound(f"no artifact {artifact_id[:80]} is published")
        await self._check_reader(ArtifactKey.from_json(record["key"]), request.header("authorization"))
        return Response.json({"id": artifact_id, **record})

    # -- publishing -----------------------------------------------------------------------

    def _is_publisher(self, request: Request) -> bool:
        try:
            check_publisher(request.header(PUBLISH_TOKEN_HEADER), self._publish_token)
        except MmfsError:
            return False
        return True

    def _publisher(self, request: Request) -> None:
        """The caller may push and lease here: one replica, and the publish token."""
        replicas = self._replica_count()
        if replicas > 1:
            self.pushes["refused"] += 1
            raise NotSupported(f"this backend runs {replicas} replicas and artifacts need exactly one (each "
                               "replica keeps its own artifacts); run the artifact-enabled backend with "
                               "replicas: 1 (deploy/README.md, docs/artifacts.md)")
        try:
            check_publisher(request.header(PUBLISH_TOKEN_HEADER), self._publish_token)
        except MmfsError:
            self.pushes["refused"] += 1
            raise

    async def upload(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        body = _json(request)
        ArtifactKey.from_json(body.get("key"))
        files = parse_files(body.get("files"))

        def staged() -> dict[str, int]:
            return {sha: self.store.staged(sha, size) for _, size, sha in files}

        return Response.json({"blobs": await trio.to_thread.run_sync(staged), "piece": UPLOAD_PIECE})

    async def put_blob(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        sha = check_sha256(s[-1])
        offset, size = _int_query(request, "offset"), _int_query(request, "size")
        staged = await trio.to_thread.run_sync(self.store.append, sha, size, offset, request.body)
        return Response.json({"staged": staged, "complete": staged == size})

    async def publish(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        body = _json(request)
        key = ArtifactKey.from_json(body.get("key"))
        files = parse_files(body.get("files"))
        record, created = await trio.to_thread.run_sync(self.store.publish, key, files)
        self.leases.forget(key.id)
        if created:
            self.pushes["published"] += 1
        return Response.json({"id": key.id, "created": created, **record}, 201 if created else 200)

    # -- build leases ---------------------------------------------------------------------

    async def lease(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        body = _json(request)
        key = ArtifactKey.from_json(body.get("key"))
        if await trio.to_thread.run_sync(self.store.record, key.id) is not None:
            return Response.json({"state": "published", "id": key.id})
        waited_on = body.get("waited_on")
        holder = str(body.get("holder") or request.client or socket.gethostname())[:200]
        try:
            ttl = float(body.get("ttl", 30))
        except (TypeError, ValueError):
            raise InvalidName("ttl must be a number of seconds") from None
        answer = self.leases.acquire(key.id, key.to_json(), holder, ttl,
                                     int(waited_on) if isinstance(waited_on, int) else None)
        return Response.json({"id": key.id, **answer})

    async def renew(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        key, lease = self._lease_of(request)
        if not self.leases.renew(key.id, lease):
            raise Conflict(f"the build lease of {key} is not held any more (expired and taken over, or the "
                           "backend restarted)")
        return Response.json({"renewed": True})

    async def release(self, request: Request, s: list[str]) -> Response:
        self._publisher(request)
        key, lease = self._lease_of(request)
        body = _json(request)
        released = self.leases.release(key.id, lease, failed=bool(body.get("failed")),
                                       log_tail=str(body.get("log_tail", "")))
        return Response.json({"released": released})

    def _lease_of(self, request: Request) -> tuple[ArtifactKey, str]:
        body = _json(request)
        lease = body.get("lease")
        if not isinstance(lease, str) or not lease:
            raise InvalidName("a lease id is needed")
        return ArtifactKey.from_json(body.get("key")), lease

    def statistics(self) -> dict[str, Any]:
        return {**self.store.statistics(), "building": len(self.leases.in_progress()), "pushes": dict(self.pushes)}


def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise InvalidName(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidName("the request body must be a JSON object")
    return body


def _int_query(request: Request, name: str) -> int:
    raw = request.query_value(name)
    if raw is None or not raw.isdigit() or len(raw) > 18:
        raise InvalidName(f"?{name}= must be a number of bytes")
    return int(raw)


__all__ = ["ArtifactApi", "UPLOAD_PIECE"]
