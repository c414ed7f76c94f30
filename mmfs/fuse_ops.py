"""The thin pyfuse3 adapter over :class:`mmfs.vfs.Vfs`.

It converts the core's records into pyfuse3's and errors into errnos: an
:class:`~mmfs.errors.MmfsError` becomes ``FUSEError(err.errno)``; anything unexpected is
logged with its traceback and answered EIO, so a bug fails one call, never the daemon
(an exception escaping a pyfuse3 handler would end ``pyfuse3.main``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from .errors import FailureLog, MmfsError
from .vfs import Attributes, PassthroughBackend, Vfs

log = logging.getLogger(__name__)
#: File-system calls that failed: the first of each kind at WARNING/ERROR, with its cause.
failures = FailureLog(log)

T = TypeVar("T")


def _errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except MmfsError as exc:
            failures.failed(f"{fn.__name__}{args[1:]!r}", exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except (trio.Cancelled, KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - a bug: fail this call only
            log.exception("internal error in %s%r", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def entry_attributes(attr: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.inode
    entry.generation = 0
    entry.entry_timeout = attr.timeout
    entry.attr_timeout = attr.timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = 0
    entry.st_size = attr.size
    entry.st_blksize = 1 << 20
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
    return entry


def _name(raw: bytes) -> str:
    try:
        return os.fsdecode(raw) if b"\0" not in raw else "\0"
    except UnicodeDecodeError:
        return "\0"  # undecodable: not a name any manifest holds


class _KernelBacking(PassthroughBackend):
    """Backing ids through the patched pyfuse3 (``scripts/pyfuse3-passthrough.patch``)."""

    def open(self, fd: int) -> int:
        return pyfuse3.passthrough_open(fd)

    def close(self, backing_id: int) -> None:
        pyfuse3.passthrough_close(backing_id)


def passthrough_support() -> str | None:
    """Why this pyfuse3 cannot do passthrough (``None``: it can, if the kernel agrees)."""
    if not hasattr(pyfuse3, "passthrough_open") or not hasattr(pyfuse3.Operations, "enable_passthrough"):
        return "pyfuse3 without the passthrough patch (scripts/pyfuse3-passthrough.sh)"
    return None


class Operations(pyfuse3.Operations):
    """pyfuse3 callbacks; read-only, so everything that writes answers EROFS or ENOSYS.

    ``passthrough``: ask the kernel for FUSE passthrough at INIT; files complete in the disk
    cache are then opened on their cache file (:meth:`mmfs.vfs.Vfs.open`)."""

    def __init__(self, vfs: Vfs, *, passthrough: bool = False) -> None:
        super().__init__()
        self.vfs = vfs
        self.passthrough_why_not = "--passthrough off" if not passthrough else passthrough_support()
        self.enable_passthrough = self.passthrough_why_not is None
        if self.enable_passthrough:
            vfs.backing = _KernelBacking()
        self._dirs: dict[int, list[tuple[str, Attributes]]] = {}
        self._next_dir = 1
        #: Set once the kernel's INIT request was answered (see :mod:`mmfs.daemon`).
        self.initialized = trio.Event()
        vfs.invalidate = self._invalidate

    def init(self) -> None:
        why_not = self.passthrough_why_not
        if why_not is None and not pyfuse3.passthrough_enabled():
            why_not = "the kernel or libfuse did not offer it (Linux >= 6.9 and libfuse >= 3.17 needed)"
        self.passthrough_why_not = why_not
        self.vfs.enable_passthrough(why_not)
        self.initialized.set()

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.vfs.lookup(parent_inode, _name(name)))

    async def forget(self, inode_list: Any) -> None:
        """Frees provisional org nodes the kernel no longer holds (see :mod:`mmfs.vfs`)."""
        for inode, nlookup in inode_list:
            try:
                self.vfs.forget(inode, nlookup)
            except Exception:  # noqa: BLE001 - forget must not raise
                log.exception("internal error in forget(%d, %d)", inode, nlookup)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.vfs.getattr(inode))

    @_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return os.fsencode(await self.vfs.readlink(inode))

    @_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        listing = await self.vfs.listdir(inode)
        handle = self._next_dir
        self._next_dir += 1
        self._dirs[handle] = listing
        return handle

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(listing)):
            name, attr = listing[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry_attributes(attr), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))
        opened = await self.vfs.open(inode, writable)
        if opened.backing_id:
            return pyfuse3.FileInfo(fh=opened.handle, keep_cache=False, direct_io=False,
                                    backing_id=opened.backing_id)
        return pyfuse3.FileInfo(fh=opened.handle, keep_cache=opened.keep_cache, direct_io=opened.direct_io)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self.vfs.read(fh, off, size)

    def _invalidate(self, inode: int) -> None:
        trio.lowlevel.spawn_system_task(self._drop_pages, inode)

    @staticmethod
    async def _drop_pages(inode: int) -> None:
        """Drop the kernel's cached pages of a file whose bytes turned out wrong.

        In a thread, after the current reply: the kernel may hold page locks until a read
        in progress is answered, and invalidation waits for them."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
        except Exception as exc:  # noqa: BLE001 - best effort; the next open drops them anyway
            log.warning("cannot invalidate the page cache of inode %d: %s", inode, exc)

    @_errors
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        self.vfs.node(inode)
        return not mode & os.W_OK

    @_errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        block = 1 << 20
        used = limit = 0
        for tier in self.vfs.engine.statistics().tiers:
            if tier.name == "disk":
                used, limit = tier.used_bytes, tier.limit_bytes
        data.f_bsize = data.f_frsize = block
        data.f_blocks = max(limit // block, 1)
        data.f_bfree = data.f_bavail = max((limit - used) // block, 0)
        data.f_files = self.vfs.inode_count()
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return []
