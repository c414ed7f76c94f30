"""The backend server end to end: the test hub in this process, ``mmfs-backend serve`` as a
child process, real clients (huggingface_hub, BackendRemote, httpx) over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import trio
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError

from backend_server.testing import BackendProcess
from mmfs.engine import FetchEngine
from mmfs.errors import EntryNotFound, IntegrityError, RepoNotFound, RevisionNotFound
from mmfs.names import parse_repo_id
from mmfs.remote._http import RetryPolicy
from mmfs.chunkmap import ChunkMap, block_digests
from mmfs.remote.backend import VERIFIED_HEADER, BackendRemote
from mmfs.remote.base import FileSource
from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model
from mmfs.tiers.memory import MemoryTier

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture
def start_backend(tmp_path: Path, hub: TestHub) -> Iterator:
    """``start_backend(name="b", **options)`` runs a backend against ``hub``; all are stopped after."""
    running: list[BackendProcess] = []

    def start(name: str = "backend", **options: object) -> BackendProcess:
        backend = BackendProcess(tmp_path / name, hub_url=hub.url, **options)  # type: ignore[arg-type]
        running.append(backend.start())
        return backend

    yield start
    for backend in running:
        backend.stop()


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".hub" not in p.parts}


def synthetic(hub_root: Path, name: str, size: int, seed: int = 0) -> Path:
    return make_synthetic_model(hub_root / "org" / name, size, n_shards=1, seed=seed)


def test_real_model_through_backend_with_huggingface_hub(hub: TestHub, hub_root: Path, tmp_path: Path,
                                                         start_backend) -> None:
    backend = start_backend(env={"POD_NAME": "backend-test-0"})
    upstream = tree_files(hub_root / REAL_REPO_ID)
    assert "1_Pooling/config.json" in upstream and "model.safetensors" in upstream

    first = Path(snapshot_download(REAL_REPO_ID, endpoint=backend.url, cache_dir=tmp_path / "client-a"))
    assert tree_files(first) == upstream  # byte-identical, subfolder included
    total = sum(len(b) for b in upstream.values())
    assert hub.stats().bytes_served == total  # each byte fetched once

    hub.reset_stats()
    second = Path(snapshot_download(REAL_REPO_ID, endpoint=backend.url, cache_dir=tmp_path / "client-b"))
    assert tree_files(second) == upstream
    assert hub.stats().bytes_served == 0  # the second client cost the upstream nothing

    metrics = backend.metrics()
    assert metrics["mmfs_backend_upstream_bytes_total"] == total
    assert metrics['mmfs_backend_served_bytes_total{tier="upstream"}'] == total
    assert metrics['mmfs_backend_served_bytes_total{tier="memory"}'] == total
    assert metrics["mmfs_backend_files_verified"] == len(upstream)

    # The metadata DB: where each file came from, when, its hash; nothing left in flight.
    records = {r["content_id"]: r for r in json.loads(backend.get("/v1/files"))["files"]}
    sha = hashlib.sha256(upstream["model.safetensors"]).hexdigest()
    record = records[f"sha256-{sha}"]
    assert record["source_url"].endswith(f"/{REAL_REPO_ID}/resolve/{hub.commit(REAL_REPO_ID)}/model.safetensors")
    assert record["verified"] and record["downloaded_at"] > 0 and record["inflight_download"] == ""
    assert record["holder"] == "backend-test-0"
    assert len(records) == len(upstream)

    # A single file by the official client, with the Range it uses to resume.
    hub.reset_stats()
    path = hf_hub_download(REAL_REPO_ID, "1_Pooling/config.json", endpoint=backend.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == upstream["1_Pooling/config.json"]
    response = httpx.get(f"{backend.url}/{REAL_REPO_ID}/resolve/main/model.safetensors",
                         headers={"Range": "bytes=1000-"})
    assert response.status_code == 206 and response.content == upstream["model.safetensors"][1000:]
    assert hub.stats().bytes_served == 0


def test_restart_with_same_data_dir_costs_no_upstream_bytes(hub: TestHub, hub_root: Path, start_backend) -> None:
    repo = synthetic(hub_root, "restart", 3 << 20)
    files = tree_files(repo)
    backend = start_backend("data", chunk_size="256KiB")
    for path, data in files.items():
        assert httpx.get(f"{backend.url}/v1/file/huggingface/org/restart/main/{path}").content == data
    assert hub.stats().bytes_served == sum(map(len, files.values()))
    assert backend.stop() == 0

    hub.reset_stats()
    again = start_backend("data", chunk_size="256KiB")
    for path, data in files.items():
        assert httpx.get(f"{again.url}/v1/file/huggingface/org/restart/main/{path}").content == data
    assert hub.stats().bytes_served == 0
    metrics = again.metrics()
    assert metrics["mmfs_backend_upstream_bytes_total"] == 0
    assert metrics['mmfs_backend_served_bytes_total{tier="disk"}'] > 0


async def test_thundering_herd_one_upstream_fetch_and_bounded_rss(hub: TestHub, hub_root: Path,
                                                                  start_backend) -> None:
    repo = synthetic(hub_root, "herd", 24 << 20)
    data = (repo / SHARD).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    backend = start_backend(chunk_size="512KiB", memory_cache="32MiB")
    url = f"{backend.url}/v1/file/huggingface/org/herd/main/{SHARD}"
    hub.set_rate("200MB/s")  # slow enough that the readers overlap
    peak_rss = 0
    done = trio.Event()

    async def sample_rss() -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, backend.rss())
            await trio.sleep(0.02)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        # 50 readers of the same cold range (inside one chunk): one upstream request.
        ranged: list[bytes] = []

        async def read_range() -> None:
            response = await client.get(url, headers={"Range": "bytes=1600000-1700000"})
            assert response.status_code == 206
            ranged.append(response.content)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(read_range)
        assert ranged == [data[1600000:1700001]] * 50
        stats = hub.stats()  # one ranged GET upstream (the Hub's resolve redirect, then the LFS "CDN")
        assert stats.requests_by_kind.get("lfs_get") == 1 and stats.bytes_served == 512 << 10

        # 50 readers of the whole cold file at once.
        results: list[str] = []

        async def read_all() -> None:
            hasher = hashlib.sha256()
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                async for block in response.aiter_raw(1 << 20):
                    hasher.update(block)
            results.append(hasher.hexdigest())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            async with trio.open_nursery() as readers:
                for _ in range(50):
                    readers.start_soon(read_all)
            done.set()
    assert results == [digest] * 50
    upstream = hub.stats().bytes_by_path[f"org/herd/{SHARD}"]
    assert upstream <= 1.05 * len(data), f"{upstream} upstream bytes for a {len(data)}-byte file"
    metrics = backend.metrics()
    assert metrics["mmfs_backend_coalesced_requests_total"] >= 49
    assert metrics['mmfs_backend_served_bytes_total{tier="upstream"}'] > 0
    assert metrics["mmfs_backend_inflight_fetches"] == 0
    assert peak_rss <= (32 << 20) + (200 << 20), f"peak RSS {peak_rss >> 20} MiB"


async def test_node_protocol_with_backend_remote(hub: TestHub, hub_root: Path, start_backend) -> None:
    repo_dir = synthetic(hub_root, "node", (1 << 20) + 12345)
    files = tree_files(repo_dir)
    backend = start_backend(chunk_size="256KiB")
    repo = parse_repo_id("org/node")
    remote = BackendRemote(backend.url, policy=RetryPolicy(attempts=1))
    try:
        commit = await remote.resolve(repo, "main")
        assert commit == hub.commit("org/node")
        assert await remote.resolve(repo, commit) == commit
        manifest = await remote.manifest(repo, commit)
        assert {f.path: f.size for f in manifest.files} == {p: len(d) for p, d in files.items()}
        entry = manifest.file(SHARD)
        assert entry is not None and entry.is_lfs and entry.chunk_size == 256 << 10 and entry.chunk_count == 5
        source = FileSource(repo, commit, entry)
        pieces = []
        for index in range(entry.chunk_count):
            chunk = await remote.fetch_chunk(source, index)
            pieces.append(chunk.data)
        assert b"".join(pieces) == files[SHARD]
        # Serving the tail verified the file: the backend hands out its chunk map, whose
        # block digests are those of the true bytes.
        chunk_map = await remote.fetch_map(source)
        assert isinstance(chunk_map, ChunkMap)
        assert all(chunk_map.matches(i, block_digests(p)) for i, p in enumerate(pieces))
        assert (await remote.fetch_chunk(source, 0)).file_verified

        # The node's own engine over the backend checks each chunk against the map.
        async with FetchEngine([MemoryTier(64 << 20)], BackendRemote(backend.url)) as engine:
            node_manifest = await engine.manifest(repo, "main")
            source = FileSource(repo, node_manifest.commit, node_manifest.file(SHARD))
            assert await engine.read(source, 0, entry.size) == files[SHARD]
            config = FileSource(repo, node_manifest.commit, node_manifest.file("config.json"))
            assert await engine.read(config, 0, 1 << 20) == files["config.json"]

        # Errors come back as the same classes.
        with pytest.raises(RepoNotFound):
            await remote.resolve(parse_repo_id("org/missing"), "main")
        with pytest.raises(RevisionNotFound):
            await remote.resolve(repo, "no-such-branch")
        with pytest.raises(EntryNotFound):
            await remote.fetch_chunk(FileSource(repo, commit, entry.__class__("nope.bin", 10, "sha256", "0" * 64,
                                                                               entry.chunk_size)), 0)
        response = httpx.get(f"{backend.url}/v1/chunk/huggingface/org/node/{commit}/{SHARD}?index=2")
        assert response.headers[VERIFIED_HEADER] == "1"
        assert response.content == files[SHARD][2 << 18:3 << 18]
    finally:
        await remote.aclose()


def test_prefetch_endpoint_warms_without_sending_data(hub: TestHub, hub_root: Path, start_backend) -> None:
    repo_dir = synthetic(hub_root, "warm", 2 << 20)
    files = tree_files(repo_dir)
    backend = start_backend(chunk_size="256KiB")
    response = httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/warm/main", params={"include": "*.json"},
                          timeout=60)
    assert response.status_code == 200, response.text
    summary = response.json()
    json_files = [p for p in files if p.endswith(".json")]
    assert summary["files"] == len(json_files) and summary["commit"] == hub.commit("org/warm")
    assert summary["upstream_bytes"] == sum(len(files[p]) for p in json_files) and summary["errors"] == []
    assert len(response.content) < 2000  # a summary, not the data

    summary = httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/warm/main", timeout=60).json()
    assert summary["files"] == len(files) and summary["bytes"] == sum(map(len, files.values()))
    assert summary["upstream_bytes"] == len(files[SHARD])  # the JSON files were warm already
    hub.reset_stats()
    for path, data in files.items():
        assert httpx.get(f"{backend.url}/v1/file/huggingface/org/warm/main/{path}").content == data
    assert hub.stats().bytes_served == 0


def test_gated_repo_needs_the_callers_own_access(hub: TestHub, hub_root: Path, tmp_path: Path,
                                                 start_backend) -> None:
    files = restricted(hub_root, "gated", "tok-sesame-1234")
    backend = start_backend()  # no HF_TOKEN of its own
    url = f"{backend.url}/v1/file/huggingface/org/gated/main/{SHARD}"
    good = {"Authorization": "Bearer tok-sesame-1234"}

    denied = httpx.get(url)
    assert denied.status_code == 403 and denied.headers["X-Error-Code"] == "GatedRepo"
    assert "gated" in denied.json()["error"]
    allowed = httpx.get(url, headers=good)
    assert allowed.status_code == 200 and allowed.content == files[SHARD]
    assert httpx.head(url, headers=good).headers["X-Mmfs-Access"] == "gated"
    # Now cached, and still not served to callers without access.
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 403, headers
        assert response.content != files[SHARD]
    # A gated repo's metadata is public, as on the Hub: only content needs the grant.
    manifest = httpx.get(f"{backend.url}/v1/manifest/huggingface/org/gated/main")
    assert manifest.status_code == 200 and SHARD in manifest.text
    assert httpx.get(f"{backend.url}/api/models/org/gated").json()["gated"] == "manual"

    # The official client, both ways.
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", SHARD, endpoint=backend.url, cache_dir=tmp_path / "anon", token=False)
    path = hf_hub_download("org/gated", SHARD, endpoint=backend.url, cache_dir=tmp_path / "ok",
                           token="tok-sesame-1234")
    assert Path(path).read_bytes() == files[SHARD]
    assert "tok-sesame-1234" not in backend.log_text() and "Bearer" not in backend.log_text()
    assert "org/gated" in json.loads((backend.data_dir / "access.json").read_text())["restricted"]


def restricted(hub_root: Path, name: str, *tokens: str, kind: str = "gated", size: int = 1 << 20) -> dict[str, bytes]:
    """A synthetic repo that only ``tokens`` may read (``kind``: ``gated`` or ``private``)."""
    repo_dir = synthetic(hub_root, name, size)
    (repo_dir / ".hub").mkdir()
    (repo_dir / ".hub" / kind).write_text("\n".join(tokens))
    return tree_files(repo_dir)


def test_private_listings_are_checked_even_when_cached(hub: TestHub, hub_root: Path, start_backend) -> None:
    restricted(hub_root, "listed", "tok-listed", kind="private")
    backend = start_backend()  # no HF_TOKEN of its own
    commit = hub.commit("org/listed")
    good = {"Authorization": "Bearer tok-listed"}
    listings = ["/v1/resolve/huggingface/org/listed/main", f"/v1/manifest/huggingface/org/listed/{commit}",
                "/v1/manifest/huggingface/org/listed/main", "/api/models/org/listed",
                "/api/models/org/listed/revision/main", "/api/models/org/listed/tree/main"]
    # An authorized caller first: the engine now holds every listing.
    for target in listings:
        response = httpx.get(backend.url + target, headers=good)
        assert response.status_code == 200, target
    assert httpx.get(f"{backend.url}/api/models/org/listed", headers=good).json()["private"] is True
    # Callers without access get none of it, cached or not: the repo does not exist for them.
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for target in listings:
            response = httpx.get(backend.url + target, headers=headers)
            assert response.status_code == 404 and response.headers["X-Error-Code"] == "RepoNotFound", target
            assert commit not in response.text and SHARD not in response.text
        # Nor file names through prefetch errors, nor a file's absence through resolve.
        response = httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/listed/main", headers=headers)
        assert response.status_code == 404 and SHARD not in response.text
        response = httpx.head(f"{backend.url}/org/listed/resolve/main/nope.bin", headers=headers)
        assert response.status_code == 404 and "X-Repo-Commit" not in response.headers
        response = httpx.get(f"{backend.url}/v1/file/huggingface/org/listed/main/{SHARD}", headers=headers)
        assert response.status_code == 404 and response.headers["X-Error-Code"] == "RepoNotFound"
    # Nor the cache's own listing, which shows restricted repos to the admin token only.
    httpx.get(f"{backend.url}/v1/file/huggingface/org/listed/main/config.json", headers=good).raise_for_status()
    listing = httpx.get(f"{backend.url}/v1/files", headers=good).text
    assert "org/listed" not in listing and commit not in listing


def test_access_fails_closed_when_the_upstream_cannot_answer(hub: TestHub, hub_root: Path, start_backend) -> None:
    files = restricted(hub_root, "closed", "tok-closed", "tok-backend")
    public = tree_files(synthetic(hub_root, "public", 1 << 20))
    commit, public_commit = hub.commit("org/closed"), hub.commit("org/public")
    good = {"Authorization": "Bearer tok-closed"}

    def url(backend: BackendProcess, repo: str = "closed", at: str = commit) -> str:
        return f"{backend.url}/v1/file/huggingface/org/{repo}/{at}/config.json"

    # A backend whose own token reads the gated repo still serves it only to callers with access.
    first = start_backend("data", env={"HF_TOKEN": "tok-backend"})
    assert httpx.get(url(first)).status_code == 403
    assert httpx.get(url(first), headers=good).content == files["config.json"]
    assert httpx.get(url(first, "public", public_commit)).content == public["config.json"]
    first.stop()
    hub.stop()
    # The Hub is down, the backend restarted. The public repo was seen open: still served.
    again = start_backend("data", env={"HF_TOKEN": "tok-backend"})
    assert httpx.get(url(again, "public", public_commit)).content == public["config.json"]
    # The gated repo stays restricted: nobody's token can be checked, nobody gets its bytes.
    for headers in ({}, good):
        response = httpx.get(url(again), headers=headers, timeout=60)
        assert response.status_code in (403, 502, 503), headers
        assert response.content != files["config.json"]
    again.stop()
    # A backend with no answer at all about a repo serves nothing of it until one comes.
    other = start_backend("other")
    response = httpx.get(url(other, "public", public_commit), timeout=60)
    assert response.status_code in (502, 503) and response.content != public["config.json"]


def test_the_backends_own_token_is_for_warming_not_a_bypass(hub: TestHub, hub_root: Path, start_backend) -> None:
    repo_dir = make_synthetic_model(hub_root / "org" / "shared", 8 << 20, n_shards=2)
    (repo_dir / ".hub").mkdir()
    (repo_dir / ".hub" / "gated").write_text("tok-backend\ntok-a\ntok-b")
    files = tree_files(repo_dir)
    first, second = sorted(p for p in files if p.endswith(".safetensors"))
    backend = start_backend(chunk_size="256KiB", env={"HF_TOKEN": "tok-backend"})
    url = f"{backend.url}/v1/file/huggingface/org/shared/main/"
    junk, a, b = ({"Authorization": f"Bearer {t}"} for t in ("junk", "tok-a", "tok-b"))
    # The backend's token reads the repo; callers without their own access still get nothing.
    for headers in ({}, junk):
        response = httpx.get(url + first, headers=headers, timeout=60)
        assert response.status_code == 403 and response.content != files[first]
    response = httpx.get(url + first, headers=a, timeout=60)
    assert response.status_code == 200 and response.content == files[first]
    # Callers with access share one upstream fetch made with the backend's own token, so a
    # caller whose token is refused fails alone.
    hub.set_rate("40MB/s")  # slow enough that the readers share the cold fetches
    callers = [a, junk, b, {}, a]
    with ThreadPoolExecutor(len(callers)) as pool:
        answers = list(pool.map(lambda headers: httpx.get(url + second, headers=headers, timeout=60), callers))
    for headers, response in zip(callers, answers):
        if headers in (a, b):
            assert response.status_code == 200 and response.content == files[second], headers
        else:
            assert response.status_code == 403 and response.content != files[second], headers
    assert hub.stats().bytes_served == len(files[first]) + len(files[second])


def test_a_revoked_token_stops_reading_cached_bytes_within_the_access_ttl(hub: TestHub, hub_root: Path,
                                                                        start_backend) -> None:
    files = restricted(hub_root, "revoked", "tok-a", "tok-b")
    ttl = 1.0
    backend = start_backend(extra_args=["--access-ttl", str(ttl)])
    url = f"{backend.url}/v1/file/huggingface/org/revoked/main/{SHARD}"
    a, b = ({"Authorization": f"Bearer {t}"} for t in ("tok-a", "tok-b"))
    assert httpx.get(url, headers=a).content == files[SHARD]  # cached now
    (hub_root / "org" / "revoked" / ".hub" / "gated").write_text("tok-b")  # tok-a revoked upstream
    time.sleep(ttl)  # the longest an answer is trusted (--access-ttl); then it is asked again
    response = httpx.get(url, headers=a)
    assert response.status_code == 403 and response.content != files[SHARD]
    assert httpx.get(url, headers=b).content == files[SHARD]


def test_admin_actions_need_the_admin_token(hub: TestHub, hub_root: Path, start_backend, tmp_path: Path) -> None:
    files = restricted(hub_root, "warmable", "tok-w")
    backend = start_backend(env={"MMFS_ADMIN_TOKEN": "adm-secret"})
    target = f"{backend.url}/v1/prefetch/huggingface/org/warmable/main"
    caller = {"Authorization": "Bearer tok-w"}
    for headers in (caller, {**caller, "X-Mmfs-Admin-Token": "wrong"}):
        response = httpx.post(target, headers=headers, timeout=60)
        assert response.status_code == 401 and response.headers["X-Error-Code"] == "AdminRequired"
    assert hub.stats().bytes_served == 0
    # The admin token alone is not access to a gated repo: the caller's token is still checked.
    response = httpx.post(target, headers={"X-Mmfs-Admin-Token": "adm-secret"}, timeout=60)
    assert response.status_code == 403 and hub.stats().bytes_served == 0
    # mmfs prefetch --backend sends both: the token (--token-file) and MMFS_ADMIN_TOKEN.
    token_file = tmp_path / "token"
    token_file.write_text("tok-w\n")
    command = [sys.executable, "-m", "mmfs", "prefetch", "huggingface/org/warmable", "--backend", backend.url,
               "--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "MMFS_ADMIN_TOKEN")}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0 and "admin token" in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**env, "MMFS_ADMIN_TOKEN": "adm-secret"})
    assert done.returncode == 0, done.stderr
    assert hub.stats().bytes_served == sum(map(len, files.values()))



def test_memory_and_disk_tiers_keep_their_bounds_and_the_memory_ttl(hub: TestHub, hub_root: Path,
                                                                    start_backend) -> None:
    """--memory-cache and --disk-cache bound what the backend keeps (reading more than
    either holds), and --memory-ttl hands memory back with no request touching the tier."""
    data = (synthetic(hub_root, "bounded", 12 << 20) / SHARD).read_bytes()
    memory, disk, ttl = 2 << 20, 4 << 20, 1.0
    backend = start_backend(chunk_size="256KiB", memory_cache="2MiB", memory_ttl=str(ttl),
                            extra_args=["--disk-cache", "4MiB"])
    url = f"{backend.url}/v1/file/huggingface/org/bounded/main/{SHARD}"
    assert httpx.get(url, timeout=60).content == data
    tiers = json.loads(backend.get("/healthz"))["tiers"]
    assert tiers["memory"]["limit_bytes"] == memory and 0 < tiers["memory"]["used_bytes"] <= memory
    assert tiers["disk"]["limit_bytes"] == disk and 0 < tiers["disk"]["used_bytes"] <= disk
    # The sweep runs every max(1 s, ttl / 4): after ttl and one sweep, memory is empty.
    time.sleep(ttl + max(1.0, ttl / 4))
    assert json.loads(backend.get("/healthz"))["tiers"]["memory"]["used_bytes"] == 0
    assert httpx.get(url, timeout=60).content == data  # and the file reads as before


async def flipping_proxy(backend_port: int, client: trio.SocketStream, stride: int = 64 << 10) -> None:
    """Forward a connection to the backend, flipping every ``stride``-th byte it answers
    (from the ``stride``-th on): JSON control answers stay whole, chunk bodies do not."""
    try:
        server = await trio.open_tcp_stream("127.0.0.1", backend_port)
    except OSError:
        await client.aclose()
        return

    async def up() -> None:
        async for data in client:
            await server.send_all(data)

    async def down() -> None:
        sent = 0
        async for data in server:
            block = bytearray(data)
            first = -sent % stride if sent else stride  # the next multiple of stride, never byte 0
            for offset in range(first, len(block), stride):
                block[offset] ^= 0xFF
            await client.send_all(block)
            sent += len(block)

    try:
        async with trio.open_nursery() as nursery:
            for direction in (up, down):
                nursery.start_soon(direction)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await server.aclose()
        await client.aclose()


async def test_a_node_checks_every_chunk_it_gets_over_plain_http(hub: TestHub, hub_root: Path,
                                                                  start_backend) -> None:
    """Bytes damaged between backend and node (TCP, no NIXL) fail the node's blake3 check
    against the file's chunk map: an error, never a wrong file."""
    data = (synthetic(hub_root, "wire", 2 << 20) / SHARD).read_bytes()
    backend = start_backend(chunk_size="256KiB")
    assert httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/wire/main", timeout=60).status_code == 200
    backend_port = int(backend.url.rsplit(":", 1)[1])
    repo = parse_repo_id("org/wire")
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, lambda s: flipping_proxy(backend_port, s), listeners)
        remote = BackendRemote(f"http://127.0.0.1:{port}", policy=RetryPolicy(attempts=1))
        async with FetchEngine([MemoryTier(64 << 20)], remote) as engine:
            manifest = await engine.manifest(repo, "main")
            source = FileSource(repo, manifest.commit, manifest.file(SHARD))
            with pytest.raises(IntegrityError):
                await engine.read(source, 0, len(data))
        nursery.cancel_scope.cancel()
