"""The interface every cache tier implements, so the fetch engine sees the chain as a list.

A tier holds :class:`Chunk` records: a chunk's bytes with the block digests computed once
when they arrived, and whether they matched the file's chunk map (verified) or arrived
before a map existed (provisional; see :mod:`mmfs.chunkmap`). ``get`` answers a chunk or
``None`` (a miss is not an error: a tier that finds a damaged entry drops it and reports a
miss). ``put`` may refuse to keep what does not fit, and raises
:class:`~mmfs.errors.CacheError` only when the tier itself is broken (disk full, I/O
error); the engine logs that and carries on without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator

from ..chunkmap import ChunkMap, fingerprint
from ..manifest import ChunkKey


@dataclass(frozen=True, slots=True)
class Chunk:
    """One copy of a chunk's bytes, as held by a tier."""

    #: The bytes (a ``bytearray`` when received straight into a buffer: never written to).
    data: bytes | bytearray
    #: blake3 of each 64 KiB block of ``data``, computed once when the bytes arrived.
    digests: bytes
    #: True once the digests matched the file's chunk map; False: provisional.
    verified: bool

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.digests)


@dataclass(frozen=True, slots=True)
class TierStatistics:
    """A snapshot of one tier's counters (monotonic since start) and occupancy."""

    name: str
    hits: int
    misses: int
    hit_bytes: int
    used_bytes: int
    limit_bytes: int
    entries: int
    evictions: int
    errors: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ChunkTier(ABC):
    """A bounded store of chunks keyed by :class:`~mmfs.manifest.ChunkKey`."""

    name: str
    #: Contents only retired commits use (:meth:`retire`): evicted first under pressure.
    retired: frozenset[str] = frozenset()

    def retire(self, content_ids: Iterable[str]) -> None:
        """Mark the contents only retired commits use (:mod:`mmfs.retention`, which never
        marks content a live commit shares), replacing the previous marks: when room is
        needed, their chunks go before any other, whatever their recency, so a cache under
        pressure between two gc sweeps drops yesterday's model before today's."""
        self.retired = frozenset(content_ids)

    def _eviction_order(self, keys: Collection[ChunkKey]) -> Iterator[ChunkKey]:
        """``keys`` (least recently used first) in the order to evict them: the chunks of
        retired contents first, then the rest, each in their given order."""
        retired = self.retired
        if not retired:  # the common case costs nothing more than plain LRU
            yield from keys
            return
        yield from (key for key in keys if key.content_id in retired)
        yield from (key for key in keys if key.content_id not in retired)

    @abstractmethod
    async def get(self, key: ChunkKey) -> Chunk | None:
        """Return the chunk (its bytes checked against its digests where they could have
        changed, as on disk), or ``None`` when the tier does not hold it."""

    async def get_range(self, key: ChunkKey, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of a *verified* chunk, checked, or ``None``.

        Tiers that can read and check part of a chunk (the disk tier, per block) override
        this so small random reads do not load whole chunks. Provisional chunks are not
        answered here: the engine serves them through :meth:`get` and remembers them."""
        chunk = await self.get(key)
        return None if chunk is None or not chunk.verified else bytes(memoryview(chunk.data)[start:end])

    @abstractmethod
    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Keep ``chunk``, evicting older chunks to make room."""

    @abstractmethod
    async def discard(self, content_id: str) -> int:
        """Drop every chunk of ``content_id`` (every chunk size): the file failed its check."""

    @abstractmethod
    async def settle(self, chunk_map: ChunkMap) -> list[int]:
        """Check every provisional chunk held of the map's content and chunk size against it:
        mark the matching ones verified, drop the others; return the dropped indices."""

    def find_map(self, content_id: str, chunk_size: int) -> ChunkMap | None:
        """A chunk map another process published in this tier (a tier shared by backend
        replicas), so this one need not verify the file again; blocking (call it from a
        worker thread). Tiers private to one process hold none."""
        return None

    def peek(self, key: ChunkKey) -> Chunk | None:
        """The chunk if the tier can answer without I/O, not counted as a hit; else ``None``."""
        return None

    def contains(self, key: ChunkKey) -> bool:
        """Whether the tier holds the chunk now (no I/O, not counted)."""
        return self.peek(key) is not None

    def verified_keys(self) -> set[ChunkKey]:
        """The verified chunks held now (no I/O): what a node offers its peers."""
        return set()

    @abstractmethod
    def statistics(self) -> TierStatistics:
        """Counters and occupancy, cheap enough to call on every ``/metrics`` scrape."""

    async def aclose(self) -> None:
        """Flush and release resources; the default holds none."""
