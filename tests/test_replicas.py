"""Backend replicas: chunk ownership, the shared cold tier, failover, rolling updates.

The "must show" tests run real processes on loopback addresses (127.0.0.2, 127.0.0.3):
the test hub as the upstream, two ``mmfs-backend serve --replicas`` and real FUSE mounts
(``mmfs mount --backend URL,URL``) as nodes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import backend_server.testing as backend_testing
from backend_server.datadir import filesystem_of, is_network_filesystem
from mmfs.chunkmap import ChunkMap, block_digests
from mmfs.manifest import ChunkKey
from mmfs.remote.replicas import Replica, ReplicaSet, expand, parse_replica_urls, rank
from mmfs.errors import InvalidName
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import free_port
from mmfs.tiers import codec
from mmfs.tiers.base import Chunk
from mmfs.tiers.shared import SharedTier

CHUNK = 256 << 10


# -- ownership ---------------------------------------------------------------------------


def _replicas(n: int) -> list[Replica]:
    return [Replica(f"10.0.0.{i}:3000", f"http://10.0.0.{i}:3000") for i in range(1, n + 1)]


def test_rendezvous_spreads_chunks_and_a_lost_replica_moves_only_its_share() -> None:
    three = _replicas(3)
    keys = [f"sha256-{i:064x}.4194304.{j}" for i in range(20) for j in range(50)]
    owners = {key: rank(three, key)[0].id for key in keys}
    counts = {r.id: sum(1 for o in owners.values() if o == r.id) for r in three}
    assert all(len(keys) / 3 * 0.8 < c < len(keys) / 3 * 1.2 for c in counts.values()), counts
    # The same on every machine: the order depends on ids and key only, not on list order.
    assert all(rank(list(reversed(three)), k) == rank(three, k) for k in keys[:50])
    two = [r for r in three if r.id != "10.0.0.2:3000"]
    for key in keys:
        order = rank(three, key)
        if order[0].id != "10.0.0.2:3000":
            assert rank(two, key)[0] == order[0]  # nobody else's chunks move
        else:
            assert rank(two, key)[0] == order[1]  # its share goes to the next in order


def test_a_replica_that_does_not_answer_goes_last_until_it_is_back() -> None:
    replicas = ReplicaSet(["http://127.0.0.2:1", "http://127.0.0.3:1"], down_for=60)
    key = "sha256-ab.262144.0"
    first, second = replicas.order(key)
    replicas.mark_down(first, "test")
    assert replicas.order(key) == [second, first]
    replicas.mark_up(first)
    assert replicas.order(key) == [first, second]


def test_a_name_is_one_replica_per_address_and_dual_stack_is_one_server() -> None:
    assert expand("http://127.0.0.2:3000") == [Replica("127.0.0.2:3000", "http://127.0.0.2:3000")]
    assert [r.id for r in expand("http://localhost:3000")] == ["127.0.0.1:3000"]
    assert [r.id for r in expand("http://[::1]:3000")] == ["[::1]:3000"]
    both = ReplicaSet(["http://127.0.0.2:3000", "http://127.0.0.3:3000", "http://127.0.0.2:3000"])
    assert [r.id for r in both.members] == ["127.0.0.2:3000", "127.0.0.3:3000"]


def test_replica_urls_are_checked() -> None:
    assert parse_replica_urls("http://a:3000, http://b:3000/") == ["http://a:3000", "http://b:3000"]
    for bad in ("", "a:3000", "http://a:3000/v1", "ftp://a", "http://a:port"):
        with pytest.raises(InvalidName):
            parse_replica_urls(bad)


# -- the shared cold tier ------------------------------------------------------------------


def _weights(n: int, seed: int) -> bytes:
    """bf16-like bytes: the high bytes of normally distributed float32s."""
    import numpy as np

    values = np.random.default_rng(seed).standard_normal(n // 2).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def test_codec_round_trips_and_groups_16_bit_weights() -> None:
    weights = _weights(CHUNK, 1)
    for data in (weights, weights + b"odd", os.urandom(70001), b"{}" * 5000, b""):
        for compression in ("zstd", "none"):
            assert codec.decode(codec.encode(data, compression)) == data
    grouped = codec.encode(weights, "zstd")
    assert codec.choose(weights) in (2, 4)
    assert len(grouped) < len(codec.HEADER.pack(codec.MAGIC, 0, 1, 0)) + len(
        __import__("zstandard").ZstdCompressor(level=codec.LEVEL).compress(weights))
    assert codec.encode(os.urandom(CHUNK), "zstd")[8] == codec.RAW  # noise is stored raw
    with pytest.raises(codec.CorruptObject):
        codec.decode(grouped[:-10])
    with pytest.raises(codec.CorruptObject):
        codec.decode(b"not an object at all")


def _file(data: bytes, content_id: str = "sha256-" + "ab" * 32) -> tuple[ChunkMap, list[Chunk]]:
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    digests = [block_digests(c) for c in chunks]
    return (ChunkMap(content_id, len(data), CHUNK, b"".join(digests)),
            [Chunk(c, d, False) for c, d in zip(chunks, digests)])


async def test_two_writers_share_verified_objects_and_adopt_each_others(tmp_path: Path) -> None:
    root = tmp_path / "rwx"
    a = SharedTier(root, 1 << 30, compression="zstd")
    b = SharedTier(root, 1 << 30, compression="none")
    chunk_map, chunks = _file(_weights(3 * CHUNK + 1000, 2))
    keys = [ChunkKey(chunk_map.content_id, CHUNK, i) for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        await a.put(key, chunk)  # provisional: staged, invisible to b
    assert [await b.get(k) for k in keys] == [None] * len(keys)
    assert not list((root / "objects").rglob("*.*.*"))
    wrong = Chunk(b"x" * CHUNK, block_digests(b"x" * CHUNK), False)
    await b.put(keys[1], wrong)  # b received a bad copy of chunk 1
    assert await a.settle(chunk_map) == []
    got = [await b.get(k) for k in keys]
    assert all(c is not None and c.verified for c in got)
    assert b"".join(c.data for c in got) == b"".join(c.data for c in chunks)  # type: ignore[union-attr]
    assert a.compression_ratio < 0.95  # byte-grouped zstd at rest
    await b.sweep()  # b finds the map a published: its staged bad copy goes, never published
    assert (await b.get(keys[1])).data == chunks[1].data  # type: ignore[union-attr]
    assert not any(p.is_file() for p in (root / "staging").rglob("*")) and b.contains(keys[1])
    # Wrong bytes in a well-formed object (a buggy or hostile writer) are caught by the map;
    # a torn object by its codec. Either is removed and is a miss, never served.
    wrong_object = next((root / "objects").rglob(f"*.{CHUNK}.2"))
    wrong_object.write_bytes(codec.encode(chunks[1].data, "none"))
    torn = next((root / "objects").rglob(f"*.{CHUNK}.0"))
    torn.write_bytes(torn.read_bytes()[:-100])
    c = SharedTier(root, 1 << 30)
    assert await c.get(keys[2]) is None and not wrong_object.exists()
    assert await c.get(keys[0]) is None and not torn.exists()
    assert c.statistics().errors == 2
    for tier in (a, b, c):
        await tier.aclose()
    assert list((root / "staging").iterdir()) == []


async def test_shared_tier_evicts_least_recently_used_and_discards(tmp_path: Path) -> None:
    chunk_map, chunks = _file(os.urandom(4 * CHUNK))
    tier = SharedTier(tmp_path / "rwx", 2 * CHUNK + 2 * codec.HEADER.size, compression="none")
    await tier.settle(chunk_map)
    keys = [ChunkKey(chunk_map.content_id, CHUNK, i) for i in range(4)]
    for key, chunk in zip(keys, chunks):
        await tier.put(key, Chunk(chunk.data, chunk.digests, True))
        await tier.get(keys[0])  # keep chunk 0 in use
    assert [tier.contains(k) for k in keys] == [True, False, False, True]
    assert await tier.discard(chunk_map.content_id) == 2
    assert not list((tmp_path / "rwx" / "objects").rglob("*.*.*"))
    assert await tier.get(keys[0]) is None
    await tier.aclose()


# -- real processes: two replicas, nodes, failover ----------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


class _Replicas:
    """Two replicas on 127.0.0.2 and 127.0.0.3 sharing one cold tier (an RWX volume's stand-in)."""

    def __init__(self, tmp: Path, hub_url: str, *extra: str) -> None:
        hosts = ["127.0.0.2", "127.0.0.3"]
        ports = [free_port(h) for h in hosts]
        self.urls = [f"http://{h}:{p}" for h, p in zip(hosts, ports)]
        self.processes = [
            backend_testing.BackendProcess(tmp / f"replica{i}", hub_url=hub_url, listen=f"{h}:{p}",
                                           chunk_size="256KiB", memory_cache="64MiB",
                                           extra_args=["--replicas", ",".join(self.urls), "--shared-dir",
                                                       str(tmp / "rwx"), *extra])
            for i, (h, p) in enumerate(zip(hosts, ports))]

    def __enter__(self) -> "_Replicas":
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.stop()


def _read_all(mounts: list[MountProcess], repo: str, names: list[str]) -> dict[tuple[int, str], str]:
    """Every node reads every file at once (one thread per node); sha256 per (node, file)."""
    got: dict[tuple[int, str], str] = {}
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            for name in names:
                got[(i, name)] = _sha(mounts[i].repo(repo) / name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(mounts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return got


@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_two_replicas_four_nodes_fetch_each_chunk_upstream_once(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "rep", 6 << 20, n_shards=2, seed=5)
    files = _model_files(hub_root / "org" / "rep")
    with TestHub(hub_root) as hub, _Replicas(tmp_path, hub.url) as replicas:
        mounts = [MountProcess(tmp_path / f"mnt{i}", tmp_path / f"cache{i}", backend=",".join(replicas.urls))
                  for i in range(4)]
        try:
            for mount in mounts:
                mount.start()
            got = _read_all(mounts, "org/rep", sorted(files))
            stats = hub.stats()
            status = mounts[0].status()
        finally:
            for mount in mounts:
                mount.stop()
        assert got == {(i, name): _sha(path) for i in range(4) for name, path in files.items()}
        chunks = sum(-(-path.stat().st_size // CHUNK) for path in files.values())
        # Each chunk left the upstream once for the cluster: as many ranged GETs as chunks
        # (each LFS one redirected to the CDN once), and as many bytes as the files hold.
        assert stats.requests_by_kind["resolve_get"] == chunks, stats.requests_by_kind
        for name, path in files.items():
            assert stats.bytes_by_path[f"org/rep/{name}"] == path.stat().st_size, name
        # Both replicas did their share, and the shared cold tier holds each chunk once.
        metrics = [p.metrics() for p in replicas.processes]
        assert all(m['mmfs_backend_served_bytes_total{tier="upstream"}'] > 0 for m in metrics)
        assert sum(m["mmfs_backend_upstream_bytes_total"] for m in metrics) == sum(
            p.stat().st_size for p in files.values())
        assert sum(m["mmfs_backend_replica_bytes_total"] for m in metrics) > 0  # the verifier asked the owners
        assert status["replicas"]["down"] == [] and len(status["replicas"]["answered"]) == 2
        objects = list((tmp_path / "rwx" / "objects").rglob("*.*.*"))
        assert len(objects) == chunks


@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_killing_a_replica_mid_read_every_reader_completes(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "big", 24 << 20, n_shards=1, seed=6)
    files = _model_files(hub_root / "org" / "big")
    total = sum(p.stat().st_size for p in files.values())
    with TestHub(hub_root, rate="12MB") as hub, _Replicas(tmp_path, hub.url) as replicas:
        mounts = [MountProcess(tmp_path / f"mnt{i}", tmp_path / f"cache{i}", backend=",".join(replicas.urls))
                  for i in range(4)]
        try:
            for mount in mounts:
                mount.start()
            result: dict[tuple[int, str], str] = {}
            reader = threading.Thread(target=lambda: result.update(_read_all(mounts, "org/big", sorted(files))))
            reader.start()
            deadline = time.monotonic() + 60
            while hub.stats().bytes_served < total // 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reader.is_alive(), "the read ended before a replica could be killed"
            replicas.processes[1].kill()  # SIGKILL, mid-read
            reader.join(150)
            assert not reader.is_alive()
            assert result == {(i, name): _sha(path) for i in range(4) for name, path in files.items()}
            assert mounts[0].status()["replicas"]["answered"].get(replicas.urls[0][7:], 0) > 0
        finally:
            for mount in mounts:
                mount.stop()


def test_hub_clients_at_any_replica_and_a_new_replica_adopts_the_shared_tier(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "api", 3 << 20, n_shards=2, seed=8)
    files = _model_files(hub_root / "org" / "api")
    chunks = sum(-(-path.stat().st_size // CHUNK) for path in files.values())
    with TestHub(hub_root) as hub, _Replicas(tmp_path, hub.url) as replicas:
        first, second = replicas.processes
        for name, path in files.items():  # a Hub client pointed at one replica (HF_ENDPOINT)
            assert second.get(f"/org/api/resolve/main/{name}") == path.read_bytes(), name
        assert hub.stats().requests_by_kind["resolve_get"] == chunks  # the owners fetched, once each
        # The first replica is replaced by a pod with a fresh local index (another node):
        # it adopts what the shared cold tier holds, checked against the published maps.
        first.stop()
        replacement = backend_testing.BackendProcess(
            tmp_path / "replica0-new", hub_url=hub.url, listen=replicas.urls[0][7:], chunk_size="256KiB",
            extra_args=["--replicas", ",".join(replicas.urls), "--shared-dir", str(tmp_path / "rwx")]).start()
        replicas.processes[0] = replacement
        hub.reset_stats()
        for name, path in files.items():
            assert replacement.get(f"/v1/file/huggingface/org/api/main/{name}") == path.read_bytes(), name
        assert hub.stats().requests_by_kind.get("resolve_get", 0) == 0
        metrics = replacement.metrics()
        assert metrics['mmfs_backend_tier_hits_total{tier="shared"}'] > 0
        assert metrics["mmfs_backend_upstream_bytes_total"] == 0
        assert metrics["mmfs_backend_files_verified"] == 0  # it took the maps the others published


# -- a rolling update: two processes on one data directory ---------------------------------


def test_a_data_dir_on_a_network_filesystem_is_recognised(tmp_path: Path) -> None:
    mountinfo = ("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
                 "40 22 0:40 / /mnt/rwx rw,relatime - nfs4 server:/export rw\n"
                 "41 22 0:41 / /mnt/rwx-cache rw - fuse.juicefs JuiceFS:x rw\n")
    assert filesystem_of(Path("/mnt/rwx/index"), mountinfo) == "nfs4"
    assert filesystem_of(Path("/mnt/rwx-cache"), mountinfo) == "fuse.juicefs"
    assert filesystem_of(Path("/var/lib/x"), mountinfo) == "ext4"
    assert is_network_filesystem("nfs4") and is_network_filesystem("fuse.juicefs")
    assert not is_network_filesystem("ext4")
    assert filesystem_of(tmp_path) and not is_network_filesystem(filesystem_of(tmp_path))  # the real mountinfo


def test_rolling_update_second_process_waits_and_loses_nothing(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "roll", 4 << 20, n_shards=1, seed=7)
    files = _model_files(hub_root / "org" / "roll")
    data = tmp_path / "backend"
    hub = TestHub(hub_root).start()
    old = backend_testing.BackendProcess(data, hub_url=hub.url, chunk_size="256KiB").start()
    new = backend_testing.BackendProcess(data, hub_url=hub.url, chunk_size="256KiB",
                                         log_path=tmp_path / "new.log")
    try:
        warm = subprocess.run([sys.executable, "-m", "mmfs", "prefetch", "huggingface/org/roll", "--backend", old.url],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert warm.returncode == 0, warm.stderr
        started = threading.Thread(target=new.start, kwargs={"timeout": 60})
        started.start()  # the new pod comes up while the old one still serves
        deadline = time.monotonic() + 20
        while "is in use by" not in new.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "is in use by" in new.log_text()
        # While it waits, the old one keeps serving and keeps writing its index.
        assert old.get(f"/v1/file/huggingface/org/roll/main/{sorted(files)[0]}") == files[sorted(files)[0]].read_bytes()
        hub.stop()  # from here on, only what the data directory holds
        assert old.stop() == 0
        started.join(60)
        assert new.url, new.log_text()
        for name, path in files.items():
            assert new.get(f"/v1/file/huggingface/org/roll/main/{name}") == path.read_bytes(), name
        assert new.metrics()["mmfs_backend_upstream_bytes_total"] == 0
        assert "quarantine" not in new.log_text() and "unusable" not in new.log_text()
    finally:
        old.stop()
        new.stop()
        hub.stop()
