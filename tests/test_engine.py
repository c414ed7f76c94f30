"""The fetch engine over real tiers and an in-process remote (a fake is fine below the data
path's edges: the real upstream is exercised by the backend and mount tests)."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from mmfs.chunkmap import ChunkMap, block_digests
from mmfs.engine import EngineConfig, FetchEngine, Served
from mmfs.errors import AccessDenied, IntegrityError, InvalidName, NotFound, UpstreamError
from mmfs.manifest import SHA256, FileEntry, Manifest
from mmfs.metadata import MetadataStore
from mmfs.names import parse_repo_id
from mmfs.remote.base import FetchedChunk, FileSource, Remote
from mmfs.tiers.disk import DiskTier
from mmfs.tiers.memory import MemoryTier

REPO = parse_repo_id("org/model")
COMMIT = "c" * 40
CHUNK = 4096


class BytesRemote(Remote):
    """Serves files from a dict, counting fetches; can corrupt or fail on demand."""

    def __init__(self, files: dict[str, bytes], *, delay: float = 0.0) -> None:
        self.files = files
        self.delay = delay
        self.fetches = 0
        self.corrupt = False
        self.down = False

    async def resolve(self, repo, revision, *, auth=None):
        if self.down:
            raise UpstreamError("down")
        if revision != "main":
            raise NotFound(revision)
        return COMMIT

    async def manifest(self, repo, commit, *, auth=None):
        entries = tuple(FileEntry(p, len(d), SHA256, hashlib.sha256(d).hexdigest(), CHUNK)
                        for p, d in sorted(self.files.items()))
        return Manifest(repo, commit, entries)

    async def check_access(self, source, *, auth=None):
        return "open"

    async def fetch_chunk(self, source, index, *, auth=None):
        if self.down:
            raise UpstreamError("down")
        self.fetches += 1
        await trio.sleep(self.delay)
        start, end = source.entry.chunk_span(index)
        data = self.files[source.entry.path][start:end]
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return FetchedChunk(data)


def payload(n: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(n)


async def _open(remote, tmp_path, memory=1 << 20, disk=1 << 20):
    tiers = [MemoryTier(memory), DiskTier(tmp_path / "chunks", disk)]
    return FetchEngine(tiers, remote, MetadataStore(tmp_path / "meta"), EngineConfig())


async def test_reads_are_exact_and_cached(tmp_path):
    data = payload(10 * CHUNK + 17)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        assert await engine.read(source, 0, len(data) + 100) == data
        assert await engine.read(source, 1000, 3000) == data[1000:4000]
        assert remote.fetches == 11
        assert engine.is_verified(source.entry)


async def test_concurrent_readers_share_one_fetch(tmp_path):
    data = payload(4 * CHUNK)
    remote = BytesRemote({"w.bin": data}, delay=0.05)
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        results = []

        async def reader():
            results.append(await engine.read(source, 0, len(data)))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(reader)
        assert results == [data] * 50
        assert remote.fetches == 4


async def test_corrupted_upstream_fails_and_caches_nothing(tmp_path):
    data = payload(3 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    remote.corrupt = True
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        with pytest.raises(IntegrityError):
            await engine.read(source, 0, len(data))
        assert all(t.statistics().entries == 0 for t in engine.tiers)
        remote.corrupt = False
        assert await engine.read(source, 0, len(data)) == data


async def test_restart_serves_from_disk_and_offline_refs(tmp_path):
    data = payload(5 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        await engine.read(source, 0, len(data))
    remote2 = BytesRemote({"w.bin": data})
    remote2.down = True
    async with await _open(remote2, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        assert await engine.read(source, 0, len(data)) == data
        assert remote2.fetches == 0


async def test_disk_tier_stays_under_its_limit(tmp_path):
    data = payload(40 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path, memory=4 * CHUNK, disk=8 * CHUNK) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        assert await engine.read(source, 0, len(data)) == data
        disk = engine.tiers[1].statistics()
        assert disk.used_bytes <= 8 * CHUNK and disk.evictions > 0
        assert engine.is_verified(source.entry)


async def test_damaged_disk_chunk_is_a_miss(tmp_path):
    data = payload(2 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        await engine.read(source, 0, len(data))
    for f in (tmp_path / "chunks" / "data").rglob("*"):
        if f.is_file():  # one sparse file per content: chunk 0 at offset 0
            with open(f, "r+b") as out:
                out.write(b"\0" * CHUNK)
    async with await _open(remote, tmp_path) as engine:
        source = FileSource(REPO, COMMIT, (await engine.manifest(REPO, "main")).file("w.bin"))
        assert await engine.read(source, 0, CHUNK) == data[:CHUNK]
        assert remote.fetches == 3


async def test_refetch_of_a_verified_file_is_checked_against_its_chunk_digests(tmp_path):
    data = payload(4 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path) as engine:
        source = FileSource(REPO, COMMIT, (await engine.manifest(REPO, "main")).file("w.bin"))
        assert await engine.read(source, 0, len(data)) == data and engine.is_verified(source.entry)
        for tier in engine.tiers:  # evicted everywhere; the upstream now serves other bytes
            await tier.discard(source.entry.content_id)
        remote.corrupt = True
        with pytest.raises(IntegrityError):
            await engine.read(source, CHUNK, 10)
    async with await _open(remote, tmp_path) as engine:  # the reference survives a restart
        source = FileSource(REPO, COMMIT, (await engine.manifest(REPO, "main")).file("w.bin"))
        with pytest.raises(IntegrityError):
            await engine.read(source, 0, 10)
        remote.corrupt = False
        assert await engine.read(source, 0, len(data)) == data


async def _source(engine: FetchEngine, path: str = "w.bin") -> FileSource:
    manifest = await engine.manifest(REPO, "main")
    return FileSource(REPO, manifest.commit, manifest.file(path))


async def test_a_reader_given_a_bad_provisional_chunk_never_gets_the_end(tmp_path):
    # A chunk hashed into the whole-file check, evicted, then fetched again corrupt and
    # served: the file verifies (with the good copy), the bad copy is dropped, and the
    # reader who got it fails at the end instead of completing a wrong file.
    data = payload(6 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with FetchEngine([MemoryTier(2 * CHUNK)], remote, MetadataStore(tmp_path / "meta")) as engine:
        source = await _source(engine)
        for index in range(3):  # chunks 0-2 hashed, in order; memory keeps the last 2
            await engine.read(source, index * CHUNK, CHUNK)
        remote.corrupt = True
        reader = Served()
        assert await engine.read(source, 0, CHUNK, served=reader) != data[:CHUNK]
        remote.corrupt = False
        with pytest.raises(IntegrityError):
            await engine.read(source, 0, len(data), served=reader)
        chunk_map = engine.known_map(source.entry)
        assert chunk_map is not None and chunk_map.matches(0, block_digests(data[:CHUNK]))
        assert await engine.read(source, 0, len(data), served=Served()) == data


async def test_the_end_of_a_file_waits_for_its_map(tmp_path):
    # A tail-first reader (torch.load of a zip) gets the end only once the whole file
    # matched its hash; it gets it then, from one read.
    data = payload(5 * CHUNK + 5)
    remote = BytesRemote({"w.bin": data}, delay=0.01)
    async with FetchEngine([MemoryTier(1 << 20)], remote) as engine:
        source = await _source(engine)
        assert await engine.read(source, len(data) - 10, 10) == data[-10:]
        assert remote.fetches == 6 and engine.is_verified(source.entry)


async def test_a_new_chunk_size_reuses_the_map_where_blocks_line_up(tmp_path):
    # The backend's --chunk-size changed: the same content cut into other chunks. Its map
    # for the new size follows from the old one; nothing fails.
    from mmfs.chunkmap import BLOCK_SIZE
    data = payload(8 * BLOCK_SIZE + 3)
    digests = b"".join(block_digests(data[i:i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE))
    old = ChunkMap("sha256-" + "a" * 64, len(data), 4 * BLOCK_SIZE, digests)
    new = old.recut(2 * BLOCK_SIZE)
    assert new is not None and new.chunk_count == 5
    assert new.matches(1, block_digests(data[2 * BLOCK_SIZE:4 * BLOCK_SIZE]))
    assert old.recut(3000) is None  # blocks would not line up: the file is verified again
    metadata = MetadataStore(tmp_path / "meta")
    metadata.put_map(old, verified_here=True)
    entry = FileEntry("w.bin", len(data), SHA256, "a" * 64, 2 * BLOCK_SIZE)
    async with FetchEngine([MemoryTier(1 << 20)], BytesRemote({}), metadata) as engine:
        assert engine.known_map(entry) == new


def test_manifest_entries_from_the_network_are_validated():
    good = {"path": "a/b.bin", "size": 1, "hash_algo": SHA256, "hash": "a" * 64, "chunk_size": CHUNK}
    assert FileEntry.from_json(good).path == "a/b.bin"
    for bad in ({"hash": "a-/../../etc/cron.d/x"}, {"hash": "A" * 64}, {"hash_algo": "md5"},
                {"path": "../x"}, {"path": "/abs"}, {"size": -1}, {"chunk_size": 0}, {"chunk_size": 1 << 40}):
        with pytest.raises((ValueError, InvalidName)):
            FileEntry.from_json({**good, **bad})
    manifest = Manifest(REPO, COMMIT, (FileEntry.from_json(good),))
    with pytest.raises(ValueError):
        Manifest.loads(manifest.dumps().replace(COMMIT.encode(), b"../../x"))


async def test_held_chunk_offers_peers_verified_copies_only(tmp_path):
    """What a node's peer server may send (mmfs/peer_server.py): verified copies, never provisional ones."""
    data = payload(3 * CHUNK)
    remote = BytesRemote({"w.bin": data})
    async with await _open(remote, tmp_path) as engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        key = source.entry.chunk_key(0)
        assert await engine.held_chunk(key, 0.0) is None  # not held: a peer server never fetches
        assert remote.fetches == 0
        await engine.read(source, 0, CHUNK)  # chunk 0 alone: the file is not verified yet
        assert await engine.held_chunk(key, 0.0) is None
        assert key not in engine.held_keys()
        await engine.read(source, 0, len(data))  # the whole file: verified, its map made
        await engine.flush()
        held = await engine.held_chunk(key, 0.0)
        assert held is not None and bytes(held.data) == data[:CHUNK]
        assert {source.entry.chunk_key(i) for i in range(3)} <= engine.held_keys()


