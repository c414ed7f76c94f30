"""The client library (``mmfs.client``, ``modelmanager_client``) against real processes:
the test hub, an ``mmfs-backend`` child and, for the mount route, a real mmfs mount."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import tomllib
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import mmfs.client as client
from backend_server.testing import BackendProcess
from mmfs.client import DownloadInfo, modelmanager_download, snapshot_download
from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model, real_model_dir
from mmfs.testing.mount import MountProcess
from mmfs.testing.process import child_env

pytestmark = pytest.mark.timeout(120)

REPO = REAL_REPO_ID
WEIGHTS = "model.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_sha256(rel: str) -> str:
    return sha256(real_model_dir() / rel)


def dead_host() -> str:
    """``127.0.0.1:<port>`` with nothing listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No mount (other tests on this machine may have some), no token, no remembered probes,
    and a provider that cannot be reached unless a test says otherwise."""
    monkeypatch.setenv("MMFS_MOUNT", "")
    monkeypatch.setenv("HF_ENDPOINT", f"http://{dead_host()}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    client._probes.clear()
    yield
    client._probes.clear()


@pytest.fixture
def backend(tmp_path: Path, hub: TestHub) -> Iterator[BackendProcess]:
    with BackendProcess(tmp_path / "backend", hub_url=hub.url, chunk_size="256KiB") as running:
        yield running


def served_by_backend(backend: BackendProcess) -> float:
    return sum(v for k, v in backend.metrics().items() if k.startswith("mmfs_backend_served_bytes_total"))


# -- route 2: through the backend into the Hub cache ---------------------------------------


def test_backend_route_lands_in_the_hub_cache(tmp_path: Path, hub: TestHub, backend: BackendProcess) -> None:
    cache = tmp_path / "cache"
    # HF_ENDPOINT is unreachable (fixture): these bytes can only come through the backend.
    path = modelmanager_download(DownloadInfo(repo_id=REPO, filename=WEIGHTS, host=backend.url), cache_dir=cache)
    assert sha256(path) == source_sha256(WEIGHTS)
    commit = hub.commit(REPO)
    assert Path(path) == cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / commit / WEIGHTS
    assert served_by_backend(backend) >= (real_model_dir() / WEIGHTS).stat().st_size
    pooling = modelmanager_download(DownloadInfo(repo_id=REPO, filename="config.json", subfolder="1_Pooling",
                                                 host=backend.url, revision=commit), cache_dir=cache)
    assert Path(pooling) == Path(path).parent / "1_Pooling" / "config.json"
    assert sha256(pooling) == source_sha256("1_Pooling/config.json")
    # huggingface_hub finds both afterwards: asked as usual for that commit, it sends no
    # request at all (the backend counts none) ...
    def hub_api_requests() -> float:
        return sum(v for k, v in backend.metrics().items()
                   if k.startswith("mmfs_backend_requests_total") and 'route="hub_' in k)

    before = hub_api_requests()
    assert hf_hub_download(REPO, WEIGHTS, cache_dir=cache, revision=commit, endpoint=backend.url) == path
    assert hub_api_requests() == before
    # ... and with no network at all.
    backend.stop()
    hub.stop()
    assert hf_hub_download(REPO, WEIGHTS, cache_dir=cache, local_files_only=True) == path
    assert hf_hub_download(REPO, "1_Pooling/config.json", cache_dir=cache, local_files_only=True) == pooling


def test_backend_route_snapshot_with_patterns(tmp_path: Path, hub: TestHub, backend: BackendProcess) -> None:
    cache = tmp_path / "cache"
    folder = Path(snapshot_download(DownloadInfo(repo_id=REPO, host=backend.url), cache_dir=cache,
                                    allow_patterns=["*.json"], ignore_patterns=["tokenizer*"]))
    assert folder.name == hub.commit(REPO) and folder.parent.name == "snapshots"
    src = real_model_dir()
    expected = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.json")
                      if not p.name.startswith("tokenizer"))
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == expected and "1_Pooling/config.json" in got
    for rel in got:
        assert sha256(folder / rel) == source_sha256(rel), rel
    hub.reset_stats()
    whole = Path(snapshot_download(REPO, host=backend.url, cache_dir=tmp_path / "whole"))
    assert sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sha256(whole / WEIGHTS) == source_sha256(WEIGHTS)


def test_top_level_module_and_hf_hub_cache_in_a_fresh_interpreter(tmp_path: Path, backend: BackendProcess) -> None:
    script = f"""
