"""The node filesystem in FUSE passthrough, with real mounts (``mmfs mount`` over the test hub).

A file complete and verified in the disk cache opens in passthrough on its cache file
(the daemon then sees no READ for it); anything else, or anything that makes passthrough
unavailable, takes the lazy path, and reads are byte-identical either way. The per-inode
mode rules are in :meth:`mmfs.vfs.Vfs._passthrough`.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model
from mmfs.testing.mount import MountProcess, force_unmount

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

MMFS = [sys.executable, "-m", "mmfs"]
SHARD = "model-00001-of-00002.safetensors"
OTHER = "model-00002-of-00002.safetensors"


@pytest.fixture
def model(hub_root: Path) -> dict[str, bytes]:
    """Two 6 MiB shards (1 MiB chunks: six per shard) and small files."""
    repo = make_synthetic_model(hub_root / "org" / "pt", 12 << 20, n_shards=2, seed=11)
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


@pytest.fixture
def mounts(tmp_path: Path, backing_dir: Path) -> Iterator[Any]:
    started: list[MountProcess] = []

    def start(hub: TestHub, *args: str, cache: Path | None = None, wrapper: str | None = None) -> MountProcess:
        mount = MountProcess(tmp_path / f"mnt{len(started)}", cache or backing_dir / f"cache{len(started)}",
                             hub_url=hub.url, args=["--chunk-size", "1MiB", *args],
                             log_path=tmp_path / f"mount{len(started)}.log")
        if wrapper:
            mount.argv[1:3] = ["-m", wrapper]
        started.append(mount)
        return mount.start()

    yield start
    for mount in started:
        mount.stop()
        if os.path.ismount(mount.mountpoint):
            force_unmount(mount.mountpoint)


def passthrough(mount: MountProcess) -> dict[str, Any]:
    return mount.status()["passthrough"]


def file_reads(mount: MountProcess) -> int:
    return mount.status()["vfs"]["file_reads"]


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def drop_page_cache() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def read_once(mount: MountProcess, model: dict[str, bytes], name: str = SHARD) -> Path:
    """Read a file of org/pt whole through ``mount`` (lazily: its chunks then reach the disk
    cache) and wait until no handle of it is open; returns its path."""
    path = mount.repo("org/pt") / name
    assert read_all(path) == model[name]
    wait_closed(mount)
    return path


def open_in_passthrough(mount: MountProcess, path: Path, timeout: float = 20.0) -> int:
    """Open ``path`` again and again until the daemon answers in passthrough (its chunks
    reach the disk cache behind the readers); returns the fd, open in passthrough."""
    deadline = time.monotonic() + timeout
    while True:
        before = passthrough(mount)["opens"]
        fd = os.open(path, os.O_RDONLY)
        if passthrough(mount)["opens"] == before + 1:
            return fd
        os.close(fd)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never opened in passthrough: {passthrough(mount)}\n{mount.log_text()[-2000:]}")
        time.sleep(0.2)


def wait_closed(mount: MountProcess, timeout: float = 10.0) -> None:
    """Until the daemon saw every release (they arrive after close returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = passthrough(mount)
        if state["open_files"] == {"passthrough": 0, "lazy": 0}:
            return
        time.sleep(0.05)
    raise AssertionError(f"files still open in the daemon: {passthrough(mount)}")


def test_a_prefetched_file_opens_in_passthrough(hub_root: Path, model: dict[str, bytes], mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub)
        assert passthrough(mount)["enabled"] is True, mount.log_text()
        assert "FUSE passthrough: on" in mount.log_text()
        result = subprocess.run([*MMFS, "prefetch", "huggingface/org/pt", "--mount", str(mount.mountpoint)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    # The hub is gone: what follows comes from the node alone.
    path = mount.repo("org/pt") / SHARD
    fd = open_in_passthrough(mount, path)
    try:
        drop_page_cache()
        reads = file_reads(mount)
        assert os.pread(fd, len(model[SHARD]) + 1, 0) == model[SHARD]
        assert read_all(path) == model[SHARD]  # another open: shares the inode's backing id
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            assert view[:] == model[SHARD]
            assert hashlib.sha256(view).digest() == hashlib.sha256(model[SHARD]).digest()
        assert file_reads(mount) == reads  # not one READ reached the daemon
        state = passthrough(mount)
        assert state["backing_ids"] == 1 and state["pinned_files"] == 1
        assert state["reads_reaching_daemon"] == 0
    finally:
        os.close(fd)
    wait_closed(mount)
    state = passthrough(mount)
    assert state["backing_ids"] == 0 and state["pinned_files"] == 0  # closed with the last release
    # The lazy path is still right for files read afterwards from the page cache.
    assert read_all(mount.repo("org/pt") / "config.json") == model["config.json"]
    status = subprocess.run([*MMFS, "status", "--mount", str(mount.mountpoint)], capture_output=True, text=True,
                            timeout=30)
    assert "passthrough: on;" in status.stdout, status.stdout


def test_a_cold_file_reads_lazily_then_opens_in_passthrough(hub_root: Path, model: dict[str, bytes],
                                                            mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub)
        path = mount.repo("org/pt") / SHARD
        reads = file_reads(mount)
        assert read_all(path) == model[SHARD]  # cold: lazily, through the daemon
        assert file_reads(mount) > reads
        assert passthrough(mount)["lazy_opens"].get("cold", 0) >= 1
        wait_closed(mount)
        fd = open_in_passthrough(mount, path)  # once its chunks are all on disk, verified
        try:
            reads = file_reads(mount)
            assert os.pread(fd, len(model[SHARD]), 0) == model[SHARD]
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as view:
                assert view[:] == model[SHARD]
            assert file_reads(mount) == reads
        finally:
            os.close(fd)


def test_a_file_open_lazily_keeps_new_opens_lazy(hub_root: Path, model: dict[str, bytes], mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub)
        path = mount.repo("org/pt") / SHARD
        with open(path, "rb") as held:  # lazily: cold
            assert held.read() == model[SHARD]
            # Complete on disk now (the read reached the end), but the inode is open lazily:
            # a passthrough open would fail in the kernel (EIO), so new opens stay lazy.
            deadline = time.monotonic() + 20
            while mount.status()["tiers"][1]["entries"] < 7 and time.monotonic() < deadline:
                time.sleep(0.1)
            for _ in range(3):
                assert read_all(path) == model[SHARD]  # no EIO
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
                    assert view[:] == model[SHARD]
            held.seek(0)
            assert held.read() == model[SHARD]
            state = passthrough(mount)
            assert state["opens"] == 0 and state["lazy_opens"].get("lazy-open", 0) >= 6, state
        wait_closed(mount)
        fd = open_in_passthrough(mount, path)  # closed everywhere: the next open is native
        try:
            # While it is open in passthrough, every new open shares its backing id.
            for _ in range(3):
                assert read_all(path) == model[SHARD]
            assert passthrough(mount)["backing_ids"] == 1
        finally:
            os.close(fd)


def data_file(cache: Path, size: int, content: bytes) -> Path:
    """The disk cache's data file holding ``content``."""
    for path in (cache / "chunks" / "data").rglob("*"):
        if path.is_file() and path.stat().st_size == size and path.read_bytes() == content:
            return path
    raise AssertionError(f"no data file holds the {size} bytes")


def test_eviction_does_not_punch_a_pinned_backing_file(hub_root: Path, model: dict[str, bytes],
                                                       mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub, "--cache-size", "9MiB", "--memory-cache", "4MiB")
        first, second = mount.repo("org/pt") / SHARD, mount.repo("org/pt") / OTHER
        assert read_all(first) == model[SHARD]
        wait_closed(mount)
        fd = open_in_passthrough(mount, first)
        try:
            backing = data_file(mount.cache_dir, len(model[SHARD]), model[SHARD])
            # 6 MiB pinned, 9 MiB allowed: the other 6 MiB shard needs what is pinned.
            assert read_all(second) == model[OTHER]
            assert read_all(second) == model[OTHER]
            drop_page_cache()
            assert backing.read_bytes() == model[SHARD]  # not punched under the open file
            assert os.pread(fd, len(model[SHARD]), 0) == model[SHARD]
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as view:
                assert view[:] == model[SHARD]
            disk = mount.status()["tiers"][1]
            assert disk["used_bytes"] <= 9 << 20
            assert passthrough(mount)["pin_skips"] > 0  # chunks of the other file were not kept
        finally:
            os.close(fd)
        wait_closed(mount)
        # Unpinned: reading the other file again may evict it now; all reads stay right.
        assert read_all(second) == model[OTHER]
        assert read_all(first) == model[SHARD]
        assert passthrough(mount)["pinned_files"] == 0


def test_a_cache_on_overlayfs_falls_back_to_the_lazy_path(tmp_path: Path, hub_root: Path,
                                                          model: dict[str, bytes], mounts, overlay_dir: Path) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub, cache=overlay_dir / "cache")
        path = read_once(mount, model)
        deadline = time.monotonic() + 20
        while passthrough(mount)["enabled"] and time.monotonic() < deadline:
            assert read_all(path) == model[SHARD]  # the first open of the complete file: ELOOP
            time.sleep(0.2)
        state = passthrough(mount)
        assert state["enabled"] is False and state["off_reason"].startswith("stacked-filesystem"), state
        assert state["lazy_opens"].get("stacked-filesystem") == 1
        for _ in range(2):
            assert read_all(path) == model[SHARD]
        assert passthrough(mount)["lazy_opens"].get("off", 0) >= 2
        assert mount.log_text().count("FUSE passthrough: off") == 1  # one log line
        mount.stop()


def test_passthrough_off_reads_lazily(hub_root: Path, model: dict[str, bytes], mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub, "--passthrough", "off")
        path = mount.repo("org/pt") / SHARD
        for _ in range(3):
            assert read_all(path) == model[SHARD]
            time.sleep(0.3)
        state = passthrough(mount)
        assert state["enabled"] is False and state["off_reason"] == "--passthrough off"
        assert state["opens"] == 0 and state["lazy_opens"].get("off", 0) >= 2


def test_without_the_capability_reads_fall_back(hub_root: Path, model: dict[str, bytes], mounts) -> None:
    """The daemon without CAP_SYS_ADMIN once mounted (as in a container without that
    privilege): the kernel refuses backing files (EPERM); passthrough goes off, one log line."""
    with TestHub(hub_root) as hub:
        mount = mounts(hub, wrapper="mmfs.testing.nocap")
        path = read_once(mount, model)
        deadline = time.monotonic() + 20
        while passthrough(mount)["enabled"] and time.monotonic() < deadline:
            assert read_all(path) == model[SHARD]
            time.sleep(0.2)
        state = passthrough(mount)
        assert state["enabled"] is False and state["off_reason"].startswith("no-capability"), state
        assert state["opens"] == 0 and state["lazy_opens"].get("no-capability") == 1
        for _ in range(2):
            assert read_all(path) == model[SHARD]
        assert mount.log_text().count("FUSE passthrough: off") == 1


# -- --passthrough on --------------------------------------------------------------------


def start_failing(mount: MountProcess, wrapper: str) -> subprocess.CompletedProcess[str]:
    argv = [mount.argv[0], "-m", wrapper, *mount.argv[3:]]
    mount.mountpoint.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, env=mount.env, capture_output=True, text=True, timeout=60)


def test_passthrough_on_mounts_where_it_works(hub_root: Path, model: dict[str, bytes], mounts) -> None:
    with TestHub(hub_root) as hub:
        mount = mounts(hub, "--passthrough", "on")
        assert passthrough(mount)["enabled"] is True
        path = read_once(mount, model)
        os.close(open_in_passthrough(mount, path))
        assert not list(mount.cache_dir.rglob(".passthrough-probe*"))  # the probe file is gone


@pytest.mark.parametrize("wrapper, cause", [
    ("mmfs.testing.noinit", "the kernel or libfuse did not offer it"),  # INIT without the capability
    ("mmfs.testing.nocap", "lacks CAP_SYS_ADMIN"),  # the first registration would fail: EPERM
])
def test_passthrough_on_fails_to_start_where_it_cannot_be_used(tmp_path: Path, backing_dir: Path, hub_root: Path,
                                                               model: dict[str, bytes], wrapper: str,
                                                               cause: str) -> None:
    with TestHub(hub_root) as hub:
        mount = MountProcess(tmp_path / "mnt", backing_dir / "cache", hub_url=hub.url,
                             args=["--chunk-size", "1MiB", "--passthrough", "on"])
        try:
            result = start_failing(mount, wrapper)
        finally:
            if os.path.ismount(mount.mountpoint):
                force_unmount(mount.mountpoint)
                raise AssertionError("left mounted")
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "mmfs: mounted" not in result.stdout
        assert "--passthrough on: FUSE passthrough cannot be used" in result.stderr and cause in result.stderr, \
            result.stderr
        # The same mount with auto starts, and reads lazily.
        auto = MountProcess(tmp_path / "mnt", backing_dir / "cache", hub_url=hub.url,
                            args=["--chunk-size", "1MiB"], log_path=tmp_path / "auto.log")
        auto.argv[1:3] = ["-m", wrapper]
        with auto:
            assert read_all(auto.repo("org/pt") / SHARD) == model[SHARD]


# -- unmount, restart and kill -9 with a file open in passthrough --------------------------


def observe(fd: int, expected: bytes) -> str:
    """What a read of an fd open in passthrough gives now: ``bytes`` (always the right
    ones: asserted) or the errno's name."""
    try:
        data = os.pread(fd, len(expected) + 1, 0)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    assert data == expected, "wrong bytes from a passthrough file after its daemon went"
    return "bytes"


@pytest.mark.parametrize("how", ["unmount", "stop", "kill"])
def test_daemon_gone_with_a_passthrough_file_open(hub_root: Path, model: dict[str, bytes], mounts, how: str,
                                                  backing_dir: Path) -> None:
    cache = backing_dir / "cache-restart"
    with TestHub(hub_root) as hub:
        mount = mounts(hub, cache=cache)
        path = read_once(mount, model)
        fd = open_in_passthrough(mount, path)
        try:
            assert observe(fd, model[SHARD]) == "bytes"
            outcome: dict[str, str] = {}
            if how == "unmount":
                plain = subprocess.run([*MMFS, "unmount", str(mount.mountpoint)], capture_output=True, text=True,
                                       timeout=30)
                outcome["plain unmount"] = f"exit {plain.returncode} {plain.stderr.strip()}"
                lazy = subprocess.run([*MMFS, "unmount", "--lazy", str(mount.mountpoint)], capture_output=True,
                                      text=True, timeout=30)
                assert lazy.returncode == 0, lazy.stderr
                time.sleep(1)
                outcome["daemon after lazy unmount"] = "running" if mount.proc.poll() is None else "exited"
            elif how == "stop":
                outcome["exit"] = str(mount.stop())
            else:
                mount.kill()
            outcome["read after"] = observe(fd, model[SHARD])
        finally:
            os.close(fd)
        time.sleep(0.5)
        if how == "unmount":
            outcome["daemon after close"] = "running" if mount.proc.poll() is None else "exited"
        # Observed on Linux 6.18 (docs/node.md, "FUSE passthrough"): the open file keeps
        # reading the right bytes from its backing file whatever happened to the daemon.
        assert outcome["read after"] in ("bytes", "ENOTCONN", "EIO"), outcome
        if how == "unmount":
            assert "busy" in outcome["plain unmount"], outcome  # refused while the file is open
            # Detached: the daemon serves the open file until it is closed, then exits.
            assert outcome["daemon after lazy unmount"] == "running" and outcome["daemon after close"] == "exited"
        mount.stop()
        # Restarted on the same cache: no backing id left over, the same file reads right and
        # opens in passthrough again.
        mount = mounts(hub, cache=cache)
        path = mount.repo("org/pt") / SHARD
        state = passthrough(mount)
        assert state["backing_ids"] == 0 and state["pinned_files"] == 0, state
        assert read_all(path) == model[SHARD]
        fd = open_in_passthrough(mount, path, timeout=5)
        try:
            reads = file_reads(mount)
            assert os.pread(fd, len(model[SHARD]) + 1, 0) == model[SHARD]
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as view:
                assert view[:] == model[SHARD]
            assert file_reads(mount) == reads
            assert passthrough(mount)["backing_ids"] == 1
        finally:
            os.close(fd)
        wait_closed(mount)
        assert passthrough(mount)["backing_ids"] == 0 and mount.status()["integrity"]["failures"] == 0


# -- mmfs verify ---------------------------------------------------------------------------


def test_verify_finds_and_repairs_a_flipped_byte(hub_root: Path, model: dict[str, bytes], mounts,
                                                 backing_dir: Path) -> None:
    cache = backing_dir / "cache-verify"
    with TestHub(hub_root) as hub:
        mount = mounts(hub, cache=cache)
        assert read_all(mount.repo("org/pt") / SHARD) == model[SHARD]
        wait_closed(mount)
        os.close(open_in_passthrough(mount, mount.repo("org/pt") / SHARD))  # all on disk, verified
        refused = subprocess.run([*MMFS, "verify", "--cache-dir", str(cache)], capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1 and "in use by the mmfs mount" in refused.stderr, refused
        mount.stop()
        clean = subprocess.run([*MMFS, "verify", "--cache-dir", str(cache)], capture_output=True, text=True,
                               timeout=60)
        assert clean.returncode == 0 and " 0 damaged" in clean.stdout, (clean.stdout, clean.stderr)
        backing = data_file(cache, len(model[SHARD]), model[SHARD])
        with open(backing, "r+b") as f:  # bit rot in chunk 3
            f.seek(3 * (1 << 20) + 12345)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
        found = subprocess.run([*MMFS, "verify", "--cache-dir", str(cache)], capture_output=True, text=True,
                               timeout=60)
        assert found.returncode == 1, (found.stdout, found.stderr)
        assert f"{backing}: 1 damaged chunk(s)" in found.stdout and "chunk 3:" in found.stdout, found.stdout
        repaired = subprocess.run([*MMFS, "verify", "--repair", "--cache-dir", str(cache)], capture_output=True,
                                  text=True, timeout=60)
        assert repaired.returncode == 0 and "1 dropped" in repaired.stdout, (repaired.stdout, repaired.stderr)
        again = subprocess.run([*MMFS, "verify", "--cache-dir", str(cache)], capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0 and " 0 damaged" in again.stdout, again.stdout
        # Restarted: the dropped chunk is fetched again, the file reads right and goes passthrough again.
        mount = mounts(hub, cache=cache)
        path = read_once(mount, model)
        fd = open_in_passthrough(mount, path)
        try:
            assert os.pread(fd, len(model[SHARD]) + 1, 0) == model[SHARD]
        finally:
            os.close(fd)
