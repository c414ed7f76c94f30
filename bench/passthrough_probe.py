"""``python -m bench.passthrough_probe [--size 512MiB] [--repeats 3] [--dir DIR]``

Sequential reads of one local file, in one run: natively, through a FUSE mount in
passthrough, and through the same mount without passthrough (every READ served by a
pyfuse3 daemon with ``os.pread``; and once more from the FUSE page cache with
keep_cache), with the backing file's pages warm and evicted (``posix_fadvise``
DONTNEED on that file only, so other work on the machine keeps its cache), plus the
disk's own O_DIRECT read. The cases alternate, each repeated; the median and best GB/s
are printed with the CPU seconds per GB of the reader (this process: the kernel's work on
its behalf, which contention for the CPUs does not inflate) and of the daemon. The file system is :mod:`mmfs.testing.passthrough_fs`
with the mount's readahead at 16 MiB (as ``mmfs mount`` sets it). Reports, never asserts.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmfs.sizes import parse_size
from mmfs.testing.process import child_env, start_until_ready, stop

BLOCK = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, direct: bool = False) -> tuple[int, float, float]:
    """Bytes read, seconds spent reading and this process's CPU seconds, the open not counted: an open without
    keep_cache drops the FUSE inode's own cached pages, which a passthrough open of a file
    that was read in cached mode before pays once."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BLOCK)  # page aligned, for O_DIRECT
    total = 0
    fd = os.open(path, flags)
    try:
        t0, cpu0 = time.perf_counter(), os.times()
        while n := os.readv(fd, [buf]):
            total += n
        cpu1 = os.times()
        return total, time.perf_counter() - t0, cpu1.user + cpu1.system - cpu0.user - cpu0.system
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where the backing file goes (not overlayfs); default: a temporary dir")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mmfs-pt-probe-", dir=args.dir))
    backing, mnt, mode_file = work / "backing.bin", work / "mnt", work / "mode"
    mnt.mkdir()
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True).stdout.strip()
    with open(backing, "wb") as f:
        chunk = os.urandom(BLOCK)
        for _ in range(size // BLOCK):
            f.write(chunk)
        os.fsync(f.fileno())
    argv_fs = [sys.executable, "-m", "mmfs.testing.passthrough_fs", str(mnt), str(backing),
               "--mode-file", str(mode_file), "--read-ahead", str(16 << 20)]
    proc, line = start_until_ready(argv_fs, child_env(), log_path=work / "fs.log", timeout=30)
    data = mnt / "data"
    results: dict[str, list[tuple[float, float]]] = {}

    def case(name: str, path: Path, *, mode: str | None = None, cold: bool = False, direct: bool = False,
             warm_fuse_cache: bool = False) -> None:
        if mode:
            mode_file.write_text(mode)
        if warm_fuse_cache:
            read_file(path)
        if cold:
            evict(backing)
        cpu0 = cpu_seconds(proc.pid)
        n, elapsed, reader = read_file(path, direct=direct)
        cpu = cpu_seconds(proc.pid) - cpu0
        assert n == size, (name, n)
        results.setdefault(name, []).append((n / elapsed / 1e9, cpu / (n / 1e9), reader / (n / 1e9)))

    try:
        if not line.startswith("passthrough_fs: mounted"):
            raise SystemExit(f"passthrough_fs did not start: {line!r}")
        for _ in range(args.repeats):
            read_file(backing)  # the backing file's pages warm
            case("native, page cache", backing)
            case("passthrough, page cache", data, mode="passthrough")
            case("plain pyfuse3, daemon reads (backing file in page cache)", data, mode="plain")
            case("plain pyfuse3 keep_cache, 2nd read (FUSE page cache)", data, mode="cached", warm_fuse_cache=True)
            case("disk O_DIRECT", backing, direct=True)
            case("native, evicted", backing, cold=True)
            case("passthrough, evicted", data, mode="passthrough", cold=True)
            case("plain pyfuse3, evicted", data, mode="plain", cold=True)
        stats = json.loads((mnt / ".stats").read_bytes())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        stop(proc, 15, 10)
        backing.unlink(missing_ok=True)
    summary = {name: {"gb_s": statistics.median(v[0] for v in runs), "best_gb_s": max(v[0] for v in runs),
                      "all_gb_s": [round(v[0], 3) for v in runs],
                      "daemon_cpu_s_per_gb": statistics.median(v[1] for v in runs),
                      "reader_cpu_s_per_gb": statistics.median(v[2] for v in runs)}
               for name, runs in results.items()}
    print(f"{size >> 20} MiB, {args.repeats} repeats, backing dir on {fstype}, kernel {os.uname().release}; "
          f"daemon READs seen in all: {stats['reads']}")
    print(f"{'case':58} {'GB/s':>6} {'best':>6}  {'CPU-s/GB: reader':>16} {'daemon':>6}  runs (GB/s)")
    for name, row in summary.items():
        print(f"{name:58} {row['gb_s']:6.2f} {row['best_gb_s']:6.2f}  {row['reader_cpu_s_per_gb']:16.3f} "
              f"{row['daemon_cpu_s_per_gb']:6.3f}  {row['all_gb_s']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "fstype": fstype, "cases": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
