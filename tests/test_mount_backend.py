"""Real FUSE mounts in backend mode: node daemon → ``mmfs-backend serve`` → test hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import backend_server.testing as backend_testing
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
