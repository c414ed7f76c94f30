"""The interface every cache tier implements, so the fetch engine sees the chain as a list.

A tier answers ``get`` with the verified bytes of a chunk or ``None`` (a miss is not an
error: a tier that finds a damaged entry drops it and reports a miss). ``put`` may refuse
to keep what does not fit, and raises :class:`~mmfs.errors.CacheError` only when the tier
itself is broken (disk full, I/O error); the engine logs that and carries on without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..manifest import ChunkKey


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

    @abstractmethod
    async def get(self, key: ChunkKey) -> bytes | None:
        """Return the chunk's bytes, verified, or ``None`` when the tier does not hold it."""

    async def get_range(self, key: ChunkKey, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the chunk, verified, or ``None``.

        Tiers that can read and verify part of a chunk (the disk tier, per 64 KiB block)
        override this so small random reads do not load whole chunks."""
        data = await self.get(key)
        return None if data is None else data[start:end]

    @abstractmethod
    async def put(self, key: ChunkKey, data: bytes) -> None:
        """Keep ``data`` (already verified by the caller), evicting older chunks to make room."""

    @abstractmethod
    async def discard(self, content_id: str) -> int:
        """Drop every chunk of ``content_id`` (used when a file fails verification); return how many."""

    def peek(self, key: ChunkKey) -> bytes | None:
        """The chunk if the tier can answer without I/O, not counted as a hit; else ``None``."""
        return None

    @abstractmethod
    def statistics(self) -> TierStatistics:
        """Counters and occupancy, cheap enough to call on every ``/metrics`` scrape."""

    async def aclose(self) -> None:
        """Flush and release resources; the default holds none."""
