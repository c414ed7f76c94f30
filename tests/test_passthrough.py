"""FUSE passthrough through pyfuse3 (scripts/pyfuse3-passthrough.patch) with real mounts.

A minimal file system (:mod:`mmfs.testing.passthrough_fs`) serves one local file; the
tests read it through the mount and check bytes, that the kernel served it (the daemon
saw no READ), and the kernel's rules for passthrough opens, with the errno a reader sees.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pyfuse3
import pytest

from mmfs.testing.mount import filesystem_type, force_unmount
from mmfs.testing.process import child_env, start_until_ready, stop

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

SIZE = 8 << 20


class PassthroughMount:
    def __init__(self, root: Path, backing: Path, *args: str) -> None:
        self.mountpoint = root / "mnt"
        self.mountpoint.mkdir()
        self.mode_file = root / "mode"
        self.log_path = root / "fs.log"
        argv = [sys.executable, "-m", "mmfs.testing.passthrough_fs", str(self.mountpoint), str(backing),
                "--mode-file", str(self.mode_file), *args]
        self.proc, line = start_until_ready(argv, child_env(), log_path=self.log_path, timeout=30)
        if not line.startswith("passthrough_fs: mounted"):
            self.stop()
            raise RuntimeError(f"passthrough_fs did not start: {line!r}\n{self.log_path.read_text()}")
        self.ready_line = line

    @property
    def data(self) -> Path:
        return self.mountpoint / "data"

    def mode(self, word: str) -> None:
        self.mode_file.write_text(word)

    def stats(self) -> dict[str, Any]:
        return json.loads((self.mountpoint / ".stats").read_bytes())

    def drop_ids(self) -> None:
        os.close(os.open(self.mountpoint / ".drop-ids", os.O_RDONLY))

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=10)
        stop(self.proc, 15, 10)
        if os.path.ismount(self.mountpoint):
            force_unmount(self.mountpoint)


@pytest.fixture
def payload(backing_dir: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = backing_dir / "backing.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def mount(tmp_path: Path, payload: tuple[Path, bytes]) -> Iterator[PassthroughMount]:
    fs = PassthroughMount(tmp_path, payload[0])
    try:
        yield fs
    finally:
        fs.stop()


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def open_errno(path: Path) -> int:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.errno or 0
    return 0


def assert_no_backing_ids_left(mount: PassthroughMount) -> None:
    # A passthrough open that the kernel failed after the daemon's reply is released
    # (FUSE_RELEASE) like any other, so the daemon's count of users comes back to zero.
    stats = mount.stats()
    assert stats["shared_users"] == 0 and stats["shared_id"] == 0, stats
    assert stats["opens"] == stats["releases"] + 1, stats  # + the open .stats itself


def test_the_patched_pyfuse3_is_installed() -> None:
    assert "+passthrough." in pyfuse3.__version__
    assert pyfuse3.FileInfo(backing_id=7).backing_id == 7
    assert pyfuse3.FileInfo().backing_id == 0
    assert pyfuse3.Operations.enable_passthrough is False  # opt-in
    with pytest.raises(RuntimeError):
        pyfuse3.passthrough_open(0)  # no session in this process


def test_passthrough_reads_are_served_by_the_kernel(mount: PassthroughMount, payload: tuple[Path, bytes]) -> None:
    assert mount.stats()["passthrough"] is True
    assert read_all(mount.data) == payload[1]
    with open(mount.data, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        assert view[:] == payload[1]
        assert view[SIZE - 4096:] == payload[1][SIZE - 4096:]
    with open(mount.data, "rb", buffering=0) as f:
        assert os.pread(f.fileno(), 1000, 12345) == payload[1][12345:13345]
    stats = mount.stats()
    assert stats["reads"] == 0, stats  # not one READ reached the daemon
    assert stats["opens"] >= 3
    assert stats["shared_users"] == 0 and stats["shared_id"] == 0  # closed with the last release


def test_without_passthrough_the_daemon_serves_reads(mount: PassthroughMount, payload: tuple[Path, bytes]) -> None:
    mount.mode("plain")
    assert read_all(mount.data) == payload[1]
    stats = mount.stats()
    assert stats["reads"] > 0 and stats["read_bytes"] >= SIZE


def test_keep_cache_fails_a_passthrough_open(mount: PassthroughMount) -> None:
    mount.mode("keep_cache")
    # FOPEN_KEEP_CACHE is outside FOPEN_PASSTHROUGH_MASK: the kernel fails the open.
    assert open_errno(mount.data) == errno.EIO
    mount.mode("passthrough")
    assert open_errno(mount.data) == 0
    assert_no_backing_ids_left(mount)


def test_an_inode_is_open_in_one_mode_at_a_time(mount: PassthroughMount, payload: tuple[Path, bytes]) -> None:
    # Cached open held: a passthrough open of the same inode fails (ETXTBSY in the kernel).
    mount.mode("cached")
    cached = os.open(mount.data, os.O_RDONLY)
    try:
        mount.mode("passthrough")
        assert open_errno(mount.data) == errno.EIO
    finally:
        os.close(cached)
    assert open_errno(mount.data) == 0  # the cached file is gone: passthrough opens again

    # Passthrough open held: every open of the inode must be passthrough, even direct_io.
    held = os.open(mount.data, os.O_RDONLY)
    try:
        for word in ("cached", "plain", "direct"):
            mount.mode(word)
            assert open_errno(mount.data) == errno.EIO, word
        mount.mode("passthrough")
        assert os.pread(held, 4096, 0) == payload[1][:4096]
    finally:
        os.close(held)
    mount.mode("cached")
    assert read_all(mount.data) == payload[1]  # back in cached mode once all are closed
    assert_no_backing_ids_left(mount)


def test_a_direct_io_open_does_not_block_passthrough(mount: PassthroughMount, payload: tuple[Path, bytes]) -> None:
    mount.mode("direct")
    direct = os.open(mount.data, os.O_RDONLY)
    try:
        mount.mode("passthrough")
        assert read_all(mount.data) == payload[1]  # direct_io files take no io mode
        assert os.pread(direct, 4096, 4096) == payload[1][4096:8192]
    finally:
        os.close(direct)


def test_one_backing_id_per_inode(mount: PassthroughMount) -> None:
    mount.mode("fresh")
    held = os.open(mount.data, os.O_RDONLY)
    try:
        # A second backing file for an inode already in passthrough: EBUSY in the kernel.
        assert open_errno(mount.data) == errno.EIO
    finally:
        os.close(held)
    assert open_errno(mount.data) == 0
    assert_no_backing_ids_left(mount)


def test_open_files_outlive_their_backing_id(mount: PassthroughMount, payload: tuple[Path, bytes]) -> None:
    with open(mount.data, "rb", buffering=0) as f:
        assert mount.stats()["shared_id"] > 0
        mount.drop_ids()
        assert mount.stats()["shared_id"] == 0
        assert f.read() == payload[1]
    assert mount.stats()["reads"] == 0


def test_without_the_capability_backing_ids_are_refused(tmp_path: Path, payload: tuple[Path, bytes]) -> None:
    fs = PassthroughMount(tmp_path, payload[0], "--no-passthrough")
    try:
        assert fs.stats()["passthrough"] is False
        assert open_errno(fs.data) == errno.EPERM  # FUSE_DEV_IOC_BACKING_OPEN: EPERM
        fs.mode("plain")
        assert read_all(fs.data) == payload[1]
    finally:
        fs.stop()


def test_a_backing_file_on_overlayfs_is_refused(tmp_path: Path, overlay_dir: Path) -> None:
    (overlay_dir / "backing.bin").write_bytes(b"x" * 4096)
    assert filesystem_type(overlay_dir) == "overlayfs"
    fs = PassthroughMount(tmp_path, overlay_dir / "backing.bin")
    try:
        # The backing file's stack depth must be below the connection's max_stack_depth
        # (1: libfuse's FUSE_BACKING_STACKED_UNDER default + 1).
        assert open_errno(fs.data) == errno.ELOOP
    finally:
        fs.stop()
