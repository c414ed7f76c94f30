"""Chunks on local disk: one sparse file per content and chunk size, indexed in LMDB.

Layout under ``root``::

    data/<ab>/<content_id>.<chunk_size>   chunk k at offset k × chunk_size (pwrite, sparse)
    index-v3.lmdb/  chunks:  key -> (recency, size, verified)
                    digests: key -> the chunk's block digests, exactly as the caller gave them
    quarantine-<time>/   the last index that could not be read, kept for a post-mortem

Why this shape (``docs/datapath.md``):

- **One file per content**, not per chunk: a put is one ``pwrite`` into an open file instead
  of create, write, rename, and a complete verified file is a backing file that FUSE
  passthrough or ``sendfile`` can use as it is (:meth:`DiskTier.complete_file`). Eviction
  punches a hole (``fallocate(PUNCH_HOLE)``) and removes the file with its last chunk.
- **Hash once**: the block digests stored are the ones computed when the bytes arrived
  (:class:`~mmfs.tiers.base.Chunk`); a put never hashes. Every read checks the blocks it
  reads against them, so a damaged chunk is a miss, never bad bytes, and a small read (a
  4 KiB page fault) reads and checks one 64 KiB block, not the whole chunk.
- **Settling needs no I/O**: a provisional chunk is checked against the file's chunk map by
  comparing stored digests, then marked verified in the index or punched.
- **Crash safety without fsync**: a chunk becomes visible only once its index entry is
  committed, after its bytes are written; a chunk is dropped from the index before its bytes
  are punched. So ``kill -9`` at any point leaves at most unindexed bytes, which start-up
  punches (``SEEK_DATA`` over each file against its indexed chunks), and index entries
  whose file is gone or short, which start-up drops. Bytes lost to a power failure fail
  their digest check on read; an index it damaged is quarantined (below).
- **No ``fadvise(DONTNEED)`` after a write**: measured here (4 MiB chunks), it leaves the
  just-written pages cached anyway (they are dirty) and does not make puts faster; dropping
  them takes an ``fdatasync`` first, which made puts disk-bound, 2 to 4 times slower. The
  page cache of the data files is clean and reclaimable; the kernel drops it under pressure.
- **A cache never takes the node down**: an index that cannot be read (corrupt, foreign)
  is moved to ``quarantine-<time>/`` with one log line and the cache starts empty; only
  when even that fails is :class:`~mmfs.errors.CacheError` raised (the daemon then runs
  memory-only). The file-per-chunk layout before this one (``chunks/``, ``index-v2.lmdb``)
  is removed at start-up: its chunks carry no verified flag, and a cache is a cache.

The index is mirrored in memory (recency, size, verified: tens of thousands of entries at
most; digests stay in LMDB) so lookups, LRU order and :meth:`~DiskTier.locate` cost no
transaction; recency is written back lazily, with the next write. Blocking work runs in
worker threads behind a :class:`trio.CapacityLimiter`, never on the trio loop.

Three locks: ``_db_lock`` around every LMDB transaction (so the map can be grown while no
transaction is open); ``_files_lock`` around creating, punching and removing data files, in
worker threads only (so a file is never removed just after a writer opened it); ``_lock``
around the in-memory mirror, for dictionary updates only (the trio loop takes it too).
``_lock`` may be taken inside either of the others, never the other way round, and those
two are never held together.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import lmdb
import trio

from ..chunkmap import BLOCK_SIZE, DIGEST_SIZE, ChunkMap, block_count, block_digests
from ..errors import CacheError
from ..manifest import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ChunkKey
from .base import Chunk, ChunkTier, TierStatistics

log = logging.getLogger(__name__)

#: The index's format is in its name; indexes of other formats are removed at start-up.
_INDEX_NAME = "index-v3.lmdb"
#: The layout before this one (a file per chunk): removed at start-up.
_OLD_CHUNKS = "chunks"
_DATA = "data"
_QUARANTINE = "quarantine-"
_RECORD = struct.Struct(">QQ?")  # recency sequence, size, verified
#: The LMDB map (address space, not disk use) to start with; it doubles whenever it is full.
#: A 4 MiB chunk costs about 2.2 KiB of index, so 64 MiB covers a 100 GiB cache.
DEFAULT_MAP_SIZE = 64 << 20
#: Content ids name files: an index entry whose id could climb out of ``data/`` is foreign.
_CONTENT_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{2,}")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of a file, keeping its size (reads there give zeros)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Unusable(Exception):
    """The index cannot be opened or read: it is quarantined and the cache starts empty."""


@dataclass(slots=True)
class _Entry:
    """The in-memory mirror of one indexed chunk (its digests stay in LMDB)."""

    size: int
    verified: bool
    seq: int  # recency: higher is more recent


#: (content id, chunk size): one data file.
_FileId = tuple[str, int]


class DiskTier(ChunkTier):
    """A bounded, crash-safe chunk store in ``root``, evicting retired contents' chunks
    (:meth:`~mmfs.tiers.base.ChunkTier.retire`), then the least recently used."""

    name = "disk"

    def __init__(self, root: Path, limit_bytes: int, *, threads: int = 4,
                 map_size: int = DEFAULT_MAP_SIZE) -> None:
        self._root = Path(root)
        self._data = self._root / _DATA
        self._limit = limit_bytes
        self._map_size = map_size
        self._limiter = trio.CapacityLimiter(threads)
        self._db_lock = threading.Lock()
        self._files_lock = threading.Lock()
        self._lock = threading.Lock()
        self._direct = hasattr(os, "O_DIRECT")  # until the filesystem refuses it
        self._dirs: set[Path] = set()  # shard folders known to exist
        # Visible chunks in LRU order, oldest first.
        self._index: OrderedDict[ChunkKey, _Entry] = OrderedDict()
        # Chunks with file work in flight (being written, or dropped but not yet punched):
        # not visible, and not written again until that work is done.
        self._busy: set[ChunkKey] = set()
        # The chunk indices that keep each data file: indexed or busy. A file goes with the last.
        self._files: dict[_FileId, set[int]] = {}
        self._touched: set[ChunkKey] = set()  # recency not yet written to the index
        self._discards: dict[str, int] = {}  # content id -> times discarded (see _store)
        #: Files in use as passthrough backing files -> how many users: never evicted.
        self._pins: dict[_FileId, int] = {}
        self._pin_skips = 0  # puts refused because only pinned chunks were left to evict
        self._seq = 0
        self._used = 0
        self._hits = self._misses = self._hit_bytes = self._evictions = self._errors = 0
        self._closed = False
        self._open()

    # -- start-up -------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    def _open(self) -> None:
        """Open the index and reconcile it with the data files; quarantine what is unusable."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create chunk cache {self._root}: {exc}") from exc
        self._remove_other_formats()
        try:
            self._load()
            return
        except _Unusable as exc:
            reason = exc
        try:
            place = self._quarantine()
            self._load()
        except (OSError, _Unusable) as exc:
            raise CacheError(f"chunk cache {self._root} is unusable ({reason}) and could not be "
                             f"reset: {exc}") from exc
        log.warning("chunk cache %s: index unusable (%s); moved to %s, starting empty", self._root, reason, place)

    def _remove_other_formats(self) -> None:
        """Remove indexes of other formats and the file-per-chunk layout's files: nothing
        here could vouch for them (no verified flag), so they are not worth migrating."""
        old = [p for p in self._root.glob("index-v*.lmdb") if p.name != _INDEX_NAME]
        if (self._root / _OLD_CHUNKS).is_dir():
            old.append(self._root / _OLD_CHUNKS)
        if old:
            try:
                for path in old:
                    _remove(path)
            except OSError as exc:  # in the way of nothing: the new layout has other names
                log.error("chunk cache %s: cannot remove a cache of an older format: %s", self._root, exc)
                return
            log.info("chunk cache %s: removed a cache of an older format (%s)", self._root,
                     ", ".join(sorted(p.name for p in old)))

    def _quarantine(self) -> Path:
        """Move the index aside (replacing an older quarantine: the cache's disk use stays
        bounded); its data files, indexed nowhere then, go at the next :meth:`_load`."""
        for older in self._root.glob(_QUARANTINE + "*"):
            _remove(older)
        place = self._root / (_QUARANTINE + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        place.mkdir()
        index = self._root / _INDEX_NAME
        if index.exists() or index.is_symlink():
            index.rename(place / _INDEX_NAME)
        return place

    def _load(self) -> None:
        """Open the index and reconcile it with ``data/``; :class:`_Unusable` when it cannot be."""
        self._index.clear()
        self._files.clear()
        self._used = self._seq = 0
        try:
            self._env = lmdb.open(str(self._root / _INDEX_NAME), map_size=self._map_size, max_dbs=2,
                                  sync=False, metasync=False, readahead=False)
        except (lmdb.Error, OSError) as exc:
            raise _Unusable(f"{type(exc).__name__}: {exc}") from exc
        try:
            self._chunks_db = self._env.open_db(b"chunks")
            self._digests_db = self._env.open_db(b"digests")
            self._reconcile()
        except BaseException as exc:
            self._env.close()
            if isinstance(exc, (lmdb.Error, OSError, CacheError)):
                raise _Unusable(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _reconcile(self) -> None:
        """Drop index entries without data, load the rest into the mirror, and remove or
        punch what nothing indexed under ``data/``."""
        records = self._read_records()
        stale = self._check_files(records)
        if stale:
            self._update_index(removed=stale)
        for key, entry in sorted(records.items(), key=lambda item: item[1].seq):
            if key not in stale:
                self._index[key] = entry
                self._files.setdefault((key.content_id, key.chunk_size), set()).add(key.index)
                self._used += entry.size
                self._seq = max(self._seq, entry.seq)
        removed = self._clean_data()
        if stale or removed:
            log.info("chunk cache %s: dropped %d index entries without data and %d files or "
                     "directories nothing indexed", self._root, len(stale), removed)

    def _read_records(self) -> dict[ChunkKey, _Entry]:
        """Every index entry; raises :class:`_Unusable` at the first that is not one of ours."""
        records = {}
        with self._env.begin() as txn:
            for raw_key, raw in txn.cursor(db=self._chunks_db):
                try:
                    key = ChunkKey.decode(raw_key)
                    seq, size, verified = _RECORD.unpack(raw)
                except (ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
                    raise _Unusable(f"undecodable index entry {bytes(raw_key)[:80]!r}") from exc
                if not _valid(key, size, txn.get(raw_key, db=self._digests_db)):
                    raise _Unusable(f"invalid index entry {bytes(raw_key)[:80]!r}")
                records[key] = _Entry(size, verified, seq)
        return records

    def _check_files(self, records: dict[ChunkKey, _Entry]) -> set[ChunkKey]:
        """The entries whose data file is missing, not a regular file, or too short."""
        sizes: dict[_FileId, int] = {}
        stale = set()
        for key, entry in records.items():
            file_id = (key.content_id, key.chunk_size)
            if file_id not in sizes:
                try:
                    info = os.lstat(self._path(*file_id))
                    sizes[file_id] = info.st_size if stat.S_ISREG(info.st_mode) else -1
                except OSError:  # missing, or data/ is not a directory
                    sizes[file_id] = -1
            if sizes[file_id] < key.index * key.chunk_size + entry.size:
                stale.add(key)
        return stale

    def _clean_data(self) -> int:
        """Remove what nothing indexed under ``data/`` and punch the unindexed bytes of the
        files that stay (written, then the process died before indexing them). Returns how
        many files or directories were removed."""
        if not self._data.is_dir() or self._data.is_symlink():
            _remove(self._data)
            self._data.mkdir()
        kept = {self._path(*file_id): file_id for file_id in self._files}
        removed = 0
        for shard in self._data.iterdir():
            if not shard.is_dir() or shard.is_symlink():
                _remove(shard)
                removed += 1
                continue
            for path in shard.iterdir():
                file_id = kept.get(path)
                if file_id is None:
                    _remove(path)
                    removed += 1
                else:
                    self._punch_unindexed(path, file_id)
            if not any(shard.iterdir()):
                shard.rmdir()  # safe here only: at run time a writer may be about to use it
        return removed

    def _punch_unindexed(self, path: Path, file_id: _FileId) -> None:
        """Punch the data extents (``SEEK_DATA``/``SEEK_HOLE``) between indexed chunks."""
        chunk_size = file_id[1]
        spans = sorted((index * chunk_size, index * chunk_size + self._index[ChunkKey(*file_id, index)].size)
                       for index in self._files[file_id])
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            gap_start = 0
            for start, end in [*spans, (os.fstat(fd).st_size, 0)]:
                position = gap_start
                while position < start:  # the data extents of the gap [gap_start, start)
                    try:
                        data = os.lseek(fd, position, os.SEEK_DATA)
                    except OSError as exc:
                        if exc.errno != errno.ENXIO:  # ENXIO: no data past position
                            raise
                        return
                    if data >= start:
                        break
                    position = min(start, os.lseek(fd, data, os.SEEK_HOLE))
                    _punch(fd, data, position - data)
                gap_start = end
        finally:
            os.close(fd)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: ChunkKey) -> Chunk | None:
        entry = self._index.get(key)
        read = None if entry is None else await self._read(key, entry, 0, entry.size)
        if read is None:
            self._misses += 1
            return None
        data, digests = read
        self._hit(key, entry, len(data))
        return Chunk(data, digests, entry.verified)

    async def get_range(self, key: ChunkKey, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of a verified chunk, reading and checking only the blocks
        that cover them. A provisional chunk is neither a hit nor a miss here: the engine
        asks :meth:`get` next, which counts."""
        entry = self._index.get(key)
        if entry is not None and not entry.verified:
            return None
        read = None
        if entry is not None and 0 <= start < end <= entry.size:
            read = await self._read(key, entry, start, end)
        if read is None:
            self._misses += 1
            return None
        data, _ = read
        offset = start % BLOCK_SIZE
        data = data if offset == 0 and len(data) == end - start else data[offset:offset + end - start]
        self._hit(key, entry, len(data))
        return data

    def _hit(self, key: ChunkKey, entry: _Entry, size: int) -> None:
        self._hits += 1
        self._hit_bytes += size
        with self._lock:
            if self._index.get(key) is entry:
                self._index.move_to_end(key)
                entry.seq = self._next_seq()
                self._touched.add(key)

    async def _read(self, key: ChunkKey, entry: _Entry, start: int, end: int) -> tuple[bytes, bytes] | None:
        return await trio.to_thread.run_sync(self._read_blocks, key, entry, start, end, limiter=self._limiter)

    def _read_blocks(self, key: ChunkKey, entry: _Entry, start: int, end: int) -> tuple[bytes, bytes] | None:
        """The blocks covering ``[start, end)``, checked, and all the chunk's digests; ``None``
        when the chunk went meanwhile or fails its check (then it is dropped)."""
        first = start // BLOCK_SIZE
        low, high = first * BLOCK_SIZE, min(entry.size, block_count(end) * BLOCK_SIZE)
        digests = self._stored_digests([key]).get(key)
        if digests is None:
            return None  # dropped since the lookup
        try:
            fd = os.open(self._path(key.content_id, key.chunk_size), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, high - low, key.index * key.chunk_size + low)
            finally:
                os.close(fd)
        except FileNotFoundError:
            data = b""  # lost, or dropped since the lookup: _drop_damaged tells which
        except OSError as exc:
            with self._lock:
                self._errors += 1
            log.error("chunk cache: reading %s failed: %s", self._path(key.content_id, key.chunk_size), exc)
            return None
        expected = digests[first * DIGEST_SIZE:(first + block_count(high - low)) * DIGEST_SIZE]
        if len(data) != high - low or block_digests(data) != expected:
            self._drop_damaged(key, entry)
            return None
        return data, digests

    def _drop_damaged(self, key: ChunkKey, entry: _Entry) -> None:
        with self._lock:
            if self._index.get(key) is not entry:
                return  # evicted or discarded while we read: not damage
            doomed = [self._take(key)]
            self._errors += 1
        log.error("chunk cache %s: chunk %d of %s (chunk size %d) failed its blake3 check; dropped",
                  self._root, key.index, key.content_id, key.chunk_size)
        try:
            self._forget(doomed)
        except CacheError as exc:
            log.error("%s", exc)

    def _stored_digests(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, bytes]:
        with self._db_lock:
            if self._closed:
                return {}
            with self._env.begin(db=self._digests_db) as txn:
                found = {key: txn.get(key.encode()) for key in keys}
        return {key: digests for key, digests in found.items() if digests is not None}

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Keep ``chunk`` with the digests it carries (never re-hashed). A chunk already held,
        or with file work in flight, is left as it is: :meth:`settle` is what verifies."""
        size = len(chunk.data)
        if not _valid(key, size, chunk.digests):
            raise ValueError(f"chunk {key.index} of {key.content_id!r}: {size} bytes with "
                             f"{len(chunk.digests)} bytes of digests for chunk size {key.chunk_size}")
        if size > self._limit or key in self._index or key in self._busy:
            return
        discards = self._discards.get(key.content_id, 0)
        await trio.to_thread.run_sync(self._store, key, chunk, discards, limiter=self._limiter)

    def _store(self, key: ChunkKey, chunk: Chunk, discards: int) -> None:
        """Make room, write the bytes, then index them: visible only once committed, counted
        against the limit from the start. A write that a :meth:`discard` of its content
        overtook (``discards`` changed) is thrown away."""
        size = len(chunk.data)
        with self._lock:
            if key in self._index or key in self._busy or self._discards.get(key.content_id, 0) != discards:
                return
            victims = self._make_room(size)
            if victims is None:
                self._pin_skips += 1
                return
            self._busy.add(key)
            self._files.setdefault((key.content_id, key.chunk_size), set()).add(key.index)
            self._evictions += len(victims)
            self._used += size
        try:
            if victims:
                self._forget(victims)
            self._write(key, chunk.data)
            with self._lock:
                entry = _Entry(size, chunk.verified, self._next_seq())
            self._update_index(added=[(key, entry, chunk.digests)])
        except BaseException:
            with self._lock:
                self._used -= size
            self._release([(key, size)])
            raise
        with self._lock:
            overtaken = self._discards.get(key.content_id, 0) != discards
            if overtaken:
                self._used -= size
            else:
                self._index[key] = entry
                self._busy.discard(key)
        if overtaken:
            self._forget([(key, size)])

    def _make_room(self, size: int) -> list[tuple[ChunkKey, int]] | None:
        """Take chunks until ``size`` more bytes fit (``_lock`` held): retired contents'
        first, then the least recently used; chunks of files in use by passthrough readers
        are skipped: pinned here, or held by a reader of an earlier daemon
        (:func:`hold_for_reader`). ``None``, taking nothing, when even every other chunk
        would not make room."""
        if self._used + size <= self._limit:
            return []
        in_use: dict[_FileId, bool] = {}
        chosen, freed = [], 0
        for key in self._eviction_order(self._index):
            if self._used - freed + size <= self._limit:
                break
            entry = self._index[key]
            file_id = (key.content_id, key.chunk_size)
            if file_id not in in_use:
                in_use[file_id] = file_id in self._pins or _held_by_reader(self._path(*file_id))
            if not in_use[file_id]:
                chosen.append(key)
                freed += entry.size
        if self._used - freed + size > self._limit:
            return None
        return [self._take(key) for key in chosen]

    def _write(self, key: ChunkKey, data: bytes | bytearray | memoryview) -> None:
        """Write a chunk at its offset: its whole pages with ``O_DIRECT`` where the buffer is
        page-aligned (the wire client's are) and the filesystem allows it, the rest buffered.

        Why: a buffered write copies into the page cache, 0.5 to 1.2 CPU-s per GB on these
        machines, and leaves a second cached copy of bytes the FUSE file's pages already
        hold; ``O_DIRECT`` costs about 0.1 (measured). Readers of the disk tier get the
        bytes from the disk or from whatever caches them there."""
        path = self._path(key.content_id, key.chunk_size)
        view, offset = memoryview(data).cast("B"), key.index * key.chunk_size
        direct = len(view) // _PAGE * _PAGE if self._direct and not offset % _PAGE and _aligned(view) else 0
        try:
            with self._files_lock:  # not while the last chunk's release removes the file
                if path.parent not in self._dirs:
                    path.parent.mkdir(exist_ok=True)
                    self._dirs.add(path.parent)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if direct and not self._write_direct(path, view[:direct], offset):
                    direct = 0
                _pwrite_all(fd, view[direct:], offset + direct)
            finally:
                os.close(fd)
        except OSError as exc:
            with self._lock:
                self._errors += 1
            raise CacheError(f"cannot write chunk to {path}: {os.strerror(exc.errno or errno.EIO)}") from exc

    def _write_direct(self, path: Path, view: memoryview, offset: int) -> bool:
        """``O_DIRECT`` write; False (and buffered writes from then on) where the
        filesystem refuses it (tmpfs, some overlays)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
            try:
                _pwrite_all(fd, view, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False
            log.info("chunk cache %s: the filesystem refuses O_DIRECT; writing through the page cache", self._root)
            return False
        return True

    async def discard(self, content_id: str) -> int:
        # Invisible at once, and writes in flight are told (_store); the index entries and
        # the bytes go in a worker thread, shielded: a discarded chunk must not come back
        # at the next start because the caller was cancelled.
        with self._lock:
            self._discards[content_id] = self._discards.get(content_id, 0) + 1
            doomed = [self._take(ChunkKey(cid, chunk_size, index))
                      for (cid, chunk_size), indices in self._files.items() if cid == content_id
                      for index in indices if ChunkKey(cid, chunk_size, index) in self._index]
        if doomed:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._forget, doomed, limiter=self._limiter)
        return len(doomed)

    async def settle(self, chunk_map: ChunkMap) -> list[int]:
        file_id = (chunk_map.content_id, chunk_map.chunk_size)
        with self._lock:
            candidates = [(key, entry) for index in self._files.get(file_id, ())
                          if (entry := self._index.get(key := ChunkKey(*file_id, index))) is not None
                          and not entry.verified]
        if not candidates:
            return []
        return await trio.to_thread.run_sync(self._settle, chunk_map, candidates, limiter=self._limiter)

    def _settle(self, chunk_map: ChunkMap, candidates: list[tuple[ChunkKey, _Entry]]) -> list[int]:
        stored = self._stored_digests(key for key, _ in candidates)
        matching, wrong = [], []
        for key, entry in candidates:
            if key in stored:  # else dropped meanwhile
                good = key.index < chunk_map.chunk_count and chunk_map.matches(key.index, stored[key])
                (matching if good else wrong).append((key, entry))
        with self._lock:
            doomed = [self._take(key) for key, entry in wrong if self._index.get(key) is entry]
        try:
            self._update_index(verified=matching)
        finally:
            self._forget(doomed)
        return sorted(key.index for key, _ in doomed)

    # -- dropping chunks ------------------------------------------------------------------

    def _take(self, key: ChunkKey) -> tuple[ChunkKey, int]:
        """Make an indexed chunk invisible and busy (``_lock`` held); :meth:`_forget` it next."""
        entry = self._index.pop(key)
        self._used -= entry.size
        self._touched.discard(key)
        self._busy.add(key)
        return key, entry.size

    def _forget(self, doomed: list[tuple[ChunkKey, int]]) -> None:
        """Drop taken chunks from the index, then free their bytes: in that order, so a crash
        in between leaves only unindexed bytes, which start-up punches."""
        if not doomed:
            return
        try:
            self._update_index(removed=[key for key, _ in doomed])
        finally:
            self._release(doomed)

    def _release(self, doomed: list[tuple[ChunkKey, int]]) -> None:
        """Free the bytes of chunks no longer indexed: punch them, or remove their file with
        its last chunk; then they may be written again."""
        by_file: dict[_FileId, list[tuple[int, int]]] = {}
        for key, size in doomed:
            by_file.setdefault((key.content_id, key.chunk_size), []).append((key.index, size))
        with self._files_lock:
            for file_id, chunks in by_file.items():
                with self._lock:
                    holders = self._files[file_id]
                    holders.difference_update(index for index, _ in chunks)
                    if last := not holders:
                        del self._files[file_id]
                path = self._path(*file_id)
                try:
                    if last:
                        path.unlink(missing_ok=True)
                    else:
                        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                        try:
                            for index, size in chunks:
                                _punch(fd, index * file_id[1], size)
                        finally:
                            os.close(fd)
                except OSError as exc:
                    with self._lock:
                        self._errors += 1
                    log.error("chunk cache: cannot free chunks of %s: %s", path, exc)
        with self._lock:
            self._busy.difference_update(key for key, _ in doomed)

    # -- the index ------------------------------------------------------------------------

    def _update_index(self, *, removed: Iterable[ChunkKey] = (),
                      added: Iterable[tuple[ChunkKey, _Entry, bytes]] = (),
                      verified: Iterable[tuple[ChunkKey, _Entry]] = ()) -> None:
        """One transaction: removals, additions, chunks now verified, and the recency of the
        chunks read since the last one. Grows the LMDB map when it is full."""
        with self._db_lock:
            if self._closed:
                raise CacheError(f"chunk cache {self._root} is closed")
            # The records of touched chunks are read here, under _db_lock: a chunk dropped
            # meanwhile is then either gone from the mirror or deleted by a later transaction.
            with self._lock:
                for key, entry in verified:
                    if self._index.get(key) is entry:
                        entry.verified = True
                        self._touched.add(key)
                touched, self._touched = self._touched, set()
                records = [(key, entry) for key in touched if (entry := self._index.get(key)) is not None]
            records += [(key, entry) for key, entry, _ in added]
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for key in removed:
                            txn.delete(key.encode(), db=self._chunks_db)
                            txn.delete(key.encode(), db=self._digests_db)
                        for key, _, digests in added:
                            txn.put(key.encode(), digests, db=self._digests_db)
                        for key, entry in records:
                            txn.put(key.encode(), _RECORD.pack(entry.seq, entry.size, entry.verified),
                                    db=self._chunks_db)
                    return
                except lmdb.MapFullError:
                    pass
                except lmdb.Error as exc:
                    with self._lock:
                        self._errors += 1
                    raise CacheError(f"chunk index update failed in {self._root}: {exc}") from exc
                self._grow_map()

    def _grow_map(self) -> None:
        """Double the LMDB map (``_db_lock`` held, so no transaction of ours is open)."""
        size = self._env.info()["map_size"] * 2
        try:
            self._env.set_mapsize(size)
        except lmdb.Error as exc:
            with self._lock:
                self._errors += 1
            raise CacheError(f"chunk index in {self._root} is full and cannot grow to {size} bytes: {exc}") from exc
        log.info("chunk cache %s: index map grown to %d MiB", self._root, size >> 20)

    # -- for passthrough and sendfile -----------------------------------------------------

    def locate(self, key: ChunkKey) -> tuple[Path, int, int] | None:
        """Where a verified chunk's bytes are (file, offset, length), without I/O: valid
        until the chunk is evicted or discarded, so readers still check what they read."""
        entry = self._index.get(key)
        if entry is None or not entry.verified:
            return None
        return self._path(key.content_id, key.chunk_size), key.index * key.chunk_size, entry.size

    def complete_file(self, content_id: str, chunk_size: int, chunk_count: int) -> Path | None:
        """The data file of a content when every one of its chunks is here and verified: the
        file's bytes are then the content's, a backing file for passthrough."""
        complete = chunk_count > 0 and all(
            (entry := self._index.get(ChunkKey(content_id, chunk_size, index))) is not None and entry.verified
            for index in range(chunk_count))
        return self._path(content_id, chunk_size) if complete else None

    def pin_complete(self, content_id: str, chunk_size: int, chunk_count: int) -> Path | None:
        """:meth:`complete_file`, and if complete, pin it: its chunks are not evicted until
        as many :meth:`unpin` calls. A :meth:`discard` still drops a pinned file (it failed
        its check): it disappears from the index and from ``data/`` (unlinked, never punched,
        so a reader holding it open keeps the bytes it had; see docs/node.md)."""
        with self._lock:
            path = self.complete_file(content_id, chunk_size, chunk_count)
            if path is not None:
                file_id = (content_id, chunk_size)
                self._pins[file_id] = self._pins.get(file_id, 0) + 1
                self._touch_file(file_id)
            return path

    def unpin(self, content_id: str, chunk_size: int) -> None:
        """Release one pin; the file's chunks count as just used (passthrough reads never
        reached the tier, so its recency would otherwise be that of the last lazy read)."""
        file_id = (content_id, chunk_size)
        with self._lock:
            count = self._pins.get(file_id, 0) - 1
            if count > 0:
                self._pins[file_id] = count
                return
            self._pins.pop(file_id, None)
            self._touch_file(file_id)

    def pinned(self) -> dict[str, int]:
        """Pinned files (``<content id>.<chunk size>`` -> users), for status."""
        with self._lock:
            return {f"{cid}.{size}": n for (cid, size), n in self._pins.items()}

    @property
    def pin_skips(self) -> int:
        """Chunks not stored because every chunk that could have been evicted was pinned."""
        return self._pin_skips

    def _touch_file(self, file_id: _FileId) -> None:
        for index in self._files.get(file_id, ()):  # _lock held
            key = ChunkKey(*file_id, index)
            entry = self._index.get(key)
            if entry is not None:
                self._index.move_to_end(key)
                entry.seq = self._next_seq()
                self._touched.add(key)

    # -- the rest of the interface --------------------------------------------------------

    def contains(self, key: ChunkKey) -> bool:
        return key in self._index

    def verified_keys(self) -> set[ChunkKey]:
        with self._lock:  # worker threads change the index
            return {key for key, entry in self._index.items() if entry.verified}

    def statistics(self) -> TierStatistics:
        return TierStatistics(self.name, self._hits, self._misses, self._hit_bytes, self._used,
                              self._limit, len(self._index), self._evictions, self._errors)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        try:
            self._update_index()  # the recency of recent reads
        finally:
            with self._db_lock:
                self._closed = True
                self._env.sync(True)
                self._env.close()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _path(self, content_id: str, chunk_size: int) -> Path:
        return self._data / content_id.rsplit("-", 1)[-1][:2] / f"{content_id}.{chunk_size}"


def _valid(key: ChunkKey, size: int, digests: bytes | None) -> bool:
    """Whether a chunk can be kept: its content id names a file under ``data/`` and nothing
    else, its bytes fit its slot, and it has one digest per block."""
    return (_CONTENT_ID.fullmatch(key.content_id) is not None and key.index >= 0
            and MIN_CHUNK_SIZE <= key.chunk_size <= MAX_CHUNK_SIZE and 0 < size <= key.chunk_size
            and digests is not None and len(digests) == DIGEST_SIZE * block_count(size))


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree that has no place in the cache."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_PAGE = 4096


def _aligned(view: memoryview) -> bool:
    """Whether ``view`` starts on a page boundary (``O_DIRECT`` needs it); read-only
    buffers (``bytes``) are not checked and count as unaligned."""
    if view.readonly:
        return False
    return not ctypes.addressof(ctypes.c_char.from_buffer(view)) % _PAGE


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


_LOCK = struct.Struct("hh4xqqi4x")  # struct flock on Linux x86_64 and aarch64


def hold_for_reader(fd: int) -> None:
    """Mark the open file ``fd`` as read by someone the cache cannot see (a passthrough
    backing file: the kernel keeps this open file while readers use it, also across a
    daemon restart). An open-file-description read lock lasts exactly as long."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _LOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))


def _held_by_reader(path: Path) -> bool:
    """Whether some open file of ``path`` carries a :func:`hold_for_reader` lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _LOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    finally:
        os.close(fd)
    return _LOCK.unpack(answer)[0] != fcntl.F_UNLCK