class GatedRemote(BytesRemote):
    """Serves chunks only to the tokens in ``allowed``; each fetch waits for ``release``."""

    def __init__(self, files: dict[str, bytes], allowed: set[str]) -> None:
        super().__init__(files)
        self.allowed = allowed
        self.release = trio.Event()
        self.asked = trio.Event()
        self.asked_with: list[str | None] = []

    async def fetch_chunk(self, source, index, *, auth=None):
        self.asked_with.append(auth)
        self.asked.set()
        await self.release.wait()
        if auth not in self.allowed:
            raise AccessDenied(f"{auth} has no access")
        return await super().fetch_chunk(source, index, auth=auth)


async def test_a_token_revoked_during_a_shared_fetch_fails_only_its_owner(tmp_path):
    """Readers share one fetch per chunk, made with the first reader's token; when the
    upstream refuses that token (revoked meanwhile), the others retry with their own
    instead of all failing."""
    data = payload(CHUNK)
    remote = GatedRemote({"w.bin": data}, allowed={"Bearer b", "Bearer c"})
    # Memory only: a disk tier's lookups run in worker threads, which
    # wait_all_tasks_blocked cannot see, so b and c might not have joined yet.
    engine = FetchEngine([MemoryTier(1 << 20)], remote, MetadataStore(tmp_path / "meta"), EngineConfig())
    async with engine:
        manifest = await engine.manifest(REPO, "main")
        source = FileSource(REPO, manifest.commit, manifest.file("w.bin"))
        results: dict[str, bytes | Exception] = {}

        async def reader(auth: str) -> None:
            try:
                results[auth] = await engine.read(source, 0, len(data), auth=auth)
            except AccessDenied as exc:
                results[auth] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, "Bearer a")  # starts the shared fetch with its revoked token
            await remote.asked.wait()
            nursery.start_soon(reader, "Bearer b")
            nursery.start_soon(reader, "Bearer c")
            await trio.testing.wait_all_tasks_blocked()
            assert remote.asked_with == ["Bearer a"]  # b and c joined a's fetch
            remote.release.set()
        assert results["Bearer b"] == results["Bearer c"] == data
        # Fetched again with a token of theirs. (Who may read what is not the engine's call:
        # the backend's access check and the node's gate decide that before any read.)
        assert remote.asked_with[0] == "Bearer a" and {"Bearer b", "Bearer c"} & set(remote.asked_with[1:])
