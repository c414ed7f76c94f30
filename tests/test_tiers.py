"""The cache tiers on their own: bounds, verification, crash recovery, partial reads.

The disk tests use real LMDB and real files; what they check is what a node relies on
after a crash, a damaged disk or an upgrade: never bad bytes, bounded disk use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest
import trio

from mmfs.chunkmap import BLOCK_SIZE, ChunkMap, block_digests
from mmfs.errors import CacheError
from mmfs.manifest import ChunkKey
from mmfs.tiers.base import Chunk
from mmfs.tiers.disk import DiskTier, hold_for_reader
from mmfs.tiers.memory import MemoryTier

CHUNK = 8 * BLOCK_SIZE + 123  # blocks never cross chunks: the last block of each is short
CONTENT = "sha256-" + "ab" * 32
OTHER = "sha256-" + "cd" * 32
REPO = Path(__file__).resolve().parents[1]


def payload(seed: int, size: int = CHUNK) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def chunk(seed: int, verified: bool = True) -> Chunk:
    data = payload(seed)
    return Chunk(data, block_digests(data), verified)


def key(index: int, content: str = CONTENT, chunk_size: int = CHUNK) -> ChunkKey:
    return ChunkKey(content, chunk_size, index)


def data_file(root: Path, content: str = CONTENT, chunk_size: int = CHUNK) -> Path:
    """Where docs/datapath.md says a content's chunks live."""
    return root / "data" / content[7:9] / f"{content}.{chunk_size}"


def chunk_map(seeds: list[int], content: str = CONTENT) -> ChunkMap:
    return ChunkMap(content, len(seeds) * CHUNK, CHUNK, b"".join(block_digests(payload(s)) for s in seeds))


def assert_consistent(root: Path, tier: DiskTier, keys: list[ChunkKey]) -> None:
    """Disk use is what the index says: ``used`` is the sum of the indexed chunks (``CHUNK``
    bytes each), every data file holds an indexed chunk, and every byte outside indexed
    chunks is a hole (zeros)."""
    spans: dict[Path, list[int]] = {}
    for k in keys:
        if tier.contains(k):
            spans.setdefault(data_file(root, k.content_id, k.chunk_size), []).append(k.index * k.chunk_size)
    assert {p for p in (root / "data").rglob("*") if p.is_file()} == set(spans)
    for path, offsets in spans.items():
        raw = bytearray(path.read_bytes())
        for offset in offsets:
            raw[offset:offset + CHUNK] = bytes(CHUNK)
        assert not any(raw), f"unindexed bytes left in {path}"
    held = sum(len(offsets) for offsets in spans.values())
    assert (tier.statistics().entries, tier.statistics().used_bytes) == (held, held * CHUNK)


