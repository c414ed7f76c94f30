"""Derived artifacts: keys, the backend's blob store and build leases, and (real mounts,
real backend, real builders) push, path and build once per cluster (docs/artifacts.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

import backend_server.testing as backend_testing
from backend_server.artifact_store import ArtifactStore, Conflict
from backend_server.builds import BuildLeases
from mmfs.artifact_client import ArtifactClient
from mmfs.artifacts import ArtifactKey, scan_dir
from mmfs.errors import IntegrityError, InvalidName, MmfsError
from mmfs.metadata import MetadataStore
from mmfs.names import RepoRef, parse_repo_id
from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import free_port
from mmfs.testing.process import child_env

TOKEN = "publish-s3cret"
MODEL = "huggingface/org/tiny@main"
MMFS = [sys.executable, "-m", "mmfs"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MMFS, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env({**os.environ, "MMFS_PUBLISH_TOKEN": TOKEN, **(env or {})}))


def key_args(kind: str, mount: Path, model: str = MODEL, target: str = "cpu") -> list[str]:
    return ["--kind", kind, "--model", model, "--target", target, "--mount", str(mount)]


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# -- units --------------------------------------------------------------------------------


def test_key_id_names_exactly_what_determines_the_artifact() -> None:
    repo = parse_repo_id("org/tiny")
    base = ArtifactKey(repo, "a" * 40, "tensorrt-engine", "sm90-tp2-fp8", "trtllm-0.20")
    assert base.id == ArtifactKey.from_json(json.loads(json.dumps(base.to_json()))).id
    others = [ArtifactKey(parse_repo_id("org/other"), "a" * 40, "tensorrt-engine", "sm90-tp2-fp8", "trtllm-0.20"),
              ArtifactKey(repo, "b" * 40, "tensorrt-engine", "sm90-tp2-fp8", "trtllm-0.20"),
              ArtifactKey(repo, "a" * 40, "torch-compile-cache", "sm90-tp2-fp8", "trtllm-0.20"),
              ArtifactKey(repo, "a" * 40, "tensorrt-engine", "sm80-tp2-fp8", "trtllm-0.20"),
              ArtifactKey(repo, "a" * 40, "tensorrt-engine", "sm90-tp2-fp8", "trtllm-0.21")]
    assert len({base.id, *(k.id for k in others)}) == 6
    for bad in ("", "../x", "a/b", "x" * 129, "-x"):
        with pytest.raises(InvalidName):
            ArtifactKey(repo, "a" * 40, bad, "cpu")
    with pytest.raises(InvalidName):
        ArtifactKey(repo, "main", "k", "cpu")  # keyed by a commit, never a branch


def test_build_leases_one_builder_takeover_after_expiry_failure_to_waiters() -> None:
    now = [0.0]
    leases = BuildLeases(clock=lambda: now[0])
    key = {"kind": "k"}
    first = leases.acquire("id", key, "node-a", 10, None)
    assert first["state"] == "granted" and first["generation"] == 1
    waiting = leases.acquire("id", key, "node-b", 10, None)
    assert waiting == {"state": "building", "generation": 1, "holder": "node-a", "expires_in": 10.0}
    now[0] = 8.0
    assert leases.renew("id", first["lease"])  # heartbeat: expires at 18 now
    now[0] = 15.0
    assert leases.acquire("id", key, "node-b", 10, 1)["state"] == "building"
    assert [b["holder"] for b in leases.in_progress()] == ["node-a"]
    now[0] = 18.5  # node-a stopped renewing
    second = leases.acquire("id", key, "node-b", 10, 1)
    assert second["state"] == "granted" and second["generation"] == 2 and second["took_over"]
    assert not leases.renew("id", first["lease"])  # the dead builder's lease is gone
    assert leases.release("id", second["lease"], failed=True, log_tail="line\nboom 42\n")
    told = leases.acquire("id", key, "node-c", 10, 2)  # waited on generation 2
    assert told["state"] == "failed" and "boom 42" in told["log_tail"]
    assert leases.acquire("id", key, "node-d", 10, None)["generation"] == 3  # a new request tries again


def test_blob_store_resumes_verifies_and_publishes_whole(tmp_path: Path) -> None:
    metadata = MetadataStore(tmp_path / "metadata")
    store = ArtifactStore(tmp_path / "artifacts", metadata, 64 << 10)
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    key = ArtifactKey(parse_repo_id("org/tiny"), "c" * 40, "k", "cpu")
    files = [("engine.bin", len(data), sha)]
    assert store.append(sha, len(data), 0, data[:100_000]) == 100_000
    with pytest.raises(Conflict):
        store.append(sha, len(data), 50_000, data[50_000:])  # not where the upload stopped
    with pytest.raises(Conflict):
        store.publish(key, files)  # a blob still partial: nothing becomes visible
    assert store.record(key.id) is None and metadata.get_manifest(RepoRef("artifacts", "mmfs", "published"),
                                                                   key.id) is None
    assert store.staged(sha, len(data)) == 100_000  # a new push resumes here
    assert store.append(sha, len(data), 100_000, data[100_000:]) == len(data)
    record, created = store.publish(key, files)
    assert created and record["size"] == len(data) and store.read(sha, 10, 20) == data[10:20]
    assert store.publish(key, files)[1] is False  # the same files again: a no-op
    other = os.urandom(10)
    other_sha = hashlib.sha256(other).hexdigest()
    store.append(other_sha, 10, 0, other)
    with pytest.raises(Conflict):
        store.publish(key, [("engine.bin", 10, other_sha)])  # immutable once published
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError):
        store.append(wrong, 5, 0, b"12345")
    assert store.staged(wrong, 5) == 0  # the bad upload was dropped
    # Retention: pinned while the model commit is, reclaimable after.
    assert store.reclaim(lambda repo, commit: commit == "c" * 40) == []
    assert store.reclaim(lambda repo, commit: False) == [key.id]
    assert store.record(key.id) is None and not store.blob_path(sha).exists()
    metadata.close()


def test_scan_dir_refuses_symlinks_and_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidName, match="no files"):
        scan_dir(tmp_path / "empty")
    made = make_dir(tmp_path / "d", {"a": b"x", "sub/b": b"yy"})
    assert [(f.path, f.size) for f in scan_dir(made)] == [("a", 1), ("sub/b", 2)]
    (made / "link").symlink_to(made / "a")
    with pytest.raises(InvalidName, match="symbolic link"):
        scan_dir(made)


def test_build_without_a_builder_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run("artifact", "build", "--kind", "k", "--model", MODEL, "--target", "cpu", "--mount", str(tmp_path))
    assert result.returncode == 2 and "give the builder after --" in result.stderr
    assert "Traceback" not in result.stderr


# -- a cluster: hub, backend with the publish token, one node --------------------------------


class Cluster:
    def __init__(self, tmp: Path, hub: TestHub, backend: backend_testing.BackendProcess, mount: MountProcess) -> None:
        self.tmp, self.hub, self.backend, self.mount = tmp, hub, backend, mount

    @property
    def mnt(self) -> Path:
        return self.mount.mountpoint

    def key(self, kind: str, repo_id: str = "org/tiny") -> ArtifactKey:
        return ArtifactKey(parse_repo_id(repo_id), self.hub.commit(repo_id), kind, "cpu")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from mmfs.testing.models import populate_hub_root

    if not os.path.exists("/dev/fuse") and not os.environ.get("CI"):
        pytest.skip("/dev/fuse is missing")
    tmp = tmp_path_factory.mktemp("artifacts")
    root = populate_hub_root(tmp / "hub", include_real=False)
    make_synthetic_model(root / "org" / "tiny", 256 << 10, n_shards=1, seed=3)
    make_synthetic_model(root / "org" / "gated", 64 << 10, n_shards=1, seed=4)
    (root / "org" / "gated" / ".hub").mkdir()
    (root / "org" / "gated" / ".hub" / "gated").write_text("reader-token")
    with TestHub(root) as hub, \
            backend_testing.BackendProcess(tmp / "backend", hub_url=hub.url, chunk_size="64KiB",
                                           env={"MMFS_PUBLISH_TOKEN": TOKEN}) as backend, \
            MountProcess(tmp / "mnt", tmp / "cache", backend=backend.url) as mount:
        yield Cluster(tmp, hub, backend, mount)


pytestmark = [pytest.mark.timeout(240)]


@pytest.mark.fuse
def test_push_refused_without_token_partial_never_visible_then_resumed(cluster: Cluster, tmp_path: Path) -> None:
    files = {"engine.bin": os.urandom(3 << 20), "meta/config.json": b'{"tp": 2}'}
    out = make_dir(tmp_path / "out", files)
    args = key_args("push-test", cluster.mnt)
    for token in ("", "wrong"):
        refused = run("artifact", "push", str(out), *args, env={"MMFS_PUBLISH_TOKEN": token})
        assert refused.returncode == 1 and "publish token" in refused.stderr and "Traceback" not in refused.stderr
    assert run("artifact", "path", *args).returncode == 1
    # A push that dies after part of a blob: nothing shows anywhere.
    key = cluster.key("push-test")
    client = ArtifactClient(cluster.backend.url, publish_token=TOKEN)
    local = {f.path: f for f in scan_dir(out)}["engine.bin"]
    client.call("POST", "/v1/artifacts/upload", json={"key": key.to_json(), "files": [local.to_json()]})
    client.call("PUT", f"/v1/artifacts/blobs/{local.sha256}", content=files["engine.bin"][:1 << 20],
                params={"offset": 0, "size": local.size})
    with pytest.raises(MmfsError):
        client.call("POST", "/v1/artifacts/publish", json={"key": key.to_json(),
                                                          "files": [f.to_json() for f in scan_dir(out)]})
    client.close()
    assert not (cluster.mnt / ".artifacts" / key.id).exists()
    assert key.id not in [a["id"] for a in httpx.get(f"{cluster.backend.url}/v1/artifacts").json()["artifacts"]]
    pushed = run("artifact", "push", str(out), *args)
    assert pushed.returncode == 0, pushed.stderr
    assert f"{key.id} published" in pushed.stdout and "(2.0 MiB sent)" in pushed.stdout  # resumed after 1 MiB
    found = run("artifact", "path", *args)
    assert found.returncode == 0 and found.stdout.strip() == str(cluster.mnt / ".artifacts" / key.id)
    where = Path(found.stdout.strip())
    assert {p.relative_to(where).as_posix(): p.read_bytes() for p in where.rglob("*") if p.is_file()} == files
    again = run("artifact", "push", str(out), *args)
    assert again.returncode == 0 and "already published" in again.stdout and "(0 B sent)" in again.stdout
    changed = make_dir(tmp_path / "changed", {"engine.bin": b"other"})
    conflict = run("artifact", "push", str(changed), *args)
    assert conflict.returncode == 1 and "immutable" in conflict.stderr
    status = run("status", "--mount", str(cluster.mnt))
    assert key.id in status.stdout and "push-test of huggingface/org/tiny" in status.stdout
    metrics = cluster.backend.metrics()
    assert metrics["mmfs_backend_artifacts"] >= 1 and metrics['mmfs_backend_artifact_pushes_total{outcome="refused"}'] >= 2


@pytest.mark.fuse
def test_readers_need_access_to_the_model(cluster: Cluster, tmp_path: Path) -> None:
    key = cluster.key("gated-test", "org/gated")
    out = make_dir(tmp_path / "out", {"cache.bin": b"compiled"})
    client = ArtifactClient(cluster.backend.url, publish_token=TOKEN)
    from mmfs.artifact_client import push

    assert push(client, out, key).created
    client.close()
    url = f"{cluster.backend.url}/v1/manifest/artifacts/mmfs/published/{key.id}"
    anonymous = httpx.get(url)
    assert anonymous.status_code in (401, 403), anonymous.text
    allowed = httpx.get(url, headers={"Authorization": "Bearer reader-token"})
    assert allowed.status_code == 200 and allowed.json()["files"][0]["path"] == "cache.bin"
    assert httpx.get(f"{cluster.backend.url}/v1/artifacts/{key.id}").status_code in (401, 403)
    listed = httpx.get(f"{cluster.backend.url}/v1/artifacts").json()["artifacts"]
    assert key.id not in [a["id"] for a in listed]  # no private model names for anonymous callers


@pytest.mark.fuse
def test_corrupted_artifact_blob_is_caught(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    out = make_dir(tmp_path / "out", {"engine.plan": data})
    args = key_args("corrupt-test", cluster.mnt)
    assert run("artifact", "push", str(out), *args).returncode == 0
    key = cluster.key("corrupt-test")
    blob = cluster.backend.data_dir / "artifacts" / "blobs" / hashlib.sha256(data).hexdigest()[:2] / \
        hashlib.sha256(data).hexdigest()
    with open(blob, "r+b") as f:  # bit rot on the backend's volume, before anyone read it
        f.seek(150_000)
        byte = f.read(1)
        f.seek(150_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(OSError) as caught:
        (cluster.mnt / ".artifacts" / key.id / "engine.plan").read_bytes()
    assert caught.value.errno == errno.EIO
    assert cluster.backend.metrics()["mmfs_backend_integrity_failures_total"] >= 1


@pytest.mark.fuse
def test_eight_concurrent_builds_run_the_builder_once(cluster: Cluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    builder = ("import os, time; open(os.environ['RUNS'], 'a').write('x'); time.sleep(3); "
               "names = sorted(os.listdir(os.environ['MMFS_MODEL_PATH'])); "
               "open(os.path.join(os.environ['MMFS_ARTIFACT_OUT'], 'built.txt'), 'w').write(' '.join(names))")
    procs = [subprocess.Popen([*MMFS, "artifact", "build", *key_args("once-test", cluster.mnt), "--",
                               sys.executable, "-c", builder], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env({**os.environ, "MMFS_PUBLISH_TOKEN": TOKEN,
                                                        "RUNS": str(runs)}))
             for _ in range(8)]
    results = [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for code, stdout, stderr in results:
        assert code == 0, stderr
    paths = {stdout.strip() for _, stdout, _ in results}
    assert paths == {str(cluster.mnt / ".artifacts" / cluster.key("once-test").id)}
    assert runs.read_text() == "x"  # one build for eight requesters
    assert sum("is building" in stderr for _, _, stderr in results) == 7
    built = (Path(paths.pop()) / "built.txt").read_text()
    assert "config.json" in built.split() and "model-00001-of-00001.safetensors" in built.split()


@pytest.mark.fuse
def test_killed_builder_is_taken_over_after_its_lease_expires(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    payload = os.urandom(500_000)
    (tmp_path / "payload").write_bytes(payload)
    builder = ("import os, shutil, time, pathlib; s = pathlib.Path(os.environ['STATE']); "
               "first = not (s / 'first').exists(); (s / 'first').touch(); "
               "(s / ('pid-first' if first else 'pid-second')).write_text(str(os.getpid())); "
               "time.sleep(600 if first else 0); "
               "shutil.copy(os.environ['PAYLOAD'], os.path.join(os.environ['MMFS_ARTIFACT_OUT'], 'engine.bin'))")
    env = child_env({**os.environ, "MMFS_PUBLISH_TOKEN": TOKEN, "STATE": str(state),
                     "PAYLOAD": str(tmp_path / "payload")})
    argv = [*MMFS, "artifact", "build", *key_args("takeover-test", cluster.mnt), "--lease-ttl", "3", "--",
            sys.executable, "-c", builder]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (state / "pid-first").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.1)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1)
    first.kill()  # the requester that holds the lease dies mid-build (its builder dies with it)
    first.wait()
    code = second.wait(timeout=120)
    stderr = second.stderr.read()  # type: ignore[union-attr]
    assert code == 0, stderr
    assert "stopped renewing its lease" in stderr and (state / "pid-second").exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # PR_SET_PDEATHSIG: the first builder does not outlive its requester
            os.kill(int((state / "pid-first").read_text()), 0)
            time.sleep(0.1)
    where = Path(second.stdout.read().strip())  # type: ignore[union-attr]
    assert (where / "engine.bin").read_bytes() == payload  # complete, and verified on the way


@pytest.mark.fuse
def test_failed_build_publishes_nothing_and_every_waiter_gets_its_log(cluster: Cluster) -> None:
    builder = "import sys, time; time.sleep(3); print('compiling layer 7'); print('boom 42', file=sys.stderr); sys.exit(3)"
    procs = [subprocess.Popen([*MMFS, "artifact", "build", *key_args("fail-test", cluster.mnt), "--",
                               sys.executable, "-c", builder], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env({**os.environ, "MMFS_PUBLISH_TOKEN": TOKEN}))
             for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 1
        stderr = proc.stderr.read()  # type: ignore[union-attr]
        assert "failed; its log ends with" in stderr and "boom 42" in stderr and "Traceback" not in stderr
    assert run("artifact", "path", *key_args("fail-test", cluster.mnt)).returncode == 1


@pytest.mark.fuse
def test_backend_restart_keeps_every_artifact(tmp_path: Path, hub_root: Path) -> None:
    make_synthetic_model(hub_root / "org" / "tiny", 128 << 10, n_shards=1, seed=5)
    port = free_port()
    files = {"a.bin": os.urandom(150_000), "b/c.txt": b"kept"}
    out = make_dir(tmp_path / "out", files)
    with TestHub(hub_root) as hub:
        def backend() -> backend_testing.BackendProcess:
            return backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, listen=f"127.0.0.1:{port}",
                                                  chunk_size="64KiB", env={"MMFS_PUBLISH_TOKEN": TOKEN})

        with backend() as first:
            pushed = run("artifact", "push", str(out), "--kind", "restart-test", "--model", MODEL, "--target", "cpu",
                         "--backend", first.url)
            assert pushed.returncode == 0, pushed.stderr
        with backend() as second, MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=second.url) as mount:
            found = run("artifact", "path", *key_args("restart-test", mount.mountpoint))
            assert found.returncode == 0, found.stderr
            where = Path(found.stdout.strip())
            assert {p.relative_to(where).as_posix(): p.read_bytes() for p in where.rglob("*") if p.is_file()} == files


@pytest.mark.fuse
@pytest.mark.timeout(900)
def test_torch_compile_cache_built_once_then_loaded_by_a_second_node(tmp_path: Path, hub: TestHub) -> None:
    """Two nodes: the first compiles the real model (torch.compile, inductor on the CPU)
    under ``mmfs artifact build``; the second finds the cache on its own mount and starts
    from it: no compile (FX graph cache hits only), the same output."""
    if not os.environ.get("CI"):  # CI installs the compile extra: there a missing torch fails
        pytest.importorskip("torch")
    model = f"huggingface/{REAL_REPO_ID}@main"
    kind = ["--kind", "torch-compile-cache", "--model", model, "--target", "cpu-layers1", "--builder", "torch-2.13.0"]
    env = {"MMFS_COMPILE_LAYERS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    with backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, env={"MMFS_PUBLISH_TOKEN": TOKEN}) \
            as backend, MountProcess(tmp_path / "mnt-a", tmp_path / "cache-a", backend=backend.url) as node_a, \
            MountProcess(tmp_path / "mnt-b", tmp_path / "cache-b", backend=backend.url) as node_b:
        built = run("artifact", "build", *kind, "--mount", str(node_a.mountpoint), "--",
                    sys.executable, "-m", "mmfs.testing.compile_worker", env=env, timeout=600)
        assert built.returncode == 0, built.stderr[-3000:]
        first = json.loads([line for line in built.stderr.splitlines() if line.startswith("{")][-1])
        assert first["fxgraph_cache_miss"] >= 1 and first["fxgraph_cache_hit"] == 0  # it really compiled
        found = run("artifact", "path", *kind, "--mount", str(node_b.mountpoint))
        assert found.returncode == 0, found.stderr
        assert found.stdout.startswith(str(node_b.mountpoint))
        worker = subprocess.run([sys.executable, "-m", "mmfs.testing.compile_worker",
                                 "--model", str(node_b.repo(REAL_REPO_ID)),
                                 "--cache-in", found.stdout.strip()],
                                capture_output=True, text=True, timeout=600, env=child_env({**os.environ, **env}))
        assert worker.returncode == 0, worker.stderr[-3000:]
        second = json.loads(worker.stdout.strip().splitlines()[-1])
        assert second["fxgraph_cache_hit"] >= 1 and second["fxgraph_cache_miss"] == 0
        assert second["output_sha256"] == first["output_sha256"]


def test_gc_unpublishes_the_artifacts_of_retired_commits_only(tmp_path: Path, hub_root: Path) -> None:
    """Retention: an artifact lives while its model commit does (a ref points at it, a node
    pins it, or it is in its grace period), and goes with it in the backend's gc."""
    repo = make_synthetic_model(hub_root / "org" / "tiny", 64 << 10, n_shards=1, seed=6)
    with TestHub(hub_root) as hub, backend_testing.BackendProcess(
            tmp_path / "backend", hub_url=hub.url, env={"MMFS_PUBLISH_TOKEN": TOKEN},
            extra_args=["--retain", "0", "--ref-ttl", "1"]) as backend:
        def push(kind: str, payload: bytes) -> str:
            out = make_dir(tmp_path / kind, {"engine.bin": payload})
            pushed = run("artifact", "push", str(out), "--kind", kind, "--model", MODEL, "--target", "cpu",
                         "--backend", backend.url)
            assert pushed.returncode == 0, pushed.stderr
            return pushed.stdout.split()[0]

        old = push("old-commit", b"built for the first commit")
        (repo / "config.json").write_text('{"moved": true}\n')  # main moves to a new commit
        time.sleep(1.5)  # past --ref-ttl: the backend resolves main afresh
        new = push("new-commit", b"built for the second commit")
        assert old != new
        dry = httpx.post(f"{backend.url}/v1/gc?dry_run=1", timeout=60).json()
        assert dry["artifacts_unpublished"] == [old]
        assert {a["id"] for a in httpx.get(f"{backend.url}/v1/artifacts").json()["artifacts"]} == {old, new}
        done = httpx.post(f"{backend.url}/v1/gc", timeout=60).json()
        assert done["artifacts_unpublished"] == [old]
        assert [a["id"] for a in httpx.get(f"{backend.url}/v1/artifacts").json()["artifacts"]] == [new]
        blobs = {p.name for p in (backend.data_dir / "artifacts" / "blobs").glob("*/*")}
        assert blobs == {hashlib.sha256(b"built for the second commit").hexdigest()}


