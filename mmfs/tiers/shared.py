"""The cold tier backend replicas share on one RWX volume: immutable, content-addressed objects.

Layout under ``root``::

    objects/<ab>/<content_id>.<chunk_size>.<index>   one verified chunk (codec header + bytes)
    maps/<ab>/<content_id>.<chunk_size>              the file's chunk map (size, then digests)
    staging/<writer>/…                               one process's provisional chunks and
                                                      partial writes, never read by others

Why this shape, not the node's :class:`~mmfs.tiers.disk.DiskTier`:

- **Several writers, no shared index.** LMDB must not sit on a network filesystem, and a
  sparse file written in place by two replicas could be punched by one while the other
  writes it. Here a file's name is its content, every object is written whole under
  ``staging/<writer>/`` and then renamed into place (atomic on POSIX and NFS), and nothing
  is ever rewritten in place: two replicas publishing the same chunk publish the same bytes,
  the second rename replaces the first, and a reader holding the first keeps it.
- **Only verified chunks are published**, and a map before its chunks. A chunk that
  arrives before its file is verified waits in this writer's staging folder; when the map
  comes (:meth:`SharedTier.settle`, or :meth:`SharedTier.sweep` finding one another
  replica published) it is renamed into ``objects/`` or dropped.
- **Adopting what another replica wrote**: a read checks the object against the file's
  chunk map (block by block, blake3), so an object is trusted as far as the map is, never
  by its name alone. A damaged object is removed and reported as a miss.
- **Compression at rest** (``compression="zstd"``, :mod:`.codec`): shared capacity is this
  tier's cost; reads pay decompression, which is why the hot tier and the wire stay raw.

Bounded by ``limit_bytes`` per replica's view: each replica knows the objects it found at
start-up or later (:meth:`sweep` rescans) and evicts the least recently used of them; a read
refreshes an object's mtime (at most every :data:`TOUCH_EVERY` seconds) so that the other
replicas' rescans see it as used. Blocking work runs in worker threads behind a limiter.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path

import trio

from ..chunkmap import ChunkMap, block_digests, map_key
from ..errors import CacheError
from ..manifest import ChunkKey
from . import codec
from .base import Chunk, ChunkTier, TierStatistics

log = logging.getLogger(__name__)

_OBJECTS, _MAPS, _STAGING = "objects", "maps", "staging"
_MAP_HEADER = struct.Struct(">Q")  # file size
#: Seconds after which another writer's staging folder is taken for abandoned and removed.
STAGING_TTL = 3600.0
#: Seconds between rescans of ``objects/`` (what the other replicas published or evicted).
RESCAN_EVERY = 600.0
#: A read refreshes an object's mtime when it is older than this (seconds).
TOUCH_EVERY = 600.0
#: Chunk maps kept in memory (they are also files under ``maps/``).
_MAP_CACHE = 64


class SharedTier(ChunkTier):
    """Verified chunks as immutable objects under ``root``, safe for several writers."""

    name = "shared"

    def __init__(self, root: Path, limit_bytes: int, *, compression: codec.Compression = "zstd",
                 threads: int = 4) -> None:
        self._root = Path(root)
        self._limit = limit_bytes
        self._compression = compression
        self._limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._staging = self._root / _STAGING / self._writer
        self._staged: dict[ChunkKey, bytes] = {}  # provisional chunks staged here -> digests
        self._known: OrderedDict[ChunkKey, int] = OrderedDict()  # published objects -> stored size, LRU
        self._maps: OrderedDict[str, ChunkMap] = OrderedDict()
        self._used = 0
        self._scanned_at = 0.0
        self._hits = self._misses = self._hit_bytes = self._evictions = self._errors = 0
        self.stored_bytes = self.raw_bytes = 0  # what this process published: bytes on disk, bytes of chunks
        try:
            for folder in (_OBJECTS, _MAPS):
                (self._root / folder).mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(parents=True)
            self._remove_abandoned_staging()
            self._rescan()
        except OSError as exc:
            raise CacheError(f"shared cold tier {self._root} is unusable: {exc}") from exc

    @property
    def root(self) -> Path:
        return self._root

    # -- paths ----------------------------------------------------------------------------

    def _object_path(self, key: ChunkKey) -> Path:
        return self._root / _OBJECTS / _shard(key.content_id) / f"{key.content_id}.{key.chunk_size}.{key.index}"

    def _map_path(self, content_id: str, chunk_size: int) -> Path:
        return self._root / _MAPS / _shard(content_id) / f"{content_id}.{chunk_size}"

    def _staged_path(self, key: ChunkKey) -> Path:
        return self._staging / f"{key.content_id}.{key.chunk_size}.{key.index}"

    def _write_atomically(self, path: Path, parts: list[bytes]) -> None:
        """Write the whole file under this writer's staging folder, then rename it into
        place: readers see all of it or nothing, never a partial file."""
        partial = self._staging / f".{path.name}.{secrets.token_hex(4)}.part"
        with open(partial, "wb") as f:
            for part in parts:
                f.write(part)
        path.parent.mkdir(exist_ok=True)
        os.rename(partial, path)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: ChunkKey) -> Chunk | None:
        chunk = await trio.to_thread.run_sync(self._get, key, limiter=self._limiter)
        with self._lock:
            if chunk is None:
                self._misses += 1
            else:
                self._hits += 1
                self._hit_bytes += len(chunk.data)
        return chunk

    def _get(self, key: ChunkKey) -> Chunk | None:
        chunk_map = self._map(key.content_id, key.chunk_size)
        if chunk_map is None:  # published objects are only trusted through their file's map
            staged = self._staged.get(key)
            data = self._read(self._staged_path(key)) if staged is not None else None
            return Chunk(data, staged, False) if data is not None and block_digests(data) == staged else None
        if key.index >= chunk_map.chunk_count:
            return None
        path = self._object_path(key)
        data = self._read(path)
        if data is None:
            self._forget_known(key)
            return None
        digests = block_digests(data)
        if not chunk_map.matches(key.index, digests):
            with self._lock:
                self._errors += 1
            log.error("shared cold tier %s: %s does not match its chunk map; removed", self._root, path.name)
            path.unlink(missing_ok=True)
            self._forget_known(key)
            return None
        self._touch(key, path)
        return Chunk(data, digests, True)

    def _read(self, path: Path) -> bytes | bytearray | None:
        """An object's chunk bytes; ``None`` when it is missing or cannot be decoded."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            with self._lock:
                self._errors += 1
            log.error("shared cold tier: reading %s failed: %s", path, exc)
            return None
        try:
            return codec.decode(blob)
        except codec.CorruptObject as exc:
            with self._lock:
                self._errors += 1
            log.error("shared cold tier: %s is damaged (%s); removed", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _touch(self, key: ChunkKey, path: Path) -> None:
        """Count a read object as just used (adopting it if another replica published it)."""
        try:
            info = path.stat()
            if time.time() - info.st_mtime > TOUCH_EVERY:
                os.utime(path)
        except OSError:
            return  # evicted by another replica meanwhile: this read already has its bytes
        with self._lock:
            if key not in self._known:
                self._known[key] = info.st_size
                self._used += info.st_size
            self._known.move_to_end(key)

    # -- maps -----------------------------------------------------------------------------

    def find_map(self, content_id: str, chunk_size: int) -> ChunkMap | None:
        """The file's chunk map if a replica published it (blocking: a worker thread's call)."""
        return self._map(content_id, chunk_size)

    def _map(self, content_id: str, chunk_size: int) -> ChunkMap | None:
        key = map_key(content_id, chunk_size)
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                self._maps.move_to_end(key)
                return found
        try:
            raw = self._map_path(content_id, chunk_size).read_bytes()
            found = ChunkMap(content_id, _MAP_HEADER.unpack_from(raw)[0], chunk_size, raw[_MAP_HEADER.size:])
        except FileNotFoundError:
            return None
        except (OSError, struct.error, ValueError) as exc:
            log.error("shared cold tier: chunk map %s.%d is unusable: %s", content_id, chunk_size, exc)
            return None
        self._cache_map(found)
        return found

    def _cache_map(self, chunk_map: ChunkMap) -> None:
        with self._lock:
            self._maps[chunk_map.key] = chunk_map
            self._maps.move_to_end(chunk_map.key)
            while len(self._maps) > _MAP_CACHE:
                self._maps.popitem(last=False)

    def _publish_map(self, chunk_map: ChunkMap) -> None:
        path = self._map_path(chunk_map.content_id, chunk_map.chunk_size)
        if not path.exists():
            self._write_atomically(path, [_MAP_HEADER.pack(chunk_map.size), chunk_map.digests])
        self._cache_map(chunk_map)

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        try:
            await trio.to_thread.run_sync(self._put, key, chunk, limiter=self._limiter)
        except OSError as exc:
            with self._lock:
                self._errors += 1
            raise CacheError(f"shared cold tier {self._root} cannot store a chunk: {exc}") from exc

    def _put(self, key: ChunkKey, chunk: Chunk) -> None:
        chunk_map = self._map(key.content_id, key.chunk_size) if chunk.verified else None
        if chunk_map is not None and chunk_map.matches(key.index, chunk.digests):
            path = self._object_path(key)
            if not path.exists():
                blob = codec.encode(chunk.data, self._compression)
                self._write_atomically(path, [blob])
                self._added(key, len(blob), len(chunk.data))
            return
        # Provisional (or verified by a map not published here yet): staged until settled.
        if key in self._staged:
            return
        self._write_atomically(self._staged_path(key), [codec.encode(chunk.data, self._compression)])
        with self._lock:
            self._staged[key] = chunk.digests

    def _added(self, key: ChunkKey, stored: int, raw: int) -> None:
        with self._lock:
            if key not in self._known:
                self._known[key] = stored
                self._used += stored
            self.stored_bytes += stored
            self.raw_bytes += raw
        self._evict()

    def _evict(self) -> None:
        """Remove objects this replica knows while over the limit: retired contents' first,
        then the least recently used."""
        while True:
            with self._lock:
                if self._used <= self._limit or not self._known:
                    return
                key = next(self._eviction_order(self._known))
                self._used -= self._known.pop(key)
                self._evictions += 1
            self._object_path(key).unlink(missing_ok=True)

    def _forget_known(self, key: ChunkKey) -> None:
        with self._lock:
            size = self._known.pop(key, None)
            if size is not None:
                self._used -= size

    async def settle(self, chunk_map: ChunkMap) -> list[int]:
        """Publish the map, then this writer's staged chunks of it that match it; drop the rest."""
        return await trio.to_thread.run_sync(self._settle, chunk_map, limiter=self._limiter)

    def _settle(self, chunk_map: ChunkMap) -> list[int]:
        self._publish_map(chunk_map)
        with self._lock:
            staged = [(k, d) for k, d in self._staged.items()
                      if k.content_id == chunk_map.content_id and k.chunk_size == chunk_map.chunk_size]
        dropped = []
        for key, digests in staged:
            path = self._staged_path(key)
            try:
                if key.index < chunk_map.chunk_count and chunk_map.matches(key.index, digests):
                    target = self._object_path(key)
                    if target.exists():  # another replica published it first
                        path.unlink()
                    else:
                        target.parent.mkdir(exist_ok=True)
                        stored = path.stat().st_size
                        os.rename(path, target)
                        self._added(key, stored, _chunk_length(chunk_map, key.index))
                else:
                    path.unlink(missing_ok=True)
                    dropped.append(key.index)
            except OSError as exc:
                with self._lock:
                    self._errors += 1
                log.error("shared cold tier: cannot publish %s: %s", path.name, exc)
            with self._lock:
                self._staged.pop(key, None)
        return sorted(dropped)

    async def discard(self, content_id: str) -> int:
        return await trio.to_thread.run_sync(self._discard, content_id, limiter=self._limiter)

    def _discard(self, content_id: str) -> int:
        """The file failed its check: its staged chunks, objects and maps go, for every replica."""
        with self._lock:
            staged = [k for k in self._staged if k.content_id == content_id]
            for key in staged:
                del self._staged[key]
            for key in [k for k in self._maps if k.startswith(content_id + ":")]:
                del self._maps[key]
        removed = 0
        for key in staged:
            self._staged_path(key).unlink(missing_ok=True)
            removed += 1
        for folder in (_OBJECTS, _MAPS):
            for path in (self._root / folder / _shard(content_id)).glob(f"{content_id}.*"):
                path.unlink(missing_ok=True)
                removed += folder == _OBJECTS
        with self._lock:
            for key in [k for k in self._known if k.content_id == content_id]:
                self._used -= self._known.pop(key)
        return removed

    # -- housekeeping ---------------------------------------------------------------------

    async def sweep(self) -> None:
        """Settle staged chunks whose map another replica published, remove abandoned
        staging folders, rescan ``objects/`` when due. Run every few seconds."""
        await trio.to_thread.run_sync(self._sweep, limiter=self._limiter)

    def _sweep(self) -> None:
        with self._lock:
            waiting = {(k.content_id, k.chunk_size) for k in self._staged}
        for content_id, chunk_size in waiting:
            chunk_map = self._map(content_id, chunk_size)
            if chunk_map is not None:
                self._settle(chunk_map)
        if time.monotonic() - self._scanned_at > RESCAN_EVERY:
            self._remove_abandoned_staging()
            self._rescan()

    def _remove_abandoned_staging(self) -> None:
        for folder in (self._root / _STAGING).iterdir():
            if folder == self._staging:
                continue
            try:
                if time.time() - folder.stat().st_mtime > STAGING_TTL:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass  # removed by another replica's sweep

    def _rescan(self) -> None:
        """Learn the published objects (others' too), oldest mtime first, and evict."""
        found: list[tuple[float, ChunkKey, int]] = []
        for shard in (self._root / _OBJECTS).iterdir():
            for entry in os.scandir(shard):
                key = _parse_object_name(entry.name)
                if key is None:
                    continue
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((info.st_mtime, key, info.st_size))
        found.sort(key=lambda item: item[0])
        with self._lock:
            self._known = OrderedDict((key, size) for _, key, size in found)
            self._used = sum(self._known.values())
        self._scanned_at = time.monotonic()
        self._evict()

    # -- the rest of the interface --------------------------------------------------------

    def contains(self, key: ChunkKey) -> bool:
        return key in self._known or key in self._staged

    @property
    def compression_ratio(self) -> float:
        """Bytes on the volume per chunk byte, for what this process published (1.0: none yet)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def statistics(self) -> TierStatistics:
        return TierStatistics(self.name, self._hits, self._misses, self._hit_bytes, self._used, self._limit,
                              len(self._known), self._evictions, self._errors)

    async def aclose(self) -> None:
        """Staged chunks never settled are of no use to anyone: remove this writer's folder."""
        await trio.to_thread.run_sync(shutil.rmtree, self._staging, True)


def _chunk_length(chunk_map: ChunkMap, index: int) -> int:
    return min(chunk_map.chunk_size, chunk_map.size - index * chunk_map.chunk_size)


def _shard(content_id: str) -> str:
    return content_id.rsplit("-", 1)[-1][:2]


def _parse_object_name(name: str) -> ChunkKey | None:
    content_id, _, rest = name.partition(".")
    chunk_size, _, index = rest.partition(".")
    if not content_id or not chunk_size.isdigit() or not index.isdigit():
        return None
    return ChunkKey(content_id, int(chunk_size), int(index))


__all__ = ["SharedTier"]
