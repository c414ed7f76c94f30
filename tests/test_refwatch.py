"""The ref watcher over an in-process remote that counts its resolutions (trio's autojump clock)."""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from mmfs.chunkmap import BLOCK_SIZE, ChunkMap, block_digests

from mmfs.engine import EngineConfig, FetchEngine
from mmfs.errors import NotFound, RevisionNotFound
from mmfs.manifest import SHA256, ChunkKey, FileEntry, Manifest
from mmfs.metadata import MetadataStore
from mmfs.names import RepoRef, parse_repo_id
from mmfs.refwatch import RefWatcher, parse_ref_key
from mmfs.remote.base import FetchedChunk, FileSource, Remote
from mmfs.retention import MARK_EVERY, Retention
from mmfs.tiers.base import Chunk, ChunkTier
from mmfs.tiers.disk import DiskTier
from mmfs.tiers.memory import MemoryTier
from mmfs.tiers.shared import SharedTier

REPO = parse_repo_id("acme/tiny")
OLD, NEW = "a" * 40, "b" * 40
CHUNK = 4 * BLOCK_SIZE


class CountingRemote(Remote):
    """Where ``main`` points is ``self.commit``; ``None``: the ref is gone upstream."""

    def __init__(self) -> None:
        self.commit: str | None = OLD
        self.resolves = 0
        self.manifests: dict[str, Manifest] = {}  # commit -> its files (none when absent)

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        self.resolves += 1
        await trio.sleep(0.05)  # a round trip: concurrent askers overlap
        if self.commit is None or revision != "main":
            raise RevisionNotFound(f"Invalid rev id: {revision}")
        return self.commit

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        return self.manifests.get(commit, Manifest(repo, commit, ()))

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        raise AssertionError("no chunk is read here")

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        raise AssertionError("no file is opened here")


@pytest.fixture
async def setup(tmp_path: Path):
    remote = CountingRemote()
    engine = FetchEngine([], remote, MetadataStore(tmp_path / "meta"), EngineConfig(ref_ttl=10.0, holder="test"))
    async with engine:
        yield engine, remote, RefWatcher(engine, interval=10.0)


def one_chunk_file(path: str, seed: int) -> tuple[FileEntry, Chunk]:
    """A file of one :data:`CHUNK`-byte chunk, and that chunk as a tier holds it."""
    data = hashlib.shake_256(seed.to_bytes(4, "big")).digest(CHUNK)
    entry = FileEntry(path, CHUNK, SHA256, hashlib.sha256(data).hexdigest(), chunk_size=CHUNK)
    return entry, Chunk(data, block_digests(data), True)


async def test_one_upstream_check_per_interval_however_many_readers(setup, autojump_clock) -> None:
    engine, remote, watcher = setup
    await engine.resolve(REPO, "main")
    watcher.touch(REPO, "main")
    remote.resolves = 0

    async def reader() -> None:  # a node resolving main every 0.5 s
        for _ in range(200):
            assert await engine.resolve(REPO, "main") in (OLD, NEW)
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        for _ in range(5):
            nursery.start_soon(reader)
        await trio.sleep(100.0)
        nursery.cancel_scope.cancel()
    assert 10 <= remote.resolves <= 11  # one per 10 s interval, not one per reader or per TTL each


async def test_waiters_are_told_of_a_move_and_history_is_kept(setup) -> None:
    """Real clock (the move's metadata write runs in a thread, which an autojump clock
    would skip past the waiters' deadlines)."""
    engine, remote, watcher = setup
    watcher.interval = 0.2
    await engine.resolve(REPO, "main")
    watcher.touch(REPO, "main")
    key = f"{REPO}@main"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        assert await watcher.wait_for_moves({key: OLD}, 0.5) == {}  # nothing moved: empty after the wait
        remote.commit = NEW
        assert await watcher.wait_for_moves({key: OLD}, 60.0) == {key: NEW}  # the next check finds it
        assert await watcher.wait_for_moves({key: OLD}, 60.0) == {key: NEW}  # a late poller: at once
        nursery.cancel_scope.cancel()
    [move] = engine.metadata.ref_history(key)
    assert (move.from_commit, move.to_commit, move.detected_by) == (OLD, NEW, "test")
    assert watcher.status()["moves"] == 1


async def test_a_ref_gone_upstream_keeps_its_last_commit_unknown_ones_are_not_found(setup) -> None:
    engine, remote, watcher = setup
    assert await engine.resolve(REPO, "main") == OLD
    remote.commit = None
    assert await engine.check_ref(REPO, "main") == OLD
    assert (REPO, "main") in engine.gone and watcher.status()["refs"] == []
    with pytest.raises(NotFound):
        await engine.resolve(REPO, "refs/pr/9")
    remote.commit = NEW
    assert await engine.check_ref(REPO, "main") == NEW and (REPO, "main") not in engine.gone


def test_ref_keys() -> None:
    assert parse_ref_key("huggingface/acme/tiny@refs/pr/1") == (REPO, "refs/pr/1")
    for bad in ("huggingface/acme/tiny", "acme@main", "huggingface/acme/tiny@../x", "nope/acme/tiny@main"):
        with pytest.raises(Exception) as caught:
            parse_ref_key(bad)
        assert type(caught.value).__name__ == "InvalidName", bad


