"""Read-ahead per open file: detect sequential readers, keep a growing window in flight.

The kernel already reads ahead within the page cache (``read_ahead_kb``, raised on the
mount); this module looks further, at chunk granularity, so the next chunks are on their
way from the remote (or the disk tier into memory) before the kernel asks for them::

    read chunk 0 ──▶ window 2: fetch 1, 2
    read chunk 1 ──▶ window 4: fetch 3..5
    read chunk 2 ──▶ window 8: fetch 6..10          (doubling while sequential)
    jump to 90   ──▶ window 0: nothing             (a random reader costs no extra bytes)
    read chunk 91 ─▶ window 2 again

A read counts as sequential when it starts exactly where the previous one ended, or —
once streaming — anywhere from one window behind to the end of what was already
requested: the kernel keeps several read-ahead requests in flight and pyfuse3 serves
them concurrently, so they may arrive out of order. The prefetcher only decides *which* chunks; the engine fetches
them in the background (single-flight, so concurrent readers share each fetch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReadAheadConfig:
    #: Chunks requested ahead once a reader proves sequential (its first contiguous read).
    initial_chunks: int = 2
    #: Largest window, in chunks (32 x 4 MiB = 128 MiB in flight per sequential reader).
    max_chunks: int = 32
    #: Factor the window grows by each time a sequential reader enters a new chunk.
    growth: int = 2
    #: Treat a handle's first read at offset 0 as the start of a sequential scan.
    start_at_zero: bool = True

    def __post_init__(self) -> None:
        if self.initial_chunks < 0 or self.max_chunks < self.initial_chunks or self.growth < 1:
            raise ValueError("need 0 <= initial_chunks <= max_chunks and growth >= 1")


@dataclass(frozen=True, slots=True)
class ReadAheadStatistics:
    #: Chunk indices handed to the engine for background fetching.
    chunks_requested: int
    #: Times a reader's window collapsed because it jumped.
    resets: int


class ReadAhead:
    """The read-ahead state of one open file handle (not shared between handles)."""

    __slots__ = ("config", "chunk_size", "chunk_count", "window", "_next_offset", "_last_chunk",
                 "_issued_until", "requested", "resets")

    def __init__(self, chunk_size: int, chunk_count: int, config: ReadAheadConfig = ReadAheadConfig()) -> None:
        self.config = config
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count
        #: Current window in chunks; 0 while the reader looks random.
        self.window = 0
        self._next_offset: int | None = None
        self._last_chunk = -1
        self._issued_until = 0  # chunks below this were already requested
        self.requested = 0
        self.resets = 0

    def on_read(self, offset: int, size: int) -> range:
        """Record a read of ``[offset, offset+size)``; return chunk indices to fetch ahead."""
        if size <= 0 or self.chunk_count == 0:
            return range(0)
        first = offset // self.chunk_size
        last = min((offset + size - 1) // self.chunk_size, self.chunk_count - 1)
        if self._next_offset is None:
            sequential = offset == 0 and self.config.start_at_zero
        else:
            # Streaming readers may arrive out of order: anything from a window behind to
            # the end of what was already requested still counts as sequential.
            streaming = (self.window > 0 and self._last_chunk - self.window <= first
                         <= max(self._issued_until, self._last_chunk + 1))
            sequential = offset == self._next_offset or streaming
        if not sequential:
            if self.window:
                self.resets += 1
            self.window = 0
            self._issued_until = last + 1
        elif self.window == 0:
            self.window = self.config.initial_chunks
        elif first > self._last_chunk:
            self.window = min(self.window * self.config.growth, self.config.max_chunks)
        self._next_offset = offset + size
        if sequential:
            self._last_chunk = max(self._last_chunk, last)
        else:
            self._last_chunk = last
        if not self.window:
            return range(0)
        start = max(self._issued_until, self._last_chunk + 1)
        end = min(self._last_chunk + 1 + self.window, self.chunk_count)
        if start >= end:
            return range(0)
        self._issued_until = end
        self.requested += end - start
        return range(start, end)

    def statistics(self) -> ReadAheadStatistics:
        return ReadAheadStatistics(self.requested, self.resets)
