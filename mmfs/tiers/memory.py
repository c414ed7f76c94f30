"""In-memory LRU of chunks, bounded by bytes, with an optional time to live.

The node uses it as tier 1 (no TTL: the kernel page cache sits above it anyway); the
backend uses it as its hot tier with a TTL, so a burst of cold-start traffic is served
from memory and the memory is handed back once the rollout is over.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from ..chunkmap import ChunkMap
from ..manifest import ChunkKey
from .base import Chunk, ChunkTier, TierStatistics


class MemoryTier(ChunkTier):
    name = "memory"

    def __init__(self, limit_bytes: int, ttl_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit_bytes
        self._ttl = ttl_seconds
        self._clock = clock
        # key -> (chunk, stored_at); order is recency, oldest first.
        self._entries: OrderedDict[ChunkKey, tuple[Chunk, float]] = OrderedDict()
        self._used = 0
        self._hits = self._misses = self._hit_bytes = self._evictions = 0

    async def get(self, key: ChunkKey) -> Chunk | None:
        return self.get_nowait(key)

    def get_nowait(self, key: ChunkKey) -> Chunk | None:
        """:meth:`get` without the coroutine: for callers on a hot path that must not yield."""
        entry = self._entries.get(key)
        if entry is not None and self._ttl is not None and self._clock() - entry[1] > self._ttl:
            self._remove(key)
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        self._hit_bytes += len(entry[0].data)
        return entry[0]

    def peek(self, key: ChunkKey) -> Chunk | None:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def verified_keys(self) -> set[ChunkKey]:
        return {key for key, (chunk, _) in self._entries.items() if chunk.verified}

    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        if len(chunk.data) > self._limit:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (chunk, self._clock())
        self._used += len(chunk.data)
        self._expire()
        while self._used > self._limit:  # never the chunk just stored (it fits on its own)
            self._remove(next(k for k in self._eviction_order(self._entries) if k != key))
            self._evictions += 1

    async def discard(self, content_id: str) -> int:
        doomed = [k for k in self._entries if k.content_id == content_id]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    async def settle(self, chunk_map: ChunkMap) -> list[int]:
        dropped = []
        for key, (chunk, stored_at) in list(self._entries.items()):
            if key.content_id != chunk_map.content_id or key.chunk_size != chunk_map.chunk_size or chunk.verified:
                continue
            if chunk_map.matches(key.index, chunk.digests):
                self._entries[key] = (Chunk(chunk.data, chunk.digests, True), stored_at)
            else:
                self._remove(key)
                dropped.append(key.index)
        return dropped

    def expire(self) -> int:
        """Drop chunks older than the TTL now; return how many. Owners with a TTL call it
        periodically so an idle process hands its memory back (lookups and stores expire too)."""
        before = len(self._entries)
        self._expire()
        return before - len(self._entries)

    def _expire(self) -> None:
        if self._ttl is None:
            return
        deadline = self._clock() - self._ttl
        # Insertion refreshes position, so stale entries cluster at the front only roughly;
        # scan from the oldest and stop at the first fresh one: cheap and good enough.
        while self._entries:
            key, (_, stored_at) = next(iter(self._entries.items()))
            if stored_at > deadline:
                break
            self._remove(key)
            self._evictions += 1

    def _remove(self, key: ChunkKey) -> None:
        chunk, _ = self._entries.pop(key)
        self._used -= len(chunk.data)

    def statistics(self) -> TierStatistics:
        return TierStatistics(self.name, self._hits, self._misses, self._hit_bytes, self._used,
                              self._limit, len(self._entries), self._evictions, 0)
