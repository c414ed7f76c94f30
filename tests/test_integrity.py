"""Data path v2 (issue 8), "Must show": integrity and bounds end to end, with real processes.

Black-box on purpose (the internals are being rewritten): the test hub with its faults
switched at run time (:mod:`mmfs.testing.hub`), ``mmfs-backend serve`` and ``mmfs mount``
as child processes, and what a user sees: bytes read through the kernel, HTTP from the
backend, ``huggingface_hub.hf_hub_download`` against the backend. The rule every test
checks: a read that completes has the right sha256, anything else is an error, never a
completed wrong file; once the upstream is good again, reads are right.

Files are small (1-12 MiB) and chunks 256 KiB (the backend's ``--chunk-size``, or the
mount's in embedded mode). Mounts run with a 128 KiB kernel readahead, so that reading the
head of a file does not pull its tail in by itself. The sections follow the issue's list:
its seven scenarios (1-7), then two nodes and a Hub client (8), ``kill -9`` (9), and the
upgrade from the old cache layout (10).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import blake3
import httpx
import lmdb
import pytest

from backend_server.testing import BackendProcess
from mmfs.testing.hub import TestHub
from mmfs.testing.mount import MountProcess, force_unmount
from mmfs.testing.net import free_port

pytestmark = pytest.mark.timeout(150)  # hang guard; each test takes seconds

CHUNK = 256 << 10
CHUNK_ARG = "256KiB"
FILE = "model.bin"
#: Every mount: a small kernel readahead (see the module docstring), and a bound on each
#: call well above anything these tests wait for (the tail-first test sets its own).
MOUNT_ARGS = ["--read-ahead", "128KiB", "--remote-timeout", "20"]


# -- repos, processes -------------------------------------------------------------------


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    """Overrides conftest's: these tests need no copy of the real model."""
    root = tmp_path / "hub"
    root.mkdir()
    return root


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_repo(hub_root: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Write (or add) files of the repo ``repo_id``; a change moves its ``main`` to a new commit."""
    for path, data in files.items():
        target = hub_root / repo_id / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class Cluster:
    """The processes of one test, stopped at teardown (mounts first)."""

    def __init__(self, tmp_path: Path, hub: TestHub) -> None:
        self.tmp_path = tmp_path
        self.hub = hub
        self.mounts: list[MountProcess] = []
        self.backends: list[BackendProcess] = []

    def backend(self, name: str = "backend", *, chunk_size: str = CHUNK_ARG, listen: str = "127.0.0.1:0",
                args: list[str] | None = None) -> BackendProcess:
        """``mmfs-backend serve`` on ``tmp_path/name`` (the same name: the same data dir)."""
        backend = BackendProcess(self.tmp_path / name, hub_url=self.hub.url, chunk_size=chunk_size, listen=listen,
                                 extra_args=args)
        self.backends.append(backend)
        return backend.start()

    def mount(self, name: str, *, backend: str | None = None, args: list[str] | None = None,
              cache: Path | None = None) -> MountProcess:
        """``mmfs mount`` at ``tmp_path/name-mnt`` with cache ``tmp_path/name-cache``: in backend
        mode with ``backend``, else embedded (the hub directly, chunks of :data:`CHUNK`)."""
        extra = MOUNT_ARGS + ([] if backend else ["--chunk-size", CHUNK_ARG]) + (args or [])
        mount = MountProcess(self.tmp_path / f"{name}-mnt", cache or self.tmp_path / f"{name}-cache",
                             hub_url=self.hub.url, backend=backend, args=extra)
        self.mounts.append(mount)
        mount.start()
        # The daemon sets the readahead just after the kernel's INIT: give it a moment, so
        # that the first reads do not use the kernel's own (an optimisation: no failure).
        deadline = time.monotonic() + 5
        while kernel_read_ahead_kb(mount.mountpoint) not in (None, 128) and time.monotonic() < deadline:
            time.sleep(0.02)
        return mount

    def close(self) -> None:
        for mount in self.mounts:
            mount.stop()
            if os.path.ismount(mount.mountpoint):
                force_unmount(mount.mountpoint)
        for backend in self.backends:
            backend.kill()


@pytest.fixture
def cluster(tmp_path: Path, hub: TestHub) -> Iterator[Cluster]:
    running = Cluster(tmp_path, hub)
    try:
        yield running
    finally:
        running.close()


def kernel_read_ahead_kb(mountpoint: Path) -> int | None:
    """The kernel readahead of the mount at ``mountpoint`` (its bdi's), ``None`` when unknown."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        devices = [line.split()[2] for line in f if line.split()[4] == target]
    try:
        return int((Path("/sys/class/bdi") / devices[-1] / "read_ahead_kb").read_text())
    except (IndexError, OSError, ValueError):
        return None


def file_url(backend: BackendProcess, repo_id: str, path: str = FILE, revision: str = "main") -> str:
    return f"{backend.url}/v1/file/huggingface/{repo_id}/{revision}/{path}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Hang guard for a precondition the test itself brings about."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what}")
        time.sleep(0.02)


# -- reads and what came of them ----------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one reader got: the sha256 of a read that completed, or why it did not."""

    who: str
    sha256: str | None = None
    error: str = ""

    @property
    def completed(self) -> bool:
        return self.sha256 is not None

    def never_wrong(self, expected: str) -> "Outcome":
        """The rule: completed means right; an error is allowed."""
        assert self.sha256 in (None, expected), f"{self.who} completed a WRONG file (sha256 {self.sha256})"
        return self

    def right(self, expected: str) -> "Outcome":
        assert self.completed, f"{self.who} failed: {self.error}"
        assert self.sha256 == expected, f"{self.who} completed a WRONG file (sha256 {self.sha256})"
        return self


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def read_mounted(path: Path, who: str = "") -> Outcome:
    """The whole file through the kernel, as a worker reads it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        return Outcome(who or str(path), error=_errno_name(exc))
    return Outcome(who or str(path), digest.hexdigest())


def read_head(path: Path, size: int = 64 << 10) -> bytes | str:
    """The first ``size`` bytes through the kernel (a lazy reader's start), or the errno name."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as exc:
        return _errno_name(exc)


def read_http(url: str, who: str, headers: dict[str, str] | None = None) -> Outcome:
    """A streamed GET; a body cut short (the backend aborts it) or a non-2xx status is an error."""
    digest = hashlib.sha256()
    try:
        with httpx.Client(timeout=60) as client, client.stream("GET", url, headers=headers) as response:
            if response.status_code not in (200, 206):
                return Outcome(who, error=f"HTTP {response.status_code} {response.headers.get('X-Error-Code', '')}")
            for block in response.iter_raw():
                digest.update(block)
    except httpx.HTTPError as exc:
        return Outcome(who, error=f"{type(exc).__name__}: {exc}")
    return Outcome(who, digest.hexdigest())


def read_range(url: str, who: str, first_chunk: int, end_chunk: int) -> Outcome:
    """Chunks ``[first_chunk, end_chunk)`` of a file over HTTP (``Range``)."""
    return read_http(url, who, {"Range": f"bytes={first_chunk * CHUNK}-{end_chunk * CHUNK - 1}"})


def download(endpoint: str, repo_id: str, cache_dir: Path, who: str, path: str = FILE,
             timeout: float = 60.0) -> Outcome:
    """``huggingface_hub.hf_hub_download`` (its own retries and resumes) into a fresh cache
    dir, against ``endpoint``. A client still busy after ``timeout`` fails the test: a
    retry loop that never ends is neither an error nor a file."""
    from huggingface_hub import hf_hub_download

    result: list[Outcome] = []

    def run() -> None:
        try:
            got = hf_hub_download(repo_id, path, endpoint=endpoint, cache_dir=cache_dir, token=False)
        except Exception as exc:  # noqa: BLE001 - any failure the client reports is an error outcome
            result.append(Outcome(who, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            return
        result.append(Outcome(who, sha(Path(got).read_bytes())))

    thread = threading.Thread(target=run, daemon=True, name=f"hf_hub_download {who}")
    thread.start()
    thread.join(timeout)
    assert result, f"{who}: hf_hub_download still running after {timeout:g} s (retrying for ever?)"
    return result[0]


def run_together(readers: list[Callable[[], Outcome]]) -> list[Outcome]:
    with ThreadPoolExecutor(len(readers)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(r) for r in readers]]


# -- caches on disk ---------------------------------------------------------------------


def _data_bytes(path: Path) -> int:
    """Bytes of ``path`` that hold data (holes of a sparse file excluded)."""
    total = 0
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            position = end
    return total


def chunk_data_on_disk(root: Path) -> int:
    """Data held under ``root`` outside the LMDB environments (the index, the metadata DB)."""
    return sum(_data_bytes(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
               and not p.name.endswith(".mdb"))


def assert_accounts_for_disk(used: Callable[[], int], root: Path, who: str) -> None:
    """The bytes a disk tier says it holds are the bytes of chunk data under ``root`` (within
    64 KiB for small files such as ``access.json``): no orphans, nothing counted twice."""
    slack = 64 << 10
    try:
        wait_until(lambda: abs(chunk_data_on_disk(root) - used()) <= slack, "accounting settles", timeout=20)
    except AssertionError:
        raise AssertionError(f"{who}: the disk tier counts {used()} bytes, {root} holds "
                             f"{chunk_data_on_disk(root)} bytes of chunk data") from None


def node_disk_used(mount: MountProcess) -> int:
    return next(t["used_bytes"] for t in mount.status()["tiers"] if t["name"] == "disk")


def backend_disk_used(backend: BackendProcess) -> int:
    return json.loads(backend.get("/healthz"))["tiers"]["disk"]["used_bytes"]


DAMAGES = ("junk", "garbage")


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check()`` holds within ``timeout`` seconds (a hang guard: page-cache
    invalidation runs in the background, right after the read that failed)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def damage(root: Path, how: str) -> None:
    """Damage a cache or data directory the way disks and people do.

    ``junk``: a stray file and a stray folder in every folder, and records no mmfs wrote in
    every table of every LMDB environment. ``garbage``: every LMDB data file overwritten
    with random bytes, and every other file's bytes flipped here and there (same size).
    """
    rng = random.Random(how)
    if how == "junk":
        for env_dir in sorted({p.parent for p in root.rglob("data.mdb")}):
            env = lmdb.open(str(env_dir), max_dbs=64, lock=False)
            try:
                with env.begin() as txn:
                    names = [key for key, _ in txn.cursor()]
                for name in [None, *names]:
                    try:
                        db = env.open_db(name, create=False) if name is not None else None
                    except lmdb.Error:
                        continue  # a plain key of the main table, not a table
                    for key, value in ((b"\x00junk", b"\xff" * 7), (b"junk:not:a:key", b""),
                                       (b"zz-junk", rng.randbytes(40))):
                        try:
                            with env.begin(write=True, db=db) as txn:
                                txn.put(key, value)
                        except lmdb.Error:
                            pass  # a table with fixed-size keys or values: those that fit went in
            finally:
                env.close()
        for folder in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
            if folder.name != "stray.d":
                (folder / "stray.tmp").write_bytes(rng.randbytes(100))
                (folder / "stray.d").mkdir(exist_ok=True)
                (folder / "stray.d" / "x").write_bytes(b"x")
    elif how == "garbage":
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            size = path.stat().st_size
            if path.name == "data.mdb":
                path.write_bytes(rng.randbytes(size))
            elif path.name != "lock.mdb" and size:
                path.write_bytes(corrupted(path.read_bytes()))
    else:
        raise ValueError(how)


_OLD_BLOCK = 64 << 10


def write_old_layout_cache(cache_dir: Path, chunks: dict[tuple[str, int, int], bytes],
                           manifests: list[bytes], refs: dict[str, str]) -> None:
    """A node cache dir as mmfs wrote it before data path v2 (commit 1b1254f:
    ``mmfs/tiers/disk.py``, ``mmfs/metadata.py``), written here with lmdb directly:

    * ``chunks/chunks/<ab>/<content id>.<chunk size>.<index>``: a file per chunk
      (``<ab>``: the first two hex digits of the content hash);
    * ``chunks/index-v2.lmdb``: table ``chunks``, key ``<content id>:<chunk size>:<index>``
      -> big-endian u64 recency, u64 size; table ``digests``, same key -> the blake3 of
      each 64 KiB block of the chunk, concatenated;
    * ``metadata/``: tables ``refs`` (``provider/org/name@rev`` -> JSON commit and time)
      and ``manifests`` (``provider/org/name@commit`` -> the manifest JSON).

    ``chunks`` maps ``(content id, chunk size, index)`` to the chunk's bytes, as cached.
    """
    index_dir = cache_dir / "chunks" / "index-v2.lmdb"
    index_dir.mkdir(parents=True)
    env = lmdb.open(str(index_dir), map_size=1 << 30, max_dbs=2)
    try:
        chunks_db, digests_db = env.open_db(b"chunks"), env.open_db(b"digests")
        with env.begin(write=True) as txn:
            for seq, ((content_id, chunk_size, index), data) in enumerate(chunks.items(), start=1):
                key = f"{content_id}:{chunk_size}:{index}".encode()
                view = memoryview(data)
                digests = b"".join(blake3.blake3(view[i:i + _OLD_BLOCK]).digest()
                                   for i in range(0, len(data), _OLD_BLOCK))
                txn.put(key, digests, db=digests_db)
                txn.put(key, struct.pack(">QQ", seq, len(data)), db=chunks_db)
                path = cache_dir / "chunks" / "chunks" / content_id.rsplit("-", 1)[-1][:2] / \
                    f"{content_id}.{chunk_size}.{index}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    finally:
        env.close()
    env = lmdb.open(str(cache_dir / "metadata"), map_size=1 << 30, max_dbs=4)
    try:
        refs_db, manifests_db = env.open_db(b"refs"), env.open_db(b"manifests")
        env.open_db(b"files")
        env.open_db(b"chunk_digests")
        with env.begin(write=True) as txn:
            for raw in manifests:
                manifest = json.loads(raw)
                key = f"{manifest['provider']}/{manifest['repo']}@{manifest['commit']}"
                txn.put(key.encode(), raw, db=manifests_db)
            for key, commit in refs.items():
                txn.put(key.encode(), json.dumps({"commit": commit, "resolved_at": time.time()}).encode(),
                        db=refs_db)
    finally:
        env.close()


def corrupted(data: bytes) -> bytes:
    """``data`` with a byte flipped every 4 KiB, as the test hub corrupts."""
    out = bytearray(data)
    out[::4096] = bytes(b ^ 0xFF for b in out[::4096])
    return bytes(out)


# -- 1. backend mode: stale chunks on one node must not finish a file ---------------------


@pytest.mark.fuse
def test_stale_chunks_on_a_node_never_finish_a_file(cluster: Cluster, hub: TestHub, hub_root: Path) -> None:
    data = payload(12 << 20, seed=1)  # 48 chunks: a node's read-ahead after a head read stays short of the tail
    good = sha(data)
    make_repo(hub_root, "org/stale", {FILE: data})
    backend = cluster.backend()
    # Nodes 1a and 1b start the file while the upstream is corrupt; node 2 reads it whole.
    node1a, node1b, node2 = (cluster.mount(name, backend=backend.url) for name in ("node1a", "node1b", "node2"))
    path1a, path1b, path2 = (node.repo("org/stale") / FILE for node in (node1a, node1b, node2))

    hub.set_faults(corrupt=[FILE])
    read_head(path1a)  # a lazy start: early chunks, not checkable yet
    read_head(path1b)
    outcome = read_mounted(path2, "node 2 (corrupt upstream)")
    assert outcome.error == "EIO", outcome  # node 2 reads the tail: the backend's whole-file check fails
    hub.clear_faults()
    assert node1b.stop() == 0
    node1b.start()  # same cache dir: what node 1b kept on disk comes back, its page cache does not

    read_mounted(path1a, "node 1a, first read once the upstream is good").never_wrong(good)
    read_mounted(path1b, "node 1b (restarted), first read once the upstream is good").never_wrong(good)
    read_mounted(path1a, "node 1a, read again").right(good)
    read_mounted(path1b, "node 1b, read again").right(good)
    read_mounted(path2, "node 2").right(good)


# -- 2. the page cache of every inode with the failed content -----------------------------


@pytest.mark.fuse
def test_failed_check_leaves_no_bad_pages_under_another_path(cluster: Cluster, hub: TestHub,
                                                             hub_root: Path) -> None:
    data = payload(4 << 20, seed=2)
    good = sha(data)
    make_repo(hub_root, "org/first", {FILE: data, "README.md": b"first\n"})
    make_repo(hub_root, "org/second", {FILE: data, "README.md": b"second\n"})
    node = cluster.mount("node", backend=None)  # embedded: the node checks whole files itself
    first, second = node.repo("org/first") / FILE, node.repo("org/second") / FILE
    assert os.stat(first).st_size == os.stat(second).st_size == len(data)

    hub.set_faults(corrupt=[FILE])
    head = read_head(second)  # the second inode's page cache: provisional (here: bad) pages
    assert isinstance(head, bytes) and head != data[:len(head)], \
        f"precondition: the head of the second path was served, from the corrupt upstream ({head[:20]!r})"
    held = open(second, "rb")  # a reader in the middle of the file when the failure comes
    try:
        held_digest = hashlib.sha256(held.read(CHUNK))
        outcome = read_mounted(first, "first path (corrupt upstream)")
        assert outcome.error == "EIO", outcome  # the whole-file check fails through the first path
        hub.clear_faults()

        # The held reader goes on: its earlier bytes were bad, so it must not complete.
        try:
            while block := held.read(1 << 20):
                held_digest.update(block)
            held_outcome = Outcome("reader of the second path across the failure", held_digest.hexdigest())
        except OSError as exc:
            held_outcome = Outcome("reader of the second path across the failure", error=_errno_name(exc))
        held_outcome.never_wrong(good)
        # Its inode's cached pages went with the failure: reading the head again gives
        # the right bytes (fetched afresh), not the bad pages still in the kernel.
        head_again = _eventually(lambda: os.pread(held.fileno(), CHUNK, 0) == data[:CHUNK])
        assert head_again, "the page cache of the second path still holds the failed bytes"
    finally:
        held.close()

    read_mounted(second, "second path, opened after the failure").never_wrong(good)
    read_mounted(second, "second path, read again").right(good)
    read_mounted(first, "first path").right(good)


# -- 3. Hub clients that resume ------------------------------------------------------------


def test_hub_client_never_resumes_into_a_wrong_file(cluster: Cluster, hub: TestHub, hub_root: Path,
                                                    tmp_path: Path) -> None:
    # Over 10 MiB: huggingface_hub writes a body in 10 MiB pieces, so only a larger file
    # has a part on disk to resume from when the body breaks off.
    data = payload((12 << 20) + 12345, seed=3)
    good = sha(data)
    make_repo(hub_root, "org/resume", {FILE: data})
    backend = cluster.backend()

    hub.set_faults(corrupt=[FILE])  # bad for good: an error (not a file, not a retry loop)
    outcome = download(backend.url, "org/resume", tmp_path / "client-1", "hub client (corrupt upstream)",
                       timeout=45)
    assert not outcome.completed, outcome.never_wrong(good)

    # Only the first pass over the file is bad: the backend aborts the response when the
    # file fails its check, the client resumes from where the body broke off (Range),
    # and by then the upstream serves good bytes.
    hub.set_faults(corrupt=[FILE], corrupt_bytes=len(data))
    download(backend.url, "org/resume", tmp_path / "client-2", "hub client (resumed)").never_wrong(good)
    assert hub.stats().faults.get("corrupted", 0) >= 1  # precondition: the bad pass happened

    hub.clear_faults()
    download(backend.url, "org/resume", tmp_path / "client-3", "hub client (good upstream)").right(good)


# -- 4. verification tied to the bytes served ------------------------------------------------


def test_chunk_fetched_again_corrupt_after_it_was_hashed_never_verifies(cluster: Cluster, hub: TestHub,
                                                                        hub_root: Path, tmp_path: Path) -> None:
    data = payload(8 * CHUNK + 4321, seed=4)  # 9 chunks
    good = sha(data)
    make_repo(hub_root, "org/evict", {FILE: data})
    # One chunk of memory, two of disk: chunks leave both tiers quickly.
    backend = cluster.backend(args=["--memory-cache", "256KiB", "--disk-cache", "512KiB"])
    url = file_url(backend, "org/evict")

    read_range(url, "chunk 0", 0, 1).right(sha(data[:CHUNK]))  # good, into the whole-file check
    read_range(url, "chunks 1-5", 1, 6).right(sha(data[CHUNK:6 * CHUNK]))  # chunk 0 evicted from both tiers
    hub.set_faults(corrupt=[FILE])
    corrupted_before = hub.stats().faults.get("corrupted", 0)
    read_range(url, "chunk 0 while the upstream is corrupt", 0, 1)  # fetched again: a bad copy
    assert hub.stats().faults.get("corrupted", 0) > corrupted_before, \
        "precondition: chunk 0 was fetched again from the upstream"
    hub.clear_faults()

    # The rest arrives good; the file must not pass its check with the bad copy served.
    read_http(url, "backend /v1/file").never_wrong(good)
    download(backend.url, "org/evict", tmp_path / "client-1", "hub client").never_wrong(good)
    # Nothing bad was kept.
    read_http(url, "backend /v1/file, again").right(good)
    download(backend.url, "org/evict", tmp_path / "client-2", "hub client, again").right(good)


# -- 5. chunk size change on the backend ---------------------------------------------------


@pytest.mark.fuse
def test_chunk_size_change_keeps_shared_files_readable(cluster: Cluster, hub: TestHub, hub_root: Path) -> None:
    data = payload((2 << 20) + 54321, seed=5)
    good = sha(data)
    make_repo(hub_root, "org/resized", {FILE: data})
    commits: list[str] = []

    def phase(number: int, chunk_size: str, order: list[int]) -> None:
        """Restart the backend (same data dir) with ``chunk_size``; a fresh node reads the
        file at each commit in ``order`` (``-1``: main, recorded as the next commit)."""
        backend = cluster.backend("backend", chunk_size=chunk_size)
        node = cluster.mount(f"node{number}", backend=backend.url)
        repo = node.mountpoint / "huggingface" / "org" / "resized"
        for which in order:
            if which == -1:
                commits.append(os.readlink(repo / "main"))
                which = len(commits) - 1
            read_mounted(repo / commits[which] / FILE, f"commit {which + 1} with --chunk-size {chunk_size} "
                         f"(phase {number})").right(good)
        node.stop()
        backend.stop()

    phase(1, "256KiB", [-1])
    make_repo(hub_root, "org/resized", {"extra-1.txt": b"a new commit sharing model.bin\n"})
    phase(2, "512KiB", [0, -1])  # the old commit (256 KiB chunks), then the new one (512 KiB)
    make_repo(hub_root, "org/resized", {"extra-2.txt": b"another one\n"})
    phase(3, "128KiB", [-1, 1, 0])  # newest first this time, across another restart
    assert len(set(commits)) == 3


# -- 6. tail-first readers ------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["embedded", "backend"])
def test_tail_first_reader_succeeds_while_bytes_flow(cluster: Cluster, hub: TestHub, hub_root: Path,
                                                     mode: str) -> None:
    data = payload(8 * CHUNK + 999, seed=6)  # 2 MiB, 9 chunks
    make_repo(hub_root, "org/zipped", {FILE: data})
    backend = cluster.backend() if mode == "backend" else None
    # At the capped rate a chunk takes under 1 s and the whole file about 7 s: more than
    # twice --remote-timeout, which is how long a read waits when the kernel asks twice
    # (readahead, then the page itself).
    node = cluster.mount("node", backend=backend.url if backend else None, args=["--remote-timeout", "2"])
    path = node.repo("org/zipped") / FILE
    assert os.stat(path).st_size == len(data)  # the manifest is known before the cap
    hub.set_rate("300KB/s")
    try:
        with open(path, "rb") as f:  # like torch.load of a zip .bin: the central directory first
            f.seek(len(data) - 64 * 1024)
            tail = f.read()
    except OSError as exc:
        pytest.fail(f"the tail-first read failed with {_errno_name(exc)} while the upstream was sending")
    finally:
        hub.set_rate(None)
    assert tail == data[-64 * 1024:]
    read_mounted(path, "the whole file afterwards").right(sha(data))


# -- 7. bounds: damaged cache and data directories -----------------------------------------


@pytest.mark.fuse
def test_damaged_node_cache_dir_still_mounts_and_reads_right(cluster: Cluster, hub: TestHub,
                                                             hub_root: Path) -> None:
    data, config = payload((1 << 20) + 777, seed=7), b'{"model_type": "test"}\n'
    make_repo(hub_root, "org/damaged", {FILE: data, "config.json": config})
    node = cluster.mount("node", backend=None)
    read_mounted(node.repo("org/damaged") / FILE).right(sha(data))
    for how in DAMAGES:
        assert node.stop() == 0
        damage(node.cache_dir, how)
        node.start()  # must start, not exit (that is a crash loop under a DaemonSet)
        read_mounted(node.repo("org/damaged") / FILE, f"node on a cache dir with {how}").right(sha(data))
        read_mounted(node.repo("org/damaged") / "config.json", f"node on a cache dir with {how}").right(sha(config))


def test_damaged_backend_data_dir_still_serves_right(cluster: Cluster, hub: TestHub, hub_root: Path) -> None:
    data = payload((1 << 20) + 777, seed=7)
    make_repo(hub_root, "org/damaged", {FILE: data})
    backend = cluster.backend()
    read_http(file_url(backend, "org/damaged"), "backend").right(sha(data))
    for how in DAMAGES:
        assert backend.stop() == 0
        damage(backend.data_dir, how)
        backend.start()  # must start, not exit
        read_http(file_url(backend, "org/damaged"), f"backend on a data dir with {how}").right(sha(data))


# -- 8. two nodes and a Hub client through one backend -------------------------------------


@pytest.mark.fuse
def test_two_nodes_and_a_hub_client_through_a_corrupt_then_good_upstream(cluster: Cluster, hub: TestHub,
                                                                         hub_root: Path, tmp_path: Path) -> None:
    data = payload(12 << 20, seed=8)  # over 10 MiB: the Hub client resumes (see the resume test)
    good = sha(data)
    make_repo(hub_root, "org/shared", {FILE: data})
    backend = cluster.backend()
    node1 = cluster.mount("node1", backend=backend.url)
    node2 = cluster.mount("node2", backend=backend.url)
    path1, path2 = node1.repo("org/shared") / FILE, node2.repo("org/shared") / FILE
    clients = iter(range(100))

    def everyone(when: str) -> list[Callable[[], Outcome]]:
        return [lambda: read_mounted(path1, f"node 1 ({when})"),
                lambda: read_mounted(path2, f"node 2 ({when})"),
                lambda: download(backend.url, "org/shared", tmp_path / f"client-{next(clients)}",
                                 f"hub client ({when})"),
                lambda: read_http(file_url(backend, "org/shared"), f"backend /v1/file ({when})")]

    # The upstream is corrupt: node 1 starts the file (lazily), the others read it whole.
    hub.set_faults(corrupt=[FILE])

    def node1_head() -> Outcome:
        read_head(path1)
        return Outcome("node 1 (head only, not judged)", error="partial read")

    for outcome in run_together([node1_head, *everyone("corrupt upstream")[1:]]):
        assert not outcome.completed, outcome.never_wrong(good)

    # Everyone reads while the upstream turns good in the middle (capped, so reads are in flight).
    hub.set_rate("8MB/s")
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(reader) for reader in everyone("upstream turning good")]
            wait_until(lambda: hub.stats().faults.get("corrupted", 0) >= 2, "corrupt responses under way")
            hub.clear_faults()
            hub.set_rate(None)
            outcomes = [f.result(timeout=120) for f in futures]
    finally:
        hub.clear_faults()
        hub.set_rate(None)
    for outcome in outcomes:
        outcome.never_wrong(good)

    # The upstream is good: nothing bad stayed anywhere (tiers, page caches).
    for outcome in run_together(everyone("good upstream")):
        outcome.never_wrong(good)
    for outcome in run_together(everyone("good upstream, again")):
        outcome.right(good)


# -- 9. kill -9 during writes -----------------------------------------------------------------


@pytest.mark.fuse
def test_kill_9_of_node_and_backend_during_cold_reads(cluster: Cluster, hub: TestHub, hub_root: Path) -> None:
    files = {f"{name}.bin": payload((2 << 20) + 1000 * i, seed=90 + i) for i, name in enumerate("abcd")}
    make_repo(hub_root, "org/killed", files)
    backend = cluster.backend(listen=f"127.0.0.1:{free_port()}")  # restarted on the same address
    node = cluster.mount("node", backend=backend.url, args=["--remote-timeout", "5"])
    repo = node.repo("org/killed")
    for name in files:
        os.stat(repo / name)

    def kill_during_cold_reads(names: list[str], kill: Callable[[], None]) -> None:
        served = hub.stats().bytes_served
        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(read_mounted, repo / name, f"{name} while killed") for name in names]
            wait_until(lambda: hub.stats().bytes_served >= served + (1 << 20), "cold reads under way")
            kill()
            for name, future in zip(names, futures):
                future.result(timeout=60).never_wrong(sha(files[name]))

    hub.set_rate("4MB/s")  # reads and cache writes are in progress when the kill comes
    kill_during_cold_reads(["a.bin", "b.bin"], node.kill)
    node.start()  # same cache dir
    kill_during_cold_reads(["c.bin", "d.bin"], backend.kill)
    backend.start()  # same data dir
    hub.set_rate(None)

    for name, data in files.items():
        read_mounted(repo / name, f"{name} after the restarts").right(sha(data))
    assert node.stop() == 0
    node.start()  # no page cache now: the node's disk cache
    for name, data in files.items():
        read_mounted(repo / name, f"{name} from the node's disk").right(sha(data))
    for name, data in files.items():  # the backend's tiers
        read_http(file_url(backend, "org/killed", name), f"{name} from the backend").right(sha(data))
    assert_accounts_for_disk(lambda: node_disk_used(node), node.cache_dir, "node")
    assert_accounts_for_disk(lambda: backend_disk_used(backend), backend.data_dir, "backend")


# -- 10. upgrading a node with a cache in the old layout -----------------------------------


@pytest.mark.fuse
def test_node_cache_in_the_old_layout_upgrades_and_reads_right(cluster: Cluster, hub: TestHub, hub_root: Path,
                                                               tmp_path: Path) -> None:
    files = {"good.bin": payload((2 << 20) + 333, seed=101), "poisoned.bin": payload((2 << 20) + 444, seed=102)}
    make_repo(hub_root, "org/upgrade", files)
    backend = cluster.backend()
    raw = backend.get("/v1/manifest/huggingface/org/upgrade/main")
    manifest = json.loads(raw)
    chunks: dict[tuple[str, int, int], bytes] = {}
    for entry in manifest["files"]:
        content, size = files[entry["path"]], entry["chunk_size"]
        content_id = f"{entry['hash_algo']}-{entry['hash']}"
        for index in range(-(-len(content) // size)):
            chunk = content[index * size:(index + 1) * size]
            # The old code could keep a bad chunk of a file whose check failed elsewhere
            # (issue 8, scenario 1): one is in this cache, consistent with its own digests.
            chunks[(content_id, size, index)] = corrupted(chunk) if entry["path"] == "poisoned.bin" and \
                index == 0 else chunk
    cache = tmp_path / "old-cache"
    write_old_layout_cache(cache, chunks, [raw], {"huggingface/org/upgrade@main": manifest["commit"]})

    node = cluster.mount("node", backend=backend.url, cache=cache)  # it starts on the old cache
    repo = node.repo("org/upgrade")
    assert os.readlink(repo) == manifest["commit"]
    read_mounted(repo / "good.bin", "a file cached in the old layout").right(sha(files["good.bin"]))
    read_mounted(repo / "poisoned.bin", "a file with a bad chunk in the old cache").never_wrong(
        sha(files["poisoned.bin"]))
    read_mounted(repo / "poisoned.bin", "that file, read again").right(sha(files["poisoned.bin"]))
    assert node.stop() == 0
    node.start()  # and again, on what the upgrade left
    for name, data in files.items():
        read_mounted(repo / name, f"{name} after a restart").right(sha(data))
