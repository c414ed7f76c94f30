"""The client library: ``hf_hub_download`` and ``snapshot_download`` that take the fastest
honest route to a model's files.

    from mmfs.client import DownloadInfo, modelmanager_download, snapshot_download
    # (or: from modelmanager_client import ...)

    path = modelmanager_download(DownloadInfo(repo_id="sentence-transformers/all-MiniLM-L6-v2",
                                              filename="model.safetensors"))
    folder = snapshot_download(DownloadInfo(repo_id="org/model", revision="v1.0"),
                               allow_patterns=["*.json", "*.safetensors"])

Routes, first that applies wins:

1. **The node's mmfs mount** (Hub models and datasets): ``MMFS_MOUNT`` when set, else every
   ``fuse.mmfs`` mount of the machine (``/proc/self/mountinfo``). The answer is a path on
   the mount: nothing is copied and nothing is read, so loading stays lazy. It is the
   commit directory's path when ``revision`` is a commit, the branch's (``…/main/…``, a
   symlink to the commit) otherwise; under ``huggingface/`` for a model,
   ``huggingface-datasets/`` for a dataset. A mount that does not show the file (unknown repo,
   gated for the node, a revision with ``/``, a dead mount) is passed over, so the
   backend or the Hub gives the authoritative answer. Not used with ``local_dir`` (the
   caller asked for files in that folder) nor ``local_files_only`` (the cache only).
2. **The cluster backend** at ``host`` (``http://<host>:3000`` unless ``host`` names a
   scheme or a port), when it answers ``/healthz``: huggingface_hub itself downloads
   through the backend's Hub API into the Hub cache (``HF_HUB_CACHE`` or ``cache_dir``),
   or ``local_dir``, so a later ``hf_hub_download`` finds the files without a network call.
   Any answer of the backend stands (a missing repo is missing, a gated one gated, an
   integrity failure is not retried around the backend); only a backend that cannot be
   reached is passed over.
3. **The provider**: huggingface_hub against ``HF_ENDPOINT`` (read at each call), else
   the Hub.

Arguments mean what they mean to ``hf_hub_download``; errors are huggingface_hub's
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``,
``GatedRepoError``, ``LocalEntryNotFoundError``, …), and a :class:`ValueError` naming
the problem for an unknown provider or a bad argument. Progress bars are
huggingface_hub's (tqdm) while standard error is a terminal, and off otherwise (logs and
pipes get no bar lines; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` turns them off on a terminal
too). The route taken is logged at INFO on the ``mmfs.client`` logger.
"""

from __future__ import annotations

import inspect
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from .names import STORE_PROVIDERS

log = logging.getLogger(__name__)

__all__ = ["DownloadInfo", "modelmanager_download", "snapshot_download", "backend_url", "mount_roots"]

DEFAULT_HOST = "modelmanager-server"
DEFAULT_PORT = 3000
#: Provider spellings accepted (case-insensitive) and the name the mount and backend use.
PROVIDERS = {"huggingface": "huggingface", "hf": "huggingface", "hub": "huggingface",
             "s3": "s3", "azure": "azure", "file": "file"}
REPO_TYPES = ("model", "dataset", "space")
#: Repo types the node mount and the backend serve; spaces go to the provider.
CLUSTER_REPO_TYPES = ("model", "dataset")
#: Seconds to wait for a backend's ``/healthz``; the answer is remembered for PROBE_TTL s.
PROBE_TIMEOUT = 3.0
PROBE_TTL = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class DownloadInfo:
    """What to fetch and where to ask for it.

    ``repo_id`` ``"<org>/<name>"``; ``filename`` the file in the repo (``None`` for
    :func:`snapshot_download`); ``host`` the cluster backend (``None`` or ``""``: none);
    ``provider`` ``"HuggingFace"`` (case-insensitive); ``revision`` a branch, tag or commit
    (``None``: ``main``); ``repo_type`` ``"model"``, ``"dataset"`` or ``"space"``;
    ``subfolder`` a folder in the repo that holds ``filename``; ``token`` as for
    huggingface_hub (``None``: ``HF_TOKEN`` or the stored login, ``False``: none).
    """

    repo_id: str
    filename: str | None = None
    host: str | None = DEFAULT_HOST
    provider: str = "HuggingFace"
    revision: str | None = None
    repo_type: str | None = "model"
    subfolder: str | None = None
    token: str | bool | None = None


