"""The Hugging Face Hub (or anything speaking its API) as a remote.

Uses the Hub's public download API only: ``/api/models/<repo>/revision/<rev>?blobs=true``
for resolution and listing (one request gives the commit, every file, its size and its
LFS sha256 or git blob id), and ranged ``GET /<repo>/resolve/<commit>/<path>`` for bytes,
following the Hub's redirect to its LFS storage. Datasets (provider
``huggingface-datasets``) take the same routes under ``/api/datasets/`` and
``/datasets/<repo>/resolve/`` (:func:`hub_path`, :func:`api_path`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping
from urllib.parse import quote

from ..errors import AccessDenied, InvalidName, NotFound, RepoNotFound, RevisionNotFound, UpstreamError
from ..manifest import DEFAULT_CHUNK_SIZE, GIT_SHA1, SHA256, FileEntry, Manifest
from ..names import RepoRef, check_path, is_commit
from ._http import RetryPolicy, make_client, request
from .base import FetchedChunk, FileSource, Remote

log = logging.getLogger(__name__)

PUBLIC_HUB = "https://huggingface.co"


def hub_endpoint() -> str:
    """The Hub URL, from ``HF_ENDPOINT`` as the Hub's own clients read it."""
    return os.environ.get("HF_ENDPOINT", PUBLIC_HUB).rstrip("/")


def hub_path(repo: RepoRef) -> str:
    """The repo's path on the Hub's web routes: ``org/name`` for a model,
    ``datasets/org/name`` for a dataset (``<endpoint>/<hub_path>/resolve/...``). Unique
    per repo across types, so it also keys per-repo state a model and a dataset of the
    same id must not share."""
    kind = repo.hub_repo_type
    if kind is None:
        raise InvalidName(f"{repo} is not a Hub repo")
    return repo.repo_id if kind == "model" else f"{kind}s/{repo.repo_id}"


def api_path(repo: RepoRef) -> str:
    """The repo's path on the Hub's API routes: ``models/org/name``, ``datasets/org/name``."""
    return f"{repo.hub_repo_type}s/{repo.repo_id}"

#: A git ref's prefix -> its group in the Hub's ``GET /api/models/<repo>/refs`` answer.
_REF_GROUPS = (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/convert/", "converts"),
               ("refs/pr/", "pullRequests"))


def git_ref(revision: str) -> str:
    """The full git ref a revision names: a ``refs/...`` name as it is, any other a branch."""
    return revision if revision.startswith("refs/") else f"refs/heads/{revision}"


def refs_json(refs: Mapping[str, str], include_prs: bool) -> dict[str, Any]:
    """``GET /api/models/<repo>/refs`` as the Hub shapes it, from full git refs -> commits:
    each entry is ``{"name", "ref", "targetCommit"}``, the name being the ref without its
    group's prefix (``main``, ``v1.0``, ``parquet``, ``1`` for ``refs/pr/1``);
    ``pullRequests`` only with ``include_prs``, as ``huggingface_hub`` asks."""
    found: dict[str, list[dict[str, str]]] = {group: [] for _, group in _REF_GROUPS
                                              if include_prs or group != "pullRequests"}
    for ref, commit in sorted(refs.items()):
        for prefix, group in _REF_GROUPS:
            if ref.startswith(prefix) and group in found:
                found[group].append({"name": ref[len(prefix):], "ref": ref, "targetCommit": commit})
    return found


