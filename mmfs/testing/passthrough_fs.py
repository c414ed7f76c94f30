"""A minimal pyfuse3 file system that serves one local file, in FUSE passthrough or not.

For the passthrough tests and the passthrough benchmark; not part of the mmfs daemon.

    python -m mmfs.testing.passthrough_fs MOUNTPOINT BACKING_FILE [--mode-file F] [--no-passthrough]

The mount shows two files:

- ``data``: the backing file. Each ``open`` is answered as the first word of the mode
  file (``--mode-file``; read at every open, default ``passthrough``) says:
  ``passthrough`` (one backing id per inode, shared by its open files, closed when the
  last one is released, as libfuse's passthrough_hp example does), ``fresh`` (passthrough
  with a new backing id for this open), ``keep_cache`` (passthrough and keep_cache, which
  the kernel refuses), ``cached`` (no passthrough, the page cache kept), ``plain`` (no
  passthrough, no keep_cache) or ``direct`` (direct_io). Reads that reach the daemon are
  served with ``os.pread`` from the backing file and counted.
- ``.stats``: JSON counters (``reads``, ``read_bytes``, ``opens``, ``releases``, the
  backing ids open now, ``passthrough`` = ``pyfuse3.passthrough_enabled()``), read with
  direct_io so that it is never cached. Opening ``.drop-ids`` closes every backing id
  now (files open on them keep reading).

A backing-id error (``passthrough_open``) answers the ``open`` with its errno. The ready
line ``passthrough_fs: mounted <mountpoint>`` goes to stdout once INIT was answered.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import stat
import sys
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("passthrough_fs")

ROOT, DATA, STATS, DROP = pyfuse3.ROOT_INODE, 2, 3, 4
NAMES = {b"data": DATA, b".stats": STATS, b".drop-ids": DROP}
MODES = ("passthrough", "fresh", "keep_cache", "cached", "plain", "direct")


class PassthroughFs(pyfuse3.Operations):
    enable_passthrough = True

    def __init__(self, backing: str, mode_file: str | None, passthrough: bool = True) -> None:
        super().__init__()
        self.enable_passthrough = passthrough
        self.backing = backing
        self.mode_file = mode_file
        self.fd = os.open(backing, os.O_RDONLY)
        self.initialized = trio.Event()
        self.stats: dict[str, Any] = {"reads": 0, "read_bytes": 0, "opens": 0, "releases": 0}
        self.shared_id = 0  # the inode's backing id while passthrough handles are open
        self.shared_users = 0
        self.handles: dict[int, tuple[int, int]] = {}  # fh -> (inode, own backing id or 0)
        self.next_fh = 1

    def init(self) -> None:
        self.initialized.set()

    def mode(self) -> str:
        if self.mode_file is None:
            return "passthrough"
        try:
            with open(self.mode_file) as f:
                words = f.read().split()
        except FileNotFoundError:
            return "passthrough"
        word = words[0] if words else "passthrough"
        if word not in MODES:
            raise ValueError(f"unknown mode {word!r}")
        return word

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = 300
        if inode == ROOT:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == DATA:
            entry.st_mode, entry.st_nlink = stat.S_IFREG | 0o444, 1
            entry.st_size = os.fstat(self.fd).st_size
        else:
            entry.st_mode, entry.st_nlink, entry.st_size = stat.S_IFREG | 0o444, 1, 0
            entry.entry_timeout = entry.attr_timeout = 0
        entry.st_blksize = 1 << 20
        entry.st_blocks = (entry.st_size + 511) // 512
        return entry

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (ROOT, DATA, STATS, DROP):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for index, (name, inode) in enumerate(NAMES.items()):
            if index >= start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.stats["opens"] += 1
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        if inode == DROP:
            self.drop_ids()
        if inode != DATA:
            self.handles[fh] = (inode, 0)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        mode = self.mode()
        if mode in ("cached", "plain", "direct"):
            self.handles[fh] = (inode, 0)
            return pyfuse3.FileInfo(fh=fh, keep_cache=mode == "cached", direct_io=mode == "direct")
        try:
            if mode == "fresh":
                own = pyfuse3.passthrough_open(self.fd)
                self.handles[fh] = (inode, own)
                return pyfuse3.FileInfo(fh=fh, keep_cache=False, backing_id=own)
            if not self.shared_id:
                self.shared_id = pyfuse3.passthrough_open(self.fd)
        except OSError as exc:
            log.info("passthrough_open: %s", exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        self.shared_users += 1
        self.handles[fh] = (inode, -1)
        return pyfuse3.FileInfo(fh=fh, keep_cache=mode == "keep_cache", backing_id=self.shared_id)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode, _ = self.handles.get(fh, (0, 0))
        if inode == STATS:
            body = json.dumps({**self.stats, "shared_id": self.shared_id, "shared_users": self.shared_users,
                               "passthrough": pyfuse3.passthrough_enabled()}).encode()
            return body[off:off + size]
        if inode != DATA:
            return b""
        data = os.pread(self.fd, size, off)
        self.stats["reads"] += 1
        self.stats["read_bytes"] += len(data)
        return data

    async def release(self, fh: int) -> None:
        self.stats["releases"] += 1
        _, backing = self.handles.pop(fh, (0, 0))
        if backing > 0:
            pyfuse3.passthrough_close(backing)
        elif backing < 0:
            self.shared_users -= 1
            if self.shared_users == 0 and self.shared_id:
                pyfuse3.passthrough_close(self.shared_id)
                self.shared_id = 0

    def drop_ids(self) -> None:
        if self.shared_id:
            pyfuse3.passthrough_close(self.shared_id)
            self.shared_id = 0  # users keep counting down; nothing left to close
        for fh, (inode, backing) in list(self.handles.items()):
            if backing > 0:
                pyfuse3.passthrough_close(backing)
                self.handles[fh] = (inode, 0)


async def serve(fs: PassthroughFs, mountpoint: str, read_ahead: int | None) -> None:
    async with trio.open_nursery() as nursery:
        async def announce() -> None:
            await fs.initialized.wait()
            await trio.sleep(0.05)
            if read_ahead:
                from mmfs import mountutil

                mountutil.set_read_ahead(mountpoint, read_ahead)
            print(f"passthrough_fs: mounted {mountpoint} passthrough={pyfuse3.passthrough_enabled()}", flush=True)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(announce)
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("backing")
    parser.add_argument("--mode-file")
    parser.add_argument("--no-passthrough", action="store_true", help="do not ask for the capability")
    parser.add_argument("--read-ahead", type=int, default=0, help="bytes, for the FUSE mount's bdi")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    fs = PassthroughFs(args.backing, args.mode_file, passthrough=not args.no_passthrough)
    options = set(pyfuse3.default_options) | {"fsname=passthrough_fs", "ro"}
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(serve, fs, args.mountpoint, args.read_ahead)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
