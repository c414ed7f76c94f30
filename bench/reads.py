"""Scenarios 3 (sequential read), 4 (mmap load), 5 (random 4 KiB reads) and the read-path profile.

All on one big single-shard safetensors file, the hub uncapped (these measure the node,
not the internet). States of a node:

- *cold node, warm backend*: a fresh node daemon and cache dir; the backend already holds
  the file in memory (it was read once through another node).
- *warm node, page cache dropped*: the daemon restarted on the same disk cache (its memory
  tier starts empty), then ``echo 3 > /proc/sys/vm/drop_caches``: this drops the disk
  cache's files from the page cache too, so the bytes come off the disk.
- *page cache warm*: the same file read again at once (the mount keeps the kernel cache).

Baselines in the same run: ``read()`` of the same local file (page cache dropped / warm),
the disk's own ``O_DIRECT`` read of that file (measured next to each warm-node read, the
order alternating: this VM's disk swings from run to run), one-connection loopback TCP
of the same byte count (a sender process, this process receiving), and ``safe_open`` of
the local file. The node daemon's CPU seconds per GB (and the backend's, where it serves)
are reported for each read through a mount.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .config import BIGFILE_NAME
from .context import Context
from .harness import BIN, CpuMeter, MountHandle, drop_caches, rmtree
from .ingest import cold_node_read
from .profile import Profiler
from .results import Scenario
from .workers import direct_read, gbps as _gbps, timed_read


def loopback(ctx: Context, nbytes: int) -> float:
    """GB/s of one loopback TCP connection: a sender process, this process receiving."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = [0]

    def receive() -> None:
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        with conn:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n
            conn.sendall(b"k")

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        _, res = ctx.harness.workers("loopback", [["sock-send", str(port), str(nbytes)]])
    finally:
        thread.join(30)
        srv.close()
    if got[0] != nbytes:
        raise RuntimeError(f"loopback: received {got[0]} of {nbytes} bytes")
    return _gbps(nbytes, res[0]["end"] - res[0]["start"])


