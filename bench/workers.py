"""Worker processes of the benchmarks: ``python -m bench.workers <command> ...``.

Each worker imports what it needs, prints ``ready``, waits for a line on stdin (the
harness releases all workers of a run at once), does its work and prints one JSON line:
``{"start": wall time, "end": wall time, "bytes": n, ...}``.

Commands:

- ``download ENDPOINT REPO_ID CACHE_DIR [--local-dir DIR] [--include PATTERN]``: ``huggingface_hub.snapshot_download``.
- ``read DIR [--threads N]``: read every file under DIR (``read()`` in 16 MiB blocks, up
  to N files at once), as a model loader would.
- ``sock-send PORT NBYTES``: connect to 127.0.0.1:PORT and send NBYTES in 1 MiB ``sendall``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 16 << 20


def read_file(path: Path, block: int = BLOCK) -> int:
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return total
            total += n


def timed_read(path: Path) -> tuple[float, int]:
    """(seconds, bytes) of :func:`read_file`, open included."""
    t0 = time.perf_counter()
    n = read_file(path)
    return time.perf_counter() - t0, n


def direct_read(path: Path, block: int = BLOCK) -> tuple[float, int]:
    """(seconds, bytes) of reading a file with ``O_DIRECT``: the disk itself, no page cache.

    Raises ``OSError`` where the file system refuses ``O_DIRECT`` (tmpfs).
    """
    import mmap

    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total = 0
    try:
        while True:
            n = os.preadv(fd, [buf], total)
            total += n
            if n < block:  # end of file (the last block may be short; no read past it at an odd offset)
                break
    finally:
        os.close(fd)
        buf.close()
    return time.perf_counter() - t0, total


def gbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e9


def list_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirs, names in os.walk(root, followlinks=True):
        # huggingface_hub's bookkeeping in a --local-dir download is not model content.
        dirs[:] = [d for d in dirs if d != ".cache"]
        for name in names:
            files.append(Path(dirpath) / name)
    return sorted(files)


def read_tree(root: Path, threads: int) -> int:
    files = list_files(root)
    if not files:
        raise SystemExit(f"no files under {root}")
    # Largest first, so the big shards start at once and small files fill in.
    files.sort(key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(read_file, files))


cpu0 = 0.0


def _wait_go() -> None:
    global cpu0
    print("ready", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("released without go")
    t = os.times()
    cpu0 = t.user + t.system


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    extra: dict[str, object] = {}
    if cmd == "download":
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("endpoint")
        parser.add_argument("repo_id")
        parser.add_argument("cache_dir")
        parser.add_argument("--local-dir")
        parser.add_argument("--include")
        opts = parser.parse_args(args)
        from huggingface_hub import snapshot_download

        _wait_go()
        start = time.time()
        path = snapshot_download(opts.repo_id, endpoint=opts.endpoint, cache_dir=opts.cache_dir,
                                 local_dir=opts.local_dir, allow_patterns=opts.include)
        end = time.time()
        nbytes = sum(p.stat().st_size for p in list_files(Path(path)))
        extra["path"] = str(path)
    elif cmd == "read":
        root = Path(args[0])
        threads = int(args[2]) if len(args) > 2 and args[1] == "--threads" else 4
        _wait_go()
        start = time.time()
        nbytes = read_tree(root, threads)
        end = time.time()
    elif cmd == "sock-send":
        port, nbytes = int(args[0]), int(args[1])
        payload = memoryview(bytes(1 << 20))
        _wait_go()
        start = time.time()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            left = nbytes
            while left:
                n = min(left, len(payload))
                sock.sendall(payload[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        end = time.time()
    else:
        raise SystemExit(f"unknown worker command {cmd!r}")
    t = os.times()
    extra["cpu"] = t.user + t.system - cpu0  # this process's threads: CPU spent on the work
    print(json.dumps({"start": start, "end": end, "bytes": nbytes, **extra}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
