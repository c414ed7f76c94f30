"""The cluster backend server as a remote: what a node daemon reads through.

The node-facing protocol (also documented in the README):

* ``GET /v1/resolve/<provider>/<org>/<name>/<revision>`` -> ``{"commit": "<40 hex>"}``
* ``GET /v1/manifest/<provider>/<org>/<name>/<commit>`` -> the manifest JSON
* ``GET /v1/chunk/<provider>/<org>/<name>/<commit>/<path>?index=N`` -> the chunk's bytes,
  with ``X-Mmfs-Blake3`` (hex digest of the body). A file's last chunk is only served
  once the whole file matched its upstream hash.

Errors carry ``X-Error-Code`` (the :mod:`mmfs.errors` class name, or the Hub's code) and a
JSON ``{"error": message}`` body, so the node raises the same error the backend did.
"""

from __future__ import annotations

from urllib.parse import quote

from ..errors import InvalidName, UpstreamError
from ..manifest import Manifest
from ..names import RepoRef, is_commit
from ._http import RetryPolicy, make_client, request
from .base import FetchedChunk, FileSource, Remote

BLAKE3_HEADER = "X-Mmfs-Blake3"


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
        url = f"{self.url}/v1/resolve/{repo}/{quote(revision, safe='')}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        try:
            commit = str(response.json()["commit"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"backend {self.url} sent an unreadable answer for {repo}@{revision}") from exc
        if not is_commit(commit):
            raise UpstreamError(f"backend {self.url} resolved {repo}@{revision} to an invalid commit")
        return commit

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        url = f"{self.url}/v1/manifest/{repo}/{commit}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        try:
            manifest = Manifest.loads(response.content)
        except (ValueError, KeyError, TypeError, InvalidName) as exc:
            raise UpstreamError(f"backend {self.url} sent an unusable manifest for {repo}@{commit}: {exc}") from exc
        if manifest.repo != repo or manifest.commit != commit:
            raise UpstreamError(f"backend {self.url} sent the manifest of {manifest.repo}@{manifest.commit} "
                                f"for {repo}@{commit}")
        return manifest

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        start, end = source.entry.chunk_span(index)
        url = f"{self.url}/v1/chunk/{source.repo}/{source.commit}/{quote(source.entry.path)}?index={index}"
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth),
                                 expect_length=end - start)
        return FetchedChunk(data=response.content, blake3=response.headers.get(BLAKE3_HEADER), source_url=url)

    async def aclose(self) -> None:
        await self._client.aclose()
