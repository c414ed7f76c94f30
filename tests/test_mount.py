"""Real FUSE mounts: ``mmfs mount`` as a child process over the test hub (embedded mode).

Each test mounts, reads through the kernel like a worker would (``open``/``read``,
``mmap`` via safetensors, ``os.walk``/``stat``), and checks bytes and the hub's counters.
Skipped only where /dev/fuse is missing outside CI; under CI a missing /dev/fuse fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfs.testing.hub import TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model, real_model_dir
from mmfs.testing.mount import MountProcess, force_unmount
from mmfs.testing.net import free_port

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

MMFS = [sys.executable, "-m", "mmfs"]


@pytest.fixture
def mounts(tmp_path: Path):
    """Start mounts with ``mounts(hub_url=..., args=[...])``; all are stopped at teardown."""
    started: list[MountProcess] = []

    def start(*, hub_url: str | None = None, cache: str = "cache", mountpoint: str = "mnt",
              args: list[str] | None = None, backend: str | None = None, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> MountProcess:
        mount = MountProcess(tmp_path / mountpoint, tmp_path / cache, hub_url=hub_url, backend=backend,
                             args=args, env=env)
        started.append(mount)
        return mount.start(timeout)

    yield start
    for mount in started:
        mount.stop()
        force_unmount(mount.mountpoint) if os.path.ismount(mount.mountpoint) else None


def tree_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_errno(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        return exc.errno or 0
    return 0


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MMFS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# -- the real model --------------------------------------------------------------------


def test_real_model_reads_identical_and_loads_with_safetensors(hub: TestHub, mounts) -> None:
    from safetensors import safe_open

    mount = mounts(hub_url=hub.url)
    assert mount.ready_line == f"mmfs: mounted {mount.mountpoint} (embedded)"
    repo = mount.repo(REAL_REPO_ID)
    original = real_model_dir()
    expected = tree_files(original)
    assert "1_Pooling/config.json" in expected
    # The branch is a relative symlink to its commit directory.
    commit = hub.commit(REAL_REPO_ID)
    assert os.readlink(repo) == commit
    assert (repo.parent / commit).is_dir()
    found = tree_files(repo)
    assert sorted(found) == sorted(expected)
    for name, path in expected.items():
        st = os.stat(found[name])
        assert st.st_size == path.stat().st_size and st.st_mode & 0o777 == 0o444
        assert found[name].read_bytes() == path.read_bytes(), name
    assert os.stat(repo / "1_Pooling").st_mode & 0o777 == 0o555
    # safetensors maps the file: the mmap path through FUSE, not only read().
    with safe_open(repo / "model.safetensors", framework="numpy") as mounted, \
            safe_open(original / "model.safetensors", framework="numpy") as local:
        assert sorted(mounted.keys()) == sorted(local.keys())
        for key in local.keys():
            assert (mounted.get_tensor(key) == local.get_tensor(key)).all(), key
    # Read-only.
    with pytest.raises(OSError) as info:
        open(repo / "config.json", "r+b")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    # Everything came from the hub exactly once.
    status = mount.status()
    assert status["integrity"]["failures"] == 0
    assert status["remote"]["bytes"] == sum(p.stat().st_size for p in expected.values())
    assert mount.stop() == 0
    assert not os.path.ismount(mount.mountpoint)


def test_listing_and_stat_cost_no_content_bytes(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url)
    hub.reset_stats()
    repo = mount.repo(REAL_REPO_ID)
    sizes = {}
    for folder, dirs, files in os.walk(repo):
        for name in files + dirs:
            st = os.lstat(os.path.join(folder, name))
            sizes[os.path.relpath(os.path.join(folder, name), repo)] = st.st_size
    assert sizes["model.safetensors"] == (real_model_dir() / "model.safetensors").stat().st_size
    # find, ls -lR, du over the whole namespace
    subprocess.run(["find", str(mount.mountpoint / "huggingface"), "-ls"], check=True, capture_output=True)
    subprocess.run(["ls", "-laR", str(mount.mountpoint)], check=True, capture_output=True)
    listing = os.listdir(mount.mountpoint / "huggingface" / REAL_REPO_ID)
    assert "main" in listing and hub.commit(REAL_REPO_ID) in listing
    assert os.listdir(mount.mountpoint / "huggingface") == ["sentence-transformers"]
    stats = hub.stats()
    assert stats.bytes_served == 0 and stats.content_requests == 0, stats


def test_unmount_cli_and_signals_exit_cleanly(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url)
    result = run_cli("unmount", str(mount.mountpoint))
    assert result.returncode == 0, result.stderr
    assert mount.proc is not None and mount.proc.wait(timeout=15) == 0
    assert not os.path.ismount(mount.mountpoint)
    mount = mounts(hub_url=hub.url)
    mount.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert mount.proc.wait(timeout=15) == 0  # type: ignore[union-attr]
    assert not os.path.ismount(mount.mountpoint)


# -- prefetch, restarts, offline -------------------------------------------------------


def test_prefetch_then_offline_and_restart(hub_root: Path, mounts) -> None:
    make_synthetic_model(hub_root / "org" / "synth", 12 << 20, n_shards=2, seed=3)
    originals = {**{f"sentence-transformers/all-MiniLM-L6-v2/{k}": v for k, v in tree_files(real_model_dir()).items()},
                 **{f"org/synth/{k}": v for k, v in tree_files(hub_root / "org" / "synth").items()}}
    hub = TestHub(hub_root).start()
    try:
        mount = mounts(hub_url=hub.url, args=["--chunk-size", "1MiB"])
        for model in (f"huggingface/{REAL_REPO_ID}", "huggingface/org/synth@main"):
            result = run_cli("prefetch", model, "--mount", str(mount.mountpoint), "--jobs", "4")
            assert result.returncode == 0, result.stderr
            assert "files" in result.stdout and "MiB" in result.stdout
        result = run_cli("prefetch", "huggingface/org/missing", "--mount", str(mount.mountpoint))
        assert result.returncode != 0 and "org/missing" in result.stderr
        result = run_cli("prefetch", "huggingface/org/synth@nobranch", "--mount", str(mount.mountpoint))
        assert result.returncode != 0 and "nobranch" in result.stderr
        status = run_cli("status", "--mount", str(mount.mountpoint))
        assert status.returncode == 0 and "org/synth" in status.stdout and "main ->" in status.stdout
    finally:
        hub.stop()
    # Hub gone: everything reads back from the node cache, byte for byte.
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    for name, path in originals.items():
        assert sha(mount.mountpoint / "huggingface" / name.replace("/", "/main/", 2).replace("/main/", "/", 1)) \
            == sha(path), name
    assert mount.stop() == 0
    # A fresh daemon on the same cache, still without the hub: refs and manifests come
    # from the metadata DB, bytes from the disk cache.
    mount = mounts(hub_url=hub.url, args=["--chunk-size", "1MiB", "--remote-timeout", "10"])
    for name, path in originals.items():
        org, repo, rest = name.split("/", 2)
        assert sha(mount.repo(f"{org}/{repo}") / rest) == sha(path), name
    status = mount.status()
    assert status["remote"]["bytes"] == 0
    assert {r["repo"] for r in status["repos"]} >= {"huggingface/org/synth", f"huggingface/{REAL_REPO_ID}"}


def test_restart_fetches_nothing_cached(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url)
    repo = mount.repo(REAL_REPO_ID)
    first = (repo / "model.safetensors").read_bytes()
    assert mount.stop() == 0
    hub.reset_stats()
    mount = mounts(hub_url=hub.url)
    assert (mount.repo(REAL_REPO_ID) / "model.safetensors").read_bytes() == first
    assert hub.stats().bytes_served == 0
    assert mount.status()["remote"]["bytes"] == 0


def test_kill_during_prefetch_then_restart_reads_correctly(hub_root: Path, mounts) -> None:
    make_synthetic_model(hub_root / "org" / "big", 48 << 20, n_shards=2, seed=5)
    originals = tree_files(hub_root / "org" / "big")
    with TestHub(hub_root, rate="16MB/s") as hub:
        mount = mounts(hub_url=hub.url, args=["--chunk-size", "1MiB"])
        prefetch = subprocess.Popen([*MMFS, "prefetch", "huggingface/org/big", "--mount", str(mount.mountpoint)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and hub.stats().bytes_served < 12 << 20:
            time.sleep(0.1)
        assert hub.stats().bytes_served >= 12 << 20
        mount.kill()
        out, err = prefetch.communicate(timeout=30)
        assert prefetch.returncode != 0
        with pytest.raises(OSError) as dead:
            os.statvfs(mount.mountpoint)
        assert dead.value.errno == errno.ENOTCONN  # a dead mount, as after a crash
        hub.set_rate(None)
        # mmfs mount on the dead mountpoint clears it and mounts again.
        mount = mounts(hub_url=hub.url, args=["--chunk-size", "1MiB"])
        repo = mount.repo("org/big")
        for name, path in originals.items():
            assert sha(repo / name) == sha(path), name
        assert mount.status()["integrity"]["failures"] == 0


def test_cache_stays_under_its_bound(hub_root: Path, mounts) -> None:
    make_synthetic_model(hub_root / "org" / "large", 40 << 20, n_shards=1, seed=7)
    originals = tree_files(hub_root / "org" / "large")
    with TestHub(hub_root) as hub:
        mount = mounts(hub_url=hub.url, args=["--chunk-size", "1MiB", "--cache-size", "10MiB",
                                              "--memory-cache", "6MiB"])
        repo = mount.repo("org/large")
        for name, path in originals.items():
            assert sha(repo / name) == sha(path), name
        tiers = {t["name"]: t for t in mount.status()["tiers"]}
        assert tiers["disk"]["used_bytes"] <= 10 << 20 and tiers["disk"]["evictions"] > 0
        assert tiers["memory"]["used_bytes"] <= 6 << 20
        on_disk = sum(p.stat().st_size for p in (mount.cache_dir / "chunks" / "chunks").rglob("*") if p.is_file())
        assert on_disk <= 10 << 20


# -- errors ----------------------------------------------------------------------------


@pytest.mark.timeout(60)  # hang guard: every answer comes from the hub or the names alone
def test_unknown_names_are_enoent(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url)
    root = mount.mountpoint / "huggingface"
    assert stat_errno(root / "nobody" / "nothing") == errno.ENOENT
    assert stat_errno(root / "sentence-transformers" / "nothing") == errno.ENOENT
    assert stat_errno(root / REAL_REPO_ID / "no-such-branch") == errno.ENOENT
    assert stat_errno(root / REAL_REPO_ID / ("0" * 40)) == errno.ENOENT
    assert stat_errno(root / REAL_REPO_ID / "main" / "no-such-file") == errno.ENOENT
    assert stat_errno(root / REAL_REPO_ID / "main" / "1_Pooling" / "nope") == errno.ENOENT
    assert stat_errno(mount.mountpoint / "gcs") == errno.ENOENT  # no such provider
    # malformed names: ENOENT (FUSE passes components up to 1024 bytes; the daemon refuses them)
    assert stat_errno(root / "a..b" / "c") == errno.ENOENT
    assert stat_errno(root / "-bad" / "c") == errno.ENOENT
    assert stat_errno(root / ("o" * 200)) == errno.ENOENT
    assert stat_errno(root / ("o" * 300)) in (errno.ENOENT, errno.ENAMETOOLONG)
    assert stat_errno(root / REAL_REPO_ID / "main" / "config.json" / "x") == errno.ENOTDIR
    assert hub.stats().bytes_served == 0


@pytest.mark.timeout(60)  # hang guard: EIO must come, not a hang
def test_unreachable_upstream_is_eio_after_a_bounded_wait(tmp_path: Path, mounts) -> None:
    remote_timeout = 10.0
    mount = mounts(hub_url=f"http://127.0.0.1:{free_port()}", args=["--remote-timeout", str(remote_timeout)])
    started = time.monotonic()
    assert stat_errno(mount.mountpoint / "huggingface" / REAL_REPO_ID) == errno.EIO
    # One lookup reaches the remote; the daemon bounds each such call by --remote-timeout.
    assert time.monotonic() - started <= remote_timeout


def test_a_moved_branch_is_seen_after_ref_ttl(hub: TestHub, hub_root: Path, mounts) -> None:
    """A branch's commit is trusted for --ref-ttl, then resolved again (not forever)."""
    ref_ttl = 1.0
    repo_dir = make_synthetic_model(hub_root / "org" / "moving", 1 << 20, n_shards=1, seed=21)
    mount = mounts(hub_url=hub.url, args=["--ref-ttl", str(ref_ttl)])
    branch = mount.repo("org/moving")
    before = hub.commit("org/moving")
    assert os.readlink(branch) == before
    (repo_dir / "config.json").write_text('{"moved": true}')
    after = hub.commit("org/moving")
    assert after != before
    # The node's --ref-ttl, then the kernel's 1 s on the symlink's entry (VfsConfig.ref_timeout).
    time.sleep(ref_ttl + 1.0)
    assert os.readlink(branch) == after
    assert (branch / "config.json").read_text() == '{"moved": true}'
    assert (mount.mountpoint / "huggingface" / "org" / "moving" / before).is_dir()  # the old commit stays


