"""``mmfs prefetch``: warm a node's cache through its mount, or a backend before a rollout.

Through a mount, the files are simply read (N parallel readers over 64 MiB slices): every
chunk then sits verified in the daemon's disk cache, the whole-file checks have passed and
the metadata DB remembers the ref and the manifest, so the files read back with the
backend and the Hub gone, also after a daemon restart. Pages are dropped from the page
cache as they are read (``POSIX_FADV_DONTNEED``): warming a 100 GB model must not evict
everything else on the node.

Against a backend, ``POST /v1/prefetch/<provider>/<org>/<name>/<rev>`` asks it to warm
itself; a backend without that endpoint gets every chunk fetched (and discarded) with
:class:`~mmfs.remote.backend.BackendRemote`, which makes it fetch and keep them.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import trio

from .errors import AccessDenied, InvalidName, MmfsError, NotFound, RepoNotFound, RevisionNotFound, UpstreamError
from .names import PROVIDERS, STORE_BRANCH, STORE_PROVIDERS, RepoRef, check_provider, check_revision, parse_repo_id
from .sizes import format_size

SLICE = 64 << 20
READ_BLOCK = 8 << 20
#: Seconds to connect to a backend; the whole warm-up is bounded by ``--timeout``.
CONNECT_TIMEOUT = 10.0
#: Default bound of ``mmfs prefetch --backend``, seconds (a 100 GB model at a few hundred MB/s).
DEFAULT_BACKEND_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Target:
    repo: RepoRef
    revision: str

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}"


def parse_target(text: str) -> Target:
    """``huggingface/<org>/<name>[@<rev>]`` (``<org>/<name>`` alone means huggingface), or
    a store model ``s3|azure|file/<bucket>/<prefix…>[@<rev>]`` (revision ``latest``)."""
    spec, at, revision = text.partition("@")
    if at and not revision:
        raise InvalidName(f"invalid model {text!r}: empty revision after '@'")
    parts = spec.strip("/").split("/")
    if parts[0] in STORE_PROVIDERS:
        repo = parse_repo_id("/".join(parts[1:]), parts[0])
        return Target(repo, check_revision(revision or STORE_BRANCH))
    if len(parts) == 2 and parts[0] not in PROVIDERS:
        parts = ["huggingface", *parts]
    if len(parts) != 3:
        raise InvalidName(f"invalid model {text!r}: expected huggingface/<org>/<name>[@<revision>]")
    check_provider(parts[0])
    repo = parse_repo_id(f"{parts[1]}/{parts[2]}", parts[0])
    return Target(repo, check_revision(revision or "main"))


def matches(path: str, include: Sequence[str]) -> bool:
    if not include:
        return True
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(name, pattern) for pattern in include)


@dataclass(frozen=True, slots=True)
class Summary:
    files: int
    bytes: int
    seconds: float

    def line(self, what: str) -> str:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        return (f"mmfs prefetch: {what}: {self.files} files, {format_size(self.bytes)} in {self.seconds:.1f} s "
                f"({format_size(rate)}/s)")


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total_bytes: int, total_files: int, stream=sys.stderr) -> None:
        self.total, self.files = total_bytes, total_files
        self.done = self.files_done = 0
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last = 0.0

    def advance(self, n: int, file_done: bool = False) -> None:
        with self._lock:
            self.done += n
            self.files_done += file_done
            now = time.monotonic()
            if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        rate = self.done / max(now - self.started, 1e-6)
        self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {format_size(self.done)}/{format_size(self.total)} "
                          f"{self.files_done}/{self.files} files {format_size(rate)}/s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# -- through a mount -------------------------------------------------------------------


def _read_slice(path: Path, start: int, end: int, last: bool, progress: Progress, stop: threading.Event) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = start
        while offset < end and not stop.is_set():
            n = min(READ_BLOCK, end - offset)
            data = os.pread(fd, n, offset)
            if not data:
                raise OSError(f"{path}: unexpected end of file at {offset}")
            offset += len(data)
            progress.advance(len(data))
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
    finally:
        os.close(fd)
    if last:
        progress.advance(0, file_done=True)


def prefetch_mount(mountpoint: str, target: Target, include: Sequence[str] = (), jobs: int = 8) -> Summary:
    """Read every matching file of ``target`` through the mount at ``mountpoint``."""
    root = Path(mountpoint) / target.repo.provider / target.repo.org / target.repo.name
    revision_dir = root / target.revision
    try:
        os.stat(root)
    except FileNotFoundError:
        raise RepoNotFound(f"unknown repo {target.repo} (not found through {mountpoint})") from None
    except OSError as exc:
        raise _through_mount_error(str(target.repo), mountpoint, exc) from None
    try:
        os.stat(revision_dir)
    except FileNotFoundError:
        raise RevisionNotFound(f"unknown revision {target.revision!r} of {target.repo}") from None
    except OSError as exc:
        raise _through_mount_error(str(target), mountpoint, exc) from None
    files: list[tuple[Path, int]] = []
    for folder, _, names in os.walk(revision_dir):
        for name in names:
            path = Path(folder) / name
            relative = path.relative_to(revision_dir).as_posix()
            if matches(relative, include):
                files.append((path, path.stat().st_size))
    if not files:
        raise NotFound(f"{target}: no file matches {' '.join(include) or '*'}")
    files.sort(key=lambda f: -f[1])
    work = []
    for path, size in files:
        if size == 0:
            work.append((path, 0, 0, True))
        for start in range(0, size, SLICE):
            end = min(start + SLICE, size)
            work.append((path, start, end, end == size))
    progress = Progress(sum(size for _, size in files), len(files))
    started = time.monotonic()
    try:
        _read_all(work, jobs, progress, target, mountpoint)
    finally:
        progress.close()
    return Summary(len(files), progress.done, time.monotonic() - started)


def _read_all(work: list[tuple[Path, int, int, bool]], jobs: int, progress: Progress, target: Target,
              mountpoint: str) -> None:
    """Read the slices with ``jobs`` threads; the first failure stops the others.

    Daemon threads, and a main thread that only waits in short joins: Ctrl-C stops the
    command at once (the readers stop within one block; an exiting process never waits for
    a read stuck in the mount, as a thread pool's shutdown would)."""
    pending = iter(work)
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[tuple[Path, OSError]] = []

    def reader() -> None:
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                _read_slice(*item, progress, stop)
            except OSError as exc:
                failures.append((item[0], exc))
                stop.set()

    threads = [threading.Thread(target=reader, name=f"prefetch-{i}", daemon=True) for i in range(min(jobs, len(work)))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    finally:
        stop.set()
    if failures:
        path, exc = failures[0]
        if exc.errno == errno.EACCES:
            raise _through_mount_error(str(target.repo), mountpoint, exc)
        raise MmfsError(f"{target}: reading {path} failed: {exc.strerror or exc}")


# -- a backend alone -------------------------------------------------------------------


async def _prefetch_backend(url: str, target: Target, include: Sequence[str], jobs: int,
                            progress_factory: Callable[[int, int], Progress], token: str | None = None) -> Summary:
    import httpx

    from .remote._http import error_from_response
    from .remote.backend import ADMIN_HEADER, BackendRemote
    from .remote.base import FileSource
    from .remote.wire import proxy_url

    started = time.monotonic()
    auth = f"Bearer {token}" if token else None
    remote = BackendRemote(url, auth=auth)
    try:
        commit = await remote.resolve(target.repo, target.revision)
        manifest = await remote.manifest(target.repo, commit)
        entries = [e for e in manifest.files if matches(e.path, include)]
        if not entries:
            raise NotFound(f"{target}: no file matches {' '.join(include) or '*'}")
        total = sum(e.size for e in entries)
        # Ask the backend to warm itself, if it offers that (it answers when done: no read
        # timeout, the caller's overall bound applies).
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT), trust_env=False,
                                     proxy=proxy_url(url)) as client:
            try:
                headers = {"Authorization": auth} if auth else {}
                if os.environ.get("MMFS_ADMIN_TOKEN"):
                    headers[ADMIN_HEADER] = os.environ["MMFS_ADMIN_TOKEN"]
                response = await client.post(f"{url.rstrip('/')}/v1/prefetch/{target.repo.url_path}/{commit}",
                                             params=[("include", p) for p in include], headers=headers)
            except httpx.ConnectTimeout:
                raise UpstreamError(f"cannot connect to {url} within {CONNECT_TIMEOUT:g} s") from None
            except httpx.HTTPError:
                response = None
            if response is not None and response.is_success:
                try:
                    body = response.json()
                except ValueError:
                    body = {}
                return Summary(int(body.get("files", len(entries))), int(body.get("bytes", total)),
                               time.monotonic() - started)
            missing_route = response is not None and response.status_code in (404, 405, 501) \
                and "X-Error-Code" not in response.headers
            if response is not None and not missing_route:
                raise error_from_response(response)
        progress = progress_factory(total, len(entries))
        limiter = trio.CapacityLimiter(max(jobs, 1))
        try:
            async with trio.open_nursery() as nursery:
                for entry in entries:
                    source = FileSource(target.repo, commit, entry)
                    for index in range(entry.chunk_count):
                        async def one(source=source, index=index) -> None:
                            async with limiter:
                                chunk = await remote.fetch_chunk(source, index)
                            progress.advance(len(chunk.data), index == source.entry.chunk_count - 1)
                        nursery.start_soon(one)
        finally:
            progress.close()
        return Summary(len(entries), total, time.monotonic() - started)
    finally:
        await remote.aclose()


