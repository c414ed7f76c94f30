"""Versioning with real processes: the test hub moves refs while nodes and a backend run.

Each test is one story from issue 10: refs followed for the cluster while nobody reads,
warm-on-update, open files keeping their commit, retention and gc, revisions with slashes,
and a backend that goes away while ``main`` moves. Short ``--ref-ttl`` values keep them
quick; what they assert is behaviour (which commit, which bytes, how many upstream checks
per interval), never a duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError

import backend_server.testing as backend_testing
from csi_driver.mounts import bind_read_only, unmount_all
from mmfs.testing.hub import TestHub
from mmfs.testing.models import populate_hub_root
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import free_port

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(150)]

MMFS = [sys.executable, "-m", "mmfs"]
REPO = "acme/tiny"
TTL = "1"  # seconds between ref checks in these tests


def payload(tag: str, size: int) -> bytes:
    """``size`` bytes that differ for every ``tag`` (so every version has its own content)."""
    block = (tag.encode() * 64)[:64]
    return (block * (size // 64 + 1))[:size]


V1 = {"config.json": b'{"version": 1}', "weights.bin": payload("w1", 3 << 20), "shared.bin": payload("s", 2 << 20)}


@pytest.fixture
def hub(tmp_path: Path):
    root = populate_hub_root(tmp_path / "hub", include_real=False)
    for name, data in V1.items():
        (root / REPO / name).parent.mkdir(parents=True, exist_ok=True)
        (root / REPO / name).write_bytes(data)
    with TestHub(root) as running:
        yield running


@pytest.fixture
def volume(tmp_path: Path):
    """A CSI volume's target path: bind it with ``bind_read_only``; unmounted afterwards."""
    target = tmp_path / "volume"
    target.mkdir()
    yield target
    unmount_all(str(target))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` (a hang guard, not a measure)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def link_of(mount: MountProcess, revision: str = "main") -> str:
    return os.readlink(mount.repo(REPO, revision))


def told_of(mount: MountProcess, commit: str) -> bool:
    """Whether the node recorded main's move to ``commit`` as told by its backend (read from
    its status file, which resolves nothing: only the node's ref follower can do this)."""
    return any(m["to"] == commit and m["detected_by"] == "backend" for m in mount.status()["versions"]["moves"])


def mmfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MMFS, *args], capture_output=True, text=True, timeout=60)


def backend_refs(backend: backend_testing.BackendProcess) -> dict:
    return json.loads(backend.get("/v1/refs"))


def test_two_nodes_follow_main_without_readers_one_upstream_check_per_interval(tmp_path: Path, hub: TestHub,
                                                                              volume: Path) -> None:
    """Node b publishes main's commit to a CSI-style volume: the backend (default
    --warm-on-update auto) then warms main's new commits for the cluster."""
    args = ["--ref-ttl", TTL, "--retain", "0"]
    with backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, chunk_size="1MiB",
                                        extra_args=args) as backend, \
            MountProcess(tmp_path / "a", tmp_path / "cache-a", backend=backend.url,
                         args=["--ref-ttl", TTL, "--warm-on-update"]) as a, \
            MountProcess(tmp_path / "b", tmp_path / "cache-b", backend=backend.url, args=["--ref-ttl", TTL]) as b:
        old = hub.commit(REPO)
        assert link_of(a) == link_of(b) == old
        bind_read_only(str(b.repo(REPO, old)), str(volume))  # what the CSI node plugin does at publish
        wait_for("the backend learns main is published by a CSI volume", lambda: any(
            r["ref"] == f"huggingface/{REPO}@main" and "csi" in r["watched_because"] and r["warm"]
            for r in backend_refs(backend)["refs"]))
        reader = open(a.repo(REPO) / "weights.bin", "rb")  # an old-commit file held open across the move
        head = reader.read(1 << 20)
        v2 = {"config.json": b'{"version": 2}', "weights.bin": payload("w2", 3 << 20)}
        hub.reset_stats()
        started = time.monotonic()
        new = hub.push(REPO, v2)
        # nobody reads: both nodes are told by the backend, and then their symlinks name the new commit
        wait_for("both nodes are told main moved", lambda: told_of(a, new) and told_of(b, new))
        assert link_of(a) == link_of(b) == new
        # warm-on-update: the backend fetched the new commit before anyone opened it ...
        wait_for("the backend warmed the new commit", lambda: any(
            r["ref"] == f"huggingface/{REPO}@main" and r["warm_state"] == f"warmed {new}"
            for r in backend_refs(backend)["refs"]))
        # ... and node a (--warm-on-update) the new version of the file it held
        wait_for("node a warmed what changed", lambda: "warmed 1 changed files" in a.log_text())
        time.sleep(5 * float(TTL))  # let a few more intervals pass: still one check each, for both nodes
        window = time.monotonic() - started
        checks = hub.stats().ref_checks.get(f"{REPO}@main", 0)
        assert 1 <= checks <= window / float(TTL) + 2, (checks, window)
        served = hub.stats().bytes_served
        assert served >= len(v2["weights.bin"])  # the warm fetched the new weights, once
        remote_a = a.status()["remote"]["bytes"]
        assert (a.repo(REPO) / "weights.bin").read_bytes() == v2["weights.bin"]
        assert a.status()["remote"]["bytes"] == remote_a  # node a had warmed it: not even the backend was asked
        for name, data in {**V1, **v2}.items():
            assert (b.repo(REPO) / name).read_bytes() == data
            assert (a.repo(REPO) / name).read_bytes() == data
        assert hub.stats().bytes_served == served  # reading after the flip cost the upstream 0 bytes
        # the reader of the old commit reads it to the end, unchanged
        assert head + reader.read() == V1["weights.bin"]
        # while it is open, node a reports the old commit pinned: the backend's gc keeps it
        plan = mmfs("gc", "--backend", backend.url, "--dry-run", "--json")
        assert plan.returncode == 0, plan.stderr
        assert f"huggingface/{REPO}@{old}" in json.loads(plan.stdout)["pinned"]
        reader.close()
        unmount_all(str(volume))
        history = backend_refs(backend)["history"]
        assert [(m["from_commit"], m["to_commit"]) for m in history] == [(old, new)]
        status = mmfs("status", "--mount", str(b.mountpoint))
        assert f"{old[:12]} -> {new[:12]}" in status.stdout
        metrics = backend.metrics()
        assert metrics["mmfs_backend_ref_moves_total"] == 1 and metrics["mmfs_backend_refs_watched"] >= 1


def test_retention_pinned_commit_survives_gc_retired_unique_content_reclaimed(tmp_path: Path, hub: TestHub,
                                                                             volume: Path) -> None:
    """Embedded node (its own watcher): C1 published by a CSI-style bind mount, C2 retired, C3 current."""
    target = volume
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", hub_url=hub.url,
                      args=["--ref-ttl", TTL, "--retain", "0"]) as node:
        c1 = hub.commit(REPO)
        bind_read_only(str(node.repo(REPO, c1)), str(target))  # what the CSI node plugin does at publish
        try:
            for name in V1:
                assert (target / name).read_bytes() == V1[name]
            c2 = hub.push(REPO, {"weights.bin": payload("w2", 3 << 20)})
            # the embedded node checks upstream itself: the move is noted with no one reading
            wait_for("the node notes main moved to C2", lambda: any(
                m["to"] == c2 for m in node.status()["versions"]["moves"]))
            assert link_of(node) == c2
            for name in V1:
                (node.repo(REPO) / name).read_bytes()
            c3 = hub.push(REPO, {"weights.bin": payload("w3", 3 << 20)})
            wait_for("main flips to C3", lambda: link_of(node) == c3)
            plan = mmfs("gc", "--mount", str(node.mountpoint), "--dry-run", "--json")
            assert plan.returncode == 0, plan.stderr
            report = json.loads(plan.stdout)
            assert report["dry_run"] and report["retired"] == [f"huggingface/{REPO}@{c2}"]
            assert f"huggingface/{REPO}@{c1}" in report["pinned"]
            assert report["contents"] == 1 and report["bytes"] == 3 << 20  # C2's weights only
            done = mmfs("gc", "--mount", str(node.mountpoint))
            assert done.returncode == 0 and "reclaimed 1 files" in done.stdout, done.stdout + done.stderr
            hub.reset_stats()
            for name in V1:  # the pinned commit survived: nothing fetched
                assert (target / name).read_bytes() == V1[name]
            assert (node.repo(REPO, c2) / "shared.bin").read_bytes() == V1["shared.bin"]  # shared: kept
            assert hub.stats().bytes_served == 0
            assert (node.repo(REPO, c2) / "weights.bin").read_bytes() == payload("w2", 3 << 20)
            assert hub.stats().bytes_served == 3 << 20  # C2's own content was reclaimed: fetched again
            assert node.status()["versions"]["retention"]["reclaimed_bytes"] == 3 << 20
        finally:
            unmount_all(str(target))


def test_revisions_with_slashes_on_the_mount_and_through_the_hub_api(tmp_path: Path, hub: TestHub) -> None:
    pr = hub.push(REPO, {"config.json": b'{"pr": 1}'}, ref="refs/pr/1")
    with backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, extra_args=["--ref-ttl", TTL]) \
            as backend, MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url) as node:
        repo = node.repo(REPO, "")
        assert (repo / "refs" / "pr" / "1" / "config.json").read_bytes() == b'{"pr": 1}'
        assert os.readlink(repo / "refs" / "pr" / "1") == f"../../{pr}"
        assert (repo / "refs" / "pr" / "1" / "weights.bin").read_bytes() == V1["weights.bin"]
        assert {"main", "refs", pr} <= set(os.listdir(repo))
        assert os.listdir(repo / "refs") == ["pr"] and os.listdir(repo / "refs" / "pr") == ["1"]
        with pytest.raises(FileNotFoundError):
            os.stat(repo / "refs" / "pr" / "9")
        path = hf_hub_download(REPO, "config.json", revision="refs/pr/1", endpoint=backend.url,
                               cache_dir=str(tmp_path / "hf"))
        assert Path(path).read_bytes() == b'{"pr": 1}'
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision="refs/pr/9", endpoint=backend.url,
                            cache_dir=str(tmp_path / "hf"))
        parquet = hub.push(REPO, {"data.parquet": b"PAR1"}, ref="refs/convert/parquet")  # known upstream only
        refs = HfApi(endpoint=backend.url).list_repo_refs(REPO, include_pull_requests=True)
        assert [(r.name, r.ref, r.target_commit) for r in refs.pull_requests] == [("1", "refs/pr/1", pr)]
        assert [(r.name, r.ref, r.target_commit) for r in refs.converts] == [("parquet", "refs/convert/parquet",
                                                                            parquet)]
        assert [(r.name, r.ref, r.target_commit) for r in refs.branches] == [("main", "refs/heads/main",
                                                                            hub.commit(REPO))]
        assert refs.tags == []
        # the PR is closed upstream: its last commit keeps serving, with a warning
        hub.delete_ref(REPO, "refs/pr/1")
        wait_for("the backend noticed the ref is gone", lambda: any(
            r["ref"] == f"huggingface/{REPO}@refs/pr/1" and r["gone_upstream"] for r in backend_refs(backend)["refs"]))
        assert "gone upstream" in backend.log_text()
        assert (repo / "refs" / "pr" / "1" / "config.json").read_bytes() == b'{"pr": 1}'
        assert Path(hf_hub_download(REPO, "config.json", revision="refs/pr/1", endpoint=backend.url,
                                    cache_dir=str(tmp_path / "hf2"))).read_bytes() == b'{"pr": 1}'


def test_backend_down_while_main_moves_nodes_serve_then_flip(tmp_path: Path, hub: TestHub) -> None:
    port = free_port()
    backend = backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, listen=f"127.0.0.1:{port}",
                                             extra_args=["--ref-ttl", TTL]).start()
    try:
        with MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=backend.url,
                          args=["--ref-ttl", TTL, "--remote-timeout", "5"]) as node:
            old = hub.commit(REPO)
            for name, data in V1.items():
                assert (node.repo(REPO) / name).read_bytes() == data
            backend.stop()
            new = hub.push(REPO, {"config.json": b'{"version": 2}'})
            wait_for("the node notices its backend is gone",
                     lambda: node.status()["versions"]["updates"]["connected"] is False)
            time.sleep(3 * float(TTL))  # past its TTL: the node re-resolves, fails, keeps the last commit
            assert link_of(node) == old
            for name, data in V1.items():
                assert (node.repo(REPO) / name).read_bytes() == data
            backend = backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url,
                                                     listen=f"127.0.0.1:{port}", extra_args=["--ref-ttl", TTL]).start()
            wait_for("the node is told of the move once the backend is back", lambda: told_of(node, new))
            assert node.status()["versions"]["updates"]["connected"] is True
            assert link_of(node) == new
            assert (node.repo(REPO) / "config.json").read_bytes() == b'{"version": 2}'
    finally:
        backend.stop()


def test_watch_command_and_bad_input(tmp_path: Path, hub: TestHub) -> None:
    with backend_testing.BackendProcess(tmp_path / "backend", hub_url=hub.url, extra_args=["--ref-ttl", TTL]) \
            as backend:
        done = mmfs("watch", f"huggingface/{REPO}@main", "--backend", backend.url)
        assert done.returncode == 0 and hub.commit(REPO) in done.stdout, done.stderr
        watched = {r["ref"]: r for r in backend_refs(backend)["refs"]}
        assert watched[f"huggingface/{REPO}@main"]["watched_because"] == ["watch"]
        assert watched[f"huggingface/{REPO}@main"]["warm"] is True
        new = hub.push(REPO, {"config.json": b'{"version": 2}'})
        wait_for("the watched ref's new commit is warmed", lambda: any(
            r["warm_state"] == f"warmed {new}" for r in backend_refs(backend)["refs"]))
        for bad, why in ((f"huggingface/{REPO}", "expected <provider>/<org>/<name>@<revision>"),
                         (f"huggingface/{REPO}@refs/pr/9", "refs/pr/9"), (f"huggingface/{REPO}@{'a' * 40}", "commit")):
            result = mmfs("watch", bad, "--backend", backend.url)
            assert result.returncode != 0 and why in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        gone = httpx.post(f"{backend.url}/v1/refs/watch", content=b"not json")
        assert gone.status_code == 400 and gone.headers["X-Error-Code"] == "InvalidName"


def test_a_store_models_latest_is_followed_like_a_branch(tmp_path: Path) -> None:
    """The watcher is provider-agnostic: a file store's ``latest`` (the digest of its listing)
    moves when a file changes, and an embedded node notes it with nobody reading."""
    root = tmp_path / "weka"
    (root / "org" / "tiny").mkdir(parents=True)
    (root / "org" / "tiny" / "config.json").write_bytes(b'{"v": 1}')
    with MountProcess(tmp_path / "mnt", tmp_path / "cache",
                      args=["--store", f"file:weka={root}", "--ref-ttl", TTL]) as node:
        latest = node.mountpoint / "file" / "weka" / "org" / "tiny" / "latest"
        old = os.readlink(latest)
        assert (latest / "config.json").read_bytes() == b'{"v": 1}'
        (root / "org" / "tiny" / "config.json").write_bytes(b'{"v": 2}')
        wait_for("the node notes latest moved", lambda: any(
            m["ref"] == "file/weka/org/tiny@latest" and m["from"] == old for m in node.status()["versions"]["moves"]))
        assert os.readlink(latest) != old and (latest / "config.json").read_bytes() == b'{"v": 2}'
