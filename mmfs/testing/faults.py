"""The fault suite: faults injected into a running node and backend while readers check
every byte they get against the source.

    python -m mmfs.testing.faults --duration 600      # the long run (the README's figures)
    python -m mmfs.testing.faults --duration 30       # what tests/test_faults.py runs in CI

The set-up is the real one on loopback: the test hub, ``mmfs-backend serve`` and ``mmfs
mount`` as child processes, with a fault-injecting TCP proxy between the node and the
backend and another between the backend and the hub; the node's cache and the backend's
data dir each on a small tmpfs of their own. The files are warmed (read and verified once)
before the faults start: from then on every holder has each file's chunk map, so any byte a
reader gets must be the source's (bytes read before a file's first verification are
*provisional* by design and are covered by tests/test_integrity.py instead).

Faults, one at a time, at random: ``kill -9`` of the node or the backend (restarted on the
same cache); connection resets and stalls on either proxy; the hub flipping bytes; a full
cache disk (a ballast file fills the tmpfs) for either cache; bytes flipped in the cache
files of either (bit rot). The node runs with ``--passthrough off``: passthrough reads are
served by the kernel and not re-verified (``mmfs verify`` scrubs them), so bit rot under
them is out of this suite's promise. Slow disks are not simulated.

Readers (threads reading random ranges through the mount, and ranged GETs through the
backend like a Hub client) count bytes checked and wrong bytes; a read that takes longer
than its bound is a hung reader. After each fault is cleared the suite waits for a probe
read of every file to succeed: a recovery. It prints the figures and returns them.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from ..sizes import format_size
from .hub import TestHub
from .mount import MountProcess, force_unmount
from .net import TcpProxy

REPO = "org/faults"
#: Files of the repo: LFS ones come through the hub's CDN, the others through the proxy.
FILES = {"model-a.safetensors": 12 << 20, "model-b.bin": 5 << 20, "tokenizer.json": 3 << 20 | 4321,
         "config.json": 777}
LFS_THRESHOLD = 8 << 20
REMOTE_TIMEOUT = 5.0
#: A read that takes longer than this is a hung reader: the mount's bound (a tail read may
#: wait twice, for its chunks and for the map) plus the retries' slack; the backend runs
#: with ``--send-timeout REMOTE_TIMEOUT``, so a stream waits at most twice that for memory.
READ_BOUND = 3 * REMOTE_TIMEOUT + 10.0
#: How long the suite waits for every file to read right again after a fault cleared.
RECOVERY_BOUND = 60.0


# -- the figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    duration_s: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    bytes_checked: int = 0
    reads: int = 0
    read_errors: Counter[str] = field(default_factory=Counter)
    wrong_bytes: int = 0
    wrong_reads: list[str] = field(default_factory=list)
    hung_readers: int = 0
    #: What each hung read was reading (``mount ...`` or ``http ...``) and the last fault before it.
    hung_reads: list[str] = field(default_factory=list)
    recoveries: int = 0
    not_recovered: list[str] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self) -> str:
        slowest = max(self.recovery_seconds, default=0.0)
        return "\n".join([
            f"fault suite: {self.duration_s:.0f} s",
            f"  faults injected: {sum(self.faults.values())} ("
            + ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) + ")",
            f"  bytes read and checked: {format_size(self.bytes_checked)} in {self.reads} reads "
            f"({sum(self.read_errors.values())} reads failed cleanly: "
            + (", ".join(f"{e} {n}" for e, n in sorted(self.read_errors.items())) or "none") + ")",
            f"  wrong bytes served: {self.wrong_bytes}",
            f"  readers hung past {READ_BOUND:.0f} s: {self.hung_readers}"
            + (f" ({'; '.join(self.hung_reads)})" if self.hung_reads else ""),
            f"  recoveries after the fault cleared: {self.recoveries} of {sum(self.faults.values())} "
            f"(slowest {slowest:.1f} s)" + (f"; not recovered: {', '.join(self.not_recovered)}"
                                            if self.not_recovered else ""),
        ])


# -- the cluster under test --------------------------------------------------------------------


class Cluster:
    """Hub, proxies, backend and node, each cache on a small tmpfs of its own."""

    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self._undo: list[Callable[[], object]] = []  # what close() takes down, last first
        try:
            self._start(seed)
        except BaseException:
            self.close()
            raise

    def _start(self, seed: int) -> None:
        work = self.work
        self.hub_root = work / "hub"
        repo_dir = self.hub_root / REPO
        repo_dir.mkdir(parents=True)
        self.source: dict[str, bytes] = {}
        for name, size in FILES.items():
            data = random.Random(f"{seed}:{name}").randbytes(size)
            (repo_dir / name).write_bytes(data)
            self.source[name] = data
        self.node_disk = self._tmpfs("node-disk", 48 << 20)
        self.backend_disk = self._tmpfs("backend-disk", 64 << 20)
        self.hub = TestHub(self.hub_root, lfs_threshold=LFS_THRESHOLD).start()
        self._undo.append(self.hub.stop)
        hub_port = int(self.hub.url.rsplit(":", 1)[1])
        self.upstream = TcpProxy(("127.0.0.1", hub_port))
        self._undo.append(self.upstream.close)
        self.backend_url = ""
        self.start_backend()
        self._undo.append(lambda: self.backend.stop())
        self.nodes = TcpProxy(_address(self.backend_url))
        self._undo.append(self.nodes.close)
        self.mount = MountProcess(work / "mnt", self.node_disk / "cache", backend=self.nodes.url,
                                  args=["--cache-size", "16MiB", "--memory-cache", "4MiB", "--remote-timeout",
                                        str(REMOTE_TIMEOUT), "--passthrough", "off"],
                                  log_path=work / "mount.log")
        self._undo.append(self.mount.stop)
        self.mount.start(60)

    def _tmpfs(self, name: str, size: int) -> Path:
        path = self.work / name
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self._undo.append(lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True))
        return path

    def start_backend(self) -> None:
        from backend_server.testing import BackendProcess

        self.backend = BackendProcess(self.backend_disk / "data", hub_url=self.upstream.url, chunk_size="256KiB",
                                      log_path=self.work / "backend.log",
                                      extra_args=["--memory-cache", "4MiB", "--disk-cache", "12MiB",
                                                  "--send-timeout", str(REMOTE_TIMEOUT),
                                                  "--upstream-timeout", str(REMOTE_TIMEOUT)])
        self.backend.start(60)
        self.backend_url = self.backend.url
        if hasattr(self, "nodes"):
            self.nodes.target = _address(self.backend_url)

    def path(self, name: str) -> Path:
        return self.mount.mountpoint / "huggingface" / REPO / "main" / name

    def close(self) -> None:
        while self._undo:
            try:
                self._undo.pop()()
            except Exception:  # noqa: BLE001 - tear down as much as possible
                pass
        force_unmount(self.work / "mnt")


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


# -- readers ---------------------------------------------------------------------------------


class Readers:
    """Threads reading random ranges and checking them; a watchdog counts hung reads."""

    def __init__(self, cluster: Cluster, figures: Figures, mount_readers: int = 3, http_readers: int = 1) -> None:
        self.cluster = cluster
        self.figures = figures
        self.stop = threading.Event()
        self._started: dict[int, tuple[float, str]] = {}  # thread id -> (when its read began, what it reads)
        self.last_fault = "none yet"
        self._hung: set[tuple[int, float]] = set()
        self.threads = [threading.Thread(target=self._loop, args=(self._mount_read, i), daemon=True)
                        for i in range(mount_readers)]
        self.threads += [threading.Thread(target=self._loop, args=(self._http_read, 100 + i), daemon=True)
                         for i in range(http_readers)]
        self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        self._check_hung()

    def _loop(self, read: Callable[[random.Random], None], seed: int) -> None:
        rng = random.Random(seed)
        me = threading.get_ident()
        while not self.stop.is_set():
            try:
                read(rng)
            finally:
                self._started.pop(me, None)

    def _pick(self, rng: random.Random, how: str) -> tuple[str, int, int]:
        name = rng.choice(list(FILES))
        size = FILES[name]
        offset = rng.randrange(size)
        length = min(size - offset, rng.choice([4096, 65536, 1 << 20, 3 << 20]))
        self._started[threading.get_ident()] = (time.monotonic(), f"{how} {name}@{offset}+{length} after "
                                                                  f"{self.last_fault}")
        return name, offset, length

    def _check(self, what: str, expected: bytes, got: bytes) -> None:
        wrong = sum(a != b for a, b in zip(expected, got)) + max(0, len(got) - len(expected))
        with self.figures.lock:
            self.figures.reads += 1
            self.figures.bytes_checked += len(got)
            if wrong:
                self.figures.wrong_bytes += wrong
                self.figures.wrong_reads.append(f"{what}: {wrong} wrong bytes")

    def _failed(self, why: str) -> None:
        with self.figures.lock:
            self.figures.read_errors[why] += 1
        time.sleep(0.2)

    def _mount_read(self, rng: random.Random) -> None:
        name, offset, length = self._pick(rng, "mount")
        try:
            with open(self.cluster.path(name), "rb") as f:
                f.seek(offset)
                got = f.read(length)
        except OSError as exc:
            self._failed(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return
        self._check(f"mount {name}@{offset}", self.cluster.source[name][offset:offset + length], got)

    def _http_read(self, rng: random.Random) -> None:
        name, offset, length = self._pick(rng, "http")
        url = f"{self.cluster.nodes.url}/v1/file/huggingface/{REPO}/main/{name}"
        got = bytearray()
        try:
            with httpx.Client(timeout=READ_BOUND) as client:
                with client.stream("GET", url, headers={"Range": f"bytes={offset}-{offset + length - 1}"}) as r:
                    if r.status_code != 206:
                        self._failed(f"http {r.status_code}")
                        return
                    for block in r.iter_raw():
                        got += block
        except httpx.HTTPError as exc:
            self._failed(f"http {type(exc).__name__}")
            # what arrived before the cut must still be right
        self._check(f"http {name}@{offset}", self.cluster.source[name][offset:offset + length], bytes(got))

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self._check_hung()

    def _check_hung(self) -> None:
        now = time.monotonic()
        for thread, (began, what) in list(self._started.items()):
            if now - began > READ_BOUND and (thread, began) not in self._hung:
                self._hung.add((thread, began))
                with self.figures.lock:
                    self.figures.hung_readers += 1
                    self.figures.hung_reads.append(what)


# -- faults ----------------------------------------------------------------------------------


def _fill(disk: Path) -> Path:
    """Fill the tmpfs at ``disk`` with a ballast file; return it (removed when the fault clears)."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    return ballast


