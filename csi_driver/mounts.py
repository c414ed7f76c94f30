"""Mount-table reading and the mount syscalls the plugin makes, all bounded in time.

Everything here talks to the kernel and nothing else: ``/proc/self/mountinfo`` to learn
what is mounted where (read without touching the mounted filesystems, so a dead FUSE
daemon cannot hang it), ``mount(8)``/``umount(8)`` for bind mounts, sysfs for readahead.
Calls that *do* enter a filesystem (``stat``, ``statvfs``, ``readlink``) go through
:func:`bounded`, which runs them in a daemon thread and gives up after a timeout: a hung
FUSE daemon leaks one blocked thread but never an RPC.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errnos that mean "the filesystem behind this path is gone", not "no such file".
STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EIO, errno.ECONNABORTED})
MOUNTINFO = "/proc/self/mountinfo"


class Timeout(Exception):
    """A bounded filesystem call did not return in time (the FUSE daemon hangs)."""


class MountError(Exception):
    """``mount(8)`` or ``umount(8)`` failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the path inside the source filesystem that is mounted here
    mount_point: str
    options: str
    fs_type: str
    source: str

    @property
    def is_fuse(self) -> bool:
        return self.fs_type == "fuse" or self.fs_type.startswith("fuse.") or self.fs_type == "fuseblk"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and all(c in "01234567" for c in field[i + 1 : i + 4]):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """The mount table of this process's mount namespace, in mount order."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=fields[5],
                    fs_type=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
    return entries


def canonical(path: str) -> str:
    """*path* made absolute and normalised, resolving symlinks in its parent only.

    The last component is left alone: it may be a dead mount whose ``lstat`` fails.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def mounts_at(path: str) -> list[MountEntry]:
    """Every mount stacked on *path* (bottom first); empty when it is no mount point."""
    path = canonical(path)
    return [e for e in read_mountinfo() if e.mount_point == path]


def is_mount_point(path: str) -> bool:
    return bool(mounts_at(path))


def bounded(fn: Callable[[], T], timeout: float) -> T:
    """Run *fn* in a daemon thread; its result, its exception, or :class:`Timeout`."""
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="csi-bounded-fs-call", daemon=True).start()
    if not done.wait(timeout):
        raise Timeout(f"filesystem call did not return within {timeout:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def path_health(path: str, timeout: float) -> int | None:
    """``None`` when the filesystem at *path* answers, else the errno it fails with.

    Uses ``statvfs``: FUSE never answers it from the kernel's attribute cache, so a dead
    daemon shows as ``ENOTCONN`` even where ``stat`` of a cached inode still succeeds. A
    filesystem without statfs (``ENOSYS``) is checked with ``stat`` instead. A timeout
    reads as ``ETIMEDOUT``; a missing path as ``ENOENT``.
    """

    def check() -> None:
        try:
            os.statvfs(path)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            os.stat(path)

    try:
        bounded(check, timeout)
        return None
    except Timeout:
        return errno.ETIMEDOUT
    except OSError as exc:
        return exc.errno or errno.EIO


def _run(argv: list[str], timeout: float = 30.0) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MountError(f"{' '.join(argv)}: timed out after {timeout:g}s") from exc
    if proc.returncode != 0:
        raise MountError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def bind_read_only(source: str, target: str) -> None:
    """Bind *source* on *target*, then remount that bind read-only (two steps: the
    kernel ignores ``ro`` on the first ``MS_BIND`` call). Undoes the bind if step two fails."""
    _run(["mount", "--bind", source, target])
    try:
        _run(["mount", "-o", "remount,bind,ro,nosuid,nodev", target])
    except MountError:
        unmount_all(target)
        raise


def unmount_all(target: str, attempts: int = 8) -> None:
    """Unmount every mount stacked on *target*: a plain ``umount`` first, then a lazy one
    (``umount -l``) for busy or dead (ENOTCONN) mounts. Nothing mounted is fine."""
    for _ in range(attempts):
        if not is_mount_point(target):
            return
        try:
            _run(["umount", target])
        except MountError as exc:
            log.info("umount %s failed (%s); detaching lazily", target, exc)
            _run(["umount", "-l", target])
    if is_mount_point(target):
        raise MountError(f"{target} is still mounted after {attempts} unmounts")


def fuse_device(mount_root: str) -> str | None:
    """``major:minor`` of the FUSE mount on *mount_root* (the topmost), or ``None``."""
    stacked = [e for e in mounts_at(mount_root) if e.is_fuse]
    return stacked[-1].device if stacked else None


def set_read_ahead(device: str, kb: int, sysfs: str = "/sys/class/bdi") -> bool:
    """Write *kb* to the readahead of backing device *device*; True when it changed."""
    knob = Path(sysfs) / device / "read_ahead_kb"
    current = knob.read_text().strip()
    if current == str(kb):
        return False
    knob.write_text(f"{kb}\n")
    log.info("read_ahead_kb of bdi %s: %s -> %d", device, current, kb)
    return True
