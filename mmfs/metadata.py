"""What mmfs knows about repos and files, kept in LMDB so it survives restarts.

Four tables:

* ``refs``: ``provider/org/name@revision`` -> the commit it resolved to and when. A branch
  is re-resolved after a short TTL; when the upstream is unreachable (or
  ``HF_HUB_OFFLINE=1``) the last known commit is used, so a node whose caches are warm
  keeps working with the backend and the Hub gone.
* ``manifests``: ``provider/org/name@commit`` -> the commit's manifest (immutable).
* ``chunk_digests``: content id -> the blake3 of each chunk of a file that passed
  whole-file verification; a chunk fetched again later must match it.
* ``files``: content id -> a record per file content: where it came from (source URL,
  ETag, Last-Modified), when it was downloaded, whether it passed whole-file
  verification, the id of the download in flight (so a waiter can tell which fetch it is
  subscribed to) and which pod holds it in memory. The backend's ``/metrics`` and
  ``mmfs status`` read from here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from .errors import CacheError
from .manifest import Manifest
from .names import RepoRef

_MAP_SIZE = 1 << 30


@dataclass(slots=True)
class FileRecord:
    """Provenance and state of one file content (keyed by content id)."""

    content_id: str
    source_url: str = ""
    etag: str = ""
    last_modified: str = ""
    downloaded_at: float = 0.0
    verified: bool = False
    failures: int = 0
    last_failure: str = ""
    inflight_download: str = ""
    holder: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RefRecord:
    commit: str
    resolved_at: float


class MetadataStore:
    """Small LMDB database of refs, manifests and file records. Calls are short and local."""

    def __init__(self, path: Path) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=4, sync=False, metasync=False)
        except (OSError, lmdb.Error) as exc:
            raise CacheError(f"cannot open metadata database at {path}: {exc}") from exc
        self._refs = self._env.open_db(b"refs")
        self._manifests = self._env.open_db(b"manifests")
        self._files = self._env.open_db(b"files")
        self._chunk_digests = self._env.open_db(b"chunk_digests")

    @staticmethod
    def _repo_key(repo: RepoRef, revision: str) -> bytes:
        return f"{repo}@{revision}".encode()

    def _get(self, db: Any, key: bytes) -> bytes | None:
        with self._env.begin(db=db) as txn:
            return txn.get(key)

    def _put(self, db: Any, key: bytes, value: bytes) -> None:
        try:
            with self._env.begin(db=db, write=True) as txn:
                txn.put(key, value)
        except lmdb.Error as exc:
            raise CacheError(f"metadata write failed: {exc}") from exc

    # refs

    def get_ref(self, repo: RepoRef, revision: str) -> RefRecord | None:
        raw = self._get(self._refs, self._repo_key(repo, revision))
        return RefRecord(**json.loads(raw)) if raw else None

    def put_ref(self, repo: RepoRef, revision: str, commit: str) -> None:
        record = RefRecord(commit, time.time())
        self._put(self._refs, self._repo_key(repo, revision), json.dumps(asdict(record)).encode())

    def refs(self) -> dict[str, RefRecord]:
        """Every ``provider/org/name@revision`` known, for ``mmfs status``."""
        with self._env.begin(db=self._refs) as txn:
            return {k.decode(): RefRecord(**json.loads(v)) for k, v in txn.cursor()}

    # manifests

    def get_manifest(self, repo: RepoRef, commit: str) -> Manifest | None:
        raw = self._get(self._manifests, self._repo_key(repo, commit))
        return Manifest.loads(raw) if raw else None

    def manifest_keys(self) -> list[tuple[RepoRef, str]]:
        """``(repo, commit)`` of every manifest stored, without parsing them (for listings)."""
        keys = []
        with self._env.begin(db=self._manifests) as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                repo_text, _, commit = raw.decode().rpartition("@")
                parts = repo_text.split("/")
                if len(parts) == 3:
                    keys.append((RepoRef(*parts), commit))
        return keys

    def put_manifest(self, manifest: Manifest) -> None:
        self._put(self._manifests, self._repo_key(manifest.repo, manifest.commit), manifest.dumps())

    # files

    def get_file(self, content_id: str) -> FileRecord | None:
        raw = self._get(self._files, content_id.encode())
        return FileRecord(**json.loads(raw)) if raw else None

    def update_file(self, content_id: str, **changes: Any) -> FileRecord:
        """Read-modify-write one file record in a single transaction."""
        try:
            with self._env.begin(db=self._files, write=True) as txn:
                raw = txn.get(content_id.encode())
                record = FileRecord(**json.loads(raw)) if raw else FileRecord(content_id)
                for name, value in changes.items():
                    setattr(record, name, value)
                txn.put(content_id.encode(), json.dumps(asdict(record)).encode())
                return record
        except lmdb.Error as exc:
            raise CacheError(f"metadata write failed: {exc}") from exc

    def mark_verified(self, content_id: str, chunk_digests: bytes) -> None:
        """Record that a content matched its upstream hash, with the blake3 of each chunk
        (32 bytes each, in order): the reference later fetches of its chunks must match."""
        try:
            with self._env.begin(write=True) as txn:
                txn.put(content_id.encode(), chunk_digests, db=self._chunk_digests)
                raw = txn.get(content_id.encode(), db=self._files)
                record = FileRecord(**json.loads(raw)) if raw else FileRecord(content_id)
                record.verified, record.inflight_download = True, ""
                txn.put(content_id.encode(), json.dumps(asdict(record)).encode(), db=self._files)
        except lmdb.Error as exc:
            raise CacheError(f"metadata write failed: {exc}") from exc

    def get_chunk_digests(self, content_id: str) -> bytes | None:
        return self._get(self._chunk_digests, content_id.encode())

    def mark_failed(self, content_id: str, *, failures: int, last_failure: str) -> None:
        """A content failed verification: it is neither verified nor downloaded any more."""
        try:
            with self._env.begin(write=True) as txn:
                txn.delete(content_id.encode(), db=self._chunk_digests)
        except lmdb.Error as exc:
            raise CacheError(f"metadata write failed: {exc}") from exc
        self.update_file(content_id, verified=False, failures=failures, last_failure=last_failure,
                         downloaded_at=0.0, inflight_download="")

    def files(self) -> list[FileRecord]:
        with self._env.begin(db=self._files) as txn:
            return [FileRecord(**json.loads(v)) for _, v in txn.cursor()]

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()
