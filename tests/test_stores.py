"""Object stores and local roots as model sources (docs/providers.md), with real parts: moto's
S3 server and Azurite on loopback (mmfs.testing.stores), real mounts, a real backend.

Each store test runs for S3 and for Azure Blob. The model is a synthetic safetensors repo
with a subfolder; some objects carry the store's checksum (S3 SHA-256, Azure Content-MD5)
and the shards do not (pinned by ETag, trusted on first complete fetch).
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trio

from backend_server.testing import BackendProcess
from mmfs.client import DownloadInfo, modelmanager_download, snapshot_download
from mmfs.engine import EngineConfig, FetchEngine
from mmfs.errors import AccessDenied, EntryNotFound, InvalidName, RepoNotFound, StaleRevision
from mmfs.manifest import MD5, PINNED, SHA256
from mmfs.names import make_repo, parse_repo_id
from mmfs.remote.base import FileSource
from mmfs.remote.router import StoreConfig
from mmfs.testing.models import make_synthetic_model
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import TcpProxy
from mmfs.testing.stores import Azurite, MotoS3, azurite_command
from mmfs.tiers.memory import MemoryTier

CHUNK = 64 << 10
PREFIX = "org/tiny"
#: Files uploaded without a store checksum (the rest get one).
UNCHECKED = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


# -- the stores ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    if azurite_command() is None:
        reason = "Azurite is not installed (scripts/setup.sh installs it into .deps/azurite)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the Azure tests must run in CI")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("azurite")
    with Azurite(root / "data", root / "azurite.log") as server:
        yield server


@dataclass
class Store:
    """One bucket (container) of a running store, and how to write into it."""

    provider: str
    bucket: str
    env: dict[str, str]  # credentials for mmfs processes
    put: Callable[[str, bytes, bool], None]  # key, data, with the store's checksum
    delete: Callable[[str], None]
    through: Callable[[str], dict[str, str]]  # env for the same store at another URL (a proxy)
    url: str
    bad_env: dict[str, str] = field(default_factory=dict)  # a wrong key
    versioned: bool = False

    @property
    def spec(self) -> str:
        return f"{self.provider}:{self.bucket}"

    def repo_id(self, prefix: str = PREFIX) -> str:
        return f"{self.bucket}/{prefix}"


def _s3_store(server: MotoS3) -> Store:
    client = server.client()
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)

    def put(key: str, data: bytes, checksum: bool) -> None:
        extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
        client.put_object(Bucket=bucket, Key=key, Body=data, **extra)

    return Store("s3", bucket, server.env, put, lambda key: client.delete_object(Bucket=bucket, Key=key),
                 lambda url: {**server.env, "AWS_ENDPOINT_URL": url}, server.url,
                 bad_env={**server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})


def _azure_store(server: Azurite) -> Store:
    service = server.client()
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    container = service.create_container(bucket)

    def put(key: str, data: bytes, checksum: bool) -> None:
        if checksum:  # one Put Blob: the service keeps its Content-MD5
            container.upload_blob(key, data, overwrite=True)
            return
        blob = container.get_blob_client(key)  # staged blocks: no Content-MD5 on the blob
        ids = []
        for n, start in enumerate(range(0, max(len(data), 1), 1 << 20)):
            ids.append(f"{n:08d}")
            blob.stage_block(ids[-1], data[start:start + (1 << 20)])
        blob.commit_block_list(ids)

    return Store("azure", bucket, server.env, put, lambda key: container.delete_blob(key),
                 lambda url: {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string(url=url)}, server.url,
                 bad_env={"AZURE_STORAGE_CONNECTION_STRING": server.connection_string(key="A" * 86 + "==")})


@pytest.fixture(params=["s3", "azure"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "s3":
        return _s3_store(request.getfixturevalue("moto_server"))
    return _azure_store(request.getfixturevalue("azurite_server"))


@pytest.fixture
def model(tmp_path: Path) -> dict[str, bytes]:
    """A model of several files with a subfolder: path -> bytes."""
    root = make_synthetic_model(tmp_path / "model", 1 << 20, n_shards=2, seed=11)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def upload(store: Store, model: dict[str, bytes], prefix: str = PREFIX) -> None:
    for path, data in model.items():
        store.put(f"{prefix}/{path}", data, path not in UNCHECKED)


def read_tree(folder: Path, model: dict[str, bytes]) -> dict[str, bytes]:
    return {path: (folder / path).read_bytes() for path in model}


def mount_args(*specs: str) -> list[str]:
    return ["--chunk-size", str(CHUNK), "--memory-cache", "64MiB", *[a for s in specs for a in ("--store", s)]]


# -- names and configuration (no store needed) ---------------------------------------------


def test_store_names_and_config(tmp_path: Path) -> None:
    repo = parse_repo_id("models/org/sub/tiny", "s3")
    assert (repo.org, repo.name, repo.url_path) == ("models", "org/sub/tiny", "s3/models/org%2Fsub%2Ftiny")
    for bad in ("models", "models/org/latest", "models/" + "a" * 40, "models/a/../b", "models//a"):
        with pytest.raises(InvalidName):
            parse_repo_id(bad, "s3")
    config = StoreConfig.parse(["s3:a,azure:*", f"file:weka={tmp_path}"])
    assert config.allows("s3")("a") and not config.allows("s3")("b") and config.allows("azure")("any")
    assert config.file_roots == {"weka": tmp_path}
    for bad in ("gcs:x", "file:weka=relative", f"file:w={tmp_path / 'missing'}", "s3:"):
        with pytest.raises(InvalidName):
            StoreConfig.parse([bad])


# -- reads: mounts, client, one upstream copy for four nodes ---------------------------------


@pytest.mark.fuse
def test_four_nodes_read_a_store_model_once_and_the_client_gets_the_same_bytes(
        store: Store, model: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload(store, model)
    total = sum(len(d) for d in model.values())
    proxy, store_url = TcpProxy.in_front_of(store.url)
    with proxy, \
            BackendProcess(tmp_path / "backend", hub_url="http://127.0.0.1:9", chunk_size=str(CHUNK),
                           extra_args=["--store", store.spec], env=store.through(store_url)) as backend:
        mounts = [MountProcess(tmp_path / f"mnt{i}", tmp_path / f"cache{i}", backend=backend.url) for i in range(4)]
        try:
            for mount in mounts:
                mount.start()
            got: dict[int, dict[str, bytes]] = {}
            errors: list[BaseException] = []

            def node(i: int) -> None:
                try:
                    got[i] = read_tree(mounts[i].repo(store.repo_id(), "latest", store.provider), model)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=node, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
            assert all(got[i] == model for i in range(4))
            # Four nodes, one copy from the store (plus listing, HEADs and response headers).
            assert total <= proxy.sent_bytes < total * 1.2, (proxy.sent_bytes, total)
            # The backend serves the buckets of its --store list only.
            unlisted = mounts[0].repo(f"not-{store.bucket}/{PREFIX}", "latest", store.provider)
            with pytest.raises(PermissionError):
                os.stat(unlisted)

            folder = mounts[0].repo(store.repo_id(), "latest", store.provider)
            commit = os.readlink(folder)
            assert len(commit) == 40
            info = DownloadInfo(repo_id=store.repo_id(), filename="tokenizer_config.json", subfolder="tokenizer",
                                host=backend.url, provider=store.provider.upper())
            monkeypatch.setenv("MMFS_MOUNT", str(mounts[0].mountpoint))
            assert modelmanager_download(info) == str(folder / "tokenizer/tokenizer_config.json")
            monkeypatch.setenv("MMFS_MOUNT", "none")
            cache = tmp_path / "client-cache"
            path = Path(modelmanager_download(info, cache_dir=cache))
            assert path == cache / store.provider / store.bucket / PREFIX / commit / "tokenizer/tokenizer_config.json"
            assert path.read_bytes() == model["tokenizer/tokenizer_config.json"]
            snapshot = Path(snapshot_download(DownloadInfo(repo_id=store.repo_id(), host=backend.url,
                                                           provider=store.provider), cache_dir=cache))
            assert read_tree(snapshot, model) == model
            with pytest.raises(EntryNotFound, match="no-such-file"):
                modelmanager_download(DownloadInfo(repo_id=store.repo_id(), filename="no-such-file",
                                                   host=backend.url, provider=store.provider), cache_dir=cache)
        finally:
            for mount in mounts:
                mount.stop()


# -- a changed object: a new revision, never a mix -----------------------------------------------


async def _engine_read(remote_env: dict[str, str], spec: str, work: Callable[[FetchEngine], Any]) -> Any:
    remote = StoreConfig.parse([spec]).remotes(CHUNK)[spec.split(":")[0]]
    async with FetchEngine([MemoryTier(64 << 20)], remote, None, EngineConfig(ref_ttl=0.0)) as engine:
        return await work(engine)


async def test_an_object_overwritten_mid_read_is_refused_not_mixed(
        store: Store, model: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    upload(store, model)
    path = UNCHECKED[0]
    old = model[path]
    new = bytes(b ^ 0xFF for b in old)
    repo = make_repo(store.provider, store.bucket, PREFIX)

    async def work(engine: FetchEngine) -> None:
        manifest = await engine.manifest(repo, "latest")
        entry = manifest.file(path)
        assert entry is not None and entry.hash_algo == PINNED and entry.chunk_count > 2
        source = FileSource(repo, manifest.commit, entry)
        assert await engine.read(source, 0, CHUNK) == old[:CHUNK]
        await trio.to_thread.run_sync(store.put, f"{PREFIX}/{path}", new, False)
        with pytest.raises(StaleRevision, match=path):
            await engine.read(source, CHUNK, entry.size - CHUNK)
        newer = await engine.manifest(repo, "latest")
        assert newer.commit != manifest.commit
        fresh = newer.file(path)
        assert fresh is not None and fresh.content_id != entry.content_id
        assert await engine.read(FileSource(repo, newer.commit, fresh), 0, fresh.size) == new
        checked = newer.file("config.json")
        assert checked is not None and checked.hash_algo == (SHA256 if store.provider == "s3" else MD5)

    await _engine_read(store.env, store.spec, work)


async def test_a_versioned_bucket_keeps_old_revisions_readable(
        moto_server: MotoS3, model: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    store = _s3_store(moto_server)
    moto_server.client().put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    upload(store, model)
    path, repo = UNCHECKED[1], make_repo("s3", store.bucket, PREFIX)

    async def work(engine: FetchEngine) -> None:
        manifest = await engine.manifest(repo, "latest")
        entry = manifest.file(path)
        assert entry is not None and entry.pin.startswith("version:")
        await trio.to_thread.run_sync(store.put, f"{PREFIX}/{path}", b"rewritten" * 1000, False)
        assert await engine.read(FileSource(repo, manifest.commit, entry), 0, entry.size) == model[path]
        assert (await engine.manifest(repo, "latest")).commit != manifest.commit

    await _engine_read(store.env, store.spec, work)


# -- errors ----------------------------------------------------------------------------------


def _errno_of(action: Callable[[], Any]) -> int:
    with pytest.raises(OSError) as caught:
        action()
    return caught.value.errno


@pytest.mark.fuse
def test_store_errors_on_the_mount(store: Store, model: dict[str, bytes], tmp_path: Path) -> None:
    upload(store, model)
    other = {"s3": "azure", "azure": "s3"}[store.provider]
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", args=mount_args(f"{store.provider}:*"),
                      env=store.env) as mount:
        base = mount.mountpoint / store.provider
        good = base / store.bucket / PREFIX / "latest"
        assert (good / "config.json").read_bytes() == model["config.json"]
        assert _errno_of(lambda: os.stat(base / "no-such-bucket" / PREFIX / "latest")) == errno.ENOENT
        assert _errno_of(lambda: os.stat(base / store.bucket / "org/missing/latest")) == errno.ENOENT
        assert _errno_of(lambda: os.stat(good / "no-such-key.json")) == errno.ENOENT
        # Not in this mount's --store list, and a provider it does not serve: refused.
        assert _errno_of(lambda: os.stat(mount.mountpoint / other / store.bucket / PREFIX / "latest")) == errno.ENOENT
        # A key deleted or rewritten after the listing: that revision is stale, reads refused.
        store.delete(f"{PREFIX}/{UNCHECKED[1]}")
        assert _errno_of(lambda: (good / UNCHECKED[1]).read_bytes()) == errno.ESTALE
        store.put(f"{PREFIX}/{UNCHECKED[0]}", b"x" * 1000, False)
        assert _errno_of(lambda: (good / UNCHECKED[0]).read_bytes()) == errno.ESTALE
    with MountProcess(tmp_path / "mnt2", tmp_path / "cache2", args=mount_args(store.spec),
                      env=store.bad_env) as mount:
        target = mount.mountpoint / store.provider / store.bucket / PREFIX / "latest"
        assert _errno_of(lambda: os.stat(target)) == errno.EACCES


def test_store_errors_in_the_client(store: Store, model: dict[str, bytes], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    upload(store, model)
    monkeypatch.setenv("MMFS_MOUNT", "none")
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)

    def get(repo_id: str, filename: str = "config.json") -> str:
        return modelmanager_download(DownloadInfo(repo_id=repo_id, filename=filename, host=None,
                                                  provider=store.provider), cache_dir=tmp_path / "cache")

    assert Path(get(store.repo_id())).read_bytes() == model["config.json"]  # straight from the store
    with pytest.raises(RepoNotFound, match="no-such-bucket"):
        get(f"no-such-bucket/{PREFIX}")
    with pytest.raises(RepoNotFound, match="org/missing"):
        get(f"{store.bucket}/org/missing")
    with pytest.raises(EntryNotFound, match="nothing.json"):
        get(store.repo_id(), "nothing.json")
    for key, value in store.bad_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AccessDenied, match=store.bucket):
        get(store.repo_id())
    # What an earlier download left in the cache is found without asking the store.
    cached = modelmanager_download(DownloadInfo(repo_id=store.repo_id(), filename="config.json", host=None,
                                                provider=store.provider), cache_dir=tmp_path / "cache",
                                   local_files_only=True)
    assert Path(cached).read_bytes() == model["config.json"]
    with pytest.raises(ValueError, match="provider"):
        modelmanager_download(DownloadInfo(repo_id=store.repo_id(), filename="x", provider="gcs"))


# -- local directories -----------------------------------------------------------------------


@pytest.mark.fuse
def test_file_provider_through_the_mount(model: dict[str, bytes], tmp_path: Path) -> None:
    root = tmp_path / "weka"
    for path, data in model.items():
        (root / PREFIX / path).parent.mkdir(parents=True, exist_ok=True)
        (root / PREFIX / path).write_bytes(data)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the root")
    (root / PREFIX / "escape.txt").symlink_to(secret)
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", args=mount_args(f"file:weka={root}")) as mount:
        folder = mount.mountpoint / "file" / "weka" / PREFIX / "latest"
        assert sorted(os.listdir(folder)) == sorted({p.split("/")[0] for p in model})  # no escape.txt
        assert _errno_of(lambda: os.stat(mount.mountpoint / "file" / "other" / PREFIX / "latest")) == errno.ENOENT
        # Rewritten in place (same size) after the listing, before anyone read it: that
        # revision's read is refused, not served the new bytes.
        (root / PREFIX / "config.json").write_bytes(model["config.json"].upper())
        assert _errno_of(lambda: (folder / "config.json").read_bytes()) == errno.ESTALE
        rest = {p: d for p, d in model.items() if p != "config.json"}
        assert read_tree(folder, rest) == rest
        # The folders above a revision list the models known here, prefix by prefix.
        assert os.listdir(mount.mountpoint / "file" / "weka") == ["org"]
        assert os.listdir(mount.mountpoint / "file" / "weka" / "org") == ["tiny"]
        assert os.listdir(mount.mountpoint / "file" / "weka" / PREFIX) == ["latest", os.readlink(folder)]
