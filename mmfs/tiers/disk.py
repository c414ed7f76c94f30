"""Chunks on local disk, indexed in LMDB, bounded by bytes with LRU eviction.

Layout under ``root``::

    chunks/<ab>/<content_id>.<chunk_size>.<index>   one file per chunk, written atomically
    index-v2.lmdb/  chunks:  key -> (recency, size)
                    digests: key -> blake3 of each 64 KiB block of the chunk

Why this shape: a file per chunk makes eviction a cheap ``unlink`` and lets the node and
the backend's cold tier (the same class, on an RWX volume) share one format. Each chunk
file is written to a temporary name and renamed, then indexed; on start-up entries
without a file and files without an entry (a crash between the two steps) are dropped, so
a ``kill -9`` at any point leaves a consistent cache. Every read re-checks the blake3
recorded at write time: a damaged file is a miss, never bad bytes.

Digests are kept per 64 KiB block rather than per chunk so that a small read (a 4 KiB
random read, an mmap page fault) reads and verifies one block, not the whole 4 MiB chunk:
that is what keeps warm random reads well under a millisecond.

The index is mirrored in memory (tens of thousands of entries at most) so lookups and
LRU order cost no LMDB transaction; recency updates are written back lazily, batched with
the next write. Blocking work runs in worker threads, never on the trio loop.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
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

#: The index's format is in its name: a cache written in another format starts empty (its
#: chunk files, indexed nowhere, are removed at start-up).
_INDEX_NAME = "index-v2.lmdb"
_RECORD = struct.Struct(">QQ")  # recency sequence, size
_INDEX_MAP_SIZE = 1 << 30  # address space for the index, not disk use
#: Bytes covered by one blake3 digest: the unit of verification for partial reads.
BLOCK_SIZE = 64 << 10
_DIGEST = 32


def block_digests(data: bytes) -> bytes:
    """The concatenated blake3 digests of ``data``'s 64 KiB blocks."""
    view = memoryview(data)
    return b"".join(blake3.blake3(view[i:i + BLOCK_SIZE]).digest() for i in range(0, len(data), BLOCK_SIZE))


