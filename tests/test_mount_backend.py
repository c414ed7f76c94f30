"""Real FUSE mounts in backend mode: node daemon → ``mmfs-backend serve`` → test hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backend_server.testing as backend_testing
from csi_driver.tokens import TokenStore
from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model, real_model_dir
from mmfs.testing.mount import MountProcess

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

MMFS = [sys.executable, "-m", "mmfs"]



def tree_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_model_through_backend(tmp_path: Path, hub: TestHub) -> None:
    from safetensors import safe_open

    with backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url) as backend:
        mount = MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url)
        with mount:
            assert mount.ready_line.startswith(f"mmfs: mounted {mount.mountpoint} (backend {backend.url}, transport ")
            repo = mount.repo(REAL_REPO_ID)
            assert os.readlink(repo) == hub.commit(REAL_REPO_ID)
            original = real_model_dir()
            expected = tree_files(original)
            assert sorted(tree_files(repo)) == sorted(expected)
            hub.reset_stats()
            # listing/stat cost no content anywhere
            for folder, _, files in os.walk(repo):
                for name in files:
                    os.stat(os.path.join(folder, name))
            assert hub.stats().bytes_served == 0
            for name, path in expected.items():
                assert (repo / name).read_bytes() == path.read_bytes(), name
            with safe_open(repo / "model.safetensors", framework="numpy") as mounted, \
                    safe_open(original / "model.safetensors", framework="numpy") as local:
                for key in local.keys():
                    assert (mounted.get_tensor(key) == local.get_tensor(key)).all(), key
            status = mount.status()
            assert status["mode"] == "backend" and status["backend"] == backend.url
            assert status["integrity"]["failures"] == 0


def test_prefetch_backend_then_node_prefetch_then_both_stopped(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "synth", 10 << 20, n_shards=2, seed=11)
    originals = tree_files(hub_root / "org" / "synth")
    hub = TestHub(hub_root).start()
    backend = backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url).start()
    mount = MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url)
    try:
        # Warm the backend alone, before any node mounts: the hub serves every byte once.
        result = subprocess.run([*MMFS, "prefetch", "huggingface/org/synth", "--backend", backend.url],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "files" in result.stdout
        served = hub.stats().bytes_served
        assert served >= sum(p.stat().st_size for p in originals.values())
        bad = subprocess.run([*MMFS, "prefetch", "huggingface/org/missing", "--backend", backend.url],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "org/missing" in bad.stderr
        hub.stop()  # the backend alone serves the node now
        mount.start()
        result = subprocess.run([*MMFS, "prefetch", "huggingface/org/synth", "--mount", str(mount.mountpoint)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        backend.stop()
        mount.stop()
        mount.start()  # restart on the same cache, backend and hub gone
        repo = mount.repo("org/synth")
        for name, path in originals.items():
            assert digest(repo / name) == digest(path), name
        assert mount.status()["remote"]["bytes"] == 0
    finally:
        mount.stop()
        backend.stop() if backend.proc is not None else None
        hub.stop()


def test_each_volume_token_gets_its_own_answer_on_one_mount(tmp_path: Path, hub_root: Path) -> None:
    """Two pods on one node, one mount: the view of each volume's token (written by the CSI
    plugin's token store) is checked with that token, cached bytes or not."""
    repo_dir = make_synthetic_model(hub_root / "org" / "gated", 2 << 20, n_shards=1, seed=5)
    (repo_dir / ".hub").mkdir()
    (repo_dir / ".hub" / "gated").write_text("tok-a\ntok-node")
    originals = {name: path.read_bytes() for name, path in tree_files(repo_dir).items() if ".hub" not in name}
    ttl = 1.0  # --access-ttl of the node and of the backend
    hub = TestHub(hub_root).start()
    backend = backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url,
                                             extra_args=["--access-ttl", str(ttl)]).start()
    tokens = TokenStore(str(tmp_path / "tokens"))
    key_a, key_x = tokens.put("tok-a"), tokens.put("tok-nope")
    (tmp_path / "node-token").write_text("tok-node\n")
    mount = MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url,
                         args=["--token-dir", str(tokens.dir), "--access-ttl", str(ttl),
                               "--token-file", str(tmp_path / "node-token")])
    try:
        mount.start()
        views = mount.mountpoint / ".access"
        a, x = (views / key / "huggingface" / "org" / "gated" / "main" for key in (key_a, key_x))
        for name, data in originals.items():
            assert (a / name).read_bytes() == data, name
        # Same node, same cached bytes, another token: the listing is public (a gated repo's
        # metadata is, on the Hub), the content is not.
        assert sorted(os.listdir(x)) == sorted(os.listdir(a))
        for name in originals:
            with pytest.raises(PermissionError):
                (x / name).read_bytes()
        # The mount's own token (--token-file) is a view of its own, at the root.
        assert (mount.mountpoint / "huggingface" / "org" / "gated" / "main" / "config.json").read_bytes() \
            == originals["config.json"]
        # Views are not listed, and a key without a token file is not there.
        assert os.listdir(views) == []
        with pytest.raises(FileNotFoundError):
            os.stat(views / ("0" * 32))
        # tok-a is revoked upstream: within the node's and the backend's --access-ttl, a new
        # open through its view is refused, though every byte is on this node.
        (repo_dir / ".hub" / "gated").write_text("tok-node")
        time.sleep(2 * ttl)
        with pytest.raises(PermissionError):
            (a / "config.json").read_bytes()
        assert mount.status()["remote"]["bytes"] == sum(map(len, originals.values()))
    finally:
        mount.stop()
        backend.stop()
        hub.stop()


def test_a_mount_without_a_token_cannot_read_gated_bytes_another_mount_cached(tmp_path: Path, hub_root: Path) -> None:
    """The backend checks every node's token: its own cache is no bypass."""
    repo_dir = make_synthetic_model(hub_root / "org" / "gated", 1 << 20, n_shards=1, seed=6)
    (repo_dir / ".hub").mkdir()
    (repo_dir / ".hub" / "gated").write_text("tok-ok")
    config = (repo_dir / "config.json").read_bytes()
    hub = TestHub(hub_root).start()
    backend = backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url).start()
    allowed = MountProcess(tmp_path / "m1", tmp_path / "c1", backend=backend.url, env={"HF_TOKEN": "tok-ok"})
    anonymous = MountProcess(tmp_path / "m2", tmp_path / "c2", backend=backend.url)
    try:
        allowed.start()
        assert (allowed.repo("org/gated") / "config.json").read_bytes() == config
        anonymous.start()
        with pytest.raises(PermissionError):
            (anonymous.repo("org/gated") / "config.json").read_bytes()
        result = subprocess.run([*MMFS, "prefetch", "huggingface/org/gated", "--backend", backend.url],
                                capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"})
        assert result.returncode != 0 and "gated" in result.stderr and "Traceback" not in result.stderr
    finally:
        allowed.stop()
        anonymous.stop()
        backend.stop()
        hub.stop()
