"""Mount plumbing: find mounts, clear dead ones, unmount, tune the kernel's readahead.

Everything here reads ``/proc/self/mountinfo`` rather than ``stat``-ing the mountpoint:
the daemon must never ``stat`` its own mount before its loop serves requests (it would
wait on itself), and a dead mount answers ``stat`` with ENOTCONN.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FSTYPE = "fuse.mmfs"


@dataclass(frozen=True, slots=True)
class MountInfo:
    mountpoint: str
    device: str  # "major:minor"
    fstype: str
    source: str
    root: str = "/"  # the folder of the filesystem mounted here ("/" but for bind mounts of a subfolder)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and all(c in "01234567" for c in field[i + 1:i + 4]):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            found.append(MountInfo(_unescape(fields[4]), fields[2], fields[sep + 1], _unescape(fields[sep + 2]),
                                   _unescape(fields[3])))
    return found


def mount_at(path: str | os.PathLike[str]) -> MountInfo | None:
    """The mount whose mountpoint is exactly ``path`` (the last one, if stacked)."""
    target = os.path.abspath(path)
    found = None
    for info in mounts():
        if info.mountpoint == target:
            found = info
    return found


def mmfs_mounts() -> list[MountInfo]:
    return [m for m in mounts() if m.fstype == FSTYPE]


def is_dead(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone (ENOTCONN).

    ``statfs`` always reaches the daemon, where ``stat`` may be answered from the kernel's
    attribute cache of the dead mount."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def unmount(path: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount ``path`` with fusermount3, falling back to umount(8); raise OSError on failure."""
    target = os.path.abspath(path)
    attempts: list[list[str]] = []
    if shutil.which("fusermount3"):
        attempts.append(["fusermount3", "-u"] + (["-z"] if lazy else []) + [target])
    if shutil.which("fusermount"):
        attempts.append(["fusermount", "-u"] + (["-z"] if lazy else []) + [target])
    if shutil.which("umount"):
        attempts.append(["umount"] + (["-l"] if lazy else []) + [target])
    errors = []
    for argv in attempts:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0:
            return
        said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        errors.append(said if said.startswith(f"{argv[0]}:") else f"{argv[0]}: {said}")
    if not errors:
        raise OSError(errno.ENOENT, f"cannot unmount {target}: no unmount tool found (fusermount3, umount)")
    busy = any("busy" in e.lower() for e in errors)
    # The first tool's words: the others are fallbacks that fail for the same reason.
    raise OSError(errno.EBUSY if busy else errno.EIO, f"cannot unmount {target}: {errors[0]}")


def clear_stale(path: str | os.PathLike[str]) -> bool:
    """Lazily unmount a dead mount left at ``path`` by a killed daemon; True if there was one."""
    if not is_dead(path):
        return False
    log.warning("%s is a dead mount (its daemon is gone); unmounting it", path)
    unmount(path, lazy=True)
    return True


def set_read_ahead(path: str | os.PathLike[str], read_ahead_bytes: int) -> int | None:
    """Set the kernel readahead of the mount at ``path`` via its backing device info.

    FUSE mounts have a ``/sys/class/bdi/<major>:<minor>/`` of their own. Returns the value
    set in KiB, or ``None`` (logged) when the mount or the sysfs file is not found or not
    writable: readahead is an optimisation, never a reason to fail.
    """
    info = mount_at(path)
    if info is None:
        log.warning("readahead: %s is not in /proc/self/mountinfo", path)
        return None
    knob = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
    kib = max(read_ahead_bytes // 1024, 4)
    try:
        knob.write_text(f"{kib}\n")
        value = int(knob.read_text().strip())
    except OSError as exc:
        log.warning("readahead: cannot set %s to %d KiB (%s); keeping the kernel default", knob, kib, exc)
        return None
    log.info("readahead of %s set to %d KiB (%s)", path, value, knob)
    return value