async def test_disk_round_trip_and_range_reads_check_only_their_blocks(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    data = payload(1)
    await tier.put(key(0), chunk(1))
    got = await tier.get(key(0))
    assert got == Chunk(data, block_digests(data), True)
    assert await tier.get_range(key(0), 10, 20) == data[10:20]
    assert await tier.get_range(key(0), BLOCK_SIZE - 5, 3 * BLOCK_SIZE + 7) == data[BLOCK_SIZE - 5:3 * BLOCK_SIZE + 7]
    assert await tier.get_range(key(0), 8 * BLOCK_SIZE, CHUNK) == data[8 * BLOCK_SIZE:]
    assert await tier.get_range(key(0), 0, CHUNK + 1) is None  # past the end: a miss, not a short answer
    assert tier.locate(key(0)) == (data_file(tmp_path), 0, CHUNK)

    # Damage one byte of block 5: reads elsewhere still verify; a read of block 5 is a miss
    # and the chunk is dropped (never bad bytes).
    with open(data_file(tmp_path), "r+b") as f:
        f.seek(5 * BLOCK_SIZE + 1)
        f.write(bytes([data[5 * BLOCK_SIZE + 1] ^ 1]))
    assert await tier.get_range(key(0), 0, 100) == data[:100]
    assert await tier.get_range(key(0), 5 * BLOCK_SIZE, 5 * BLOCK_SIZE + 4096) is None
    assert await tier.get(key(0)) is None
    stats = tier.statistics()
    assert (stats.entries, stats.used_bytes, stats.errors) == (0, 0, 1)
    assert not data_file(tmp_path).exists()


async def test_disk_keeps_the_digests_it_was_given(tmp_path):
    # Hash once: a put stores the digests computed on arrival, it does not hash the bytes
    # again. Bytes that do not match them are caught by the first read.
    tier = DiskTier(tmp_path, 1 << 30)
    await tier.put(key(0), Chunk(payload(1), block_digests(payload(2)), True))
    assert await tier.get(key(0)) is None
    assert tier.statistics().errors == 1


async def test_disk_provisional_chunks_are_settled_against_the_map(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    for index in range(3):
        await tier.put(key(index), chunk(index, verified=False))
    await tier.put(key(3), chunk(3))
    await tier.put(key(0, chunk_size=2 * CHUNK), chunk(0, verified=False))  # another chunking

    # Provisional: served whole through get (the engine remembers it), not by range, and
    # not located for passthrough.
    assert await tier.get_range(key(0), 0, 10) is None
    assert await tier.get(key(0)) == chunk(0, verified=False)
    assert tier.locate(key(0)) is None and tier.complete_file(CONTENT, CHUNK, 4) is None

    # The map says chunk 1 holds other bytes: 0 and 2 become verified, 1 is dropped.
    assert await tier.settle(chunk_map([0, 91, 2, 3])) == [1]
    assert await tier.get_range(key(2), 5, 15) == payload(2)[5:15]
    assert not tier.contains(key(1)) and await tier.get(key(1)) is None
    assert tier.complete_file(CONTENT, CHUNK, 4) is None  # chunk 1 is missing
    await tier.put(key(1), chunk(91))
    path = tier.complete_file(CONTENT, CHUNK, 4)
    assert path is not None and path.read_bytes() == b"".join(payload(s) for s in [0, 91, 2, 3])
    assert (await tier.get(key(0, chunk_size=2 * CHUNK))).verified is False  # another map's business
    assert tier.statistics().used_bytes == 5 * CHUNK
    await tier.aclose()

    reopened = DiskTier(tmp_path, 1 << 30)  # verified survives a restart
    assert await reopened.get_range(key(0), 0, 10) == payload(0)[:10]
    assert reopened.complete_file(CONTENT, CHUNK, 4) == path
    await reopened.aclose()


async def test_disk_lru_eviction_punches_holes_and_removes_empty_files(tmp_path):
    tier = DiskTier(tmp_path, 3 * CHUNK)
    for index in range(3):
        await tier.put(key(index), chunk(index))
    assert (await tier.get(key(0))).data == payload(0)  # now the most recent
    await tier.put(key(3), chunk(3))
    assert await tier.get(key(1)) is None  # the least recently used went
    assert (await tier.get(key(0))).data == payload(0)
    path = data_file(tmp_path)
    assert path.stat().st_blocks * 512 < 3 * CHUNK + 4 * 4096  # chunk 1's blocks are freed
    assert path.read_bytes()[CHUNK + 4096:2 * CHUNK - 4096] == bytes(CHUNK - 8192)
    keys = [key(i) for i in range(4)] + [key(i, OTHER) for i in range(3)]
    assert_consistent(tmp_path, tier, keys)

    await tier.aclose()
    tier = DiskTier(tmp_path, 3 * CHUNK)  # recency survives a restart
    await tier.put(key(4), chunk(4))
    assert await tier.get(key(2)) is None and (await tier.get(key(0))).data == payload(0)

    # Another content pushes every chunk of the first out: its file goes with the last.
    for index in range(3):
        await tier.put(key(index, OTHER), chunk(10 + index))
    assert not path.exists()
    assert_consistent(tmp_path, tier, keys)
    assert tier.statistics().evictions == 4  # since the restart
    await tier.aclose()


async def test_disk_discard_drops_every_chunking_and_wins_over_a_write_in_flight(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    await tier.put(key(0), chunk(0))
    await tier.put(key(0, chunk_size=4 * CHUNK), chunk(0))
    await tier.put(key(0, OTHER), chunk(1))
    assert await tier.discard(CONTENT) == 2
    assert not tier.contains(key(0)) and not tier.contains(key(0, chunk_size=4 * CHUNK))
    assert not data_file(tmp_path).exists() and not data_file(tmp_path, chunk_size=4 * CHUNK).exists()
    assert (await tier.get(key(0, OTHER))).data == payload(1)

    # A discard that arrives while the chunk is being written: the write is thrown away.
    big = 64 << 20
    data = payload(7, big)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.put, key(0, chunk_size=big), Chunk(data, block_digests(data), False))
        with trio.fail_after(5):
            while not data_file(tmp_path, chunk_size=big).exists():  # the write has begun
                await trio.sleep(0.0005)
        await tier.discard(CONTENT)
    assert not tier.contains(key(0, chunk_size=big)) and await tier.get(key(0, chunk_size=big)) is None
    assert not data_file(tmp_path, chunk_size=big).exists()
    assert tier.statistics().used_bytes == CHUNK
    await tier.aclose()


async def test_disk_index_map_grows_when_full(tmp_path):
    small = 4096
    tier = DiskTier(tmp_path, 1 << 30, map_size=32 << 10)
    keys = [ChunkKey(f"sha256-{i:064x}", small, 0) for i in range(400)]
    for i, k in enumerate(keys):
        data = payload(i, small)
        await tier.put(k, Chunk(data, block_digests(data), True))
    assert (tmp_path / "index-v3.lmdb" / "data.mdb").stat().st_size > 32 << 10
    await tier.aclose()
    tier = DiskTier(tmp_path, 1 << 30, map_size=32 << 10)
    assert all([(await tier.get(k)).data == payload(i, small) for i, k in enumerate(keys)])
    await tier.aclose()


async def test_disk_recovers_unindexed_bytes_and_entries_without_data(tmp_path):
    # What a crash between writing and indexing, or between unindexing and punching, leaves.
    tier = DiskTier(tmp_path, 1 << 30)
    for index in range(3):
        await tier.put(key(index), chunk(index))
    await tier.put(key(0, OTHER), chunk(5))
    await tier.aclose()
    with open(data_file(tmp_path), "r+b") as f:
        f.seek(4 * CHUNK)
        f.write(payload(4))  # chunk 4, written but never indexed
    os.truncate(data_file(tmp_path, OTHER), CHUNK - 1)  # an indexed chunk cut short
    data_file(tmp_path, "sha256-" + "ef" * 32).parent.mkdir()
    data_file(tmp_path, "sha256-" + "ef" * 32).write_bytes(payload(6))  # a file nothing indexed

    tier = DiskTier(tmp_path, 1 << 30)
    assert [(await tier.get(key(i))).data for i in range(3)] == [payload(i) for i in range(3)]
    assert await tier.get(key(4)) is None and await tier.get(key(0, OTHER)) is None
    assert tier.statistics().errors == 0  # dropped at start-up, not found damaged by a read
    assert_consistent(tmp_path, tier, [key(i) for i in range(5)] + [key(0, OTHER)])
    await tier.aclose()


def _corrupt_pages(root: Path) -> None:
    with open(root / "index-v3.lmdb" / "data.mdb", "r+b") as f:
        f.write(payload(9, 3 * 4096))


def _foreign_record(root: Path) -> None:
    env = lmdb.open(str(root / "index-v3.lmdb"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:
        txn.put(b"../../etc/passwd:4096:0", b"\0" * 17)
    env.close()


@pytest.mark.parametrize("damage", [_corrupt_pages, _foreign_record])
async def test_disk_unusable_index_is_quarantined(tmp_path, caplog, damage):
    tier = DiskTier(tmp_path, 1 << 30)
    await tier.put(key(0), chunk(0))
    await tier.aclose()
    damage(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmfs.tiers.disk"):
        tier = DiskTier(tmp_path, 1 << 30)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mmfs.tiers.disk"]
    assert len(warnings) == 1 and "quarantine-" in warnings[0].getMessage()
    assert [p.name for p in tmp_path.glob("quarantine-*/*")] == ["index-v3.lmdb"]
    assert not tier.contains(key(0)) and not data_file(tmp_path).exists()
    await tier.put(key(1), chunk(1))
    assert (await tier.get(key(1))).data == payload(1)
    await tier.aclose()


def test_disk_cache_error_when_the_directory_cannot_be_used(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    with pytest.raises(CacheError):
        DiskTier(tmp_path / "file", 1 << 30)


async def test_disk_stray_files_do_not_stop_it(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    await tier.put(key(0), chunk(0))
    await tier.aclose()
    data = tmp_path / "data"
    (data / "stray.txt").write_text("x")
    (data / "zz" / "deeper").mkdir(parents=True)
    (data / "ab" / "foreign.name").write_text("x")
    (data / "ab" / "subdir").mkdir()
    (tmp_path / "notes.txt").write_text("the operator's")
    tier = DiskTier(tmp_path, 1 << 30)
    assert (await tier.get(key(0))).data == payload(0)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == ["ab", data_file(tmp_path).relative_to(data).as_posix()]
    assert (tmp_path / "notes.txt").exists()  # outside data/: not ours to remove
    await tier.aclose()


async def test_disk_replaces_the_file_per_chunk_layout(tmp_path, caplog):
    env = lmdb.open(str(tmp_path / "index-v2.lmdb"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:
        txn.put(key(0).encode(), b"\0" * 16)
    env.close()
    old = tmp_path / "chunks" / "ab" / f"{CONTENT}.{CHUNK}.0"
    old.parent.mkdir(parents=True)
    old.write_bytes(payload(0))
    with caplog.at_level(logging.INFO, logger="mmfs.tiers.disk"):
        tier = DiskTier(tmp_path, 1 << 30)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmfs.tiers.disk"]
    assert len(lines) == 1 and "older format" in lines[0]
    assert not (tmp_path / "chunks").exists() and not (tmp_path / "index-v2.lmdb").exists()
    assert await tier.get(key(0)) is None
    await tier.put(key(0), chunk(0))
    assert (await tier.get(key(0))).data == payload(0)
    await tier.aclose()


def crash_seed(k: ChunkKey) -> int:
    """The bytes the crash test writes at ``k``, whatever the time (discards, re-puts)."""
    return k.index + (100 if k.content_id == OTHER else 0)


_WRITER = textwrap.dedent("""
    import os, signal, sys, trio
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_tiers import CHUNK, CONTENT, OTHER, chunk, chunk_map, crash_seed, key
    from mmfs.tiers.disk import DiskTier

    root, method, when, calls = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    if method:  # kill -9 at a chosen point: at the call numbered `calls` of `method`
        original, count = getattr(DiskTier, method), iter(range(10 ** 9))

        def crashing(self, *args):
            crash = next(count) == calls
            if crash and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(self, *args)
            if crash:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(DiskTier, method, crashing)

    async def main():
        tier = DiskTier(root, 6 * CHUNK)
        chunks = {{(k, verified): chunk(crash_seed(k), verified) for content in (CONTENT, OTHER)
                  for k in [key(j, content) for j in range(10)] for verified in (False, True)}}
        async def writer(content, step):
            for i in range(10 ** 9):
                k = key((i * step) % 10, content)
                await tier.put(k, chunks[k, i % 3 == 0])
                if i % 7 == 0:
                    await tier.get(key((k.index + 3) % 10, content))
                if i % 11 == 0:
                    await tier.settle(chunk_map([crash_seed(key(j, content)) for j in range(10)], content))
                if i % 23 == 0:
                    await tier.discard(content)
                if i == 20:
                    print("running", flush=True)
        async with trio.open_nursery() as nursery:
            for content, step in ((CONTENT, 3), (OTHER, 7), (CONTENT, 1), (OTHER, 1)):
                nursery.start_soon(writer, content, step)
    trio.run(main)
""")


def test_disk_survives_kill_9_at_any_point(tmp_path):
    """A child writes, reads, settles and discards from four tasks; it is killed at points
    chosen in the tier's write path (bytes about to be written, written but not indexed,
    unindexed but not yet freed) and at random times. After each kill the cache reopens
    consistent: every chunk read is exactly what was written, nothing is found damaged,
    and disk use is what the index says."""
    script = _WRITER.format(tests=str(REPO / "tests"))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    keys = [key(i, content) for content in (CONTENT, OTHER) for i in range(10)]

    async def check() -> None:
        tier = DiskTier(tmp_path / "cache", 6 * CHUNK)
        got = [await tier.get(k) for k in keys]
        assert all(c is None or c.data == payload(crash_seed(k)) for k, c in zip(keys, got))
        assert tier.statistics().errors == 0  # a crash leaves no damaged chunk behind
        assert_consistent(tmp_path / "cache", tier, keys)
        await tier.aclose()

    for method, when, calls in [("_write", "before", 30), ("_write", "after", 41),
                                ("_release", "before", 25), ("_release", "after", 32)]:
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), method, when, str(calls)],
                                 env=environment, stdout=subprocess.DEVNULL, cwd=REPO)
        assert child.wait(timeout=60) == -signal.SIGKILL  # by its own hand, at that point
        trio.run(check)
    for delay in (0.05, 0.3):
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), "", "", "0"],
                                 env=environment, stdout=subprocess.PIPE, cwd=REPO)
        try:
            assert child.stdout.readline() == b"running\n"
            trio.run(trio.sleep, delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        trio.run(check)


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


async def test_memory_tier_settles_provisional_chunks_against_the_map():
    tier = MemoryTier(8 * CHUNK)
    good, bad = chunk(0, verified=False), chunk(9, verified=False)
    await tier.put(key(0), good)
    await tier.put(key(1), bad)  # chunk 1 of the file holds chunk 9's bytes: a corrupt copy
    assert await tier.settle(chunk_map([0, 1])) == [1]
    kept = await tier.get(key(0))
    assert kept is not None and kept.verified and kept.data == good.data
    assert await tier.get(key(1)) is None and tier.statistics().used_bytes == len(good.data)


async def test_disk_tier_writes_aligned_buffers_directly_and_reads_them_back(tmp_path):
    # Chunks received into page-aligned buffers (the wire client's) are written with
    # O_DIRECT for their whole pages and buffered for the rest; both read back exactly.
    from mmfs.remote.wire import _body_buffer
    size = 2 << 20
    tier = DiskTier(tmp_path, 1 << 30)
    contents = {0: payload(10, size), 1: payload(11, (1 << 20) + 123)}  # a full chunk, a short tail
    for index, data in contents.items():
        buffer = _body_buffer(len(data))
        buffer[:] = data
        await tier.put(key(index, chunk_size=size), Chunk(buffer, block_digests(data), True))
    assert tier._direct  # this filesystem took O_DIRECT
    await tier.aclose()
    reopened = DiskTier(tmp_path, 1 << 30)
    for index, data in contents.items():
        found = await reopened.get(key(index, chunk_size=size))
        assert found is not None and bytes(found.data) == data


async def test_pinned_files_are_not_evicted_and_a_discard_unlinks_them(tmp_path: Path) -> None:
    """Passthrough backing files (mmfs.vfs): a pinned complete file stays whole under
    eviction pressure (other puts are refused rather than punching it); a discard (the
    content failed verification) still makes it unreadable for new opens: gone from the
    index and unlinked, never punched, so a reader holding it open keeps its bytes."""
    tier = DiskTier(tmp_path, 3 * CHUNK + CHUNK // 2)
    for index in range(3):
        await tier.put(key(index), chunk(index))
    assert tier.pin_complete(CONTENT, CHUNK, 4) is None  # not complete: nothing pinned
    assert tier.pinned() == {}
    path = tier.pin_complete(CONTENT, CHUNK, 3)
    assert path == data_file(tmp_path) and tier.pinned() == {f"{CONTENT}.{CHUNK}": 1}
    await tier.put(key(0, OTHER), chunk(10))  # would need a pinned chunk's room: refused
    assert not tier.contains(key(0, OTHER)) and tier.pin_skips == 1
    assert all(tier.contains(key(i)) for i in range(3))
    assert path.read_bytes() == b"".join(payload(s) for s in range(3))
    held = os.open(path, os.O_RDONLY)
    try:
        assert tier.pin_complete(CONTENT, CHUNK, 3) == path  # a second user
        tier.unpin(CONTENT, CHUNK)
        assert tier.pinned() == {f"{CONTENT}.{CHUNK}": 1}
        assert await tier.discard(CONTENT) == 3
        assert tier.complete_file(CONTENT, CHUNK, 3) is None and not path.exists()
        assert os.pread(held, 3 * CHUNK, 0) == b"".join(payload(s) for s in range(3))  # not punched
    finally:
        os.close(held)
    tier.unpin(CONTENT, CHUNK)
    assert tier.pinned() == {} and tier.statistics().used_bytes == 0
    # An unpinned file counts as just used (passthrough reads never reached the tier).
    await tier.put(key(0), chunk(0))
    await tier.put(key(1), chunk(1))
    assert tier.pin_complete(CONTENT, CHUNK, 2) is not None
    await tier.put(key(0, OTHER), chunk(10))  # more recent than the pinned file's last lazy use
    tier.unpin(CONTENT, CHUNK)
    await tier.put(key(1, OTHER), chunk(11))  # evicts the least recently used: OTHER's chunk 0
    assert tier.contains(key(0)) and tier.contains(key(1)) and not tier.contains(key(0, OTHER))
    await tier.aclose()


async def test_files_held_by_readers_of_an_earlier_daemon_are_not_evicted(tmp_path: Path) -> None:
    """A passthrough backing file outlives the daemon that registered it (the kernel keeps
    it while readers have the file open): after a restart nothing is pinned in memory, but
    the open file's lock (hold_for_reader) still keeps eviction from punching it."""
    tier = DiskTier(tmp_path, 3 * CHUNK + CHUNK // 2)
    for index in range(3):
        await tier.put(key(index), chunk(index))
    held = os.open(data_file(tmp_path), os.O_RDONLY)
    try:
        hold_for_reader(held)
        await tier.put(key(0, OTHER), chunk(10))  # would need to punch the held file: refused
        assert not tier.contains(key(0, OTHER)) and all(tier.contains(key(i)) for i in range(3))
        assert os.pread(held, 3 * CHUNK, 0) == b"".join(payload(s) for s in range(3))
    finally:
        os.close(held)
    await tier.put(key(0, OTHER), chunk(10))  # released: the least recently used chunk goes
    assert tier.contains(key(0, OTHER)) and not tier.contains(key(0))
    await tier.aclose()