class DiskTier(ChunkTier):
    name = "disk"

    def __init__(self, root: Path, limit_bytes: int, *, threads: int = 4) -> None:
        self._root = Path(root)
        self._chunks = self._root / "chunks"
        self._limit = limit_bytes
        self._limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        # LRU order, oldest first: key -> size. Digests stay in LMDB (2 KiB per 4 MiB chunk).
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        self._touched: set[ChunkKey] = set()
        self._writing: set[ChunkKey] = set()  # being written by a worker thread
        self._discards: dict[str, int] = {}  # content id -> times discarded (see _store)
        self._seq = 0
        self._used = 0
        self._hits = self._misses = self._hit_bytes = self._evictions = self._errors = 0
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            for old in self._root.glob("index*.lmdb"):
                if old.name != _INDEX_NAME:
                    shutil.rmtree(old)  # an index of another format: its chunks go at recovery
            self._env = lmdb.open(str(self._root / _INDEX_NAME), map_size=_INDEX_MAP_SIZE,
                                  max_dbs=2, sync=False, metasync=False)
            self._chunks_db = self._env.open_db(b"chunks")
            self._digests_db = self._env.open_db(b"digests")
        except (OSError, lmdb.Error) as exc:
            raise CacheError(f"cannot open chunk cache at {self._root}: {exc}") from exc
        self._recover()

    # -- start-up -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Load the index, dropping entries whose file is gone and files nobody indexed."""
        records: list[tuple[int, ChunkKey, int]] = []
        stale: list[bytes] = []
        with self._env.begin() as txn:
            digests = txn.cursor(db=self._digests_db)
            for raw_key, raw in txn.cursor(db=self._chunks_db):
                key = ChunkKey.decode(raw_key)
                seq, size = _RECORD.unpack(raw)
                path = self._path(key)
                try:
                    if path.stat().st_size != size or not digests.set_key(raw_key):
                        raise FileNotFoundError(path)
                except FileNotFoundError:
                    stale.append(raw_key)
                    continue
                records.append((seq, key, size))
        if stale:
            with self._env.begin(write=True) as txn:
                for raw_key in stale:
                    txn.delete(raw_key, db=self._chunks_db)
                    txn.delete(raw_key, db=self._digests_db)
            log.warning("chunk cache %s: dropped %d index entries without data", self._root, len(stale))
        records.sort(key=lambda r: r[0])
        for seq, key, size in records:
            self._index[key] = size
            self._used += size
            self._seq = max(self._seq, seq)
        known = {self._path(key).name for key in self._index}
        for shard in self._chunks.iterdir():
            for file in shard.iterdir():
                if file.name not in known:
                    file.unlink(missing_ok=True)

    # -- the tier interface -------------------------------------------------------------

    async def get(self, key: ChunkKey) -> bytes | None:
        size = self._index.get(key)
        return None if size is None else await self.get_range(key, 0, size)

    async def get_range(self, key: ChunkKey, start: int, end: int) -> bytes | None:
        size = self._index.get(key)
        if size is None or not 0 <= start < end <= size:
            self._misses += 1
            return None
        data = await trio.to_thread.run_sync(self._read_verified, key, size, start, end, limiter=self._limiter)
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

    def _read_verified(self, key: ChunkKey, size: int, start: int, end: int) -> bytes | None:
        """Read the blocks covering ``[start, end)``, check each against its digest, slice."""
        first = start // BLOCK_SIZE
        block_start = first * BLOCK_SIZE
        block_end = min(size, -(-end // BLOCK_SIZE) * BLOCK_SIZE)
        with self._env.begin(db=self._digests_db) as txn:
            digests = txn.get(key.encode())
        try:
            with open(self._path(key), "rb") as f:
                data = os.pread(f.fileno(), block_end - block_start, block_start)
        except FileNotFoundError:
            self._drop([key])  # evicted meanwhile, or lost: forget it rather than count it
            return None
        except OSError as exc:
            self._errors += 1
            log.error("chunk cache read failed for %s: %s", self._path(key), exc)
            return None
        expected = digests[first * _DIGEST:(first + -(-len(data) // BLOCK_SIZE)) * _DIGEST] if digests else b""
        if len(data) != block_end - block_start or block_digests(data) != expected:
            self._errors += 1
            log.error("chunk cache: %s failed its blake3 check; dropping it", self._path(key))
            self._drop([key])
            return None
        if start == block_start and end == block_end:
            return data
        return data[start - block_start:end - block_start]

    async def put(self, key: ChunkKey, data: bytes) -> None:
        if len(data) > self._limit or key in self._index:
            return
        discards = self._discards.get(key.content_id, 0)
        await trio.to_thread.run_sync(self._store, key, data, discards, limiter=self._limiter)

    def _store(self, key: ChunkKey, data: bytes, discards: int) -> None:
        """Write the chunk, then index it; it becomes visible to readers only once its
        digests are committed, and its bytes count against the limit from the start.
        A write that a :meth:`discard` of its content overtook is thrown away."""
        with self._lock:
            if key in self._index or key in self._writing:
                return
            self._writing.add(key)
            victims = self._make_room(len(data))
            self._used += len(data)
        try:
            digests = block_digests(data)
            self._unlink(victims)
            path = self._path(key)
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
            try:
                path.parent.mkdir(exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                self._errors += 1
                with self._lock:
                    self._used -= len(data)
                self._commit(victims, {}, set())
                raise CacheError(f"cannot write chunk to {self._root}: {os.strerror(exc.errno or errno.EIO)}") from exc
            with self._lock:
                self._seq += 1
                seq = self._seq
                touched, self._touched = self._touched, set()
            self._commit(victims, {key: (seq, len(data), digests)}, touched)
            with self._lock:
                overtaken = self._discards.get(key.content_id, 0) != discards
                if not overtaken:
                    self._index[key] = len(data)
                else:
                    self._used -= len(data)
            if overtaken:
                self._path(key).unlink(missing_ok=True)
                self._commit([key], {}, set())
        finally:
            with self._lock:
                self._writing.discard(key)

    def _make_room(self, size: int) -> list[ChunkKey]:
        """Pop least recently used entries until ``size`` more bytes fit (lock held)."""
        victims = []
        while self._index and self._used + size > self._limit:
            victim, victim_size = self._index.popitem(last=False)
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
                    txn.delete(key.encode(), db=self._chunks_db)
                    txn.delete(key.encode(), db=self._digests_db)
                for key, (seq, size, digests) in added.items():
                    txn.put(key.encode(), digests, db=self._digests_db)
                    txn.put(key.encode(), _RECORD.pack(seq, size), db=self._chunks_db)
                for key in touched:
                    with self._lock:
                        self._seq += 1
                        size = self._index.get(key)
                        seq = self._seq
                    if size is not None:
                        txn.put(key.encode(), _RECORD.pack(seq, size), db=self._chunks_db)
        except lmdb.Error as exc:
            self._errors += 1
            raise CacheError(f"chunk index update failed in {self._root}: {exc}") from exc

    def _drop(self, keys: list[ChunkKey]) -> None:
        with self._lock:
            dropped = []
            for key in keys:
                size = self._index.pop(key, None)
                if size is not None:
                    self._used -= size
                    self._touched.discard(key)
                    dropped.append(key)
        self._unlink(dropped)
        self._commit(dropped, {}, set())

    def _unlink(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    async def discard(self, content_id: str) -> int:
        # Invisible at once (no reader may get these chunks from here on) and writes in
        # flight are told; the files and index entries go in a worker thread.
        with self._lock:
            self._discards[content_id] = self._discards.get(content_id, 0) + 1
            doomed = [k for k in self._index if k.content_id == content_id]
            for key in doomed:
                self._used -= self._index.pop(key)
                self._touched.discard(key)
        await trio.to_thread.run_sync(self._remove_files, doomed, limiter=self._limiter)
        return len(doomed)

    def _remove_files(self, keys: list[ChunkKey]) -> None:
        self._unlink(keys)
        self._commit(keys, {}, set())

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
