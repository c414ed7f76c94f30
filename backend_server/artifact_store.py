"""Where published artifacts live on the backend, and the origin the engine reads them from.

An artifact's files are *blobs* named by their sha256 under ``<data-dir>/artifacts/blobs``
(identical files across artifacts are stored once). An upload goes to
``artifacts/staging/<sha256>`` piece by piece, at the offset the client says (so a broken
upload resumes where it stopped, also across restarts), and becomes a blob only once all
of it matched its sha256. Publishing writes the artifact's record and manifest into the
metadata DB in one transaction, after checking every blob is there: before that nobody
sees any of it, after it everything.

The blob store is the artifacts' *origin*, the way the Hub is the models': the engine
reads them through :class:`ArtifactOrigin` like any upstream file, so the same tiers,
single-flight, whole-file sha256 check and chunk maps apply (a blob damaged on disk fails
that check like a corrupt Hub file). The cold tier may evict artifact chunks; the blobs
stay until :meth:`ArtifactStore.reclaim`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import trio

from mmfs.artifacts import ArtifactKey
from mmfs.errors import IntegrityError, InvalidName, MmfsError, NotFound
from mmfs.manifest import SHA256, FileEntry, Manifest
from mmfs.metadata import MetadataStore
from mmfs.names import ARTIFACTS, RepoRef, check_path, is_commit
from mmfs.remote.base import FetchedChunk, FileSource, Remote

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 8 << 20


class ArtifactNotFound(NotFound):
    """No artifact is published under that key (yet)."""


class Conflict(MmfsError):
    """The request does not fit the state it meets (an upload at the wrong offset, a
    second publish of a key with other files)."""

    status = 409


def check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise InvalidName(f"invalid sha256 {value[:80]!r}: 64 lowercase hex digits")
    return value


def parse_files(raw: Any) -> list[tuple[str, int, str]]:
    """``[{"path", "size", "sha256"}, ...]`` from a request: validated, sorted, unique paths."""
    if not isinstance(raw, list) or not raw:
        raise InvalidName("files must be a non-empty list of {path, size, sha256}")
    files = []
    for item in raw:
        try:
            path, size, sha = check_path(str(item["path"])), int(item["size"]), check_sha256(str(item["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidName(f"malformed file entry {str(item)[:120]}: {exc}") from None
        if size < 0:
            raise InvalidName(f"{path}: negative size")
        files.append((path, size, sha))
    files.sort()
    if len({p for p, _, _ in files}) != len(files):
        raise InvalidName("a path appears twice in files")
    return files


class ArtifactStore:
    def __init__(self, root: Path, metadata: MetadataStore, chunk_size: int) -> None:
        self.root = Path(root)
        self.metadata = metadata
        self.chunk_size = chunk_size
        self._blobs = self.root / "blobs"
        self._staging = self.root / "staging"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self.uploaded_bytes = 0

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def _staging_path(self, sha256: str) -> Path:
        return self._staging / sha256

    # -- uploads (blocking: called in worker threads) -----------------------------------

    def staged(self, sha256: str, size: int) -> int:
        """Bytes of this blob the backend holds: ``size`` when complete, else what an
        upload left in staging (where the next piece must start)."""
        blob = self.blob_path(check_sha256(sha256))
        if blob.exists() and blob.stat().st_size == size:
            return size
        try:
            return min(self._staging_path(sha256).stat().st_size, size)
        except FileNotFoundError:
            return 0

    def append(self, sha256: str, size: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` of the staged blob; return the bytes now staged.

        :class:`Conflict` when ``offset`` is not where staging ends (the client resumes from
        the answer's offset); once complete the blob is hashed, and kept only if it
        matches (:class:`IntegrityError` otherwise: the staging is dropped)."""
        check_sha256(sha256)
        have = self.staged(sha256, size)
        if have == size:
            return size
        if offset != have:
            raise Conflict(f"blob {sha256[:12]}: upload must resume at byte {have}, not {offset}")
        if offset + len(data) > size:
            raise InvalidName(f"blob {sha256[:12]}: {offset + len(data)} bytes is more than its size {size}")
        staging = self._staging_path(sha256)
        with open(staging, "ab") as f:
            f.write(data)
        self.uploaded_bytes += len(data)
        if offset + len(data) < size:
            return offset + len(data)
        hasher = hashlib.sha256()
        with open(staging, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                hasher.update(block)
            os.fsync(f.fileno())
        if hasher.hexdigest() != sha256:
            staging.unlink(missing_ok=True)
            raise IntegrityError(f"blob {sha256[:12]}: the uploaded bytes hash to {hasher.hexdigest()[:12]}; "
                                 "upload dropped, send it again")
        blob = self.blob_path(sha256)
        blob.parent.mkdir(exist_ok=True)
        os.replace(staging, blob)
        return size

    def publish(self, key: ArtifactKey, files: list[tuple[str, int, str]]) -> tuple[dict[str, Any], bool]:
        """Make the artifact visible, whole; ``(record, created)``. Publishing the same
        files again is a no-op; other files under a published key are a :class:`Conflict`
        (an artifact is immutable)."""
        for path, size, sha in files:
            if self.staged(sha, size) != size:
                raise Conflict(f"{path}: its blob {sha[:12]} is not uploaded completely; push it first")
        entries = tuple(FileEntry(path, size, SHA256, sha, self.chunk_size) for path, size, sha in files)
        manifest = Manifest(ARTIFACTS, key.id, entries)
        record = {"key": key.to_json(), "files": [{"path": p, "size": s, "sha256": h} for p, s, h in files],
                  "size": sum(s for _, s, _ in files), "published_at": time.time()}
        created = self.metadata.put_artifact(key.id, record, manifest)
        existing = self.metadata.get_artifact(key.id)
        if existing is None:  # pragma: no cover - the write above just made it
            raise Conflict(f"{key.id}: published record vanished")
        if not created and existing["files"] != record["files"]:
            raise Conflict(f"{key} is already published with other files (artifacts are immutable)")
        return existing, created

    # -- reads ----------------------------------------------------------------------------

    def record(self, artifact_id: str) -> dict[str, Any] | None:
        return self.metadata.get_artifact(artifact_id) if is_commit(artifact_id) else None

    def read(self, sha256: str, start: int, end: int) -> bytes:
        with open(self.blob_path(check_sha256(sha256)), "rb") as f:
            return os.pread(f.fileno(), end - start, start)

    # -- retention ------------------------------------------------------------------------

    def reclaim(self, pinned: Callable[[RepoRef, str], bool], *, dry_run: bool = False) -> list[str]:
        """Unpublish every artifact whose model commit is no longer ``pinned(repo, commit)``,
        then delete the blobs no artifact references; return the ids removed (``dry_run``:
        that would be). The join with commit retention: the backend's gc calls it with the
        commits retention keeps live (:mod:`backend_server.versions`)."""
        removed = []
        for artifact_id, record in self.metadata.artifacts().items():
            key = ArtifactKey.from_json(record["key"])
            if not pinned(key.repo, key.commit):
                if not dry_run:
                    self.metadata.delete_artifact(artifact_id, ARTIFACTS)
                removed.append(artifact_id)
        if dry_run:
            return removed
        referenced = {f["sha256"] for r in self.metadata.artifacts().values() for f in r["files"]}
        for blob in self._blobs.glob("*/*"):
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)
        if removed:
            log.info("artifacts: %d unpublished (their model commits are not retained)", len(removed))
        return removed

    def statistics(self) -> dict[str, int]:
        records = self.metadata.artifacts()
        return {"artifacts": len(records), "bytes": sum(int(r.get("size", 0)) for r in records.values()),
                "uploaded_bytes": self.uploaded_bytes}


