"""The ref watcher over an in-process remote that counts its resolutions (trio's autojump clock)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from mmfs.chunkmap import BLOCK_SIZE, block_digests

from mmfs.engine import EngineConfig, FetchEngine
from mmfs.errors import NotFound, RevisionNotFound
from mmfs.manifest import SHA256, FileEntry, Manifest
from mmfs.metadata import MetadataStore
from mmfs.names import RepoRef, parse_repo_id
from mmfs.refwatch import RefWatcher, parse_ref_key
from mmfs.remote.base import FetchedChunk, FileSource, Remote
from mmfs.retention import Retention
from mmfs.tiers.base import Chunk
from mmfs.tiers.disk import DiskTier
from mmfs.tiers.memory import MemoryTier

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


@pytest.mark.parametrize("kind", ["disk", "memory"])
async def test_under_space_pressure_a_retired_commits_own_content_is_evicted_first(tmp_path: Path, kind: str) -> None:
    """Between two gc sweeps, a full cache makes room by dropping what only a retired
    commit uses, however recently it was read; content the current commit shares with it
    and the current commit's own stay (plain LRU would drop the least recently used)."""
    old_only, old_chunk = one_chunk_file("weights-v1.bin", 1)
    shared, shared_chunk = one_chunk_file("tokenizer.json", 2)
    new_only, new_chunk = one_chunk_file("weights-v2.bin", 3)
    extra, extra_chunk = one_chunk_file("weights-v2-extra.bin", 4)
    remote = CountingRemote()
    remote.manifests = {OLD: Manifest(REPO, OLD, (old_only, shared)),
                        NEW: Manifest(REPO, NEW, (new_only, shared, extra))}
    tier = DiskTier(tmp_path / "cache", 3 * CHUNK) if kind == "disk" else MemoryTier(3 * CHUNK)
    engine = FetchEngine([tier], remote, MetadataStore(tmp_path / "meta"), EngineConfig(ref_ttl=10.0, holder="test"))
    async with engine:
        await engine.manifest(REPO, "main")  # main is OLD
        remote.commit = NEW
        assert await engine.check_ref(REPO, "main") == NEW
        await engine.manifest(REPO, "main")
        retention = Retention(engine, grace=3600.0)
        retention._started = engine.commit_used[(REPO, OLD)] = 0.0  # OLD's grace period is over
        assert retention.classify(())[3] == {(REPO, OLD)}
        assert await retention.mark(()) == 1  # only weights-v1.bin: tokenizer.json is NEW's too
        # Least recently used first: the shared file, the current weights, the retired weights.
        for entry, chunk in ((shared, shared_chunk), (new_only, new_chunk), (old_only, old_chunk)):
            await tier.put(entry.chunk_key(0), chunk)
        assert all(tier.contains(e.chunk_key(0)) for e in (shared, new_only, old_only))
        await tier.put(extra.chunk_key(0), extra_chunk)  # the cache is full: one must go
        assert not tier.contains(old_only.chunk_key(0))
        assert all(tier.contains(e.chunk_key(0)) for e in (shared, new_only, extra))
        assert (await tier.get(shared.chunk_key(0))).data == shared_chunk.data