async def test_a_move_told_twice_at_once_is_recorded_once(setup) -> None:
    """A watcher's check and a reader's resolve can learn the same move together."""
    engine, remote, watcher = setup
    await engine.resolve(REPO, "main")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: engine.note_ref(REPO, "main", NEW, detected_by="test"))
    assert [(m.from_commit, m.to_commit) for m in engine.metadata.ref_history()] == [(OLD, NEW)]
    assert watcher.moves == 1


async def test_a_commit_in_use_is_not_retired_while_no_ref_points_at_it(setup) -> None:
    """A client reading a commit by its hash keeps it for the grace period after each use."""
    engine, remote, watcher = setup
    retention = Retention(engine, grace=3600.0)
    retention._started = 0.0  # long ago: only use keeps a commit now
    await engine.manifest(REPO, "main")
    remote.commit = NEW
    assert await engine.check_ref(REPO, "main") == NEW
    live, _, in_grace, retired = retention.classify(())
    assert (REPO, OLD) in in_grace and not retired  # used a moment ago (listed through main)
    engine.commit_used[(REPO, OLD)] = 0.0
    live, _, in_grace, retired = retention.classify(())
    assert retired == {(REPO, OLD)}


@asynccontextmanager
async def old_commit_retired(tmp_path: Path, tier: ChunkTier) -> AsyncIterator[tuple[Retention, dict[str, FileEntry]]]:
    """An engine over ``tier`` whose ``main`` moved from OLD to NEW, OLD's grace period
    over: OLD is retired; its ``tokenizer.json`` is NEW's too. Yields the retention and
    the files by name (one chunk each)."""
    files = {path: one_chunk_file(path, seed)[0] for seed, path in
             enumerate(("weights-v1.bin", "tokenizer.json", "weights-v2.bin", "weights-v2-extra.bin"))}
    remote = CountingRemote()
    remote.manifests = {OLD: Manifest(REPO, OLD, (files["weights-v1.bin"], files["tokenizer.json"])),
                        NEW: Manifest(REPO, NEW, tuple(files[p] for p in ("weights-v2.bin", "tokenizer.json",
                                                                             "weights-v2-extra.bin")))}
    engine = FetchEngine([tier], remote, MetadataStore(tmp_path / "meta"), EngineConfig(ref_ttl=10.0, holder="test"))
    async with engine:
        await engine.manifest(REPO, "main")  # main is OLD
        remote.commit = NEW
        assert await engine.check_ref(REPO, "main") == NEW
        await engine.manifest(REPO, "main")
        retention = Retention(engine, grace=3600.0)
        retention._started = engine.commit_used[(REPO, OLD)] = 0.0  # OLD's grace period is over
        assert retention.classify(())[3] == {(REPO, OLD)}
        yield retention, files


def chunk_of(files: dict[str, FileEntry], path: str) -> tuple[ChunkKey, Chunk]:
    return files[path].chunk_key(0), one_chunk_file(path, list(files).index(path))[1]


@pytest.mark.parametrize("kind", ["disk", "memory", "shared"])
async def test_under_space_pressure_a_retired_commits_own_content_is_evicted_first(tmp_path: Path, kind: str) -> None:
    """Between two gc sweeps, a full cache makes room by dropping what only a retired
    commit uses, however recently it was read; content the current commit shares with it
    and the current commit's own stay (plain LRU would drop the least recently used)."""
    tier = {"disk": lambda: DiskTier(tmp_path / "cache", 3 * CHUNK),
            "memory": lambda: MemoryTier(3 * CHUNK),
            "shared": lambda: SharedTier(tmp_path / "shared", 3 * CHUNK + 3 * 64, compression="none")}[kind]()
    async with old_commit_retired(tmp_path, tier) as (retention, files):
        assert await retention.mark(()) == 1  # only weights-v1.bin: tokenizer.json is NEW's too
        # Least recently used first: the shared file, the current weights, the retired weights.
        for path in ("tokenizer.json", "weights-v2.bin", "weights-v1.bin", "weights-v2-extra.bin"):
            key, chunk = chunk_of(files, path)
            await tier.settle(ChunkMap(key.content_id, CHUNK, CHUNK, chunk.digests))  # (shared: publishes)
            await tier.put(key, chunk)
            if path == "weights-v1.bin":  # the cache is full now: the next put makes room
                assert all(tier.contains(files[p].chunk_key(0)) for p in files if p != "weights-v2-extra.bin")
        assert not tier.contains(files["weights-v1.bin"].chunk_key(0))
        assert all(tier.contains(files[p].chunk_key(0)) for p in files if p != "weights-v1.bin")
        assert (await tier.get(files["tokenizer.json"].chunk_key(0))).data == chunk_of(files, "tokenizer.json")[1].data
        await tier.aclose()


async def test_the_sweep_marks_retired_content_each_minute_and_reclaims_it_later(tmp_path: Path,
                                                                                 autojump_clock) -> None:
    tier = MemoryTier(1 << 30)
    async with old_commit_retired(tmp_path, tier) as (retention, files):
        for path in files:
            await tier.put(*chunk_of(files, path))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(retention.sweep, lambda: ())
            await trio.sleep(MARK_EVERY + 1)
            assert tier.retired == {files["weights-v1.bin"].content_id}
            assert tier.contains(files["weights-v1.bin"].chunk_key(0))  # marked, not yet dropped
            await trio.sleep(retention.grace / 4)  # a gc sweep has run
            assert not tier.contains(files["weights-v1.bin"].chunk_key(0))
            assert all(tier.contains(files[p].chunk_key(0)) for p in files if p != "weights-v1.bin")
            nursery.cancel_scope.cancel()
