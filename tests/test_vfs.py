"""The FUSE-agnostic core (namespace, inodes, reads) and the read-ahead, without a mount."""

from __future__ import annotations

import errno
import hashlib
import stat

import pytest
import trio

from mmfs.engine import EngineConfig, FetchEngine
from mmfs.errors import MmfsError, NotFound, RepoNotFound, RevisionNotFound, UpstreamError
from mmfs.manifest import SHA256, FileEntry, Manifest
from mmfs.metadata import MetadataStore
from mmfs.names import RepoRef
from mmfs.prefetch import ReadAhead, ReadAheadConfig
from mmfs.remote.base import FetchedChunk, FileSource, Remote
from mmfs.tiers.disk import DiskTier
from mmfs.tiers.memory import MemoryTier
from mmfs.vfs import ROOT_INODE, Vfs, VfsConfig

COMMIT = "a" * 40
CHUNK = 4096
REPO = RepoRef("huggingface", "org", "model")


def payload(n: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(n)


FILES = {"config.json": b'{"a": 1}\n', "weights/model.bin": payload(10 * CHUNK + 5), "weights/empty": b""}


class FakeRemote(Remote):
    url = "fake://remote"

    def __init__(self, files: dict[str, bytes], delay: float = 0.0) -> None:
        self.files = files
        self.delay = delay
        self.fetches: list[tuple[str, int]] = []

    async def resolve(self, repo, revision, *, auth=None):
        if repo != REPO:
            raise RepoNotFound(f"{repo}")
        if revision not in ("main", COMMIT):
            raise RevisionNotFound(revision)
        return COMMIT

    async def manifest(self, repo, commit, *, auth=None):
        if commit != COMMIT:
            raise RevisionNotFound(commit)
        return Manifest(repo, commit, tuple(FileEntry(p, len(d), SHA256, hashlib.sha256(d).hexdigest(), CHUNK)
                                            for p, d in sorted(self.files.items())))

    async def check_access(self, source, *, auth=None):
        return "open"

    async def fetch_chunk(self, source, index, *, auth=None):
        await trio.sleep(self.delay)
        self.fetches.append((source.entry.path, index))
        start, end = source.entry.chunk_span(index)
        return FetchedChunk(self.files[source.entry.path][start:end])


async def _vfs(tmp_path, remote, **config) -> tuple[FetchEngine, Vfs]:
    engine = FetchEngine([MemoryTier(1 << 20), DiskTier(tmp_path / "chunks", 1 << 20)], remote,
                         MetadataStore(tmp_path / "meta"), EngineConfig())
    return engine, Vfs(engine, VfsConfig(**config))


async def walk(vfs: Vfs, *names: str) -> int:
    inode = ROOT_INODE
    for name in names:
        inode = (await vfs.lookup(inode, name)).inode
    return inode


async def test_namespace_and_attributes(tmp_path) -> None:
    remote = FakeRemote(FILES)
    engine, vfs = await _vfs(tmp_path, remote)
    async with engine:
        ref = await walk(vfs, "huggingface", "org", "model", "main")
        attr = await vfs.getattr(ref)
        assert stat.S_ISLNK(attr.mode) and attr.timeout == vfs.config.ref_timeout
        assert await vfs.readlink(ref) == COMMIT
        commit = await walk(vfs, "huggingface", "org", "model", COMMIT)
        assert stat.S_ISDIR((await vfs.getattr(commit)).mode)
        assert [n for n, _ in await vfs.listdir(commit)] == ["config.json", "weights"]
        weights = (await vfs.lookup(commit, "weights")).inode
        listing = dict(await vfs.listdir(weights))
        assert listing["model.bin"].size == len(FILES["weights/model.bin"])
        assert listing["model.bin"].mode == stat.S_IFREG | 0o444
        assert listing["model.bin"].timeout == vfs.config.immutable_timeout
        # same name, same inode
        assert (await vfs.lookup(weights, "model.bin")).inode == listing["model.bin"].inode
        # listings show what is known
        assert [n for n, _ in await vfs.listdir(await walk(vfs, "huggingface"))] == ["org"]
        repo_listing = [n for n, _ in await vfs.listdir(await walk(vfs, "huggingface", "org", "model"))]
        assert repo_listing == ["main", COMMIT]
        assert remote.fetches == []  # no content for any of that


@pytest.mark.parametrize("path,err", [
    (("gcs",), errno.ENOENT),
    (("huggingface", "a..b"), errno.ENOENT),
    (("huggingface", "x" * 97), errno.ENOENT),
    (("huggingface", "org", "other"), errno.ENOENT),
    (("huggingface", "org", "model", "dev"), errno.ENOENT),
    (("huggingface", "org", "model", "b" * 40), errno.ENOENT),
    (("huggingface", "org", "model", COMMIT, "nope"), errno.ENOENT),
    (("huggingface", "org", "model", COMMIT, "config.json", "x"), errno.ENOTDIR),
])
async def test_lookup_errors(tmp_path, path, err) -> None:
    engine, vfs = await _vfs(tmp_path, FakeRemote(FILES))
    async with engine:
        with pytest.raises(MmfsError) as info:
            await walk(vfs, *path)
        assert info.value.errno == err


async def test_random_org_lookups_leave_the_inode_table_bounded(tmp_path) -> None:
    engine, vfs = await _vfs(tmp_path, FakeRemote(FILES), max_provisional_orgs=64)
    async with engine:
        model = await walk(vfs, "huggingface", "org", "model")  # "org" resolved: permanent
        baseline = vfs.statistics().inodes
        inodes = set()
        for i in range(10_000):  # stat mnt/huggingface/<random>: any valid org answers
            inodes.add(await walk(vfs, "huggingface", f"random-{i}"))
            if i % 1000 == 0:  # ...and a repo under it that does not exist is ENOENT
                with pytest.raises(NotFound):
                    await walk(vfs, "huggingface", f"random-{i}", "nothing")
        assert len(inodes) == 10_000  # numbers are never reused
        assert vfs.statistics().inodes <= baseline + 64
        assert vfs.statistics().provisional_inodes == 64
        assert await walk(vfs, "huggingface", "org", "model") == model  # permanent entries stay
        # An org the LRU dropped while the kernel still held it answers ESTALE (the
        # kernel then looks it up afresh), never another org's entries.
        with pytest.raises(MmfsError) as info:
            await vfs.lookup(min(inodes), "model")
        assert info.value.errno == errno.ESTALE


async def test_forget_frees_provisional_orgs(tmp_path) -> None:
    engine, vfs = await _vfs(tmp_path, FakeRemote(FILES))
    async with engine:
        await walk(vfs, "huggingface")
        baseline = vfs.statistics().inodes
        looked_up = {}
        for i in range(100):
            inode = await walk(vfs, "huggingface", f"random-{i}")
            await walk(vfs, "huggingface", f"random-{i}")  # twice: the kernel holds 2 references
            looked_up[inode] = 2
        assert vfs.statistics().inodes == baseline + 100
        for inode in looked_up:
            vfs.forget(inode, 1)
        assert vfs.statistics().inodes == baseline + 100  # still held once
        for inode in looked_up:
            vfs.forget(inode, 1)
        assert vfs.statistics().inodes == baseline and vfs.statistics().provisional_inodes == 0
        vfs.forget(max(looked_up), 1)  # a late or repeated forget is harmless


async def test_org_of_a_repo_not_seen_yet_becomes_permanent(tmp_path) -> None:
    engine, vfs = await _vfs(tmp_path, FakeRemote(FILES), max_provisional_orgs=4)
    async with engine:
        # The kernel looks up "org" (unknown until now), then "model" under it.
        org = (await vfs.lookup(await walk(vfs, "huggingface"), "org")).inode
        assert vfs.statistics().provisional_inodes == 1
        model = (await vfs.lookup(org, "model")).inode
        assert vfs.statistics().provisional_inodes == 0
        for i in range(100):
            await walk(vfs, "huggingface", f"random-{i}")
        vfs.forget(org, 1)  # forgetting a permanent entry frees nothing
        assert await walk(vfs, "huggingface", "org") == org
        assert await walk(vfs, "huggingface", "org", "model") == model
        assert [name for name, _ in await vfs.listdir(await walk(vfs, "huggingface"))] == ["org"]


async def test_reads_exact_and_short_only_at_eof(tmp_path) -> None:
    data = FILES["weights/model.bin"]
    remote = FakeRemote(FILES)
    engine, vfs = await _vfs(tmp_path, remote)
    async with engine:
        inode = await walk(vfs, "huggingface", "org", "model", COMMIT, "weights", "model.bin")
        opened = await vfs.open(inode)
        assert opened.keep_cache and not opened.direct_io
        for offset, size in [(0, 100), (1000, 100), (1020, 3000), (0, len(data) + 50), (len(data) - 3, 10),
                             (len(data), 10)]:
            got = bytes(await vfs.read(opened.handle, offset, size))
            assert got == data[offset:offset + size], (offset, size)
        await vfs.release(opened.handle)
        with pytest.raises(MmfsError) as info:
            await vfs.open(inode, writable=True)
        assert info.value.errno == errno.EROFS
        empty = await vfs.open(await walk(vfs, "huggingface", "org", "model", COMMIT, "weights", "empty"))
        assert await vfs.read(empty.handle, 0, 4096) == b""


async def test_an_empty_file_listed_under_another_contents_hash_is_eio(tmp_path) -> None:
    """A zero-byte file has no chunk to verify: its listed hash is its whole check."""

    class ListsAWrongHash(FakeRemote):
        async def manifest(self, repo, commit, *, auth=None):
            right = await super().manifest(repo, commit, auth=auth)
            lying = FileEntry("weights/empty", 0, SHA256, hashlib.sha256(b"not empty").hexdigest(), CHUNK)
            return Manifest(repo, commit, tuple(lying if f.path == lying.path else f for f in right.files))

    engine, vfs = await _vfs(tmp_path, ListsAWrongHash(FILES))
    async with engine:
        inode = await walk(vfs, "huggingface", "org", "model", COMMIT, "weights", "empty")
        with pytest.raises(MmfsError) as info:
            await vfs.open(inode)
        assert info.value.errno == errno.EIO and "not the hash of empty content" in str(info.value)
        entry = vfs.node(inode).entry
        with pytest.raises(MmfsError):
            await engine.read(FileSource(REPO, COMMIT, entry), 0, 10)


async def test_sequential_reader_prefetches_ahead(tmp_path) -> None:
    data = payload(64 * CHUNK, seed=2)
    remote = FakeRemote({"big.bin": data})
    engine, vfs = await _vfs(tmp_path, remote)
    async with engine:
        opened = await vfs.open(await walk(vfs, "huggingface", "org", "model", COMMIT, "big.bin"))
        assert bytes(await vfs.read(opened.handle, 0, CHUNK)) == data[:CHUNK]
        assert bytes(await vfs.read(opened.handle, CHUNK, CHUNK)) == data[CHUNK:2 * CHUNK]
        with trio.fail_after(30):  # hang guard only: the read-ahead runs in the background
            while engine.statistics().inflight:
                await trio.sleep(0.01)
        fetched = {i for _, i in remote.fetches}
        assert fetched >= {0, 1, 2, 3, 4, 5}  # window 2, then 4 ahead
        assert vfs.statistics().readahead_chunks >= 5


async def test_status_describes_repos_and_tiers(tmp_path) -> None:
    engine, vfs = await _vfs(tmp_path, FakeRemote(FILES))
    async with engine:
        await walk(vfs, "huggingface", "org", "model", "main")
        opened = await vfs.open(await walk(vfs, "huggingface", "org", "model", COMMIT, "config.json"))
        await vfs.read(opened.handle, 0, 100)
        status_inode = await walk(vfs, ".mmfs", "status.json")
        handle = await vfs.open(status_inode)
        assert handle.direct_io
        import json

        status = json.loads(await vfs.read(handle.handle, 0, 1 << 20))
        assert status["repos"][0]["repo"] == "huggingface/org/model"
        assert status["repos"][0]["refs"] == {"main": COMMIT}
        assert {t["name"] for t in status["tiers"]} == {"memory", "disk"}
        assert status["remote"]["bytes"] == len(FILES["config.json"])


async def test_slow_remote_is_bounded(tmp_path) -> None:
    remote = FakeRemote(FILES, delay=10)
    engine, vfs = await _vfs(tmp_path, remote, remote_timeout=0.3)
    async with engine:
        opened = await vfs.open(await walk(vfs, "huggingface", "org", "model", COMMIT, "config.json"))
        with trio.fail_after(3):
            with pytest.raises(UpstreamError) as info:
                await vfs.read(opened.handle, 0, 10)
        assert info.value.errno == errno.EIO


async def test_unreachable_remote_with_unknown_repo_is_eio(tmp_path) -> None:
    class Down(FakeRemote):
        async def resolve(self, repo, revision, *, auth=None):
            raise UpstreamError("connection refused")

    engine, vfs = await _vfs(tmp_path, Down(FILES))
    async with engine:
        with pytest.raises(UpstreamError):
            await walk(vfs, "huggingface", "org", "model")
        with pytest.raises(NotFound):
            await walk(vfs, "nope")


# -- read-ahead ------------------------------------------------------------------------


def test_read_ahead_window_doubles_and_resets() -> None:
    ra = ReadAhead(chunk_size=100, chunk_count=1000, config=ReadAheadConfig(initial_chunks=2, max_chunks=8))
    assert ra.on_read(0, 50) == range(1, 3)
    assert ra.on_read(50, 50) == range(0)  # same chunk, already requested
    assert ra.on_read(100, 100) == range(3, 6)  # chunk 1: window 4
    assert ra.on_read(200, 100) == range(6, 11)  # window 8
    assert ra.on_read(300, 100) == range(11, 12)  # capped at 8
    assert ra.window == 8
    assert ra.on_read(90_000, 10) == range(0)  # a jump: random readers get nothing extra
    assert ra.window == 0 and ra.resets == 1
    assert ra.on_read(90_010, 100) == range(902, 904)  # contiguous again: window 2
    assert ra.on_read(99_990, 100) == range(0)  # clipped at the end of the file


def test_read_ahead_tolerates_out_of_order_kernel_requests() -> None:
    ra = ReadAhead(chunk_size=100, chunk_count=1000)
    ra.on_read(0, 100)
    ra.on_read(100, 100)
    ra.on_read(300, 100)  # the kernel's parallel readahead: 200 arrives after 300
    ra.on_read(200, 100)
    assert ra.window > 0 and ra.resets == 0


def test_random_first_read_does_not_prefetch() -> None:
    ra = ReadAhead(chunk_size=100, chunk_count=1000)
    assert ra.on_read(5_000, 10) == range(0)
    with pytest.raises(ValueError):
        ReadAheadConfig(initial_chunks=4, max_chunks=2)