def test_the_mount_sets_its_readahead(hub: TestHub, mounts) -> None:
    """Large kernel read requests are what make FUSE reads fast (DESIGN.md): --read-ahead
    reaches the mount's bdi before the mount is announced."""
    mount = mounts(hub_url=hub.url, args=["--read-ahead", "8MiB"])
    device = os.stat(mount.mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert int(knob.read_text()) == 8 << 10


@pytest.mark.timeout(45)  # hang guard: the hub stalls 30 s per request (two calls waiting it out: 60 s)
def test_hung_upstream_is_eio_after_remote_timeout(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url, args=["--remote-timeout", "2"])
    repo = mount.repo(REAL_REPO_ID)
    assert (repo / "config.json").stat().st_size > 0  # manifest known
    hub.set_faults(latency_s=30)
    try:
        assert read_errno(repo / "tokenizer.json") == errno.EIO
        assert stat_errno(mount.mountpoint / "huggingface" / "other" / "repo") == errno.EIO
    finally:
        hub.clear_faults()
    # The daemon is fine afterwards: fetches still waiting on the stalled hub give up within
    # their bound (a read that joins one may get one more EIO), then the file reads right.
    while True:
        try:
            got = (repo / "tokenizer.json").read_bytes()
            break
        except OSError as exc:
            assert exc.errno == errno.EIO
    assert got == (real_model_dir() / "tokenizer.json").read_bytes()


def test_corrupted_upstream_is_eio_and_logged(hub: TestHub, mounts) -> None:
    hub.set_faults(corrupt=["model.safetensors"])
    mount = mounts(hub_url=hub.url)
    path = mount.repo(REAL_REPO_ID) / "model.safetensors"
    assert read_errno(path) == errno.EIO
    assert "model.safetensors" in mount.log_text()
    assert mount.status()["integrity"]["failures"] >= 1
    hub.clear_faults()
    assert path.read_bytes() == (real_model_dir() / "model.safetensors").read_bytes()


def test_full_cache_disk_keeps_serving(tmp_path: Path, hub: TestHub, mounts) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], check=True)
    try:
        mount = mounts(hub_url=hub.url, cache="tiny")
        repo = mount.repo(REAL_REPO_ID)
        for name, path in tree_files(real_model_dir()).items():
            assert (repo / name).read_bytes() == path.read_bytes(), name
        assert "No space left" in mount.log_text()
        assert mount.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)


