"""Object stores and local directories as remotes: one listing-based remote, one small
blocking client per kind of store (:mod:`.s3`, :mod:`.azure`, :mod:`.localdir`).

A store keeps no commits, so the revision of a model (a bucket and a key prefix) is the
digest of its listing: every key under the prefix with its size and its version token
(ETag, version id, or size+mtime+inode for local files). ``latest`` is the one branch; it
moves whenever the listing does. A manifest is built once per revision, from the listing
and, where the listing lacks them, the objects' own checksums (docs/providers.md).

Every byte is read pinned to the object version the manifest recorded (``FileEntry.pin``):
an object rewritten or deleted after the listing fails the read (:class:`StaleRevision`,
naming the key), so chunks of two versions are never mixed; the new version is a new revision.

The store SDKs block, so every call runs in a worker thread, at most
``max_concurrent`` at once (the engine's own cap on fetches sits above this one).
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, TypeVar

import trio

from ..errors import (AccessDenied, EntryNotFound, InvalidName, RepoNotFound, RevisionNotFound, StaleRevision,
                      UpstreamError)
from ..manifest import DEFAULT_CHUNK_SIZE, PINNED, FileEntry, Manifest
from ..names import STORE_BRANCH, RepoRef, check_path, is_commit
from .base import FetchedChunk, FileSource, Remote

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Revisions (listings) remembered per remote, so manifests need not list again.
_LISTINGS_KEPT = 256


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object under a model's prefix, as the store describes it."""

    path: str  # relative to the prefix
    key: str  # the full key (or file path) in the store
    size: int
    #: What changes when the object does (ETag, version id, size+mtime): part of the revision.
    version: str
    #: The version every read must match (``etag:…``, ``version:…``, ``mtime:…``).
    pin: str
    #: The object's own content hash where the store keeps one: ``(algo, hex)``.
    checksum: tuple[str, str] | None = None