def _rot(root: Path, rng: random.Random, flips: int = 8) -> int:
    """Flip bytes inside the chunk files under ``root`` (bit rot); return how many."""
    files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0 and "data" in p.parts]
    done = 0
    for _ in range(flips if files else 0):
        path = rng.choice(files)
        try:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                offset = rng.randrange(size)
                byte = os.pread(f.fileno(), 1, offset)
                if byte:
                    os.pwrite(f.fileno(), bytes([byte[0] ^ 0x5A]), offset)
                    done += 1
        except OSError:
            continue
    return done


def inject(cluster: Cluster, kind: str, rng: random.Random) -> None:
    """One fault of ``kind``, held for a moment, then cleared."""
    hold = rng.uniform(1.0, 2 * REMOTE_TIMEOUT)
    if kind == "kill -9 node":
        cluster.mount.kill()
        time.sleep(rng.uniform(0.2, 2.0))
        cluster.mount.start(60)
    elif kind == "kill -9 backend":
        cluster.backend.kill()
        time.sleep(rng.uniform(0.2, 2.0))
        cluster.start_backend()
    elif kind == "reset node-backend":
        cluster.nodes.reset()
    elif kind == "reset backend-upstream":
        cluster.upstream.reset()
    elif kind == "stall node-backend":
        cluster.nodes.stall(hold)
    elif kind == "stall backend-upstream":
        cluster.upstream.stall(hold)
    elif kind == "upstream flips bytes":
        cluster.hub.set_faults(corrupt=["*"])
        time.sleep(hold)
        cluster.hub.clear_faults()
    elif kind in ("node disk full", "backend disk full"):
        ballast = _fill(cluster.node_disk if kind.startswith("node") else cluster.backend_disk)
        time.sleep(hold)
        ballast.unlink()
    elif kind == "node cache rot":
        _rot(cluster.node_disk / "cache" / "chunks", rng)
    elif kind == "backend cache rot":
        _rot(cluster.backend_disk / "data" / "chunks", rng)
    else:
        raise ValueError(kind)


