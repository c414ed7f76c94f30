"""The cluster backend server as a remote: what a node daemon reads through.

The node-facing protocol (also documented in the README):

* ``GET /v1/resolve/<provider>/<org>/<name>/<revision>`` -> ``{"commit": "<40 hex>"}``
* ``GET /v1/manifest/<provider>/<org>/<name>/<commit>`` -> the manifest JSON
* ``GET /v1/chunk/<provider>/<org>/<name>/<commit>/<path>?index=N`` -> the chunk's bytes;
  ``X-Mmfs-Verified: 1`` when the backend has the file's chunk map. A file's last chunk is
  only served once the whole file matched its upstream hash.
  A node with ``--peer-listen`` that holds the file's map may be answered ``307`` instead:
  ``Location`` names a peer's copy (``X-Mmfs-Peer``: that node); see :mod:`mmfs.remote.peer`.
* ``POST /v1/peers/heartbeat`` and ``POST /v1/peers/report``: what a node holds, and a peer
  that served bad bytes or could not be reached (docs/protocol.md, "Node-to-node sharing").
* ``GET /v1/map/<provider>/<org>/<name>/<commit>/<path>?wait=SECONDS`` -> the file's chunk
  map (the raw block digests), or ``202`` with ``{"verified_bytes": n, "progress": p}``
  (``p`` grows while the backend receives bytes) while the backend is still verifying it (with ``wait``, the backend verifies the file, waiting up to that
  long before answering).

Errors carry ``X-Error-Code`` (the :mod:`mmfs.errors` class name, or the Hub's code) and a
JSON ``{"error": message}`` body, so the node raises the same error the backend did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..chunkmap import ChunkMap
from ..errors import InvalidName, UpstreamError
from ..manifest import Manifest
from ..names import RepoRef, is_commit
from ._http import RetryPolicy, make_client, request
from .base import FetchedChunk, FileSource, Remote

VERIFIED_HEADER = "X-Mmfs-Verified"
#: On content answers: ``open``, ``gated`` or ``private`` (backend_server/access.py).
ACCESS_HEADER = "X-Mmfs-Access"
#: Carries the backend's admin token (``MMFS_ADMIN_TOKEN``) on admin requests;
#: ``Authorization`` carries the caller's Hub token.
ADMIN_HEADER = "X-Mmfs-Admin-Token"
#: Sent with chunk requests by nodes that share with peers: who asks (its peer URL) ...
NODE_HEADER = "X-Mmfs-Node"
#: ... and ``ok`` when it may be sent to a peer for this chunk (it holds the file's map).
PEERS_HEADER = "X-Mmfs-Peers"
#: On a ``307``: the node id of the peer ``Location`` points at.
PEER_HEADER = "X-Mmfs-Peer"


@dataclass(frozen=True, slots=True)
class PeerRedirect:
    """The backend's answer "get this chunk from that peer" (a ``307``)."""

    peer: str  # the peer's node id (its peer URL)
    url: str  # the chunk at the peer


class BackendRemote(Remote):
    verifies_files = True

    def __init__(self, url: str, *, policy: RetryPolicy = RetryPolicy(), auth: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._policy = policy
        self._auth = auth
        self._client = make_client(policy)

    def _headers(self, auth: str | None) -> dict[str, str]:
        value = auth or self._auth
        return {"Authorization": value} if value else {}

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        url = f"{self.url}/v1/resolve/{repo.url_path}/{quote(revision, safe='')}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        try:
            commit = str(response.json()["commit"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"backend {self.url} sent an unreadable answer for {repo}@{revision}") from exc
        if not is_commit(commit):
            raise UpstreamError(f"backend {self.url} resolved {repo}@{revision} to an invalid commit")
        return commit

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        url = f"{self.url}/v1/manifest/{repo.url_path}/{commit}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        try:
            manifest = Manifest.from_json(response.json())
        except (ValueError, KeyError, TypeError, InvalidName) as exc:
            raise UpstreamError(f"backend {self.url} sent an unusable manifest for {repo}@{commit}: {exc}") from exc
        if manifest.repo != repo or manifest.commit != commit:
            raise UpstreamError(f"backend {self.url} sent the manifest of {manifest.repo}@{manifest.commit} "
                                f"for {repo}@{commit}")
        return manifest

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        answer = await self.fetch_chunk_or_redirect(source, index, auth=auth)
        assert isinstance(answer, FetchedChunk)  # no redirects without PEERS_HEADER
        return answer

    async def fetch_chunk_or_redirect(self, source: FileSource, index: int, *, auth: str | None = None,
                                      peering: dict[str, str] | None = None) -> FetchedChunk | PeerRedirect:
        """The chunk, or (with ``peering`` headers that allow it) where a peer has it."""
        start, end = source.entry.chunk_span(index)
        url = f"{self.url}/v1/chunk/{source.repo.url_path}/{source.commit}/{quote(source.entry.path)}?index={index}"
        response = await request(self._client, self._policy, "GET", url, headers={**self._headers(auth),
                                 **(peering or {})}, expect_length=end - start, answer_redirects=bool(peering))
        if response.status_code == 307:
            peer, location = response.headers.get(PEER_HEADER), response.headers.get("location")
            if not peer or not location:
                raise UpstreamError(f"backend {self.url} redirected chunk {index} of {source.entry.path} "
                                    "without naming a peer")
            return PeerRedirect(peer, location)
        if not response.is_success:
            raise UpstreamError(f"backend {self.url} answered HTTP {response.status_code} for chunk {index}")
        return FetchedChunk(data=response.content, file_verified=response.headers.get(VERIFIED_HEADER) == "1",
                            source_url=url)

    async def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        """``POST`` a small JSON document to ``/v1/<path>`` (peer heartbeats and reports)."""
        response = await request(self._client, self._policy, "POST", f"{self.url}/v1/{path}",
                                 headers={**self._headers(None), "Content-Type": "application/json"},
                                 payload=json.dumps(payload, separators=(",", ":")).encode())
        return response.json()

    async def fetch_map(self, source: FileSource, *, wait: float = 0.0, auth: str | None = None) -> ChunkMap | int:
        entry = source.entry
        url = f"{self.url}/v1/map/{source.repo.url_path}/{source.commit}/{quote(entry.path)}?wait={wait:g}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        if response.status_code == 202:
            try:
                return int(response.json()["progress"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UpstreamError(f"backend {self.url} sent an unreadable progress answer for {entry.path}") from exc
        try:
            return ChunkMap(entry.content_id, entry.size, entry.chunk_size, bytes(response.content))
        except ValueError as exc:
            raise UpstreamError(f"backend {self.url} sent an unusable chunk map for {entry.path}: {exc}") from exc

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        """``HEAD /v1/file/...``: the backend checks the token as for any content request
        and names the repo's kind in ``X-Mmfs-Access``."""
        url = f"{self.url}/v1/file/{source.repo.url_path}/{source.commit}/{quote(source.entry.path)}"
        response = await request(self._client, self._policy, "HEAD", url, headers=self._headers(auth))
        return response.headers.get(ACCESS_HEADER) or "open"

    @property
    def received_bytes(self) -> int:
        return self._client.received_bytes

    async def aclose(self) -> None:
        await self._client.aclose()