@pytest.mark.fuse
def test_a_backend_of_several_replicas_refuses_pushes_and_builds_in_one_line(tmp_path: Path, hub: TestHub) -> None:
    """Each replica keeps its own artifacts, so a set of two would publish on one and be
    read from another: it refuses with 501 at once (no retries, the builder never runs).
    A replica set of one (deploy/overlays/artifacts) takes the same push."""
    out = make_dir(tmp_path / "out", {"engine.bin": os.urandom(64 << 10)})
    model = ["--model", f"huggingface/{REAL_REPO_ID}@{hub.commit(REAL_REPO_ID)}", "--target", "cpu"]
    ports = [free_port("127.0.0.2"), free_port("127.0.0.3")]
    replicas = ",".join(f"http://127.0.0.{i + 2}:{port}" for i, port in enumerate(ports))
    marker = tmp_path / "builder-ran"
    with backend_testing.BackendProcess(tmp_path / "two", hub_url=hub.url, listen=f"127.0.0.2:{ports[0]}",
                                        extra_args=["--replicas", replicas],
                                        env={"MMFS_PUBLISH_TOKEN": TOKEN}) as backend, \
            MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url) as mount:
        pushed = run("artifact", "push", str(out), "--kind", "engine", *model, "--backend", backend.url)
        built = run("artifact", "build", "--kind", "engine", *model, "--backend", backend.url,
                    "--mount", str(mount.mountpoint), "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
        listed = ArtifactClient(backend.url).listing()
        health = json.loads(backend.get("/healthz"))
    assert health["artifacts"]["pushes"]["refused"] == 2  # one ask each: a 501 is not retried
    for refused in (pushed, built):
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "2 replicas" in refused.stderr and "replicas: 1" in refused.stderr
    assert not marker.exists() and listed["artifacts"] == []
    with backend_testing.BackendProcess(tmp_path / "one", hub_url=hub.url, listen=f"127.0.0.2:{ports[0]}",
                                        extra_args=["--replicas", replicas.split(",")[0]],
                                        env={"MMFS_PUBLISH_TOKEN": TOKEN}) as backend:
        accepted = run("artifact", "push", str(out), "--kind", "engine", *model, "--backend", backend.url)
        assert accepted.returncode == 0, accepted.stderr
        assert [a["key"]["kind"] for a in ArtifactClient(backend.url).listing()["artifacts"]] == ["engine"]
