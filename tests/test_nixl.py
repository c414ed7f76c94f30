"""The NIXL data plane: ``mmfs-backend serve --nixl`` and a node reading chunks with NIXL READs.

Real processes and real NIXL (UCX over this machine's DRAM): the test hub in this
process, the backend as a child process, the node as another (``tests/nixl_node.py``,
a ``NixlBackendRemote`` under a node engine) or a real FUSE mount. NIXL itself is never
loaded into the pytest process (see ``tests/nixl_node.py`` for why). Skipped only where
``nixl_cu12`` is missing outside CI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from backend_server.testing import BackendProcess, backend_command
from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model
from mmfs.remote.nixl import rdma_devices
from mmfs.testing.mount import MountProcess

SHARD = "model-00001-of-00001.safetensors"
NODE = Path(__file__).with_name("nixl_node.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _need_nixl() -> None:
    if importlib.util.find_spec("nixl_cu12") is None:
        if os.environ.get("CI"):
            pytest.fail("nixl_cu12 is missing: the NIXL tests must run in CI (scripts/setup.sh installs it)")
        pytest.skip("nixl_cu12 is not installed")


@pytest.fixture
def start_backend(tmp_path: Path, hub: TestHub) -> Iterator:
    running: list[BackendProcess] = []

    def start(name: str = "backend", *, nixl: bool = True, extra: list[str] | None = None,
              **options: object) -> BackendProcess:
        args = (["--nixl"] if nixl else []) + (extra or [])
        backend = BackendProcess(tmp_path / name, hub_url=hub.url, extra_args=args, **options)  # type: ignore[arg-type]
        running.append(backend.start())
        return backend

    yield start
    for backend in running:
        backend.stop()


def repo_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".hub" not in p.parts}


def repo_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and ".hub" not in p.parts)


def node_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def node_read(backend: BackendProcess, repo_id: str, *args: str) -> tuple[dict, str]:
    """Run ``tests/nixl_node.py``: a node reading the whole repo; its JSON result and its log."""
    env = node_env()
    result = subprocess.run([sys.executable, str(NODE), backend.url, repo_id, *args], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def nixl_metrics(backend: BackendProcess) -> dict[str, float]:
    return {k: v for k, v in backend.metrics().items() if k.startswith("mmfs_nixl_")}


def test_real_model_over_nixl_byte_identical(hub: TestHub, hub_root: Path, start_backend) -> None:
    backend = start_backend()
    info = httpx.get(f"{backend.url}/v1/nixl/agent").json()
    assert info["slot_size"] == 4 << 20 and info["slots"] == 64 and info["name"].startswith("mmfs-backend-")
    assert info["rdma"] is bool(rdma_devices()) and info["rdma_devices"] == rdma_devices()

    result, log = node_read(backend, REAL_REPO_ID)
    assert result["errors"] == {} and result["files"] == repo_digests(hub_root / REAL_REPO_ID)
    total = repo_size(hub_root / REAL_REPO_ID)
    stats = result["stats"]
    assert (stats["state"], stats["bytes"], stats["fallbacks"]) == ("on", total, 0)
    assert "NIXL data plane on" in log

    metrics = nixl_metrics(backend)
    assert metrics["mmfs_nixl_bytes_total"] == total  # every byte went over NIXL ...
    assert metrics["mmfs_nixl_chunks_total"] == stats["chunks"]
    assert metrics["mmfs_nixl_fallbacks_total"] == 0 and metrics["mmfs_nixl_slots_leased"] == 0
    assert not any('route="chunk"' in name for name in backend.metrics())  # ... none over /v1/chunk


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_mount_with_transport_nixl_reads_real_model(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                     start_backend) -> None:
    backend = start_backend()
    upstream = repo_digests(hub_root / REAL_REPO_ID)
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url,
                      args=["--transport", "nixl"]) as mount:
        root = mount.repo(REAL_REPO_ID)
        assert repo_digests(root) == upstream
        status = mount.status()
        assert (status["transport"], status["transport_requested"]) == ("nixl", "nixl")
        assert status["transport_reason"].startswith("NIXL data plane on")
        assert status["nixl"]["bytes"] == repo_size(hub_root / REAL_REPO_ID) and status["nixl"]["fallbacks"] == 0
        assert "NIXL data plane on" in mount.log_text()
        assert mount.ready_line.endswith(f"(backend {backend.url}, transport nixl (--transport nixl))")
    metrics = nixl_metrics(backend)
    assert metrics["mmfs_nixl_bytes_total"] == repo_size(hub_root / REAL_REPO_ID)
    assert metrics["mmfs_nixl_fallbacks_total"] == 0


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_mount_with_transport_auto_uses_tcp_without_rdma(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                          start_backend) -> None:
    """On hosts without RDMA (this one), auto is TCP even against a backend with --nixl,
    and the mount says so: ready line, status.json, mmfs status."""
    if rdma_devices():
        pytest.skip("this host has RDMA devices: auto may rightly pick NIXL")
    backend = start_backend()
    upstream = repo_digests(hub_root / REAL_REPO_ID)
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url) as mount:
        assert repo_digests(mount.repo(REAL_REPO_ID)) == upstream
        status = mount.status()
        assert (status["transport"], status["transport_requested"]) == ("tcp", "auto")
        assert "no RDMA device on this node" in status["transport_reason"] and "nixl" not in status
        assert mount.ready_line.endswith(f"(backend {backend.url}, transport tcp (auto: no RDMA here))")
        shown = subprocess.run([sys.executable, "-m", "mmfs", "status", "--mount", str(mount.mountpoint)],
                               capture_output=True, text=True, timeout=60, env=node_env())
        assert shown.returncode == 0 and "transport: tcp (--transport auto): " in shown.stdout, shown.stderr
        assert "NIXL" not in mount.log_text()  # never loaded, never tried
    metrics = nixl_metrics(backend)
    assert metrics["mmfs_nixl_bytes_total"] == 0 and metrics["mmfs_nixl_chunks_total"] == 0


def test_auto_needs_the_backend_to_announce_rdma(hub: TestHub, hub_root: Path, start_backend) -> None:
    """A node with RDMA under --transport auto still uses TCP when the backend has none."""
    if rdma_devices():
        pytest.skip("this host has RDMA devices")
    root = make_synthetic_model(hub_root / "org" / "auto", 1 << 20, n_shards=1)
    backend = start_backend(chunk_size="256KiB")
    result, log = node_read(backend, "org/auto", "--auto")
    assert result["errors"] == {} and result["files"] == repo_digests(root)
    assert result["stats"]["state"] == "off" and result["stats"]["chunks"] == 0
    transport = result["transport"]
    assert (transport["requested"], transport["in_use"]) == ("auto", "tcp")
    assert "announces no RDMA device" in transport["reason"]
    assert log.count("announces no RDMA device") == 1 and "WARNING" not in log
    assert nixl_metrics(backend)["mmfs_nixl_bytes_total"] == 0


def test_unreleased_lease_expires_and_its_slot_is_reused(hub: TestHub, hub_root: Path, start_backend) -> None:
    make_synthetic_model(hub_root / "org" / "lease", 1 << 20, n_shards=1)
    backend = start_backend(chunk_size="256KiB", extra=["--nixl-pool", "256KiB", "--nixl-lease-timeout", "1"])
    commit = hub.commit("org/lease")
    url = f"{backend.url}/v1/nixl/chunk/huggingface/org/lease/{commit}/{SHARD}"

    first = httpx.get(f"{url}?index=0").json()  # leased, never released (a node that died)
    assert first["length"] == 256 << 10 and first["slot"] == 0 and first["verified"] is False
    busy = httpx.get(f"{url}?index=1")  # the only slot is taken: 503 after a short wait
    assert busy.status_code == 503 and busy.headers["X-Error-Code"] == "NixlBusy" and "error" in busy.json()

    deadline = time.monotonic() + 30  # hang guard only: the plane expires leases on its own
    while nixl_metrics(backend)["mmfs_nixl_lease_expirations_total"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    again = httpx.get(f"{url}?index=1")  # the lease ran out: the slot serves again
    assert again.status_code == 200 and again.json()["slot"] == 0
    late = httpx.post(f"{backend.url}/v1/nixl/release/{first['lease_id']}")
    assert late.status_code == 404 and "expired" in late.json()["error"]
    assert httpx.post(f"{backend.url}/v1/nixl/release/{again.json()['lease_id']}").status_code == 200
    metrics = nixl_metrics(backend)
    assert metrics["mmfs_nixl_lease_expirations_total"] == 1 and metrics["mmfs_nixl_slots_leased"] == 0
    assert metrics["mmfs_nixl_fallbacks_total"] == 2  # the 503 and the late release
    assert "expired unreleased" in backend.log_text()


def test_exhausted_pool_falls_back_to_tcp(hub: TestHub, hub_root: Path, start_backend) -> None:
    root = make_synthetic_model(hub_root / "org" / "busy", (1 << 20) + 4321, n_shards=1)
    backend = start_backend(chunk_size="256KiB", extra=["--nixl-pool", "256KiB", "--nixl-lease-timeout", "60"])
    commit = hub.commit("org/busy")
    held = httpx.get(f"{backend.url}/v1/nixl/chunk/huggingface/org/busy/{commit}/config.json?index=0").json()

    result, log = node_read(backend, "org/busy", "--attempts", "1")
    assert result["errors"] == {} and result["files"] == repo_digests(root)  # every chunk over TCP, all correct
    stats = result["stats"]
    assert stats["state"] == "on" and stats["chunks"] == 0 and stats["fallbacks"] >= 5
    assert "NixlBusy" in log or "503" in log  # logged (once)
    assert nixl_metrics(backend)["mmfs_nixl_fallbacks_total"] == stats["fallbacks"]

    # A busy pool does not switch NIXL off: once the slot is free, chunks go over NIXL again.
    assert httpx.post(f"{backend.url}/v1/nixl/release/{held['lease_id']}").status_code == 200
    result, _ = node_read(backend, "org/busy")
    assert result["files"] == repo_digests(root)
    assert result["stats"]["fallbacks"] == 0 and result["stats"]["bytes"] == repo_size(root)


def test_restricted_bytes_never_enter_the_shared_pool(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                      start_backend) -> None:
    """NIXL READs are one-sided and the pool is registered whole: any process with the
    backend's agent metadata can read every slot. So chunks of gated and private repos go
    over TCP only, and an attacker dumping the pool finds none of them."""
    gated = make_synthetic_model(hub_root / "org" / "gated", 1 << 20, n_shards=1, seed=7)
    (gated / ".hub").mkdir()
    (gated / ".hub" / "gated").write_text("tok-g")
    public = make_synthetic_model(hub_root / "org" / "open", 1 << 20, n_shards=1, seed=8)
    backend = start_backend(chunk_size="256KiB", extra=["--nixl-pool", "1MiB"])
    commit = hub.commit("org/gated")
    # Even a caller with access gets no lease for a restricted chunk: it is sent over TCP.
    refused = httpx.get(f"{backend.url}/v1/nixl/chunk/huggingface/org/gated/{commit}/{SHARD}?index=0",
                        headers={"Authorization": "Bearer tok-g"})
    assert refused.status_code == 503 and refused.headers["X-Error-Code"] == "RestrictedOverTcp"
    # A node with the token reads it all, correctly, every chunk over TCP.
    result, _ = node_read(backend, "org/gated", "--token", "tok-g")
    assert result["errors"] == {} and result["files"] == repo_digests(gated)
    assert result["stats"]["chunks"] == 0 and result["stats"]["fallbacks"] >= 4
    # The attacker: a public chunk's lease shows where the pool is; then every slot is READ.
    dump = tmp_path / "pool.bin"
    attack = subprocess.run([sys.executable, str(NODE), backend.url, "org/open", "--dump-pool", str(dump)],
                            capture_output=True, text=True, timeout=120, env=node_env())
    assert attack.returncode == 0, attack.stderr[-3000:]
    pool = dump.read_bytes()
    assert len(pool) == 1 << 20
    first_public = (public / sorted(p.name for p in public.iterdir() if p.is_file())[0]).read_bytes()
    assert first_public[:4096] in pool  # the dump does show what passed through the pool
    secret = (gated / SHARD).read_bytes()
    assert not any(secret[i:i + 4096] in pool for i in range(0, len(secret), 4096))


def test_backend_without_nixl_serves_over_tcp(hub: TestHub, hub_root: Path, start_backend) -> None:
    root = make_synthetic_model(hub_root / "org" / "plain", 1 << 20, n_shards=1)
    backend = start_backend(nixl=False, chunk_size="256KiB")
    response = httpx.get(f"{backend.url}/v1/nixl/agent")
    assert response.status_code == 404 and "--nixl" in response.json()["error"]

    result, log = node_read(backend, "org/plain")
    assert result["errors"] == {} and result["files"] == repo_digests(root)
    assert result["stats"]["state"] == "off" and result["stats"]["chunks"] == 0
    assert log.count("has no NIXL data plane") == 1  # logged once
    assert nixl_metrics(backend)["mmfs_nixl_slots"] == 0


def test_corrupted_bytes_are_still_an_error(hub: TestHub, hub_root: Path, start_backend) -> None:
    good = make_synthetic_model(hub_root / "org" / "good", 1 << 20, n_shards=1, seed=1)
    make_synthetic_model(hub_root / "org" / "bad", 1 << 20, n_shards=1, seed=2)
    backend = start_backend(chunk_size="256KiB")

    # Bytes damaged on the NIXL path itself: the node's blake3 check catches them ...
    result, log = node_read(backend, "org/good", "--damage")
    assert result["errors"] and all(e.startswith("IntegrityError") for e in result["errors"].values())
    assert "does not match the file's chunk map" in "".join(result["errors"].values()) + log
    # ... and with nothing damaged, a node reads it all correctly.
    result, _ = node_read(backend, "org/good")
    assert result["errors"] == {} and result["files"] == repo_digests(good)

    # Upstream corruption: the backend refuses the file's last chunk, as over TCP.
    hub.set_faults(corrupt=[f"org/bad/{SHARD}"])
    result, _ = node_read(backend, "org/bad", "--attempts", "1")
    assert set(result["errors"]) == {SHARD} and result["errors"][SHARD].startswith("IntegrityError")


def test_missing_nixl_is_named(tmp_path: Path, hub: TestHub) -> None:
    """Without the package, ``--nixl`` and ``--transport nixl`` stop with a message saying what to install."""
    shadow = tmp_path / "shadow" / "nixl_cu12"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('nixl_cu12 hidden by the test')\n")
    env = {**os.environ, "HF_ENDPOINT": hub.url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([*backend_command(), "serve", "--listen", "127.0.0.1:0", "--data-dir",
                             str(tmp_path / "data"), "--nixl"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "nixl-cu12" in result.stderr and "--nixl" in result.stderr
    result = subprocess.run([sys.executable, "-m", "mmfs", "mount", str(tmp_path / "mnt"), "--cache-dir",
                             str(tmp_path / "cache"), "--backend", "http://127.0.0.1:9", "--transport", "nixl"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "nixl-cu12" in result.stderr
