"""The client library's routes for object stores and local roots (``provider="S3"``,
``"Azure"``, ``"file"``); :mod:`mmfs.client` hands such requests here.

The same three routes as for the Hub, first that applies wins:

1. **the node's mmfs mount**: ``<mount>/<provider>/<bucket>/<prefix…>/<revision>/<path>``;
2. **the cluster backend** at ``host``: the node protocol (``/v1/resolve``, ``/v1/manifest``,
   ``/v1/file``) into ``local_dir``, or the cache folder ``cache_dir`` (default
   ``$MMFS_CLIENT_CACHE``, else ``~/.cache/mmfs``) laid out as the mount is:
   ``<provider>/<bucket>/<prefix…>/<commit>/<path>``, plus ``refs/<revision>`` naming the
   commit, so ``local_files_only`` finds it again;
3. **the store itself**, with this process's credentials (``AWS_*``, ``AZURE_STORAGE_*``;
   ``file`` roots from ``MMFS_STORES``), through the same fetch engine the daemons run, so
   every byte is verified here too.

Errors are :mod:`mmfs.errors`: :class:`~mmfs.errors.RepoNotFound` (no such bucket,
container or prefix), :class:`~mmfs.errors.EntryNotFound` (no such key),
:class:`~mmfs.errors.AccessDenied` (credentials refused), :class:`~mmfs.errors.RevisionNotFound`
(a revision the store no longer has), each naming what is wrong.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import EntryNotFound, MmfsError, NotFound
from .manifest import FileEntry, Manifest
from .names import STORE_BRANCH, RepoRef, check_revision, is_commit

if TYPE_CHECKING:
    from .client import _Request

log = logging.getLogger("mmfs.client")

CACHE_ENV = "MMFS_CLIENT_CACHE"
#: Bytes of chunks the in-process engine of route 3 keeps in memory.
_DIRECT_MEMORY = 256 << 20


def download(request: "_Request", *, cache_dir: Any, local_dir: Any, force_download: bool, local_files_only: bool,
             patterns: Callable[[str], bool] | None = None) -> str:
    """A path to the file (``request.path``) or the snapshot folder (``patterns`` selects
    the files a download copies)."""
    from . import client

    repo: RepoRef = request.cluster_repo
    revision = check_revision(request.info.revision or STORE_BRANCH)
    what = f"{repo}@{revision}" + (f"/{request.path}" if request.path else "")
    on_mount = replace(request, info=replace(request.info, revision=revision))
    if local_dir is None and not local_files_only and not force_download:
        found = client._on_mount(on_mount)
        if found is not None:
            log.info("%s: on the mmfs mount: %s", what, found)
            return found
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmfs")
    if local_files_only:
        return _cached(cache, repo, revision, request.path)
    url = client.backend_url(request.info.host)
    if url is not None and client._backend_up(url):
        log.info("%s: through the backend %s", what, url)
        source: _Source = _BackendSource(url)
    else:
        log.info("%s: from %s directly", what, repo.provider)
        source = _DirectSource()
    manifest = source.manifest(repo, revision)
    folder = Path(local_dir) if local_dir is not None else cache / _repo_dir(repo) / manifest.commit
    if request.path is not None:
        entry = manifest.file(request.path)
        if entry is None:
            raise EntryNotFound(f"{request.path} does not exist in {repo} at {manifest.commit}")
        entries = [entry]
    else:
        entries = [f for f in manifest.files if patterns is None or patterns(f.path)]
    for entry in entries:
        target = folder / entry.path
        if force_download or not _complete(target, entry):
            source.fetch(manifest, entry, target)
    if local_dir is None:
        _write_ref(cache, repo, revision, manifest.commit)
    return str(folder / request.path) if request.path is not None else str(folder)


def selector(allow: list[str] | str | None, ignore: list[str] | str | None) -> Callable[[str], bool]:
    """``allow_patterns``/``ignore_patterns`` as huggingface_hub applies them."""
    allowed = [allow] if isinstance(allow, str) else list(allow or [])
    ignored = [ignore] if isinstance(ignore, str) else list(ignore or [])

    def wanted(path: str) -> bool:
        if allowed and not any(fnmatch.fnmatch(path, p) for p in allowed):
            return False
        return not any(fnmatch.fnmatch(path, p) for p in ignored)

    return wanted


# -- the cache folder ------------------------------------------------------------------


def _repo_dir(repo: RepoRef) -> Path:
    return Path(repo.provider) / repo.org / repo.name


def _complete(target: Path, entry: FileEntry) -> bool:
    try:
        return target.stat().st_size == entry.size
    except OSError:
        return False


def _write_ref(cache: Path, repo: RepoRef, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = cache / _repo_dir(repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def _cached(cache: Path, repo: RepoRef, revision: str, path: str | None) -> str:
    """``local_files_only``: what an earlier download left in the cache folder."""
    commit = revision
    if not is_commit(revision):
        try:
            commit = (cache / _repo_dir(repo) / "refs" / revision).read_text().strip()
        except OSError:
            raise NotFound(f"{repo}@{revision} is not in the cache {cache} (local_files_only)") from None
    target = cache / _repo_dir(repo) / commit / (path or "")
    if not target.exists():
        raise NotFound(f"{target} is not in the cache (local_files_only)")
    return str(target)


def _write_atomically(target: Path, write: Callable[[Any], None]) -> None:
    """The file appears complete or not at all (a temporary name, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


# -- where the bytes come from ---------------------------------------------------------


class _Source:
    def manifest(self, repo: RepoRef, revision: str) -> Manifest:
        raise NotImplementedError

    def fetch(self, manifest: Manifest, entry: FileEntry, target: Path) -> None:
        raise NotImplementedError


class _BackendSource(_Source):
    """The backend's node protocol (docs/protocol.md); its errors become the same
    :mod:`mmfs.errors` classes the backend raised."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url
        self._client = httpx.Client(timeout=httpx.Timeout(30.0, read=120.0))

    def _get(self, path: str) -> Any:
        from .remote._http import error_from_response

        response = self._client.get(f"{self.url}{path}")
        if not response.is_success:
            raise error_from_response(response)
        return response

    def manifest(self, repo: RepoRef, revision: str) -> Manifest:
        from urllib.parse import quote

        response = self._get(f"/v1/manifest/{repo.url_path}/{quote(revision, safe='')}")
        return Manifest.from_json(response.json())

    def fetch(self, manifest: Manifest, entry: FileEntry, target: Path) -> None:
        from urllib.parse import quote

        from .remote._http import error_from_response

        url = f"{self.url}/v1/file/{manifest.repo.url_path}/{manifest.commit}/{quote(entry.path)}"

        def write(out: Any) -> None:
            with self._client.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                for block in response.iter_bytes(1 << 20):
                    out.write(block)
            if out.tell() != entry.size:
                raise MmfsError(f"{url}: got {out.tell()} of {entry.size} bytes")

        _write_atomically(target, write)


class _DirectSource(_Source):
    """The store itself, through an in-process :class:`~mmfs.engine.FetchEngine` (memory
    tier only): the same listing, pinning and verification as the daemons."""

    def manifest(self, repo: RepoRef, revision: str) -> Manifest:
        return self._run(lambda engine: engine.manifest(repo, revision), repo)

    def fetch(self, manifest: Manifest, entry: FileEntry, target: Path) -> None:
        from .remote.base import FileSource

        source = FileSource(manifest.repo, manifest.commit, entry)

        async def copy(engine: Any, out: Any) -> None:
            for index in range(entry.chunk_count):  # in order: the file's hash advances as they come
                start, end = entry.chunk_span(index)
                out.write(await engine.read(source, start, end - start))

        _write_atomically(target, lambda out: self._run(lambda engine: copy(engine, out), manifest.repo))

    def _run(self, work: Callable[[Any], Any], repo: RepoRef) -> Any:
        import trio

        from .engine import EngineConfig, FetchEngine
        from .remote.router import StoreConfig
        from .tiers.memory import MemoryTier

        specs = [f"{repo.provider}:*"] if repo.provider != "file" else []
        remote = StoreConfig.from_env(specs).remotes(chunk_size=4 << 20).get(repo.provider)
        if remote is None:
            raise NotFound(f"{repo}: no file root {repo.org!r} is configured here (MMFS_STORES=file:<name>=<path>)")

        async def main() -> Any:
            async with FetchEngine([MemoryTier(_DIRECT_MEMORY)], remote, None, EngineConfig()) as engine:
                return await work(engine)

        try:
            return trio.run(main)
        except BaseExceptionGroup as group:
            from .errors import first_error

            error = first_error(group)
            if error is None:
                raise
            raise error from None
