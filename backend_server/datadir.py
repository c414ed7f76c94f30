"""One backend process per data directory: the lock that makes rolling updates safe.

A data directory holds LMDB environments (the chunk index, the metadata DB) and an index
mirrored in the process's memory (:class:`~mmfs.tiers.disk.DiskTier`): two processes
working on one would each evict, punch and reconcile behind the other's back. A rolling
update that starts the new pod before the old one has exited (a Deployment's surge, a
node's restart racing its predecessor) would do exactly that, so the second process waits
here, not yet listening (not ready), until the first has exited: the lock is an ``flock``
on ``DIR/.lock``, released by the kernel when its holder dies however it dies. The data
directory is local storage (a per-pod volume), where ``flock`` is reliable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: Seconds between attempts while another process holds the directory.
POLL = 0.2


#: File system types where LMDB's locking and mmap are not reliable (LMDB's documentation
#: warns against remote file systems); a data directory there gets a warning at start.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "9p", "fuse")


def filesystem_of(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` is on (``/proc/self/mountinfo``'s longest match)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mountpoint = fields[4].replace("\\040", " ")
        if (target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) > len(best):
            best, kind = mountpoint, line.split(" - ", 1)[1].split()[0]
    return kind


def is_network_filesystem(kind: str) -> bool:
    return kind.split(".", 1)[0] in NETWORK_FILESYSTEMS


@contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process, waiting as long as another one holds it."""
    kind = filesystem_of(data_dir)
    if is_network_filesystem(kind):
        log.warning("--data-dir %s is on %s, a network file system: LMDB (the index) must not be there, and "
                    "the lock that keeps a second process out is not reliable there; use local storage (the "
                    "shared volume is for --shared-dir)", data_dir, kind)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                    log.warning("data directory %s is in use by %s (a rolling update?): waiting for it to exit",
                                data_dir, holder)
                    waited = True
                time.sleep(POLL)
        if waited:
            log.info("data directory %s is free now", data_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


__all__ = ["hold_data_dir"]
