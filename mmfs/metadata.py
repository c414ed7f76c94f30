"""What mmfs knows about repos and files, kept in LMDB so it survives restarts.

Seven tables:

* ``refs``: ``provider/org/name@revision`` -> the commit it resolved to and when. A branch
  is re-resolved after a short TTL; when the upstream is unreachable (or
  ``HF_HUB_OFFLINE=1``) the last known commit is used, so a node whose caches are warm
  keeps working with the backend and the Hub gone.
* ``ref_history``: ``provider/org/name@revision\0<time>`` -> one move of a ref: from
  which commit to which, when, and who detected it (:class:`RefMove`).
* ``watched``: ``provider/org/name@revision`` -> why the ref is watched while nobody reads
  it (``mmfs watch``, a CSI volume) and whether its new commits are warmed (:mod:`mmfs.refwatch`).
* ``manifests``: ``provider/org/name@commit`` -> the commit's manifest (immutable).
* ``maps``: ``<content id>:<chunk size>`` -> the file's chunk map (:mod:`mmfs.chunkmap`),
  recorded once the whole file matched its upstream hash (here or, fetched, at the
  backend); every copy of a chunk held or fetched later must match it.
* ``files``: content id -> a record per file content: where it came from (source URL,
  ETag, Last-Modified), when it was downloaded, whether it passed whole-file
  verification, the id of the download in flight (so a waiter can tell which fetch it is
  subscribed to) and which pod holds it in memory. The backend's ``/metrics`` and
  ``mmfs status`` read from here.
* ``artifacts`` (the backend): artifact id -> its key (model repo and *commit*, kind,
  target, builder), files and size (:mod:`mmfs.artifacts`). Its manifest goes into
  ``manifests`` in the same transaction, so an artifact is visible whole or not at all.
  Retention joins on the model commit each record names (``ArtifactStore.reclaim``);
  :meth:`MetadataStore.delete_artifact` removes one.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from .chunkmap import ChunkMap, map_key
from .errors import CacheError, InvalidName
from .manifest import Manifest
from .names import RepoRef, is_commit

log = logging.getLogger(__name__)

_INITIAL_MAP_SIZE = 64 << 20  # LMDB address space; doubled whenever a write finds it full
_MAP_HEADER = struct.Struct(">Q")  # file size, before the digests


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
    #: When readers may last have been given wrong bytes of this content (a failed whole-
    #: file check, or provisional copies that did not match the map); 0: never.
    tainted_at: float = 0.0
    inflight_download: str = ""
    holder: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RefRecord:
    commit: str
    resolved_at: float


@dataclass(frozen=True, slots=True)
class RefMove:
    """A ref seen pointing somewhere new: ``detected_by`` is the holder (pod or host) that
    asked the upstream, or ``backend`` when a node learnt it from its backend."""

    ref: str  # provider/org/name@revision
    from_commit: str
    to_commit: str
    at: float
    detected_by: str


@dataclass(frozen=True, slots=True)
class WatchRecord:
    """A ref watched for moves even while nobody reads it."""

    ref: str
    since: float
    warm: bool = False
    reason: str = ""


class MetadataStore:
    """Small LMDB database of refs, manifests and file records. Calls are short and local."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        try:
            self._open(path)
        except (OSError, lmdb.Error) as exc:
            # A damaged database must not stop the daemon (a crash loop under a DaemonSet):
            # move it aside once and start empty; only a second failure is an error.
            aside = path.with_name(f"{path.name}.quarantine-{int(time.time())}")
            log.error("metadata database at %s is unusable (%s); moved to %s, starting empty", path, exc, aside)
            try:
                if path.exists():
                    shutil.move(str(path), str(aside))
                self._open(path)
            except (OSError, lmdb.Error) as again:
                raise CacheError(f"cannot open metadata database at {path}: {again}") from again

    def _open(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=_INITIAL_MAP_SIZE, max_dbs=7, sync=False, metasync=False)
        self._refs = self._env.open_db(b"refs")
        self._manifests = self._env.open_db(b"manifests")
        self._files = self._env.open_db(b"files")
        self._maps = self._env.open_db(b"maps")
        self._history = self._env.open_db(b"ref_history")
        self._watched = self._env.open_db(b"watched")
        self._artifacts = self._env.open_db(b"artifacts")
        with self._env.begin() as txn:  # a file that is not LMDB fails here, not on first use
            txn.stat(self._files)

    def _write(self, fn: Any) -> Any:
        """Run ``fn(txn)`` in a write transaction, growing the map when it is full."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as exc:
                raise CacheError(f"metadata write failed: {exc}") from exc

    @staticmethod
    def _repo_key(repo: RepoRef, revision: str) -> bytes:
        return f"{repo}@{revision}".encode()

    def _get(self, db: Any, key: bytes) -> bytes | None:
        with self._env.begin(db=db) as txn:
            return txn.get(key)

    def _put(self, db: Any, key: bytes, value: bytes) -> None:
        self._write(lambda txn: txn.put(key, value, db=db))

    # refs

    def get_ref(self, repo: RepoRef, revision: str) -> RefRecord | None:
        raw = self._get(self._refs, self._repo_key(repo, revision))
        return _decode(RefRecord, raw)

    def put_ref(self, repo: RepoRef, revision: str, commit: str) -> None:
        record = RefRecord(commit, time.time())
        self._put(self._refs, self._repo_key(repo, revision), json.dumps(asdict(record)).encode())

    def record_move(self, move: RefMove) -> None:
        key = f"{move.ref}\0{move.at:017.6f}".encode()
        self._put(self._history, key, json.dumps(asdict(move)).encode())

    def ref_history(self, ref: str | None = None, limit: int = 100) -> list[RefMove]:
        """Moves of ``ref`` (all refs: ``None``), oldest first, the last ``limit`` of them."""
        prefix = f"{ref}\0".encode() if ref else b""
        found = []
        with self._env.begin(db=self._history) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append(_decode(RefMove, value))
        moves = [m for m in found if m is not None]
        return sorted(moves, key=lambda m: m.at)[-limit:]

    def put_watch(self, record: WatchRecord) -> None:
        self._put(self._watched, record.ref.encode(), json.dumps(asdict(record)).encode())

    def watched(self) -> list[WatchRecord]:
        with self._env.begin(db=self._watched) as txn:
            found = [_decode(WatchRecord, v) for _, v in txn.cursor()]
        return [record for record in found if record is not None]

    def refs(self) -> dict[str, RefRecord]:
        """Every ``provider/org/name@revision`` known, for ``mmfs status``."""
        with self._env.begin(db=self._refs) as txn:
            found = {k.decode("utf-8", "replace"): _decode(RefRecord, v) for k, v in txn.cursor()}
        return {k: v for k, v in found.items() if v is not None}

    # manifests

    def get_manifest(self, repo: RepoRef, commit: str) -> Manifest | None:
        raw = self._get(self._manifests, self._repo_key(repo, commit))
        if not raw:
            return None
        try:
            return Manifest.loads(raw)
        except (ValueError, KeyError, TypeError, InvalidName):
            log.warning("metadata: unreadable manifest record for %s@%s ignored", repo, commit)
            return None

    def manifest_keys(self) -> list[tuple[RepoRef, str]]:
        """``(repo, commit)`` of every manifest stored, without parsing them (for listings)."""
        keys = []
        with self._env.begin(db=self._manifests) as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                repo_text, _, commit = raw.decode("utf-8", "replace").rpartition("@")
                parts = repo_text.split("/", 2)  # a store model's prefix may hold "/"
                if len(parts) == 3 and is_commit(commit):
                    keys.append((RepoRef(*parts), commit))
        return keys

    def put_manifest(self, manifest: Manifest) -> None:
        self._put(self._manifests, self._repo_key(manifest.repo, manifest.commit), manifest.dumps())

    # files

    def get_file(self, content_id: str) -> FileRecord | None:
        raw = self._get(self._files, content_id.encode())
        return _decode(FileRecord, raw)

    def update_file(self, content_id: str, **changes: Any) -> FileRecord:
        """Read-modify-write one file record in a single transaction."""
        def change(txn: Any) -> FileRecord:
            return self._update(txn, content_id, changes)
        return self._write(change)

    def _update(self, txn: Any, content_id: str, changes: dict[str, Any]) -> FileRecord:
        raw = txn.get(content_id.encode(), db=self._files)
        record = _decode(FileRecord, raw) or FileRecord(content_id)
        for name, value in changes.items():
            setattr(record, name, value)
        txn.put(content_id.encode(), json.dumps(asdict(record)).encode(), db=self._files)
        return record

    # chunk maps

    def put_map(self, chunk_map: ChunkMap, *, verified_here: bool) -> None:
        """Keep a file's chunk map; ``verified_here``: this process checked the whole file
        (the file record then says verified, and no download is in flight any more)."""
        def store(txn: Any) -> None:
            txn.put(chunk_map.key.encode(), _MAP_HEADER.pack(chunk_map.size) + chunk_map.digests, db=self._maps)
            if verified_here:
                self._update(txn, chunk_map.content_id, {"verified": True, "inflight_download": ""})
        self._write(store)

    def get_map(self, content_id: str, chunk_size: int) -> ChunkMap | None:
        raw = self._get(self._maps, map_key(content_id, chunk_size).encode())
        if raw is None or len(raw) < _MAP_HEADER.size:
            return None
        try:
            return ChunkMap(content_id, _MAP_HEADER.unpack_from(raw)[0], chunk_size, bytes(raw[_MAP_HEADER.size:]))
        except ValueError:
            return None  # damaged: as if never recorded; the file is verified again

    def map_sizes(self, content_id: str) -> list[int]:
        """Chunk sizes for which a map of ``content_id`` is recorded."""
        prefix = f"{content_id}:".encode()
        with self._env.begin(db=self._maps) as txn:
            cursor = txn.cursor()
            found = []
            if cursor.set_range(prefix):
                for raw in cursor.iternext(keys=True, values=False):
                    if not raw.startswith(prefix):
                        break
                    found.append(int(raw[len(prefix):]))
            return found

    def mark_failed(self, content_id: str, *, last_failure: str) -> None:
        """A content failed verification: its maps go, it is neither verified nor
        downloaded any more, and its failure count grows (the backend then refuses to
        resume ranges of it: see docs/datapath.md)."""
        prefix = f"{content_id}:".encode()

        def fail(txn: Any) -> None:
            cursor = txn.cursor(db=self._maps)
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    if not cursor.delete():
                        break
            raw = txn.get(content_id.encode(), db=self._files)
            failures = (_decode(FileRecord, raw) or FileRecord(content_id)).failures
            self._update(txn, content_id, {"verified": False, "failures": failures + 1, "last_failure": last_failure,
                                           "downloaded_at": 0.0, "inflight_download": "", "tainted_at": time.time()})
        self._write(fail)

    # artifacts

    def put_artifact(self, artifact_id: str, record: dict[str, Any], manifest: Manifest) -> bool:
        """Publish an artifact: its record and manifest in one transaction, synced to disk.
        Returns False (and changes nothing) when ``artifact_id`` is already published."""
        def store(txn: Any) -> bool:
            if txn.get(artifact_id.encode(), db=self._artifacts) is not None:
                return False
            txn.put(artifact_id.encode(), json.dumps(record, sort_keys=True).encode(), db=self._artifacts)
            txn.put(self._repo_key(manifest.repo, manifest.commit), manifest.dumps(), db=self._manifests)
            return True
        created = self._write(store)
        self._env.sync(True)
        return bool(created)

    def get_artifact(self, artifact_id: str) -> dict[str, Any] | None:
        raw = self._get(self._artifacts, artifact_id.encode())
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            log.warning("metadata: unreadable artifact record %s ignored", artifact_id)
            return None

    def artifacts(self) -> dict[str, dict[str, Any]]:
        """Every published artifact: id -> record."""
        with self._env.begin(db=self._artifacts) as txn:
            keys = [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
        return {k: r for k in keys if (r := self.get_artifact(k)) is not None}

    def delete_artifact(self, artifact_id: str, manifest_repo: RepoRef) -> None:
        """Unpublish (retention): the record and its manifest go together."""
        def drop(txn: Any) -> None:
            txn.delete(artifact_id.encode(), db=self._artifacts)
            txn.delete(self._repo_key(manifest_repo, artifact_id), db=self._manifests)
        self._write(drop)
        self._env.sync(True)

    def files(self) -> list[FileRecord]:
        with self._env.begin(db=self._files) as txn:
            found = [_decode(FileRecord, v) for _, v in txn.cursor()]
        return [record for record in found if record is not None]

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()


def _decode(kind: Any, raw: bytes | None) -> Any:
    """A JSON record, or ``None`` for a missing or unreadable one (a damaged database must
    cost what it lost, not the daemon: the caller then behaves as if it was never stored)."""
    if not raw:
        return None
    try:
        return kind(**json.loads(raw))
    except (ValueError, TypeError):
        log.warning("metadata: an unreadable %s record was ignored", kind.__name__)
        return None
