"""The cache tiers on their own: bounds, verification, crash recovery, partial reads."""

from __future__ import annotations

import hashlib

from mmfs.manifest import ChunkKey
from mmfs.tiers.disk import BLOCK_SIZE, DiskTier
from mmfs.tiers.memory import MemoryTier

CHUNK = 8 * BLOCK_SIZE + 123


def chunk(seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(CHUNK)


def key(index: int) -> ChunkKey:
    return ChunkKey("sha256-" + "ab" * 32, CHUNK, index)


async def test_disk_range_reads_check_only_their_blocks(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    data = chunk(1)
    await tier.put(key(0), data)
    assert await tier.get_range(key(0), 10, 20) == data[10:20]
    assert await tier.get_range(key(0), BLOCK_SIZE - 5, 3 * BLOCK_SIZE + 7) == data[BLOCK_SIZE - 5:3 * BLOCK_SIZE + 7]
    assert await tier.get_range(key(0), 8 * BLOCK_SIZE, CHUNK) == data[8 * BLOCK_SIZE:]
    assert await tier.get_range(key(0), 0, CHUNK + 1) is None  # past the end: a miss, not a short answer

    # Damage one byte of block 5: reads elsewhere still verify; a read of block 5 is a miss
    # and the chunk is dropped (never bad bytes).
    path = next((tmp_path / "chunks").rglob("*.0"))
    raw = bytearray(path.read_bytes())
    raw[5 * BLOCK_SIZE + 1] ^= 1
    path.write_bytes(bytes(raw))
    assert await tier.get_range(key(0), 0, 100) == data[:100]
    assert await tier.get_range(key(0), 5 * BLOCK_SIZE, 5 * BLOCK_SIZE + 4096) is None
    assert await tier.get(key(0)) is None
    assert tier.statistics().entries == 0 and tier.statistics().errors == 1


async def test_disk_tier_recovers_after_a_crash_between_write_and_index(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    await tier.put(key(0), chunk(0))
    await tier.put(key(1), chunk(1))
    await tier.aclose()
    # A chunk file nobody indexed (the process died after the rename), a temporary file
    # (it died mid-write), and an indexed chunk whose file vanished.
    shard = next((tmp_path / "chunks").iterdir())
    (shard / "sha256-orphan.1.0").write_bytes(b"x" * 10)
    (shard / ".tmp-123").write_bytes(b"partial")
    next(shard.glob("*.1")).unlink()
    tier = DiskTier(tmp_path, 1 << 30)
    assert await tier.get(key(0)) == chunk(0)
    assert await tier.get(key(1)) is None
    assert sorted(p.name for p in shard.iterdir()) == [next(shard.glob("*.0")).name]
    assert tier.statistics().used_bytes == CHUNK


async def test_disk_lru_keeps_recently_read_chunks(tmp_path):
    tier = DiskTier(tmp_path, 3 * CHUNK)
    for index in range(3):
        await tier.put(key(index), chunk(index))
    assert await tier.get(key(0)) == chunk(0)  # now the most recent
    await tier.put(key(3), chunk(3))
    assert await tier.get(key(1)) is None  # the least recently used went
    assert await tier.get(key(0)) == chunk(0)
    assert tier.statistics().used_bytes <= 3 * CHUNK
    await tier.aclose()
    reopened = DiskTier(tmp_path, 3 * CHUNK)  # recency survives a restart
    await reopened.put(key(4), chunk(4))
    assert await reopened.get(key(2)) is None and await reopened.get(key(0)) == chunk(0)


async def test_memory_tier_ttl_and_bound():
    now = [0.0]
    tier = MemoryTier(2 * CHUNK, ttl_seconds=10, clock=lambda: now[0])
    await tier.put(key(0), chunk(0))
    await tier.put(key(1), chunk(1))
    await tier.put(key(2), chunk(2))
    assert await tier.get(key(0)) is None and await tier.get(key(2)) == chunk(2)
    now[0] = 11
    assert await tier.get(key(2)) is None
    assert tier.statistics().used_bytes <= 2 * CHUNK