@pytest.mark.parametrize("broken", ["file", "read-only"])
def test_unusable_cache_dir_serves_from_memory(tmp_path: Path, hub: TestHub, mounts, broken: str) -> None:
    cache = tmp_path / "cache"
    if broken == "file":
        cache.write_text("not a directory\n")  # --cache-dir names a file
    else:
        cache.mkdir()
        subprocess.run(["mount", "--bind", str(cache), str(cache)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
    try:
        mount = mounts(hub_url=hub.url)
        repo = mount.repo(REAL_REPO_ID)
        for name, path in tree_files(real_model_dir()).items():
            assert (repo / name).read_bytes() == path.read_bytes(), name
        status = mount.status()
        assert [t["name"] for t in status["tiers"]] == ["memory"]
        assert any("chunk cache" in p for p in status["cache_problems"])
        assert "running without the disk cache" in mount.log_text()
        shown = run_cli("status", "--mount", str(mount.mountpoint))
        assert shown.returncode == 0 and any("unavailable:" in line and "chunk cache" in line
                                             for line in shown.stdout.splitlines())
        assert mount.stop() == 0
    finally:
        if broken == "read-only":
            subprocess.run(["umount", "-l", str(cache)], check=False)


def test_random_org_lookups_leave_the_inode_table_bounded(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url)
    root = mount.mountpoint / "huggingface"
    assert (mount.repo(REAL_REPO_ID) / "config.json").stat().st_size > 0
    for i in range(10_000):  # stat mnt/huggingface/$RANDOM: any valid org name answers
        assert stat_errno(root / f"random-{i}") == 0
    vfs = mount.status()["vfs"]
    assert vfs["provisional_inodes"] <= 1024 and vfs["inodes"] < 1024 + 100
    assert os.statvfs(mount.mountpoint).f_files == mount.status()["vfs"]["inodes"]
    assert stat_errno(root / "random-1" / "nothing") == errno.ENOENT  # re-looked-up afresh
    assert (mount.repo(REAL_REPO_ID) / "config.json").read_bytes() == \
        (real_model_dir() / "config.json").read_bytes()
    assert hub.stats().statuses.get(401, 0) >= 1  # the unknown repo was asked upstream (401, as the Hub)


def test_offline_env_without_cache_is_enoent(hub: TestHub, mounts) -> None:
    mount = mounts(hub_url=hub.url, env={"HF_HUB_OFFLINE": "1"})
    assert stat_errno(mount.repo(REAL_REPO_ID)) == errno.ENOENT
    assert hub.stats().requests == 0
    assert mount.status()["offline"] is True