def mmap_load(path: Path) -> tuple[float, int]:
    """Seconds to ``safe_open(framework="numpy")`` and materialize every tensor."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    total = 0
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            total += f.get_tensor(key).nbytes
    return time.perf_counter() - t0, total


def random_reads(path: Path, n: int, seed: int, size: int = 4096) -> list[float]:
    """Latencies (ms) of ``n`` preads of ``size`` bytes at random aligned offsets."""
    fsize = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, (fsize - size) // size) * size for _ in range(n)]
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, size, off)
            out.append((time.perf_counter() - t0) * 1e3)
            if len(data) != size:
                raise RuntimeError(f"short read at {off}")
    finally:
        os.close(fd)
    return out


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(ctx: Context) -> list[Scenario]:
    cfg = ctx.cfg
    h = ctx.harness
    local = ctx.models.bigfile_path()
    size = local.stat().st_size
    mb = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
    s3 = Scenario("sequential", f"3. Sequential read of one {mb} file (16 MiB read() calls)")
    s4 = Scenario("mmap", f"4. mmap load: safetensors safe_open(framework=\"numpy\") of every tensor ({mb})")
    s5 = Scenario("random", f"5. Random 4 KiB reads ({cfg.random_reads} per repeat, uniform over {mb})")
    prof = Scenario("profile", "Profile of the read path (py-spy)")
    out = [s3, s4, s5, prof]
    can_drop = drop_caches()
    ctx.hub.set_rate(None)
    # -- baselines
    for rep in range(cfg.repeats):
        ctx.log(f"s3 baselines repeat {rep + 1}/{cfg.repeats}")
        s3.figure("loopback", "loopback TCP, 1 connection, 1 MiB sends (same byte count)", "GB/s").add(
            loopback(ctx, size))
        drop_caches()
        s3.figure("native.cold", "native read() of the local file, page cache dropped", "GB/s").add(
            _gbps(size, timed_read(local)[0]))
        s3.figure("native.warm", "native read() of the local file, page cache warm", "GB/s").add(
            _gbps(size, timed_read(local)[0]))
        drop_caches()
        s4.figure("local.cold", "local file, page cache dropped", "s").add(mmap_load(local)[0])
        s4.figure("local.warm", "local file, page cache warm", "s").add(mmap_load(local)[0])
        drop_caches()
        lat = random_reads(local, cfg.random_reads, seed=rep)
        s5.data.setdefault("latencies", {}).setdefault("local file, page cache dropped", []).extend(lat)
        s5.figure("local.p50", "local file, page cache dropped: p50", "ms").add(_pct(lat, 0.5))
        s5.figure("local.p99", "local file, page cache dropped: p99", "ms").add(_pct(lat, 0.99))
    if not can_drop:
        for s in (s3, s4, s5):
            s.notes.append("drop_caches was not allowed here: 'page cache dropped' figures are warm.")
    tools = h.tools
    if not tools.mount_ok:
        reason = tools.missing(backend=False) or "mmfs mount not available"
        for s in (s3, s4, s5, prof):
            s.unavailable(reason)
        return out
    backend = ctx.backend("s3-backend") if tools.backend_ok else None
    if backend:
        src = "warm backend"
    else:
        src = "hub (embedded; backend not available)"
        for s in (s3, s4, s5):
            s.notes.append("`mmfs-backend` was not available: the node daemons ran embedded, the uncapped "
                           "test hub standing in for the backend.")
    fname = ctx.models.bigfile
    mounts: list[MountHandle] = []

    def path_of(m: MountHandle) -> Path:
        return m.model_dir(fname) / BIGFILE_NAME

    try:
        # Warm the backend through a first node: cold node, cold backend, uncapped hub.
        m = ctx.mount(backend, name="s3-node")
        secs, n = timed_read(path_of(m))
        if n != size:
            raise RuntimeError(f"read {n} of {size} bytes through the mount")
        s3.figure("mmfs.cold_all", "mmfs, node and backend cold, hub uncapped (first read)", "GB/s",
                  baseline="native.warm").add(_gbps(size, secs))
        h.unmount(m)
        rmtree(m.cache_dir.parent)
        gb = size / 1e9
        # (c) cold node from the warm backend (scenario 8 measures the same at issue 8's size, against curl).
        m = None
        for rep in range(cfg.repeats):
            ctx.log(f"s3 (c) cold node, repeat {rep + 1}/{cfg.repeats}")
            if m is not None:
                h.unmount(m)
                rmtree(m.cache_dir.parent)
                m = None
            read = cold_node_read(ctx, backend, f"huggingface/{fname}/main/{BIGFILE_NAME}", "s3-node")
            m = read.mount
            s3.figure("mmfs.cold", f"mmfs (c): node cache cold, {src} / native warm", "GB/s",
                      baseline="native.warm").add(_gbps(size, read.seconds))
            s3.figure("mmfs.cold_vs_loopback", f"mmfs (c): node cache cold, {src} / loopback TCP", "GB/s",
                      baseline="loopback").add(_gbps(size, read.seconds))
            s3.figure("mmfs.cold.node_cpu", "mmfs (c): node daemon CPU s per GB", "CPU s/GB").add(
                read.cpu_per_gb("node"))
            if backend is not None:
                s3.figure("mmfs.cold.backend_cpu", "mmfs (c): backend CPU s per GB served", "CPU s/GB").add(
                    read.cpu_per_gb("backend"))
        assert m is not None
        mounts.append(m)
        # (a) warm node, page cache dropped, next to the disk's own O_DIRECT read; (b) page cache warm.
        direct_failed = None
        for rep in range(cfg.repeats):
            ctx.log(f"s3 (a)/(b) warm node, repeat {rep + 1}/{cfg.repeats}")
            m = ctx.remount(mounts.pop(), name="s3-node")
            mounts.append(m)

            def direct() -> None:
                nonlocal direct_failed
                drop_caches()
                try:
                    secs, n = direct_read(local)
                except OSError as err:  # a file system without O_DIRECT
                    direct_failed = f"O_DIRECT read of {local} failed: {err}"
                    return
                if n != size:
                    raise RuntimeError(f"O_DIRECT read {n} of {size} bytes")
                s3.figure("native.direct", "the disk itself: O_DIRECT read of the local file (16 MiB reads)",
                          "GB/s").add(_gbps(size, secs))

            if rep % 2 == 0:  # alternate which of the two goes first
                direct()
            drop_caches()
            with CpuMeter({"node": m.pid}) as meter:
                secs, _ = timed_read(path_of(m))
                meter.settle()
            s3.figure("mmfs.warm_node", "mmfs (a): node cache warm, page cache dropped", "GB/s",
                      baseline="native.direct").add(_gbps(size, secs))
            s3.figure("mmfs.warm_node_vs_read", "mmfs (a): node cache warm, page cache dropped / native read()",
                      "GB/s", baseline="native.cold").add(_gbps(size, secs))
            s3.figure("mmfs.warm_node.node_cpu", "mmfs (a): node daemon CPU s per GB", "CPU s/GB").add(
                meter.cpu["node"] / gb)
            with CpuMeter({"node": m.pid}) as meter:
                secs, _ = timed_read(path_of(m))
                meter.settle()
            s3.figure("mmfs.page_cache", "mmfs (b): page cache warm", "GB/s",
                      baseline="native.warm").add(_gbps(size, secs))
            s3.figure("mmfs.page_cache.node_cpu", "mmfs (b): node daemon CPU s per GB", "CPU s/GB").add(
                meter.cpu["node"] / gb)
            if rep % 2 == 1:
                direct()
        if direct_failed:
            s3.notes.append(direct_failed + ": (a) has no O_DIRECT baseline in this run.")
        # Scenario 4: mmap load through the mount.
        for rep in range(cfg.repeats):
            ctx.log(f"s4 mmap load, repeat {rep + 1}/{cfg.repeats}")
            m = ctx.remount(mounts.pop(), name="s3-node")
            mounts.append(m)
            drop_caches()
            with CpuMeter({"node": m.pid}) as meter:
                secs, _ = mmap_load(path_of(m))
                meter.settle()
            s4.figure("mount.cold", "mmfs mount, node cache warm, page cache dropped", "s",
                      baseline="local.cold").add(secs)
            s4.figure("mount.cold.node_cpu", "mmfs mount, node cache warm, page cache dropped: node daemon CPU s "
                                             "per GB", "CPU s/GB").add(meter.cpu["node"] / gb)
            s4.figure("mount.warm", "mmfs mount, page cache warm", "s", baseline="local.warm").add(
                mmap_load(path_of(m))[0])
        # Cold node, mmap straight away (the loader's real first start on a node).
        for rep in range(cfg.repeats):
            os.sync()
            cold = ctx.mount(backend, name="s4-node")
            try:
                pids = {"node": cold.pid, **({"backend": backend.pid} if backend else {})}
                with CpuMeter(pids) as meter:
                    secs, _ = mmap_load(path_of(cold))
                    meter.settle()
                s4.figure("mount.cold_node", f"mmfs mount, node cache cold, {src}", "s",
                          baseline="local.cold").add(secs)
                s4.figure("mount.cold_node.node_cpu", f"mmfs mount, node cache cold, {src}: node daemon CPU s "
                                                      "per GB", "CPU s/GB").add(meter.cpu["node"] / gb)
                if backend is not None:
                    s4.figure("mount.cold_node.backend_cpu", "mmfs mount, node cache cold: backend CPU s per GB "
                                                             "served", "CPU s/GB").add(meter.cpu["backend"] / gb)
            finally:
                h.unmount(cold)
                rmtree(cold.cache_dir.parent)
        # Scenario 5: random reads.
        for rep in range(cfg.repeats):
            ctx.log(f"s5 random reads, repeat {rep + 1}/{cfg.repeats}")
            m = ctx.remount(mounts.pop(), name="s3-node")
            mounts.append(m)
            drop_caches()
            path = path_of(m)
            path.stat()
            lat = random_reads(path, cfg.random_reads, seed=100 + rep)
            s5.data.setdefault("latencies", {}).setdefault("mmfs, node cache warm, page cache dropped",
                                                           []).extend(lat)
            s5.figure("warm.p50", "mmfs, node cache warm, page cache dropped: p50", "ms",
                      baseline="local.p50").add(_pct(lat, 0.5))
            s5.figure("warm.p99", "mmfs, node cache warm, page cache dropped: p99", "ms",
                      baseline="local.p99").add(_pct(lat, 0.99))
            cold = ctx.mount(backend, name="s5-node")
            try:
                path = path_of(cold)
                path.stat()
                lat = random_reads(path, cfg.random_reads, seed=200 + rep)
            finally:
                h.unmount(cold)
                rmtree(cold.cache_dir.parent)
            s5.data["latencies"].setdefault(f"mmfs, node cache cold, {src}", []).extend(lat)
            s5.figure("cold.p50", f"mmfs, node cache cold, {src}: p50", "ms", baseline="local.p50").add(
                _pct(lat, 0.5))
            s5.figure("cold.p99", f"mmfs, node cache cold, {src}: p99", "ms", baseline="local.p99").add(
                _pct(lat, 0.99))
        s5.notes.append("Each read is one `os.pread` of 4 KiB at a uniformly random 4 KiB-aligned offset, "
                        "one at a time; the kernel's readahead may turn it into a larger FUSE read.")
        # Profile of the read path.
        if cfg.profile_seconds > 0 and (BIN / "py-spy").exists():
            _profile(ctx, backend, mounts, path_of)
        summarize_profiles(ctx, prof)
        if not ctx.profiles:
            prof.unavailable("skipped in quick mode (--profile 1 turns it on)" if cfg.quick
                             else "py-spy is not installed (pip install py-spy)")
    finally:
        for m in mounts:
            h.unmount(m)
            rmtree(m.cache_dir.parent)
        if backend is not None:
            h.stop(backend.child)
            rmtree(backend.data_dir)
    return out


def _profile(ctx: Context, backend: Any, mounts: list[MountHandle], path_of: Any) -> None:
    """py-spy on one node reading alone: cold node from the warm backend, then warm node cache."""
    h = ctx.harness
    pdir = ctx.out / "profiles"
    pdir.mkdir(parents=True, exist_ok=True)
    cold = ctx.mount(backend, name="prof-node")
    try:
        node_p = Profiler(cold.pid, pdir / "node_cold.txt")
        back_p = Profiler(backend.pid, pdir / "backend_serving.txt") if backend is not None else None
        secs, n = timed_read(path_of(cold))
        ctx.profiles.append(("node daemon, one node, cold node cache (reading from the warm backend)",
                             node_p.out, n / secs, node_p.stop()))
        if back_p:
            ctx.profiles.append(("backend, serving that one node from memory", back_p.out, n / secs,
                                 back_p.stop()))
    finally:
        h.unmount(cold)
        rmtree(cold.cache_dir.parent)
    m = ctx.remount(mounts.pop(), name="s3-node")
    mounts.append(m)
    drop_caches()
    node_p = Profiler(m.pid, pdir / "node_warm.txt")
    secs, n = timed_read(path_of(m))
    ctx.profiles.append(("node daemon, one node, warm node cache, page cache dropped (disk tier)",
                         node_p.out, n / secs, node_p.stop()))


_ENTRY_POINTS = ("main (mmfs/cli.py)", "_mount (mmfs/cli.py)", "run (mmfs/daemon.py)", "main (backend_server/cli.py)")


def summarize_profiles(ctx: Context, prof: Scenario) -> None:
    for title, path, rate, summary in ctx.profiles:
        if summary is None:
            prof.notes.append(f"{title}: py-spy wrote nothing")
            continue
        prof.tables.append({"title": f"{title}, {rate / 1e9:.2f} GB/s under py-spy ({path.name}), "
                                     f"{summary['samples']} busy samples ({summary['idle_pct']:.0f} % of all "
                                     "samples idle): top source lines by own time (% of busy samples)",
                            "columns": ["own %", "function (file:line)", "code"],
                            "rows": [[f"{p:.1f}", f"`{fn}`", f"`{code}`" if code else ""]
                                     for fn, code, p in summary["lines"][:10]]})
        incl = [(fn, p) for fn, p in summary["inclusive"] if fn not in _ENTRY_POINTS]
        prof.tables.append({"title": f"{title}: top mmfs functions by inclusive time (% of busy samples)",
                            "columns": ["incl %", "function"],
                            "rows": [[f"{p:.1f}", f"`{fn}`"] for fn, p in incl[:8]]})
        prof.data[path.name] = summary
    if ctx.profiles:
        prof.notes.append("Collapsed stacks (py-spy --format raw, 200 Hz, --nonblocking; samples whose leaf is "
                          "trio's epoll wait or an idle worker thread count as idle) are in the run's `profiles/` "
                          "folder. Own time is charged to the Python line that called into C (a write, a hash, a "
                          "socket call); the code column was read right after each recording.")
