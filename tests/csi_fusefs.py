"""TEST HELPER, not mmfs: a tiny read-only pyfuse3 filesystem with the mmfs layout.

Stands in for ``mmfs mount`` in the CSI tests, so they exercise a *real* FUSE mount
(a real dead connection when killed, a real remount when restarted)::

    python tests/csi_fusefs.py MOUNTPOINT [--main COMMIT] [--slow-repo ORG/NAME --slow-seconds S]

Serves, under MOUNTPOINT::

    huggingface/acme/tiny/<COMMIT_A>/config.json, weights/part-0.bin, README.md
    huggingface/acme/tiny/<COMMIT_B>/config.json, weights/part-0.bin, README.md
    huggingface/acme/tiny/main -> <COMMIT_A or --main>
    huggingface/acme/tiny/v1   -> <COMMIT_B>
    huggingface/acme/slow/<COMMIT_A>/...  and main -> <COMMIT_A>  (lookups sleep when --slow-repo)

``config.json`` contains ``{"commit": "<commit>"}`` so a test can tell which commit it read.
Prints ``ready`` on stdout once mounted; unmounts on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys

import pyfuse3
import trio

COMMIT_A = "a" * 8 + "1" * 32
COMMIT_B = "b" * 8 + "2" * 32


def _commit_tree(commit: str) -> dict:
    return {
        "config.json": f'{{"commit": "{commit}"}}\n'.encode(),
        "README.md": b"# tiny test model\n",
        "weights": {"part-0.bin": bytes(range(256)) * 64},
    }


class Node:
    def __init__(self, inode: int, kind: str, data=None) -> None:
        self.inode = inode
        self.kind = kind  # "dir", "file", "link"
        self.data = data  # bytes for files, str for links
        self.children: dict[bytes, Node] = {}


class TestFs(pyfuse3.Operations):
    def __init__(self, main_commit: str, slow_repo: str | None, slow_seconds: float) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {}
        self._next = pyfuse3.ROOT_INODE
        root = self._new("dir")
        hf = self._add(root, "huggingface", "dir")
        acme = self._add(hf, "acme", "dir")
        self.slow_dirs: set[int] = set()
        for name, commits, links in (
            ("tiny", (COMMIT_A, COMMIT_B), {"main": main_commit, "v1": COMMIT_B}),
            ("slow", (COMMIT_A,), {"main": COMMIT_A}),
        ):
            repo = self._add(acme, name, "dir")
            if slow_repo == f"acme/{name}":
                self.slow_dirs.add(repo.inode)
            for commit in commits:
                self._fill(self._add(repo, commit, "dir"), _commit_tree(commit))
            for link, target in links.items():
                self._add(repo, link, "link", target)
        self.slow_seconds = slow_seconds

    def _new(self, kind: str, data=None) -> Node:
        node = Node(self._next, kind, data)
        self.nodes[node.inode] = node
        self._next += 1
        return node

    def _add(self, parent: Node, name: str, kind: str, data=None) -> Node:
        node = self._new(kind, data)
        parent.children[name.encode()] = node
        return node

    def _fill(self, parent: Node, tree: dict) -> None:
        for name, value in tree.items():
            if isinstance(value, dict):
                self._fill(self._add(parent, name, "dir"), value)
            else:
                self._add(parent, name, "file", value)

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        if node.kind == "dir":
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o555, 0, 2
        elif node.kind == "link":
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFLNK | 0o777, len(node.data), 1
        else:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o444, len(node.data), 1
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_700_000_000 * 10**9
        # Long kernel caching, as mmfs does for immutable commit trees: after a kill, stat
        # of a cached inode still succeeds, so the plugin must not rely on stat alone.
        # (A restart is a new mount with an empty cache, so moving "main" still shows.)
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(self.nodes[inode])

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode in self.slow_dirs:
            print("slow lookup", flush=True)  # tests wait for this instead of guessing with a sleep
            await trio.sleep(self.slow_seconds)
        child = self.nodes[parent_inode].children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    async def readlink(self, inode, ctx):
        return self.nodes[inode].data.encode()

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self.nodes[fh].children.items())
        for i, (name, node) in enumerate(entries[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(node), i + 1):
                break

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return self.nodes[fh].data[off : off + size]

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks, s.f_bfree, s.f_bavail = 1000, 0, 0
        s.f_files, s.f_ffree, s.f_favail = len(self.nodes), 0, 0
        s.f_namemax = 255
        return s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mountpoint")
    p.add_argument("--main", default=COMMIT_A)
    p.add_argument("--slow-repo")
    p.add_argument("--slow-seconds", type=float, default=2.0)
    args = p.parse_args()
    fs = TestFs(args.main, args.slow_repo, args.slow_seconds)
    options = set(pyfuse3.default_options)
    options.update({"fsname=csi_fusefs", "ro"})
    options.discard("default_permissions")
    pyfuse3.init(fs, args.mountpoint, options)
    print("ready", flush=True)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    sys.exit(main())