class ArtifactOrigin(Remote):
    """The backend's remote: the model upstream, plus the blob store for :data:`ARTIFACTS`.

    Artifact files come back unverified like any upstream bytes: the engine checks each
    whole file against the sha256 its publisher uploaded it with, and makes its chunk map."""

    def __init__(self, upstream: Remote, store: ArtifactStore) -> None:
        self.upstream = upstream
        self.store = store
        self.url = upstream.url
        self.verifies_files = upstream.verifies_files

    @property
    def received_bytes(self) -> int:
        return self.upstream.received_bytes

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        if repo == ARTIFACTS:
            if not is_commit(revision):
                raise ArtifactNotFound(f"artifacts are named by their 40-hex id, not {revision[:80]!r}")
            return revision
        return await self.upstream.resolve(repo, revision, auth=auth)

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        if repo == ARTIFACTS:
            # Published manifests are in the metadata DB, where the engine looks first.
            raise ArtifactNotFound(f"no artifact {commit} is published")
        return await self.upstream.manifest(repo, commit, auth=auth)

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        if source.repo != ARTIFACTS:
            return await self.upstream.fetch_chunk(source, index, auth=auth)
        start, end = source.entry.chunk_span(index)
        try:
            data = await trio.to_thread.run_sync(self.store.read, source.entry.hash, start, end)
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {source.commit}: blob of {source.entry.path} is missing") from None
        if len(data) != end - start:
            raise IntegrityError(f"artifact {source.commit}: blob of {source.entry.path} is shorter than its "
                                 "manifest says")
        return FetchedChunk(data=data, source_url=f"artifact:{source.commit}/{source.entry.path}")

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        if source.repo == ARTIFACTS:  # readers are checked against the artifact's model (BackendApp)
            return "open"
        return await self.upstream.check_access(source, auth=auth)

    async def aclose(self) -> None:
        await self.upstream.aclose()


__all__ = ["ArtifactNotFound", "ArtifactOrigin", "ArtifactStore", "Conflict", "check_sha256", "parse_files"]