KINDS = ("kill -9 node", "kill -9 backend", "reset node-backend", "reset backend-upstream", "stall node-backend",
         "stall backend-upstream", "upstream flips bytes", "node disk full", "backend disk full", "node cache rot",
         "backend cache rot")


def recovered(cluster: Cluster) -> float | None:
    """Seconds until every file reads right through the mount again; ``None`` past the bound."""
    started = time.monotonic()
    pending = dict(cluster.source)
    while pending and time.monotonic() - started < RECOVERY_BOUND:
        for name in list(pending):
            try:
                if cluster.path(name).read_bytes() == pending[name]:
                    del pending[name]
            except OSError:
                time.sleep(0.2)
    return None if pending else time.monotonic() - started


def run(duration: float, work: Path, seed: int = 1, log: Callable[[str], None] = print) -> Figures:
    figures = Figures()
    rng = random.Random(seed)
    cluster = Cluster(work, seed)
    readers: Readers | None = None
    started = time.monotonic()
    try:
        warm = recovered(cluster)  # every file read and verified once, by node and backend
        if warm is None:
            raise RuntimeError("the files never read right before any fault")
        readers = Readers(cluster, figures)
        readers.start()
        kinds = list(KINDS)
        rng.shuffle(kinds)  # every kind once first, then at random
        while time.monotonic() - started < duration:
            kind = kinds.pop() if kinds else rng.choice(KINDS)
            log(f"  fault: {kind}")
            readers.last_fault = kind
            inject(cluster, kind, rng)
            with figures.lock:
                figures.faults[kind] += 1
            seconds = recovered(cluster)
            with figures.lock:
                if seconds is None:
                    figures.not_recovered.append(kind)
                else:
                    figures.recoveries += 1
                    figures.recovery_seconds.append(seconds)
            time.sleep(rng.uniform(0.5, 2.0))  # readers run between faults too
    finally:
        if readers is not None:
            readers.close()
        figures.duration_s = time.monotonic() - started
        cluster.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfs.testing.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="mmfs-faults-"))
    figures = run(args.duration, work, args.seed)
    print(figures.report())
    for line in figures.wrong_reads[:20]:
        print(f"  WRONG: {line}")
    if figures.wrong_bytes == 0 and figures.hung_readers == 0 and not figures.not_recovered:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    print(f"  logs kept in {work}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