class HubRemote(Remote):
    def __init__(self, endpoint: str | None = None, token: str | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, policy: RetryPolicy = RetryPolicy()) -> None:
        self.url = (endpoint or hub_endpoint()).rstrip("/")
        self._token = token if token is not None else os.environ.get("HF_TOKEN") or None
        self._chunk_size = chunk_size
        self._policy = policy
        self._client = make_client(policy)

    def _headers(self, auth: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": "mmfs/0.1", **(extra or {})}
        if auth:
            headers["Authorization"] = auth
        elif self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _revision_info(self, repo: RepoRef, revision: str, auth: str | None, blobs: bool) -> dict:
        url = f"{self.url}/api/{api_path(repo)}/revision/{quote(revision, safe='')}"
        # Resolving asks for the commit alone (the Hub's ``expand``: a few bytes, however
        # many files the repo has); listing asks for every file with its hashes.
        url += "?blobs=true" if blobs else "?expand=sha"
        try:
            response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        except (NotFound, AccessDenied) as exc:
            if repo.repo_id in str(exc):
                raise
            # The Hub's own words ("Repository not found") do not say which: a user reading
            # a node's log or a prefetch error must see the repo.
            raise type(exc)(f"{repo}@{revision}: {exc}") from None
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"{self.url} answered {repo}@{revision} with invalid JSON") from exc

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        info = await self._revision_info(repo, revision, auth, blobs=False)
        commit = str(info.get("sha", ""))
        if not is_commit(commit):
            raise RevisionNotFound(f"{self.url} gave no commit for {repo}@{revision}")
        return commit

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        info = await self._revision_info(repo, commit, auth, blobs=True)
        files = []
        for sibling in info.get("siblings", []):
            path = sibling.get("rfilename", "")
            try:
                check_path(path)
            except InvalidName as exc:
                raise UpstreamError(f"{repo}@{commit} lists an unusable path: {exc}") from exc
            lfs = sibling.get("lfs")
            try:
                if lfs:
                    entry = FileEntry(path, int(lfs["size"]), SHA256, lfs["sha256"], self._chunk_size)
                elif "blobId" in sibling and "size" in sibling:
                    entry = FileEntry(path, int(sibling["size"]), GIT_SHA1, sibling["blobId"], self._chunk_size)
                else:
                    raise UpstreamError(f"{self.url} listed {path} without size or hash (blobs=true ignored?)")
            except (KeyError, TypeError, ValueError) as exc:
                raise UpstreamError(f"{self.url} listed {path} with unusable metadata: {exc}") from exc
            files.append(entry)
        if info.get("sha") != commit:
            raise UpstreamError(f"{self.url} answered {repo}@{commit} with commit {str(info.get('sha'))[:40]!r}")
        files.sort(key=lambda f: f.path)
        return Manifest(repo, commit, tuple(files))

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        start, end = source.entry.chunk_span(index)
        url = f"{self.url}/{hub_path(source.repo)}/resolve/{source.commit}/{quote(source.entry.path)}"
        headers = self._headers(auth, {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        response = await request(self._client, self._policy, "GET", url, headers=headers,
                                 expect_length=end - start)
        return FetchedChunk(
            data=response.content,
            source_url=url,
            etag=response.headers.get("ETag", ""),
            last_modified=response.headers.get("Last-Modified", ""),
        )

    async def list_refs(self, repo: RepoRef, *, include_prs: bool = False, auth: str | None = None) -> dict[str, Any]:
        """The Hub's ``list_repo_refs`` answer for ``repo`` (``branches``, ``tags``, ``converts``
        and, with ``include_prs``, ``pullRequests``), checked for shape."""
        url = f"{self.url}/api/{api_path(repo)}/refs" + ("?include_prs=1" if include_prs else "")
        response = await request(self._client, self._policy, "GET", url, headers=self._headers(auth))
        try:
            answer = response.json()
            if not all(isinstance(answer.get(k), list) for k in ("branches", "tags", "converts")):
                raise ValueError("branches, tags or converts missing")
        except (ValueError, AttributeError) as exc:
            raise UpstreamError(f"{self.url} sent an unusable ref listing for {repo}: {exc}") from exc
        return answer
    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        """A ``HEAD`` of the file's ``resolve`` URL anonymously (the repo's kind), then, for
        a gated or private repo, with ``auth`` (or our own token)."""
        url = f"{self.url}/{hub_path(source.repo)}/resolve/{source.commit}/{quote(source.entry.path)}"
        try:
            await request(self._client, self._policy, "HEAD", url, headers={"User-Agent": "mmfs/0.1"})
            return "open"
        except AccessDenied:
            kind = "gated"
        except RepoNotFound:
            kind = "private"
        await request(self._client, self._policy, "HEAD", url, headers=self._headers(auth))
        return kind

    @property
    def received_bytes(self) -> int:
        return self._client.received_bytes

    async def aclose(self) -> None:
        await self._client.aclose()