import json, mmfs.client
from huggingface_hub import hf_hub_download
from modelmanager_client import DownloadInfo, modelmanager_download, snapshot_download
assert modelmanager_download is mmfs.client.modelmanager_download
assert snapshot_download is mmfs.client.snapshot_download and DownloadInfo is mmfs.client.DownloadInfo
got = modelmanager_download(DownloadInfo(repo_id={REPO!r}, filename="config.json", host={backend.url!r}))
snapshot_download(DownloadInfo(repo_id={REPO!r}, host={backend.url!r}), allow_patterns=["*.json"])
print(json.dumps([got, hf_hub_download({REPO!r}, "config.json", local_files_only=True)]))
"""
    env = child_env({**os.environ, "HF_HUB_CACHE": str(tmp_path / "hubcache"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    got, again = json.loads(result.stdout.splitlines()[-1])
    assert got == again and Path(got).is_relative_to(tmp_path / "hubcache")
    assert sha256(got) == source_sha256("config.json")
    assert result.stderr.strip() == ""  # not a terminal: no progress bars (test_progress_bars_on_a_terminal)


def test_packaging_ships_the_top_level_module() -> None:
    from setuptools import find_namespace_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = find_namespace_packages(where=str(ROOT), include=config["include"])
    assert "modelmanager_client" in found and "mmfs" in found


# -- route 3: the provider, and the order ----------------------------------------------------


def test_falls_back_to_the_provider_when_no_backend_answers(tmp_path: Path, hub: TestHub,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    caplog.set_level(logging.INFO)
    for n, host in enumerate((dead_host(), None, "")):
        hub.reset_stats()
        path = modelmanager_download(DownloadInfo(repo_id=REPO, filename=WEIGHTS, host=host),
                                     cache_dir=tmp_path / f"c{n}")
        assert sha256(path) == source_sha256(WEIGHTS)
        assert Path(path).is_relative_to(tmp_path / f"c{n}")
        assert hub.stats().bytes_served == (real_model_dir() / WEIGHTS).stat().st_size  # straight from the hub
    folder = snapshot_download(DownloadInfo(repo_id=REPO, host=dead_host()), cache_dir=tmp_path / "snap",
                               allow_patterns="*.txt")
    assert sorted(p.name for p in Path(folder).iterdir()) == ["vocab.txt"]
    # Passed over at once: huggingface_hub never retried a dead backend (about 25 s each).
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)
    assert not [r.getMessage() for r in caplog.records if "Retrying" in r.getMessage()]


def test_falls_back_when_the_backend_goes_away_after_it_answered(tmp_path: Path, hub: TestHub,
                                                                 backend: BackendProcess,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    info = DownloadInfo(repo_id=REPO, filename="config.json", host=backend.url)
    modelmanager_download(info, cache_dir=tmp_path / "cache")  # the backend is known to answer now
    backend.stop()
    hub.reset_stats()
    path = modelmanager_download(info, filename="vocab.txt", cache_dir=tmp_path / "cache")
    assert sha256(path) == source_sha256("vocab.txt")
    assert hub.stats().bytes_served == (real_model_dir() / "vocab.txt").stat().st_size


def test_backend_wins_over_the_provider(tmp_path: Path, hub: TestHub, backend: BackendProcess,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # reachable too, but second in line
    before = served_by_backend(backend)
    path = modelmanager_download(DownloadInfo(repo_id=REPO, filename="vocab.txt", host=backend.url),
                                 cache_dir=tmp_path / "cache")
    assert sha256(path) == source_sha256("vocab.txt")
    assert served_by_backend(backend) - before == (real_model_dir() / "vocab.txt").stat().st_size


# -- local_files_only and errors -------------------------------------------------------------


def test_local_files_only(tmp_path: Path, hub: TestHub, backend: BackendProcess) -> None:
    cache = tmp_path / "cache"
    info = DownloadInfo(repo_id=REPO, filename="config.json", host=backend.url)
    with pytest.raises(LocalEntryNotFoundError):
        modelmanager_download(info, cache_dir=cache, local_files_only=True)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, host=backend.url, cache_dir=cache, local_files_only=True)
    assert served_by_backend(backend) == 0 and hub.stats().requests == 0  # no network was used
    path = modelmanager_download(info, cache_dir=cache)
    backend.stop()
    assert modelmanager_download(info, cache_dir=cache, local_files_only=True) == path
    with pytest.raises(ValueError, match="local_files_only"):
        modelmanager_download(info, cache_dir=cache, local_files_only=True, force_download=True)


@pytest.mark.parametrize("route", ["backend", "provider"])
def test_errors_are_huggingface_hub_exceptions(route: str, tmp_path: Path, hub: TestHub, hub_root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gated = hub_root / "org" / "gated"
    make_synthetic_model(gated, 1 << 20, n_shards=1, seed=3)
    (gated / ".hub").mkdir()
    (gated / ".hub" / "gated").write_text("hf_right\n")
    if route == "backend":
        running = BackendProcess(tmp_path / "backend", hub_url=hub.url).start()
        host = running.url
    else:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        running, host = None, dead_host()
    try:
        def get(repo_id: str = REPO, filename: str = "config.json", **kw) -> str:
            return modelmanager_download(DownloadInfo(repo_id=repo_id, filename=filename, host=host, **kw),
                                         cache_dir=tmp_path / "cache")

        with pytest.raises(RepositoryNotFoundError):
            get("nobody/nothing")
        with pytest.raises(RevisionNotFoundError):
            get(revision="no-such-branch")
        with pytest.raises(EntryNotFoundError):
            get(filename="missing.bin")
        with pytest.raises(EntryNotFoundError):
            get(filename="config.json", subfolder="no-such-folder")
        with pytest.raises(GatedRepoError):
            get("org/gated", "config.json", token=False)
        with pytest.raises(GatedRepoError):
            get("org/gated", "config.json", token="hf_wrong")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(DownloadInfo(repo_id="nobody/nothing", host=host), cache_dir=tmp_path / "s")
        path = get("org/gated", "config.json", token="hf_right")
        assert sha256(path) == sha256(gated / "config.json")
    finally:
        if running is not None:
            running.stop()


def test_bad_arguments_are_value_errors_naming_the_problem(tmp_path: Path) -> None:
    def get(**kw) -> str:
        fields = {"repo_id": REPO, "filename": "config.json", **kw}
        return modelmanager_download(DownloadInfo(**fields), cache_dir=tmp_path / "cache")

    cases = [
        ({"provider": "S4"}, "provider 'S4'"),
        ({"repo_type": "notebook"}, "repo_type 'notebook'"),
        ({"filename": "../etc/passwd"}, "filename"),
        ({"filename": ""}, "filename"),
        ({"subfolder": "/abs", "filename": "x/../../y"}, "filename"),
        ({"host": "ftp://mm"}, "host 'ftp://mm'"),
        ({"host": "mm:notaport"}, "bad port"),
        ({"repo_id": ""}, "repo_id"),
        ({"revision": ""}, "revision"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            get(**fields)
    with pytest.raises(ValueError, match="filename"):
        snapshot_download(DownloadInfo(repo_id=REPO, filename="config.json"))
    assert modelmanager_download.__name__ and not (tmp_path / "cache").exists()


def test_backend_urls() -> None:
    assert client.backend_url("modelmanager-server") == "http://modelmanager-server:3000"
    assert client.backend_url("mm.mmfs.svc:8080") == "http://mm.mmfs.svc:8080"
    assert client.backend_url("https://mm.example/") == "https://mm.example"
    assert client.backend_url("[::1]:3001") == "http://[::1]:3001"
    assert client.backend_url(None) is None and client.backend_url(" ") is None


# -- route 1: the node's mount ---------------------------------------------------------------


@pytest.mark.fuse
def test_mount_route_copies_nothing(tmp_path: Path, hub: TestHub, backend: BackendProcess,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hubcache"
    with MountProcess(tmp_path / "mnt", tmp_path / "mmfs-cache", hub_url=hub.url) as mount:
        monkeypatch.setenv("MMFS_MOUNT", str(mount.mountpoint))
        commit = hub.commit(REPO)
        hub.reset_stats()
        before = served_by_backend(backend)
        info = DownloadInfo(repo_id=REPO, filename=WEIGHTS, host=backend.url)
        path = modelmanager_download(info, cache_dir=cache)
        # The branch path, nothing read yet: no content from the hub, none through the backend.
        assert path == str(mount.mountpoint / "huggingface" / REPO / "main" / WEIGHTS)
        assert hub.stats().bytes_served == 0 and served_by_backend(backend) == before
        assert not cache.exists()
        pinned = modelmanager_download(info, cache_dir=cache, revision=commit)
        assert pinned == str(mount.mountpoint / "huggingface" / REPO / commit / WEIGHTS)
        sub = modelmanager_download(info, filename="config.json", subfolder="1_Pooling")
        assert sub == str(mount.mountpoint / "huggingface" / REPO / "main" / "1_Pooling" / "config.json")
        assert snapshot_download(REPO, host=backend.url, cache_dir=cache) == str(mount.repo(REPO))
        assert snapshot_download(REPO, revision=commit) == str(mount.repo(REPO, commit))
        assert hub.stats().bytes_served == 0 and not cache.exists()
        # The same bytes as the backend route gives.
        assert sha256(path) == sha256(pinned) == source_sha256(WEIGHTS)
        assert sha256(sub) == source_sha256("1_Pooling/config.json")
        through_backend = modelmanager_download(info, cache_dir=cache, local_dir=tmp_path / "local")
        assert Path(through_backend).is_relative_to(tmp_path / "local")  # local_dir: a copy, as asked
        assert sha256(through_backend) == sha256(path)
        # What the mount does not show goes on to the backend, whose answer stands.
        with pytest.raises(EntryNotFoundError):
            modelmanager_download(info, filename="missing.bin", cache_dir=cache)
        with pytest.raises(RepositoryNotFoundError):
            modelmanager_download(info, repo_id="nobody/nothing", cache_dir=cache)
        with pytest.raises(LocalEntryNotFoundError):  # the cache only, never the mount
            modelmanager_download(info, filename="vocab.txt", cache_dir=cache, local_files_only=True)


@pytest.mark.fuse
def test_mount_found_in_mountinfo_and_skipped_when_it_is_gone(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A name no other mount on this machine can show, so the one found is ours.
    repo_id = f"org/m{uuid.uuid4().hex[:12]}"
    make_synthetic_model(hub_root / repo_id, 2 << 20, n_shards=2, seed=5)
    shard = sorted(p.name for p in (hub_root / repo_id).glob("*.safetensors"))[0]
    monkeypatch.delenv("MMFS_MOUNT")
    mount = MountProcess(tmp_path / "mnt", tmp_path / "mmfs-cache", hub_url=hub.url)
    with mount:
        assert str(mount.mountpoint) in client.mount_roots()
        path = modelmanager_download(DownloadInfo(repo_id=repo_id, filename=shard, host=dead_host()),
                                     cache_dir=tmp_path / "hubcache")
        assert path == str(mount.repo(repo_id) / shard)
        assert sha256(path) == sha256(hub_root / repo_id / shard)
        # A bind mount of one model (what the CSI plugin gives a pod) is no mount root.
        bind = tmp_path / "bind"
        bind.mkdir()
        subprocess.run(["mount", "--bind", str(mount.repo(repo_id, hub.commit(repo_id))), str(bind)], check=True)
        try:
            roots = client.mount_roots()
            assert str(mount.mountpoint) in roots and str(bind) not in roots
        finally:
            subprocess.run(["umount", str(bind)], check=True)
    # Unmounted: the same call goes on to the provider.
    assert str(mount.mountpoint) not in client.mount_roots()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    path = modelmanager_download(DownloadInfo(repo_id=repo_id, filename=shard, host=dead_host()),
                                 cache_dir=tmp_path / "hubcache")
    assert Path(path).is_relative_to(tmp_path / "hubcache") and sha256(path) == sha256(hub_root / repo_id / shard)


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.fuse
def test_dataset_on_the_mount_and_through_the_backend(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                      backend: BackendProcess,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = "org/corpus"
    source = hub_root / "datasets" / dataset
    make_synthetic_model(source, 2 << 20, n_shards=2, seed=9)
    (source / "train").mkdir()
    (source / "train" / "part-0.jsonl").write_text('{"text": "a"}\n')
    # Through the backend with huggingface_hub itself, as a user runs it (HF_ENDPOINT is read
    # when huggingface_hub is imported: a fresh interpreter), into the Hub cache.
    script = f"from huggingface_hub import snapshot_download; print(snapshot_download({dataset!r}, repo_type='dataset'))"
    env = child_env({**os.environ, "HF_ENDPOINT": backend.url, "HF_HUB_CACHE": str(tmp_path / "hubcache")})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    cached = Path(result.stdout.strip().splitlines()[-1])
    assert cached.is_relative_to(tmp_path / "hubcache" / "datasets--org--corpus") and tree(cached) == tree(source)
    # On a node mount that reads through the same backend: the dataset's own folder.
    with MountProcess(tmp_path / "mnt", tmp_path / "mmfs-cache", backend=backend.url) as mount:
        monkeypatch.setenv("MMFS_MOUNT", str(mount.mountpoint))
        hub.reset_stats()
        before = served_by_backend(backend)
        info = DownloadInfo(repo_id=dataset, repo_type="dataset", host=backend.url)
        folder = snapshot_download(info, cache_dir=tmp_path / "unused")
        assert folder == str(mount.repo(dataset, provider="huggingface-datasets"))
        one = modelmanager_download(info, filename="part-0.jsonl", subfolder="train")
        assert one == str(Path(folder) / "train" / "part-0.jsonl")
        assert served_by_backend(backend) == before and not (tmp_path / "unused").exists()  # nothing copied
        assert tree(Path(folder)) == tree(cached)  # byte-identical, read through the mount
    assert hub.stats().bytes_served == 0  # the backend had every byte already


def test_progress_bars_on_a_terminal(tmp_path: Path, backend: BackendProcess) -> None:
    """tqdm bars as huggingface_hub draws them, on a terminal (a pty); the same calls with
    standard error on a pipe print nothing (test_top_level_module_and_hf_hub_cache_...)."""
    script = f"""
from modelmanager_client import DownloadInfo, modelmanager_download, snapshot_download
modelmanager_download(DownloadInfo(repo_id={REPO!r}, filename="vocab.txt", host={backend.url!r}))
snapshot_download(DownloadInfo(repo_id={REPO!r}, host={backend.url!r}), allow_patterns=["*.json"])
"""
    env = child_env({**os.environ, "HF_HUB_CACHE": str(tmp_path / "hubcache"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    leader, follower = pty.openpty()
    # A terminal of 120 columns (a fresh pty has none, and tqdm draws a bar as wide as that).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=follower, stdout=subprocess.DEVNULL, env=env)
        os.close(follower)
        seen = bytearray()
        while True:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not piece:
                break
            seen += piece
        assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        os.close(leader)
    shown = seen.decode(errors="replace")
    assert "vocab.txt: 100%|" in shown and "Fetching" in shown
