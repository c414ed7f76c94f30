"""Node-to-node sharing with real processes on loopback addresses: one test hub, one
backend, nodes started with ``--peer-listen`` on 127.0.0.x (docs/protocol.md,
"Node-to-node sharing")."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

import backend_server.testing as backend_testing
from backend_server.testing import parse_metrics
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import free_port

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

REPO = "org/shared"
SHARD = "model-00001-of-00001.safetensors"
#: Small chunks: many chunks per file, so "most chunks" and "mid-transfer" mean something.
CHUNK = "256KiB"


@pytest.fixture
def cluster(tmp_path: Path, hub_root: Path):
    """A warm backend (the model verified there, so chunk maps exist) and a node factory."""
    make_synthetic_model(hub_root / REPO, 12 << 20, n_shards=1, seed=5)
    with ExitStack() as stack:
        hub = stack.enter_context(TestHub(hub_root))
        backend = stack.enter_context(backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url,
                                                                     chunk_size=CHUNK))
        warm = subprocess.run([sys.executable, "-m", "mmfs", "prefetch", f"huggingface/{REPO}",
                               "--backend", backend.url], capture_output=True, text=True, timeout=120)
        assert warm.returncode == 0, warm.stderr
        expected = (hub_root / REPO / SHARD).read_bytes()
        nodes: list[MountProcess] = []

        def node(n: int, *, wrapper: str | None = None, labels: str = "") -> MountProcess:
            address = f"127.0.0.{n + 10}"
            args = ["--peer-listen", f"{address}:{free_port(address)}", "--transport", "tcp"]
            mount = MountProcess(tmp_path / f"mnt{n}", tmp_path / f"cache{n}", backend=backend.url,
                                 args=args + (["--peer-labels", labels] if labels else []))
            if wrapper:
                mount.argv[1:3] = ["-m", wrapper]
            nodes.append(stack.enter_context(mount))
            wait_until_known(backend, mount)
            return mount

        yield backend, node, expected


def peer_url(mount: MountProcess) -> str:
    return mount.argv[mount.argv.index("--peer-listen") + 1]


def wait_until_known(backend: backend_testing.BackendProcess, mount: MountProcess) -> None:
    """Until the node's first heartbeat reached the backend (it is sent at start)."""
    url = f"http://{peer_url(mount)}"
    for _ in range(100):
        if url in [n["node"] for n in json.loads(backend.get("/v1/peers"))["nodes"]]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never heartbeated:\n{mount.log_text()[-2000:]}")


def read(mount: MountProcess) -> bytes:
    return (mount.repo(REPO) / SHARD).read_bytes()


def peers(mount: MountProcess) -> dict:
    return mount.status()["peers"]


