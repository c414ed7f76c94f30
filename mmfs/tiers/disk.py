"""Chunks on local disk, indexed in LMDB, bounded by bytes with LRU eviction.

Layout under ``root``::

    chunks/<ab>/<content_id>.<chunk_size>.<index>   one file per chunk, written atomically
    index.lmdb/                                     key -> (recency, size, blake3)

Why this shape: a file per chunk makes eviction a cheap ``unlink`` and lets the node and
the backend's cold tier (the same class, on an RWX volume) share one format. Each chunk
file is written to a temporary name and renamed, then indexed; on start-up entries
without a file and files without an entry (a crash between the two steps) are dropped, so
a ``kill -9`` at any point leaves a consistent cache. Every read re-checks the blake3
recorded at write time: a damaged file is a miss, never bad bytes.

The index is mirrored in memory (tens of thousands of entries at most) so lookups and
LRU order cost no LMDB transaction; recency updates are written back lazily, batched with
the next write. Blocking work runs in worker threads, never on the trio loop.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import blake3
import lmdb
import trio

from ..errors import CacheError
from ..manifest import ChunkKey
from .base import ChunkTier, TierStatistics

log = logging.getLogger(__name__)

_RECORD = struct.Struct(">QQ32s")  # recency sequence, size, blake3 digest
_INDEX_MAP_SIZE = 1 << 30  # address space for the index, not disk use


class DiskTier(ChunkTier):
    name = "disk"

    def __init__(self, root: Path, limit_bytes: int, *, threads: int = 4) -> None:
        self._root = Path(root)
        self._chunks = self._root / "chunks"
        self._limit = limit_bytes
        self._limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        # LRU order, oldest first: key -> (size, digest)
        self._index: OrderedDict[ChunkKey, tuple[int, bytes]] = OrderedDict()
        self._touched: set[ChunkKey] = set()
        self._seq = 0
        self._used = 0
        self._hits = self._misses = self._hit_bytes = self._evictions = self._errors = 0
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(self._root / "index.lmdb"), map_size=_INDEX_MAP_SIZE,
                                  max_dbs=1, sync=False, metasync=False)
        except (OSError, lmdb.Error) as exc:
            raise CacheError(f"cannot open chunk cache at {self._root}: {exc}") from exc
        self._recover()

    # -- start-up -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Load the index, dropping entries whose file is gone and files nobody indexed."""
        records: list[tuple[int, ChunkKey, int, bytes]] = []
        stale: list[bytes] = []
        with self._env.begin() as txn:
            for raw_key, raw in txn.cursor():
                key = ChunkKey.decode(raw_key)
                seq, size, digest = _RECORD.unpack(raw)
                path = self._path(key)
                try:
                    if path.stat().st_size != size:
                        raise FileNotFoundError(path)
                except FileNotFoundError:
                    stale.append(raw_key)
                    continue
                records.append((seq, key, size, digest))
        if stale:
            with self._env.begin(write=True) as txn:
                for raw_key in stale:
                    txn.delete(raw_key)
            log.warning("chunk cache %s: dropped %d index entries without data", self._root, len(stale))
        records.sort(key=lambda r: r[0])
        for seq, key, size, digest in records:
            self._index[key] = (size, digest)
            self._used += size
            self._seq = max(self._seq, seq)
        known = {self._path(key).name for key in self._index}
        for shard in self._chunks.iterdir():
            for file in shard.iterdir():
                if file.name not in known:
                    file.unlink(missing_ok=True)

    # -- the tier interface -------------------------------------------------------------

    async def get(self, key: ChunkKey) -> bytes | None:
        record = self._index.get(key)
        if record is None:
            self._misses += 1
            return None
        data = await trio.to_thread.run_sync(self._read_verified, key, record, limiter=self._limiter)
        if data is None:
            self._misses += 1
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                self._touched.add(key)
        self._hits += 1
        self._hit_bytes += len(data)
        return data

    def _read_verified(self, key: ChunkKey, record: tuple[int, bytes]) -> bytes | None:
        size, digest = record
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None  # evicted meanwhile
        except OSError as exc:
            self._errors += 1
            log.error("chunk cache read failed for %s: %s", self._path(key), exc)
            return None
        if len(data) != size or blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest() != digest:
            self._errors += 1
            log.error("chunk cache: %s failed its blake3 check; dropping it", self._path(key))
            self._drop([key])
            return None
        return data

    async def put(self, key: ChunkKey, data: bytes) -> None:
        if len(data) > self._limit or key in self._index:
            return
        await trio.to_thread.run_sync(self._store, key, data, limiter=self._limiter)

    def _store(self, key: ChunkKey, data: bytes) -> None:
        digest = blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
        path = self._path(key)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        with self._lock:
            victims = self._make_room(len(data))
        self._unlink(victims)
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._errors += 1
            self._commit(victims, {}, set())
            raise CacheError(f"cannot write chunk to {self._root}: {os.strerror(exc.errno or errno.EIO)}") from exc
        with self._lock:
            self._seq += 1
            self._index[key] = (len(data), digest)
            self._used += len(data)
            touched, self._touched = self._touched, set()
        self._commit(victims, {key: (self._seq, len(data), digest)}, touched)

    def _make_room(self, size: int) -> list[ChunkKey]:
        """Pop least recently used entries until ``size`` more bytes fit (lock held)."""
        victims = []
        while self._index and self._used + size > self._limit:
            victim, (victim_size, _) = self._index.popitem(last=False)
            self._used -= victim_size
            self._touched.discard(victim)
            victims.append(victim)
        self._evictions += len(victims)
        return victims

    def _commit(self, removed: list[ChunkKey], added: dict[ChunkKey, tuple[int, int, bytes]],
                touched: set[ChunkKey]) -> None:
        """Write index changes in one transaction: removals, additions, batched recency."""
        try:
            with self._env.begin(write=True) as txn:
                for key in removed:
                    txn.delete(key.encode())
                for key, record in added.items():
                    txn.put(key.encode(), _RECORD.pack(*record))
                for key in touched:
                    with self._lock:
                        self._seq += 1
                        record = self._index.get(key)
                        seq = self._seq
                    if record is not None:
                        txn.put(key.encode(), _RECORD.pack(seq, *record))
        except lmdb.Error as exc:
            self._errors += 1
            raise CacheError(f"chunk index update failed in {self._root}: {exc}") from exc

    def _drop(self, keys: list[ChunkKey]) -> None:
        with self._lock:
            dropped = []
            for key in keys:
                record = self._index.pop(key, None)
                if record is not None:
                    self._used -= record[0]
                    self._touched.discard(key)
                    dropped.append(key)
        self._unlink(dropped)
        self._commit(dropped, {}, set())

    def _unlink(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    async def discard(self, content_id: str) -> int:
        doomed = [k for k in list(self._index) if k.content_id == content_id]
        await trio.to_thread.run_sync(self._drop, doomed, limiter=self._limiter)
        return len(doomed)

    def contains(self, key: ChunkKey) -> bool:
        return key in self._index

    def statistics(self) -> TierStatistics:
        return TierStatistics(self.name, self._hits, self._misses, self._hit_bytes, self._used,
                              self._limit, len(self._index), self._evictions, self._errors)

    async def aclose(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        if touched:
            self._commit([], {}, touched)
        self._env.sync(True)
        self._env.close()

    def _path(self, key: ChunkKey) -> Path:
        digest_part = key.content_id.rsplit("-", 1)[-1]
        return self._chunks / digest_part[:2] / f"{key.content_id}.{key.chunk_size}.{key.index}"