async def _bounded_prefetch_backend(url: str, target: Target, include: Sequence[str], jobs: int,
                                    progress_factory: Callable[[int, int], Progress], timeout: float,
                                    token: str | None = None) -> Summary:
    try:
        with trio.fail_after(timeout):
            return await _prefetch_backend(url, target, include, jobs, progress_factory, token)
    except trio.TooSlowError:
        raise UpstreamError(f"{target}: {url} did not finish warming within {timeout:g} s (raise --timeout to "
                            "wait longer; the backend may still be fetching)") from None


def prefetch_backend(url: str, target: Target, include: Sequence[str] = (), jobs: int = 8,
                     timeout: float = DEFAULT_BACKEND_TIMEOUT, *, token: str | None = None) -> Summary:
    """Warm the backend at ``url``, sending ``token`` (for gated and private repos) and
    ``MMFS_ADMIN_TOKEN`` (the backend's admin token, if it has one); :class:`~mmfs.errors.UpstreamError`
    after ``timeout`` seconds."""
    from .errors import first_error

    try:
        return trio.run(_bounded_prefetch_backend, url, target, include, jobs, Progress, timeout, token)
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is None:
            raise
        raise error from None


def _through_mount_error(what: str, mountpoint: str, exc: OSError) -> MmfsError:
    """What an errno from the mount means for ``what`` (the mount maps errors to errnos)."""
    if exc.errno == errno.EACCES:
        return AccessDenied(f"{what} is gated or private, and the mount at {mountpoint} has no token with access "
                            "to it")
    if exc.errno == errno.EINVAL:
        return InvalidName(f"{what}: the mount refused the name ({exc.strerror})")
    return UpstreamError(f"{what}: {exc.strerror} through {mountpoint} (the mount's log says why)")


def find_mount(explicit: str | None) -> str:
    """The mount to use: the one given (which must be an mmfs mount), else the only one."""
    from .mountutil import FSTYPE, mmfs_mounts, mount_at

    if explicit:
        info = mount_at(explicit)
        if info is None or info.fstype != FSTYPE:
            what = f"a {info.fstype} mount" if info is not None else "not a mount"
            raise MmfsError(f"{explicit} is not an mmfs mount ({what}); start one with 'mmfs mount {explicit}'")
        return explicit
    found = mmfs_mounts()
    if len(found) == 1:
        return found[0].mountpoint
    if not found:
        raise MmfsError("no mmfs mount found; start one with 'mmfs mount MOUNTPOINT' or pass --mount")
    raise MmfsError("several mmfs mounts found (" + ", ".join(m.mountpoint for m in found) + "); pass --mount")


def describe_targets(items: Iterable[str]) -> str:
    return ", ".join(items)