@dataclass(frozen=True)
class _Request:
    info: DownloadInfo
    provider: str
    repo_type: str
    path: str | None  # subfolder/filename, checked; None for a snapshot
    cluster_repo: Any  # mmfs.names.RepoRef (provider per repo type) when the mount and the backend can serve it


# -- checking the arguments -----------------------------------------------------------


def _info(info: DownloadInfo | None, overrides: dict[str, Any], what: str) -> DownloadInfo:
    known = {f.name for f in fields(DownloadInfo)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword arguments: {', '.join(unknown)}")
    if info is None:
        if "repo_id" not in overrides:
            raise TypeError(f"{what}() needs a DownloadInfo or repo_id=…")
        return DownloadInfo(**overrides)
    if isinstance(info, str):
        return DownloadInfo(repo_id=info, **overrides)
    if not isinstance(info, DownloadInfo):
        raise TypeError(f"{what}() takes a DownloadInfo, not {type(info).__name__}")
    return replace(info, **overrides) if overrides else info


def _check(info: DownloadInfo, want_file: bool) -> _Request:
    from .errors import InvalidName
    from .names import check_path, hub_provider, parse_repo_id

    if not isinstance(info.repo_id, str) or not info.repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string like 'org/name', not {info.repo_id!r}")
    if not isinstance(info.provider, str) or info.provider.lower() not in PROVIDERS:
        raise ValueError(f"unknown provider {info.provider!r}: the providers known here are 'HuggingFace', "
                         "'S3', 'Azure' and 'file'")
    provider = PROVIDERS[info.provider.lower()]
    repo_type = "model" if info.repo_type is None else info.repo_type
    if repo_type not in REPO_TYPES:
        raise ValueError(f"invalid repo_type {info.repo_type!r}: use one of {', '.join(REPO_TYPES)}")
    if info.revision is not None and (not isinstance(info.revision, str) or not info.revision):
        raise ValueError(f"revision must be a branch, tag or commit, not {info.revision!r}")
    if info.host is not None and not isinstance(info.host, str):
        raise ValueError(f"host must be a host name or URL, not {info.host!r}")
    if info.token is not None and not isinstance(info.token, (str, bool)):
        raise ValueError("token must be a string, True, False or None")
    if info.subfolder is not None and not isinstance(info.subfolder, str):
        raise ValueError(f"subfolder must be a string, not {info.subfolder!r}")
    path = None
    if want_file:
        if not isinstance(info.filename, str) or not info.filename:
            raise ValueError(f"filename must be a non-empty string, not {info.filename!r}")
        path = f"{info.subfolder.strip('/')}/{info.filename}" if info.subfolder else info.filename
        try:
            check_path(path)
        except InvalidName as exc:
            raise ValueError(f"invalid filename {path!r}: {exc}") from None
    elif info.filename is not None:
        raise ValueError("snapshot_download takes no filename (use allow_patterns to select files)")
    cluster_repo = None
    if provider in STORE_PROVIDERS:
        if repo_type != "model":
            raise ValueError(f"repo_type {repo_type!r} is for the Hub; a {info.provider} model is a bucket and a prefix")
        try:
            cluster_repo = parse_repo_id(info.repo_id, provider)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
    elif repo_type in CLUSTER_REPO_TYPES:
        try:
            cluster_repo = parse_repo_id(info.repo_id, hub_provider(repo_type))
        except InvalidName as exc:
            # A repo id the cluster cannot name ("gpt2"): the provider alone can serve it.
            log.debug("%s: not servable by the mount or the backend (%s)", info.repo_id, exc)
    backend_url(info.host)  # a malformed host is the caller's mistake, whatever route wins
    return _Request(info, provider, repo_type, path, cluster_repo)


def backend_url(host: str | None) -> str | None:
    """The backend's base URL for ``host``: ``http://<host>:3000`` unless ``host`` has a
    scheme (``https://mm.example``) or a port (``mm:8080``); ``None`` for no host."""
    if host is None or not host.strip():
        return None
    host = host.strip().rstrip("/")
    if "://" in host:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid host {host!r}: expected a host name, host:port or an http(s) URL")
        return host
    parts = urlsplit("//" + host)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid host {host!r}: bad port") from None
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        raise ValueError(f"invalid host {host!r}: expected a host name, host:port or an http(s) URL")
    return f"http://{host}" if port else f"http://{host}:{DEFAULT_PORT}"


# -- route 1: the mount ---------------------------------------------------------------


def mount_roots() -> list[str]:
    """Where to look for mmfs mounts: ``MMFS_MOUNT`` when set (``""`` or ``none``: no
    mount), else every ``fuse.mmfs`` mount of this machine showing the filesystem's root
    (bind mounts of one model, as the CSI plugin makes, are not roots)."""
    explicit = os.environ.get("MMFS_MOUNT")
    if explicit is not None:
        explicit = explicit.strip()
        return [] if explicit.lower() in ("", "none") else [explicit]
    from .mountutil import mmfs_mounts

    try:
        return [m.mountpoint for m in mmfs_mounts() if m.root == "/"]
    except OSError:  # no /proc: no mounts we could know of
        return []


def _on_mount(request: _Request) -> str | None:
    """The path on a mount that shows the file (or the revision folder), else ``None``."""
    from .errors import InvalidName
    from .names import check_revision

    repo = request.cluster_repo
    revision = request.info.revision or "main"
    try:
        check_revision(revision)
    except InvalidName:
        return None
    if repo is None or "/" in revision:  # refs/pr/1 is no path component on the mount
        return None
    for root in mount_roots():
        folder = Path(root) / repo.provider / repo.org / repo.name / revision
        target = folder / request.path if request.path else folder
        try:
            st = os.stat(target)  # the manifest only: no content is fetched
        except OSError as exc:
            log.debug("%s: not on the mount at %s (%s)", target, root, exc.strerror)
            continue
        if stat.S_ISREG(st.st_mode) if request.path else stat.S_ISDIR(st.st_mode):
            return str(target)
    return None


# -- route 2: the backend -------------------------------------------------------------

_probes: dict[str, tuple[bool, float]] = {}
_probes_lock = threading.Lock()


def _backend_up(url: str) -> bool:
    """Whether the backend at ``url`` answers ``/healthz`` (remembered for PROBE_TTL s)."""
    import httpx

    now = time.monotonic()
    with _probes_lock:
        known = _probes.get(url)
    if known is not None and known[1] > now:
        return known[0]
    try:
        response = httpx.get(f"{url}/healthz", timeout=PROBE_TIMEOUT)
        up = response.status_code == 200
        reason = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        up, reason = False, f"{type(exc).__name__}: {exc}"
    if not up:
        log.info("backend %s cannot be reached (%s); passing it over", url, reason)
    with _probes_lock:
        _probes[url] = (up, now + PROBE_TTL)
    return up


def _unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the server could not be reached at all,
    as opposed to an answer from it."""
    import httpx

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError)):
            return True
        if type(current).__name__ in ("ConnectionError", "ConnectTimeout") and \
                type(current).__module__.startswith("requests"):  # huggingface_hub < 1.0
            return True
        current = current.__cause__ or current.__context__
    return False


def _through(request: _Request, endpoint: str | None, call: Callable[[str | None], T], *,
             fall_back: Callable[[], T] | None) -> T:
    try:
        return call(endpoint)
    except Exception as exc:
        if fall_back is None or not _unreachable(exc):
            raise
        log.warning("backend %s became unreachable (%s); going to the provider", endpoint, exc)
        with _probes_lock:
            _probes[endpoint or ""] = (False, time.monotonic() + PROBE_TTL)
        return fall_back()


# -- the routes together --------------------------------------------------------------


def _progress(function: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments that turn ``function``'s progress bars off when standard error is
    no terminal (tqdm would write bar lines into logs and pipes); none on a terminal, where
    huggingface_hub shows its bars unless ``HF_HUB_DISABLE_PROGRESS_BARS`` says otherwise."""
    try:
        terminal = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        terminal = False
    if terminal or "tqdm_class" not in inspect.signature(function).parameters:
        return {}
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return {"tqdm_class": Silent}


def _provider_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _route(request: _Request, what: str, *, local_dir: Any, local_files_only: bool,
           call: Callable[[str | None], str]) -> str:
    from huggingface_hub import constants

    offline = local_files_only or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if local_dir is None and not local_files_only:
        found = _on_mount(request)
        if found is not None:
            log.info("%s: on the mmfs mount: %s", what, found)
            return found
    if offline:
        return call(None)
    url = backend_url(request.info.host) if request.cluster_repo is not None else None
    if url is not None and _backend_up(url):
        log.info("%s: through the backend %s", what, url)
        return _through(request, url, call, fall_back=lambda: call(_provider_endpoint()))
    endpoint = _provider_endpoint()
    log.info("%s: from the provider (%s)", what, endpoint or "the Hub")
    return call(endpoint)


def modelmanager_download(info: DownloadInfo | str | None = None, /, *, cache_dir: str | os.PathLike[str] | None = None,
                          local_dir: str | os.PathLike[str] | None = None, force_download: bool = False,
                          local_files_only: bool = False, **fields_: Any) -> str:
    """A local path to one file, like ``huggingface_hub.hf_hub_download``.

    ``info`` is a :class:`DownloadInfo`; its fields may also be given (or overridden) as
    keywords: ``modelmanager_download(repo_id="org/name", filename="config.json")``.
    ``cache_dir``, ``local_dir``, ``force_download`` and ``local_files_only`` mean what
    they mean to ``hf_hub_download``. The path is on the node's mmfs mount when one shows
    the file (nothing copied), else in the Hub cache (or ``local_dir``), downloaded through
    the backend at ``info.host`` when it answers, else from the provider. See the module
    docstring for the routes and errors.
    """
    from huggingface_hub import hf_hub_download

    request = _check(_info(info, fields_, "modelmanager_download"), want_file=True)
    if force_download and local_files_only:
        raise ValueError("force_download=True and local_files_only=True contradict each other")
    i = request.info
    if request.provider in STORE_PROVIDERS:
        from . import client_stores

        return client_stores.download(request, cache_dir=cache_dir, local_dir=local_dir, force_download=force_download,
                                      local_files_only=local_files_only)

    def call(endpoint: str | None) -> str:
        return hf_hub_download(i.repo_id, i.filename, subfolder=i.subfolder or None, repo_type=request.repo_type,
                               revision=i.revision, cache_dir=cache_dir, local_dir=local_dir,
                               force_download=force_download, token=i.token, local_files_only=local_files_only,
                               endpoint=endpoint, **_progress(hf_hub_download))

    return _route(request, f"{i.repo_id}/{request.path}", local_dir=local_dir,
                  local_files_only=local_files_only, call=call)


def snapshot_download(info: DownloadInfo | str | None = None, /, *,
                      allow_patterns: list[str] | str | None = None, ignore_patterns: list[str] | str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, local_dir: str | os.PathLike[str] | None = None,
                      force_download: bool = False, local_files_only: bool = False, max_workers: int = 8,
                      **fields_: Any) -> str:
    """A local folder holding a whole repo (or the files ``allow_patterns`` /
    ``ignore_patterns`` select), like ``huggingface_hub.snapshot_download``.

    On the mount the folder is the revision's, every file visible and none read (the
    patterns only limit what a download copies). Otherwise huggingface_hub downloads the
    selected files through the backend, else from the provider, into the Hub cache (or
    ``local_dir``) and the folder is that snapshot's. ``info.filename`` must be ``None``.
    """
    from huggingface_hub import snapshot_download as hf_snapshot_download

    request = _check(_info(info, fields_, "snapshot_download"), want_file=False)
    if force_download and local_files_only:
        raise ValueError("force_download=True and local_files_only=True contradict each other")
    if request.info.subfolder:
        raise ValueError("snapshot_download takes no subfolder (use allow_patterns=['<folder>/*'])")
    i = request.info
    if request.provider in STORE_PROVIDERS:
        from . import client_stores

        return client_stores.download(request, cache_dir=cache_dir, local_dir=local_dir, force_download=force_download,
                                      local_files_only=local_files_only,
                                      patterns=client_stores.selector(allow_patterns, ignore_patterns))

    def call(endpoint: str | None) -> str:
        return hf_snapshot_download(i.repo_id, repo_type=request.repo_type, revision=i.revision,
                                    cache_dir=cache_dir, local_dir=local_dir, force_download=force_download,
                                    token=i.token, local_files_only=local_files_only,
                                    allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                    max_workers=max_workers, endpoint=endpoint, **_progress(hf_snapshot_download))

    return _route(request, f"{i.repo_id}@{i.revision or 'main'}", local_dir=local_dir,
                  local_files_only=local_files_only, call=call)
