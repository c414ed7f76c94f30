"""Chunk maps: the unit of trust between whoever verified a file and everyone else.

Whoever checks a whole file against its upstream hash (LFS sha256, git blob id) records
its *chunk map*: the blake3 of every ``BLOCK_SIZE`` block of every chunk, for one chunk
size. Every other holder of those bytes (a node, another replica, a peer) checks what it
holds against the map instead of hashing the whole file again::

    upstream sha256 ──▶ ChunkMap(content, chunk size): blake3 per 64 KiB block
                             │
          chunk k arrives ───┴──▶ block digests computed once (Chunk.digests)
                                  match the map: verified; differ: dropped

Blocks never cross a chunk boundary (the last block of each chunk may be short), so a
chunk's digests are a contiguous slice of the map, and a small read (a 4 KiB page fault)
verifies one block, not a whole chunk. Bytes that arrive before a map exists are
*provisional*: their digests are kept so that, when the map arrives, they are checked
without being read or hashed again.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

#: Bytes covered by one digest: the unit of verification of partial reads.
BLOCK_SIZE = 64 << 10
DIGEST_SIZE = 32


def block_count(length: int) -> int:
    """Blocks covering ``length`` bytes of one chunk."""
    return -(-length // BLOCK_SIZE)


def block_digests(data: bytes | bytearray | memoryview) -> bytes:
    """The concatenated blake3 digests of ``data``'s blocks: a chunk hashed once, on arrival.

    Releases the GIL per block (blake3 does); callers hash big chunks in a worker thread."""
    view = memoryview(data)
    return b"".join(blake3.blake3(view[i:i + BLOCK_SIZE]).digest() for i in range(0, len(view), BLOCK_SIZE))


def fingerprint(digests: bytes) -> bytes:
    """A short name for one copy of a chunk (the blake3 of its block digests): two copies
    with the same fingerprint hold the same bytes. Readers remember the fingerprints of the
    provisional chunks they were served, to be checked against the map later."""
    return blake3.blake3(digests).digest()[:16]


@dataclass(frozen=True, slots=True)
class ChunkMap:
    """The block digests of every chunk of one file content, cut into ``chunk_size`` chunks."""

    content_id: str
    size: int
    chunk_size: int
    digests: bytes

    def __post_init__(self) -> None:
        if len(self.digests) != DIGEST_SIZE * self.total_blocks:
            raise ValueError(f"chunk map of {self.content_id} has {len(self.digests)} bytes of digests, "
                             f"expected {DIGEST_SIZE * self.total_blocks}")

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def blocks_per_chunk(self) -> int:
        return block_count(self.chunk_size)

    @property
    def total_blocks(self) -> int:
        if self.size == 0:
            return 0
        last = self.size - (self.chunk_count - 1) * self.chunk_size
        return (self.chunk_count - 1) * self.blocks_per_chunk + block_count(last)

    @property
    def key(self) -> str:
        return map_key(self.content_id, self.chunk_size)

    def chunk_digests(self, index: int) -> bytes:
        """The block digests of chunk ``index``."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range ({self.chunk_count} chunks)")
        start = index * self.blocks_per_chunk * DIGEST_SIZE
        end = min(len(self.digests), start + self.blocks_per_chunk * DIGEST_SIZE)
        return self.digests[start:end]

    def chunk_fingerprint(self, index: int) -> bytes:
        return fingerprint(self.chunk_digests(index))

    def matches(self, index: int, digests: bytes) -> bool:
        """Whether a copy of chunk ``index`` with these block digests is the verified one."""
        return self.chunk_digests(index) == digests

    def recut(self, chunk_size: int) -> "ChunkMap | None":
        """The map of the same content for another chunk size, where blocks line up (both
        sizes multiples of ``BLOCK_SIZE``: the blocks are then the same 64 KiB of the file);
        ``None`` where they do not, and the file must be verified again for that size."""
        if chunk_size == self.chunk_size:
            return self
        if chunk_size % BLOCK_SIZE or self.chunk_size % BLOCK_SIZE:
            return None
        return ChunkMap(self.content_id, self.size, chunk_size, self.digests)


def map_key(content_id: str, chunk_size: int) -> str:
    """Maps are keyed by content *and* chunk size: the same content cut differently has
    other digests (a backend whose ``--chunk-size`` changed must not fail old files)."""
    return f"{content_id}:{chunk_size}"