class ObjectStore(ABC):
    """A blocking client of one kind of store. Methods run in worker threads and raise
    :class:`~mmfs.errors.MmfsError` children that name the bucket and key at fault."""

    #: The provider name (``s3``, ``azure``, ``file``) and how the store is named in messages.
    provider: str = ""
    url: str = ""

    @abstractmethod
    def list(self, bucket: str, prefix: str) -> list[StoredObject]:
        """Every object under ``prefix/`` (keys ending in ``/`` are folder markers, skipped);
        :class:`RepoNotFound` for a missing bucket or an empty prefix."""

    def describe(self, bucket: str, obj: StoredObject) -> StoredObject:
        """``obj`` with its checksum and pin filled in where the listing lacks them (S3
        needs a HEAD); the default trusts the listing."""
        return obj

    @abstractmethod
    def read(self, bucket: str, obj: FileEntry, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object, pinned to ``obj.pin``."""

    def close(self) -> None:
        """Release connections."""

    def address(self, bucket: str, key: str = "") -> str:
        """``s3://bucket/key`` style name for messages."""
        return f"{self.provider}://{bucket}/{key}"


def listing_digest(repo: RepoRef, objects: list[StoredObject]) -> str:
    """The revision of a listing: 40 hex, the same wherever it is computed."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"mmfs-listing-1\0{repo}\0".encode())
    for obj in sorted(objects, key=lambda o: o.path):
        digest.update(f"{obj.path}\0{obj.size}\0{obj.version}\n".encode())
    return digest.hexdigest()


def pinned_hash(store: ObjectStore, bucket: str, obj: StoredObject) -> str:
    """The content id of an object without a checksum: a fingerprint of its version."""
    raw = f"{store.provider}\0{store.url}\0{bucket}\0{obj.key}\0{obj.size}\0{obj.pin}"
    return hashlib.sha256(raw.encode()).hexdigest()


class StoreRemote(Remote):
    """A :class:`Remote` over any :class:`ObjectStore`: revisions from listings, chunks by
    ranged reads in worker threads."""

    def __init__(self, store: ObjectStore, *, chunk_size: int = DEFAULT_CHUNK_SIZE, max_concurrent: int = 16,
                 allowed: Callable[[str], bool] = lambda bucket: True) -> None:
        self.store = store
        self.url = store.url
        self._chunk_size = chunk_size
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._allowed = allowed
        self._listings: dict[tuple[RepoRef, str], list[StoredObject]] = {}
        self._received = 0

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _check_allowed(self, repo: RepoRef) -> None:
        if repo.provider != self.store.provider:
            raise InvalidName(f"{repo} is not a {self.store.provider} model")
        if not self._allowed(repo.org):
            raise AccessDenied(f"{self.store.address(repo.org)} is not served here: it is not in this "
                               f"server's --store list for {self.store.provider}")

    async def _list(self, repo: RepoRef) -> tuple[str, list[StoredObject]]:
        self._check_allowed(repo)
        objects = await self._call(self.store.list, repo.org, repo.name)
        if not objects:
            raise RepoNotFound(f"no objects under {self.store.address(repo.org, repo.name + '/')}")
        commit = listing_digest(repo, objects)
        self._listings[(repo, commit)] = objects
        while len(self._listings) > _LISTINGS_KEPT:
            del self._listings[next(iter(self._listings))]
        return commit, objects

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        if revision != STORE_BRANCH:
            raise RevisionNotFound(f"{repo}: a {self.store.provider} model has one branch, {STORE_BRANCH!r}, "
                                   f"and revisions that are 40-hex listing digests, not {revision!r}")
        commit, _ = await self._list(repo)
        return commit

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        self._check_allowed(repo)
        objects = self._listings.get((repo, commit))
        if objects is None:
            latest, objects = await self._list(repo)
            if latest != commit or not is_commit(commit):
                raise StaleRevision(f"{repo}@{commit}: the store's listing changed since that revision "
                                       f"(latest is {latest}); object stores keep no history")
        described: list[StoredObject] = []

        async def describe(obj: StoredObject) -> None:
            described.append(await self._call(self.store.describe, repo.org, obj))

        async with trio.open_nursery() as nursery:
            for obj in objects:
                nursery.start_soon(describe, obj)
        files = []
        for obj in described:
            if obj.checksum is not None:
                algo, digest = obj.checksum
            else:
                algo, digest = PINNED, pinned_hash(self.store, repo.org, obj)
            files.append(FileEntry(obj.path, obj.size, algo, digest, self._chunk_size, obj.pin))
        files.sort(key=lambda f: f.path)
        return Manifest(repo, commit, tuple(files))

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        """Stores are read with this process's own credentials, the same for every caller
        (docs/providers.md): whoever may use the mount may read what it serves."""
        self._check_allowed(source.repo)
        return "open"

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        self._check_allowed(source.repo)
        start, end = source.entry.chunk_span(index)
        key = f"{source.repo.name}/{source.entry.path}"
        try:
            data = await self._call(self.store.read, source.repo.org, source.entry, key, start, end)
        except EntryNotFound:
            # Listed in this revision, gone now: the revision is stale (as for a rewrite).
            raise StaleRevision(f"{self.store.address(source.repo.org, key)} was deleted upstream since revision "
                                f"{source.commit[:12]} was listed; read '{STORE_BRANCH}' again") from None
        if len(data) != end - start:
            raise UpstreamError(f"{self.store.address(source.repo.org, key)}: got {len(data)} bytes for "
                                f"[{start}, {end})")
        self._received += len(data)
        return FetchedChunk(data=data, source_url=self.store.address(source.repo.org, key),
                            etag=source.entry.pin)

    @property
    def received_bytes(self) -> int:
        return self._received

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.store.close)


def relative_path(prefix: str, key: str) -> str | None:
    """The path of ``key`` under ``prefix/``; ``None`` for folder markers (``…/``).

    :class:`UpstreamError` for a key no file system can show (``a//b``, ``..``)."""
    rel = key[len(prefix) + 1:]
    if not rel or rel.endswith("/"):
        return None
    try:
        return check_path(rel)
    except InvalidName as exc:
        raise UpstreamError(f"key {key!r} cannot be a file path: {exc}") from None