def node_metrics(mount: MountProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{peer_url(mount)}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def test_later_nodes_read_mostly_from_earlier_ones(cluster) -> None:
    backend, node, expected = cluster
    chunks = -(-len(expected) // (256 << 10))
    first = node(1)
    assert read(first) == expected
    assert peers(first)["chunks_from_peers"] == 0  # nobody had it before
    later = [node(n) for n in (2, 3, 4)]
    for mount in later:
        assert read(mount) == expected
    for mount in later:
        counters = peers(mount)
        assert counters["chunks_from_peers"] > counters["chunks_from_backend"], counters
        assert counters["bad_peers"] == 0
        assert node_metrics(mount)["mmfs_peer_chunks_received_total"] == counters["chunks_from_peers"]
    served = sum(peers(m)["chunks_served"] for m in [first, *later])
    assert served == sum(peers(m)["chunks_from_peers"] for m in later)
    assert peers(first)["chunks_served"] > 0
    metrics = backend.metrics()
    assert metrics["mmfs_backend_peer_redirects_total"] >= served
    # The backend sent far fewer than the four copies it would have without sharing.
    assert sum(peers(m)["chunks_from_backend"] for m in [first, *later]) < 2 * chunks


def test_a_peer_killed_mid_transfer_costs_readers_nothing(cluster) -> None:
    backend, node, expected = cluster
    holder = node(1)
    assert read(holder) == expected
    reader = node(2)
    path = reader.repo(REPO) / SHARD
    with open(path, "rb") as f:
        head = f.read(1 << 20)  # the first chunks come from the holder ...
        assert peers(reader)["chunks_from_peers"] > 0
        holder.kill()  # ... which dies with the file open and half read here
        rest = f.read()
    assert head + rest == expected
    counters = peers(reader)
    assert counters["fallbacks"] > 0 and counters["bad_peers"] == 0, counters
    assert backend.metrics()['mmfs_backend_peer_reports_total{problem="unreachable"}'] >= 1


def test_a_peer_serving_corrupt_bytes_is_caught_reported_and_avoided(cluster) -> None:
    backend, node, expected = cluster
    liar = node(1, wrapper="mmfs.testing.corrupt_peer")  # flips a byte of every chunk it sends
    assert read(liar) == expected  # its own reads are fine: it reads from the backend
    victim = node(2)
    assert read(victim) == expected  # caught by the chunk map: the reader never sees the bad bytes
    counters = peers(victim)
    assert counters["bad_peers"] >= 1 and counters["chunks_from_peers"] == 0, counters
    assert node_metrics(victim)["mmfs_peer_bad_peers_total"] == counters["bad_peers"]
    metrics = backend.metrics()
    assert metrics['mmfs_backend_peer_reports_total{problem="corrupt"}'] >= 1
    assert metrics["mmfs_backend_peer_banned"] == 1
    assert f"http://{peer_url(liar)}" not in [n["node"] for n in json.loads(backend.get("/v1/peers"))["nodes"]]
    # A third node is sent to the honest one only.
    third = node(3)
    assert read(third) == expected
    assert peers(third)["bad_peers"] == 0 and peers(third)["chunks_from_peers"] > 0
    assert peers(liar)["chunks_served"] <= counters["bad_peers"]


def test_sharing_through_two_replicas(tmp_path: Path, hub_root: Path) -> None:
    """Each chunk's owner replica decides who a node gets it from; heartbeats reach both."""
    from test_replicas import _Replicas

    make_synthetic_model(hub_root / REPO, 12 << 20, n_shards=1, seed=5)
    expected = (hub_root / REPO / SHARD).read_bytes()
    with TestHub(hub_root) as hub, _Replicas(tmp_path, hub.url) as replicas, ExitStack() as stack:
        def node(n: int) -> MountProcess:
            address = f"127.0.0.{n + 10}"
            mount = MountProcess(tmp_path / f"mnt{n}", tmp_path / f"cache{n}", backend=",".join(replicas.urls),
                                 args=["--peer-listen", f"{address}:{free_port(address)}"])
            stack.enter_context(mount)
            for process in replicas.processes:
                wait_until_known(process, mount)
            return mount

        first = node(1)
        assert read(first) == expected
        upstream = hub.stats().bytes_served
        later = [node(n) for n in (2, 3, 4)]
        for mount in later:
            assert read(mount) == expected
        assert hub.stats().bytes_served == upstream  # the later nodes cost the upstream nothing
        for mount in later:
            counters = peers(mount)
            assert counters["chunks_from_peers"] > counters["chunks_from_backend"], counters
        redirects = [p.metrics()["mmfs_backend_peer_redirects_total"] for p in replicas.processes]
        assert all(r > 0 for r in redirects), redirects  # both owners sent nodes to peers


def test_restricted_content_never_goes_through_peers(tmp_path: Path, hub_root: Path) -> None:
    """Peers ask by content id (public in a gated repo's listing) and carry no token: a
    gated repo's chunks are neither offered to, nor redirected to, nor served to peers,
    while an open repo's chunks read by the same nodes are (the control that shows the
    gated ones are kept out by the access rule, not by a setup that shares nothing)."""
    gated = make_synthetic_model(hub_root / "org" / "gated", 2 << 20, n_shards=1, seed=9)
    (gated / ".hub").mkdir()
    (gated / ".hub" / "gated").write_text("tok-g")
    public = make_synthetic_model(hub_root / REPO, 2 << 20, n_shards=1, seed=5)
    with ExitStack() as stack:
        hub = stack.enter_context(TestHub(hub_root))
        backend = stack.enter_context(backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url,
                                                                     chunk_size=CHUNK))
        nodes = []
        for n in (1, 2):
            address = f"127.0.0.{n + 30}"
            mount = MountProcess(tmp_path / f"mnt{n}", tmp_path / f"cache{n}", backend=backend.url,
                                 args=["--peer-listen", f"{address}:{free_port(address)}", "--transport", "tcp"],
                                 env={"HF_TOKEN": "tok-g"})  # both nodes are granted: only peers are at issue
            nodes.append(stack.enter_context(mount))
            wait_until_known(backend, mount)
        first, second = nodes
        contents = {repo: content_id(backend, repo) for repo in ("org/gated", REPO)}
        beats = peers(first)["heartbeats"]
        for repo, files in (("org/gated", gated), (REPO, public)):
            assert (first.repo(repo) / SHARD).read_bytes() == (files / SHARD).read_bytes()
        while peers(first)["heartbeats"] < beats + 2:  # a heartbeat sent after the reads: what it holds is known
            time.sleep(0.1)
        held = {n["node"]: n["held_chunks"] for n in json.loads(backend.get("/v1/peers"))["nodes"]}[
            f"http://{peer_url(first)}"]
        assert f"{contents[REPO]}:{256 << 10}" in held  # offered
        assert not any(contents["org/gated"] in name for name in held)  # never offered

        # Asked directly by content id, without any token: as if it were not there.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(peer_chunk_url(first, contents["org/gated"]), timeout=10)
        assert refused.value.code == 404
        with urllib.request.urlopen(peer_chunk_url(first, contents[REPO]), timeout=10) as response:
            assert response.read() == (public / SHARD).read_bytes()[:256 << 10]

        # The backend does not send the second node to a peer for the gated file, even to
        # one that offers it (a node of another version, or one that lies) ...
        liar = f"http://127.0.0.35:{free_port('127.0.0.35')}"
        beat = {"node": liar, "labels": {}, "held": {f"{contents['org/gated']}:{256 << 10}": [[0, 8]]}}
        urllib.request.urlopen(urllib.request.Request(f"{backend.url}/v1/peers/heartbeat", json.dumps(beat).encode(),
                                                      {"Content-Type": "application/json"}), timeout=10).close()
        assert (second.repo("org/gated") / SHARD).read_bytes() == (gated / SHARD).read_bytes()
        counters = peers(second)
        assert counters["redirects"] == 0 and counters["chunks_from_peers"] == 0, counters
        # ... and does for the open one.
        assert (second.repo(REPO) / SHARD).read_bytes() == (public / SHARD).read_bytes()
        assert peers(second)["chunks_from_peers"] > 0, peers(second)


def content_id(backend: backend_testing.BackendProcess, repo: str) -> str:
    """The shard's content id, as a gated repo's public listing shows it to anyone."""
    files = json.loads(backend.get(f"/v1/manifest/huggingface/{repo}/main"))["files"]
    shard = next(f for f in files if f["path"] == SHARD)
    return f"{shard['hash_algo']}-{shard['hash']}"


def peer_chunk_url(mount: MountProcess, content: str, index: int = 0) -> str:
    return f"http://{peer_url(mount)}/v1/peer/chunk?content={content}&chunk_size={256 << 10}&index={index}"
