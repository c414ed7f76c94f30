"""A Hub-compatible HTTP server over a folder of model repos, for tests, benchmarks and the demo.

Layout: every ``ROOT/<org>/<name>/`` is a model repo, every ``ROOT/datasets/<org>/<name>/``
a dataset repo (``datasets`` is no user or org name on the Hub either), served at the Hub's
dataset routes (``/api/datasets/...``, ``/datasets/<org>/<name>/resolve/...``). Names
starting with ``.hub`` and ``.git`` folders are not repo content (``.gitattributes`` is).
Optional control files:

- ``ROOT/<org>/<name>/.hub/gated``: the repo is gated; the file holds the tokens that
  may download it, one per line (rewrite it to revoke one). As on the Hub, metadata
  (model info, tree) stays public; ``resolve`` answers 401 ``GatedRepo`` without
  ``Authorization: Bearer <token>``, 403 ``GatedRepo`` with a token not on the list.
  Unknown repos answer ``RepoNotFound`` with 401 to anonymous callers and 404 to callers
  with a token, as the Hub does.
- ``ROOT/<org>/<name>/.hub/private``: the repo is private; the file holds the tokens that
  may see it, one per line. To anyone else it does not exist, metadata included: it
  answers exactly as an unknown repo does (the Hub does not tell private from missing).
- ``ROOT/<org>/<name>/.hub/xet``: the repo is Xet-backed, as most on the Hub are since
  2025: ``resolve`` answers of LFS files carry ``X-Xet-Hash`` and a
  ``Link: <…/xet-read-token/<commit>>; rel="xet-auth"``, trees carry ``xetHash``, and the
  read-token route answers with a CAS URL that nothing listens on (a client sent around
  a proxy to the CAS fails, as it would where the CAS is out of reach).
- ``ROOT/<org>/<name>/.hub/refs.json``: a JSON list of extra refs (a branch ``"v1.0"``, a
  tag ``"refs/tags/v1.0"``, ``"refs/pr/1"``) that, like ``main``, resolve to the current commit.
- ``ROOT/.hub/users.json``: ``{"<token>": "<user name>"}``, the tokens ``/api/whoami-v2``
  knows (any other token, or none, is 401 as on the Hub).

**Read routes besides downloads**, shaped as the Hub's: ``POST .../paths-info/<rev>``
(form fields ``paths`` and ``expand``), ``GET .../commits/<rev>`` (the one commit the hub
keeps), ``GET /api/whoami-v2``, and ``tree`` with ``recursive`` and ``expand`` (which adds
``lastCommit``), paginated as the Hub does: :data:`TREE_PAGE` entries a page
(:data:`TREE_PAGE_EXPANDED` with ``expand``) and a ``Link: <...>; rel="next"`` header.

**Commits.** A repo's commit is ``sha1`` over its sorted ``"<path>\\0<git blob id>\\n"``
lines, the blob id being git's (of the LFS pointer for LFS files). The listing is
re-scanned on every request and the hashes are cached by ``(path, size, mtime, inode)``,
so changing a file moves ``main`` to a new commit. Every commit seen stays addressable by
its hash while its bytes are still readable: :meth:`Hub.push` (``POST /_hub/push``) moves a
ref to a new commit the way a ``git push`` does, keeping the bytes of the commits it
replaces (under ``.hub/objects/``, content-addressed), so old commits stay readable as on
the Hub; a file edited in place takes its old commit's bytes with it (that commit then
answers 404 ``RevisionNotFound``).

**Refs.** ``main`` is the working tree. ``push(..., ref="refs/pr/1")`` makes a commit from
``main`` plus the changes without touching the tree and points that ref at it, as a Hub
pull request does (``refs/convert/parquet`` likewise; any other name is a branch, and
``refs/tags/<t>`` a tag addressed as ``<t>``); ``delete_ref`` removes one.
``GET /api/models/<repo>/refs[?include_prs=1]`` lists them as the Hub does
(``branches``, ``tags``, ``converts``, ``pullRequests``; each ``{name, ref, targetCommit}``,
e.g. ``{"name": "1", "ref": "refs/pr/1", ...}``). Revisions with a slash arrive
percent-encoded in one path segment (``refs%2Fpr%2F1``), as ``huggingface_hub`` sends them.
``/api/models/<repo>/revision/<rev>?expand=sha`` answers only ``_id``, ``id`` and ``sha``
(the Hub's ``expand``): the cheapest way to ask where a ref points. ``HubStats.ref_checks``
counts the model-info requests that resolved a branch, tag or PR (not a 40-hex commit)
per ``"<org>/<name>@<rev>"``.

**LFS rule.** A file is LFS when its size is at least ``lfs_threshold`` (1 MiB by
default; the real model's ``model.safetensors`` is, its ``tokenizer.json`` is not) —
``.gitattributes`` is served but not interpreted. ``resolve`` answers an LFS file as
the Hub does: ``302`` to a signed URL on a second listening port (another origin, like
the Hub's CDN), with ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` and
``X-Repo-Commit``. huggingface_hub's ``HEAD`` follows only *same-origin* redirects and
reads the file's metadata from the 302 when it points elsewhere, so a second origin is
what makes the client behave exactly as against huggingface.co (auth header dropped
on the CDN request included).

**Errors** carry the Hub's ``X-Error-Code`` values and statuses, defined here and not
taken from mmfs's own error classes, so that the product is tested against the Hub's
behaviour and not against itself. **Rate limits**: the ``throttle_next`` fault answers
the next N API and content requests ``429`` with ``Retry-After: <retry_after>``.

**Control.** Counters (:class:`HubStats`), fault injection (:class:`Faults`) and the
rate cap are reachable in-process (:class:`TestHub`) and over HTTP, for a hub run as a
separate process (:class:`HubProcess`, ``python -m mmfs.testing.hub``)::

    GET  /_hub/stats     counters as JSON          POST /_hub/reset   zero the counters
    GET  /_hub/faults    the current faults        POST /_hub/faults  replace them (JSON)
    GET  /_hub/info      url, cdn_url, rate...     POST /_hub/config  {"rate": "100MB/s" | null}
    POST /_hub/push      {"repo", "files": {path: base64 | null}, "ref"} -> {"commit"}
    POST /_hub/delete_ref {"repo", "ref"}

Requests to ``/_hub/`` are neither counted nor subject to faults.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from ..remote.hub import git_ref, refs_json
from ..sizes import parse_rate
from .process import child_env, start_until_ready, stop

DEFAULT_LFS_THRESHOLD = 1 << 20
#: Corrupted responses flip the first byte of the body and every byte whose file offset
#: is a multiple of this, so any body of at least one byte changes.
CORRUPT_STRIDE = 4096
#: Bytes read per block when hashing or corrupting, and per ``sendfile`` when uncapped.
_BLOCK = 1 << 20
_UNCAPPED_SLICE = 64 << 20
#: Entries per page of a tree listing, as the Hub pages them (fewer when ``expand``).
TREE_PAGE = 1000
TREE_PAGE_EXPANDED = 50
#: The Hub's repo types with the path prefix their web routes take.
REPO_TYPES = {"model": "", "dataset": "datasets/"}


#: Control files under ``<repo>/.hub/`` (a change to any makes a new snapshot).
CONTROL_FILES = ("gated", "private", "xet", "refs.json")
#: Where Xet-backed repos send clients for bytes: nothing listens there (port 9, discard).
XET_CAS_URL = "http://127.0.0.1:9"


# ---------------------------------------------------------------------------------------
# Errors and names, as the Hub has them (independent of mmfs's own tables and rules)


class HubError(Exception):
    """An error answer: ``status``, the Hub's ``X-Error-Code`` (``None``: no header)."""

    status = 400
    code: str | None = None


class RepoNotFound(HubError):
    status, code = 404, "RepoNotFound"  # 401 to anonymous callers (see _Handler._error)


class RevisionNotFound(HubError):
    status, code = 404, "RevisionNotFound"


class EntryNotFound(HubError):
    status, code = 404, "EntryNotFound"


class GatedRepo(HubError):
    status, code = 403, "GatedRepo"


class NotLoggedIn(GatedRepo):
    """A gated repo asked for without a token: the Hub says 401, not 403."""

    status = 401


class NoRoute(HubError):
    status = 404


class BadName(HubError):
    status = 400


# The Hub's repo names: letters, digits, '-', '_', '.', not starting or ending with '-'
# or '.', no '--' or '..', at most 96 characters.
_REPO_PART = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def _check_repo_part(part: str) -> None:
    if not _REPO_PART.match(part):
        raise BadName(f"Repository name part {part[:100]!r} is not valid")


def _check_revision(revision: str) -> None:
    if not revision or len(revision) > 255 or ".." in revision or revision.startswith("/") or "\0" in revision:
        raise RevisionNotFound(f"Invalid rev id: {revision[:100]}")


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or len(path) > 4096 or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise EntryNotFound(f"invalid path {path[:100]!r}")


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _tokens(text: str | None) -> frozenset[str]:
    return frozenset(line.strip() for line in (text or "").splitlines() if line.strip())


def xet_hash(sha256: str) -> str:
    """A stand-in Xet hash of an LFS file: 64 hex digits, fixed per content (the real one
    is a Merkle hash over Xet chunks; nothing here reads it, it only has to be there)."""
    return hashlib.sha256(f"xet\0{sha256}".encode()).hexdigest()

# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a repo as the hub serves it."""

    path: str  # inside the repo, '/'-separated
    abspath: Path
    size: int
    mtime_ns: int
    blob_id: str  # git blob id: of the content, or of the LFS pointer for LFS files
    sha256: str | None  # LFS files only
    pointer_size: int | None  # LFS files only

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """What the Hub's (``X-Linked-``)``ETag`` carries: the sha256 for LFS, else the blob id."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class RepoSnapshot:
    """A repo at its current commit."""

    repo_id: str
    commit: str
    files: Mapping[str, HubFile]  # sorted by path
    last_modified: float
    gated_token: str | None  # the gated file's text: the tokens allowed, one per line
    refs: tuple[str, ...]  # names that follow the working tree (.hub/refs.json)
    repo_type: str = "model"
    private_tokens: str | None = None  # the private file's text, likewise
    xet: bool = False

    @property
    def hub_path(self) -> str:
        """``org/name`` for a model, ``datasets/org/name`` for a dataset: the repo's web
        route, and how counters and fault selectors name it."""
        return REPO_TYPES[self.repo_type] + self.repo_id

    @property
    def directories(self) -> list[str]:
        dirs = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return sorted(dirs)


@dataclass(frozen=True)
class Faults:
    """Faults to inject into *content* requests (GETs that answer file bytes).

    ``corrupt``: file selectors whose bytes are served flipped (see :data:`CORRUPT_STRIDE`):
    a repo path (``"model.safetensors"``), ``"<org>/<name>/<path>"``, a sha256 or blob id,
    or ``"*"`` for every file. ``fail_next``: the next N content requests answer
    ``fail_status`` (500 or 503). ``reset_next``: the next N content requests send half
    their body, then reset the connection (TCP RST). ``latency_s``: added before every
    request's answer. ``fail_next`` and ``reset_next`` count down as they fire.
    ``corrupt_bytes``: when positive, ``corrupt`` lasts for that many bytes only: each
    corrupted response takes its length off (a response that starts within the count is
    corrupted whole), and once the count is used up ``corrupt`` is cleared, so "the first
    pass over a file is bad, every later one good" needs no switching at the right moment.
    """

    corrupt: tuple[str, ...] = ()
    corrupt_bytes: int = 0
    fail_next: int = 0
    fail_status: int = 503
    reset_next: int = 0
    latency_s: float = 0.0
    throttle_next: int = 0
    retry_after: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "corrupt", tuple(self.corrupt))
        if self.fail_status not in (500, 502, 503, 504):
            raise ValueError(f"fail_status must be 500, 502, 503 or 504, not {self.fail_status}")
        if min(self.fail_next, self.reset_next, self.latency_s, self.corrupt_bytes, self.throttle_next,
               self.retry_after) < 0:
            raise ValueError("fail_next, reset_next, latency_s, corrupt_bytes, throttle_next and retry_after "
                             "must not be negative")

    def corrupts(self, repo_id: str, entry: HubFile) -> bool:
        return bool(self.corrupt) and not {"*", entry.path, f"{repo_id}/{entry.path}", entry.blob_id,
                                           entry.sha256}.isdisjoint(self.corrupt)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "corrupt": list(self.corrupt)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Faults":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class HubStats:
    """What the hub has served since it started or was last reset.

    ``requests_by_kind`` keys: ``model_info``, ``dataset_info``, ``tree``, ``paths_info``,
    ``commits``, ``whoami``, ``resolve_head``, ``resolve_get``,
    ``lfs_head``, ``lfs_get``, ``other``. ``bytes_served`` counts file bytes actually sent
    (bodies of resolve and LFS GETs), ``bytes_by_path`` per ``"<org>/<name>/<path>"`` (datasets:
    ``"datasets/<org>/<name>/<path>"``),
    ``bytes_by_hash`` per sha256 (LFS) or blob id. ``faults`` counts injected
    ``failed``, ``reset`` and ``corrupted`` responses.
    """

    requests: int = 0
    requests_by_kind: Mapping[str, int] = field(default_factory=dict)
    statuses: Mapping[int, int] = field(default_factory=dict)
    bytes_served: int = 0
    bytes_by_path: Mapping[str, int] = field(default_factory=dict)
    bytes_by_hash: Mapping[str, int] = field(default_factory=dict)
    faults: Mapping[str, int] = field(default_factory=dict)
    ref_checks: Mapping[str, int] = field(default_factory=dict)

    @property
    def content_requests(self) -> int:
        return self.requests_by_kind.get("resolve_get", 0) + self.requests_by_kind.get("lfs_get", 0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "HubStats":
        return cls(**{**data, "statuses": {int(k): v for k, v in data["statuses"].items()}})


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._kinds: Counter[str] = Counter()
            self._statuses: Counter[int] = Counter()
            self._bytes = 0
            self._by_path: Counter[str] = Counter()
            self._by_hash: Counter[str] = Counter()
            self._faults: Counter[str] = Counter()
            self._ref_checks: Counter[str] = Counter()

    def ref_check(self, what: str) -> None:
        with self._lock:
            self._ref_checks[what] += 1

    def request(self, kind: str) -> None:
        with self._lock:
            self._requests += 1
            self._kinds[kind] += 1

    def status(self, status: int) -> None:
        with self._lock:
            self._statuses[status] += 1

    def sent(self, path: str, content_hash: str, n: int) -> None:
        with self._lock:
            self._bytes += n
            self._by_path[path] += n
            self._by_hash[content_hash] += n

    def fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def snapshot(self) -> HubStats:
        with self._lock:
            return HubStats(self._requests, dict(self._kinds), dict(self._statuses), self._bytes,
                            dict(self._by_path), dict(self._by_hash), dict(self._faults), dict(self._ref_checks))


class RateLimiter:
    """An aggregate bandwidth cap shared by every response of a hub.

    Each sender reserves its next slice on one shared timeline and sleeps until its turn,
    so concurrent streams interleave slice by slice and their sum never exceeds the rate
    (no burst credit accumulates while idle). ``rate=None`` disables the cap.
    """

    def __init__(self, rate: float | None = None) -> None:
        self._lock = threading.Lock()
        self._next = 0.0
        self.rate = rate

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        #: Slice size: about 10 ms of the rate, so streams share at a fine grain.
        self.slice = _UNCAPPED_SLICE if rate is None else int(min(max(rate / 100, 16 << 10), 1 << 20))

    def acquire(self, n: int) -> None:
        rate = self._rate
        if rate is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / rate
        if start > now:
            time.sleep(start - now)


# ---------------------------------------------------------------------------------------
# The hub's model: repos on disk


def _is_hidden(name: str) -> bool:
    return name.startswith(".hub") or name == ".git"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class Hub:
    """The hub without HTTP: scans repos, resolves revisions, keeps counters and faults."""

    def __init__(self, root: Path | str, *, lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
                 rate: float | str | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"hub root {self.root} is not a directory")
        self.lfs_threshold = lfs_threshold
        self.limiter = RateLimiter(parse_rate(rate) if isinstance(rate, str) else rate)
        self.counters = _Counters()
        self.secret = secrets.token_bytes(16)
        self.closed = False
        self._faults = Faults()
        self._faults_lock = threading.Lock()
        self._hash_cache: dict[tuple[str, int, int, int, bool], tuple[str, str | None]] = {}
        self._snapshots: dict[str, tuple[tuple[Any, ...], RepoSnapshot]] = {}
        self._lfs_by_sha: dict[str, HubFile] = {}
        self._lock = threading.Lock()
        self._repo_locks: dict[str, threading.Lock] = {}
        self._history: dict[str, dict[str, RepoSnapshot]] = {}  # repo id -> commit -> snapshot
        self._pushed: dict[str, dict[str, str]] = {}  # repo id -> git ref made by push -> commit
        self.objects = self.root / ".hub-objects"  # bytes of replaced files, by etag

    # -- faults

    @property
    def faults(self) -> Faults:
        with self._faults_lock:
            return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._faults_lock:
            self._faults = faults

    def take_fault(self) -> str | None:
        """For one content request: ``"fail"``, ``"reset"`` or ``None``, counting down."""
        with self._faults_lock:
            if self._faults.fail_next:
                self._faults = replace(self._faults, fail_next=self._faults.fail_next - 1)
                return "fail"
            if self._faults.reset_next:
                self._faults = replace(self._faults, reset_next=self._faults.reset_next - 1)
                return "reset"
        return None

    def take_throttle(self) -> int | None:
        """For one API or content request: the ``Retry-After`` seconds of a 429, or ``None``."""
        with self._faults_lock:
            if not self._faults.throttle_next:
                return None
            self._faults = replace(self._faults, throttle_next=self._faults.throttle_next - 1)
            return self._faults.retry_after

    def take_corruption(self, repo_id: str, entry: HubFile, length: int) -> bool:
        """Whether a response of ``length`` bytes of ``entry`` goes out corrupted, using up
        ``corrupt_bytes`` when that is set."""
        with self._faults_lock:
            faults = self._faults
            if not faults.corrupts(repo_id, entry):
                return False
            if faults.corrupt_bytes:
                left = faults.corrupt_bytes - length
                self._faults = replace(faults, corrupt_bytes=left) if left > 0 else \
                    replace(faults, corrupt=(), corrupt_bytes=0)
            return True

    # -- repos

    def snapshot(self, org: str, name: str, repo_type: str = "model") -> RepoSnapshot:
        """The repo ``org/name`` of ``repo_type`` at its current commit; :class:`RepoNotFound` if absent."""
        _check_repo_part(org)
        _check_repo_part(name)
        repo_id = f"{org}/{name}"
        hub_path = REPO_TYPES[repo_type] + repo_id
        repo_dir = self.root / hub_path
        if not repo_dir.is_dir() or (repo_type == "model" and org == "datasets"):
            raise RepoNotFound(f"Repository {repo_id} not found")
        with self._lock:
            repo_lock = self._repo_locks.setdefault(hub_path, threading.Lock())
        with repo_lock:
            listing = self._scan(repo_dir)
            key = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, _, st in listing)
            key += tuple(self._control_file(repo_dir / ".hub" / name) for name in CONTROL_FILES)
            cached = self._snapshots.get(hub_path)
            if cached and cached[0] == key:
                return cached[1]
            snap = replace(self._build(repo_id, repo_dir, listing), repo_type=repo_type)
            self._snapshots[hub_path] = (key, snap)
        self._remember(snap)
        return snap

    def _remember(self, snap: RepoSnapshot) -> None:
        with self._lock:
            self._history.setdefault(snap.hub_path, {}).setdefault(snap.commit, snap)
            for entry in snap.files.values():
                if entry.sha256:
                    self._lfs_by_sha[entry.sha256] = entry

    def commit(self, repo_id: str, repo_type: str = "model") -> str:
        org, _, name = repo_id.partition("/")
        return self.snapshot(org, name, repo_type).commit

    def user(self, authorization: str | None) -> str | None:
        """The user a ``Bearer`` token belongs to (``ROOT/.hub/users.json``), else ``None``."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            users = json.loads((self.root / ".hub" / "users.json").read_text())
        except FileNotFoundError:
            return None
        known = [name for known_token, name in users.items()
                 if hmac.compare_digest(known_token.encode(), token.encode("latin-1", "replace"))]
        return known[0] if known else None

    def at(self, snap: RepoSnapshot, revision: str) -> RepoSnapshot:
        """The repo of ``snap`` (its ``main``) at ``revision``: a branch, a ref made by
        :meth:`push`, or a commit whose bytes are still readable; :class:`RevisionNotFound`
        otherwise."""
        _check_revision(revision)
        refs = self.refs(snap)
        commit = next((refs[ref] for ref in (git_ref(revision), f"refs/tags/{revision}") if ref in refs),
                      revision if _is_commit(revision) else "")
        if commit == snap.commit:
            return snap
        with self._lock:
            found = self._history.get(snap.hub_path, {}).get(commit)
        if found is None or not all(self.readable(entry) for entry in found.files.values()):
            raise RevisionNotFound(f"Invalid rev id: {revision}")
        return found

    def refs(self, snap: RepoSnapshot) -> dict[str, str]:
        """Every ref of the repo (``refs/heads/main`` included), as a full git ref -> its commit."""
        with self._lock:
            pushed = dict(self._pushed.get(snap.hub_path, {}))
        return {git_ref(name): snap.commit for name in ("main", *snap.refs)} | pushed

    def readable(self, entry: HubFile) -> Path | None:
        """Where the bytes of ``entry`` are now: its file while unchanged, else the copy
        :meth:`push` kept when it replaced the file; ``None`` once they are gone."""
        for path in (entry.abspath, self.objects / entry.etag):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size == entry.size and (path != entry.abspath or st.st_mtime_ns == entry.mtime_ns):
                return path
        return None

    def lfs_file(self, sha256: str) -> HubFile | None:
        """The LFS file with this sha256, if its bytes are still readable."""
        with self._lock:
            entry = self._lfs_by_sha.get(sha256)
        return entry if entry is not None and self.readable(entry) is not None else None

    # -- pushes

    def push(self, repo_id: str, files: Mapping[str, bytes | None], *, ref: str = "main",
             repo_type: str = "model") -> str:
        """Commit ``files`` (path -> new bytes, ``None`` deletes) on top of ``main`` and
        point ``ref`` at the result; return the new commit.

        ``main``: the working tree changes (each file replaced by a rename, the replaced
        bytes kept under :attr:`objects`), so every older commit stays readable. Any other
        ref (``refs/pr/1``): the commit is made beside the tree, which does not change."""
        org, _, name = repo_id.partition("/")
        base = self.snapshot(org, name, repo_type)
        _check_revision(ref)
        for path in files:
            _check_path(path)
            if any(_is_hidden(part) for part in path.split("/")):
                raise ValueError(f"{path!r} is not repo content")
        self.objects.mkdir(exist_ok=True)
        if git_ref(ref) == "refs/heads/main":
            repo_dir = self.root / base.hub_path
            with self._lock:
                repo_lock = self._repo_locks.setdefault(base.hub_path, threading.Lock())
            with repo_lock:  # a snapshot sees all the changes or none: no half-pushed commit
                self._replace(repo_dir, base, files)
            return self.snapshot(org, name, repo_type).commit
        entries = dict(base.files)
        for path, data in files.items():
            if data is None:
                entries.pop(path, None)
                continue
            scratch = self.objects / f".push-{secrets.token_hex(4)}"
            scratch.write_bytes(data)
            lfs = len(data) >= self.lfs_threshold
            blob_id, sha256 = self._hashes(scratch, scratch.stat(), lfs)
            stored = self.objects / (sha256 or blob_id)
            os.replace(scratch, stored)
            st = stored.stat()
            entries[path] = HubFile(path, stored, st.st_size, st.st_mtime_ns, blob_id, sha256,
                                    len(lfs_pointer(sha256, st.st_size)) if sha256 else None)
        ordered = dict(sorted(entries.items()))
        snap = replace(base, commit=commit_id(ordered), files=ordered, last_modified=time.time(), refs=())
        self._remember(snap)
        with self._lock:
            self._pushed.setdefault(snap.hub_path, {})[git_ref(ref)] = snap.commit
        return snap.commit

    def delete_ref(self, repo_id: str, ref: str, repo_type: str = "model") -> None:
        """Remove a ref made by :meth:`push` (its commit stays readable by hash)."""
        with self._lock:
            if self._pushed.get(REPO_TYPES[repo_type] + repo_id, {}).pop(git_ref(ref), None) is None:
                raise RevisionNotFound(f"no ref {ref} in {repo_id}")

    def _replace(self, repo_dir: Path, base: RepoSnapshot, files: Mapping[str, bytes | None]) -> None:
        """Apply a push to the working tree, each replaced file's bytes kept first."""
        for path, data in files.items():
            old = base.files.get(path)
            if old is not None:
                self._keep(old)
            target = repo_dir / path
            if data is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = target.with_name(f".hub-push-{secrets.token_hex(4)}")
            scratch.write_bytes(data)
            os.replace(scratch, target)

    def _keep(self, entry: HubFile) -> None:
        """Keep the bytes of ``entry`` under :attr:`objects` before its file is replaced."""
        kept = self.objects / entry.etag
        source = self.readable(entry)
        if kept.exists() or source is None:
            return
        try:
            os.link(source, kept)
        except OSError:
            shutil.copyfile(source, kept)

    def sign(self, sha256: str) -> str:
        return hmac.new(self.secret, sha256.encode(), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def _control_file(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    @staticmethod
    def _scan(repo_dir: Path) -> list[tuple[str, Path, os.stat_result]]:
        listing = []
        for dirpath, dirnames, filenames in os.walk(repo_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in filenames:
                if _is_hidden(name):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:
                    continue  # a dangling link, or a file removed while we looked
                if stat.S_ISREG(st.st_mode):
                    listing.append((path.relative_to(repo_dir).as_posix(), path, st))
        listing.sort(key=lambda item: item[0])
        return listing

    def _hashes(self, path: Path, st: os.stat_result, lfs: bool) -> tuple[str, str | None]:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, lfs)
        cached = self._hash_cache.get(key)
        if cached:
            return cached
        with open(path, "rb") as f:
            if lfs:
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
                result = (git_blob_id(lfs_pointer(sha256, st.st_size)), sha256)
            else:
                hasher = hashlib.sha1(b"blob %d\0" % st.st_size)
                result = (hashlib.file_digest(f, lambda: hasher).hexdigest(), None)
        self._hash_cache[key] = result
        return result

    def _build(self, repo_id: str, repo_dir: Path, listing: list[tuple[str, Path, os.stat_result]]) -> RepoSnapshot:
        files: dict[str, HubFile] = {}
        for rel, path, st in listing:
            lfs = st.st_size >= self.lfs_threshold
            blob_id, sha256 = self._hashes(path, st, lfs)
            pointer_size = len(lfs_pointer(sha256, st.st_size)) if sha256 else None
            files[rel] = HubFile(rel, path, st.st_size, st.st_mtime_ns, blob_id, sha256, pointer_size)
        commit = commit_id(files)
        control = repo_dir / ".hub"
        gated, private = (control / name for name in ("gated", "private"))
        token = gated.read_text().strip() if gated.is_file() else None
        refs_file = control / "refs.json"
        refs = tuple(json.loads(refs_file.read_text())) if refs_file.is_file() else ()
        last_modified = max((st.st_mtime for _, _, st in listing), default=repo_dir.stat().st_mtime)
        return RepoSnapshot(repo_id, commit, files, last_modified, token, refs,
                            private_tokens=private.read_text() if private.is_file() else None,
                            xet=(control / "xet").exists())


def commit_id(files: Mapping[str, HubFile]) -> str:
    """A commit's id: sha1 over its files' ``"<path>\\0<blob id>\\n"`` lines, in path order."""
    return hashlib.sha1("".join(f"{p}\0{f.blob_id}\n" for p, f in files.items()).encode()).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def model_info_json(snap: RepoSnapshot, blobs: bool) -> dict[str, Any]:
    """``GET /api/{models,datasets}/<repo>[/revision/<rev>]`` as the Hub shapes it."""
    siblings = []
    for entry in snap.files.values():
        sibling: dict[str, Any] = {"rfilename": entry.path}
        if blobs:
            sibling.update(size=entry.size, blobId=entry.blob_id)
            if entry.sha256:
                sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        siblings.append(sibling)
    org = snap.repo_id.split("/")[0]
    model_only: dict[str, Any] = {"modelId": snap.repo_id, "library_name": None, "spaces": []} \
        if snap.repo_type == "model" else {"cardData": {}}
    return {
        "_id": hashlib.sha1(snap.hub_path.encode()).hexdigest()[:24],
        "id": snap.repo_id,
        **model_only,
        "author": org,
        "sha": snap.commit,
        "lastModified": _iso(snap.last_modified),
        "createdAt": _iso(snap.last_modified),
        "private": snap.private_tokens is not None,
        "gated": "manual" if snap.gated_token else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(f.size for f in snap.files.values()),
    }


def tree_json(snap: RepoSnapshot, path: str, recursive: bool, expand: bool = False) -> list[dict[str, Any]]:
    """``GET /api/{models,datasets}/<repo>/tree/<rev>[/<path>]``: every entry (the handler pages them)."""
    prefix = f"{path}/" if path else ""
    if path and path not in snap.directories:
        raise EntryNotFound(f"{path} does not exist on {snap.commit}" if path not in snap.files
                            else f"{path} is a file, not a folder")

    def wanted(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

    paths = [d for d in snap.directories if wanted(d)] + [p for p in snap.files if wanted(p)]
    return sorted(path_entries(snap, paths, expand), key=lambda e: e["path"])


def path_entries(snap: RepoSnapshot, paths: list[str], expand: bool) -> list[dict[str, Any]]:
    """The tree entries of ``paths`` (files and folders; unknown paths are left out, as
    ``paths-info`` does), with ``lastCommit`` when ``expand``."""
    directories = set(snap.directories)
    entries: list[dict[str, Any]] = []
    for path in dict.fromkeys(paths):
        entry = snap.files.get(path)
        if entry is not None:
            item: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": entry.path}
            if entry.sha256:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
                if snap.xet:
                    item["xetHash"] = xet_hash(entry.sha256)
        elif path in directories:
            inside = sorted(f.blob_id for p, f in snap.files.items() if p.startswith(path + "/"))
            oid = hashlib.sha1(f"{path}\0{''.join(inside)}".encode()).hexdigest()
            item = {"type": "directory", "oid": oid, "size": 0, "path": path}
        else:
            continue
        if expand:
            item["lastCommit"] = commit_json(snap, full=False)
        entries.append(item)
    return entries


def commit_json(snap: RepoSnapshot, full: bool = True) -> dict[str, Any]:
    """The repo's one commit, as ``/commits/<rev>`` lists it (``full=False``: as a tree's
    ``lastCommit``)."""
    short = {"id": snap.commit, "title": f"Upload {len(snap.files)} files", "date": _iso(snap.last_modified)}
    return {**short, "authors": [{"user": snap.repo_id.split("/")[0]}], "message": ""} if full else short


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_exclusive)`` for one satisfiable range, ``None`` to serve the whole
    file (no or unparseable or multi-range header), ``"unsatisfiable"`` for 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes="):].strip().partition("-")
    if not sep or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) \
            or (last and not last.isdigit()):
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        return (max(size - n, 0), size) if n and size else "unsatisfiable"
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last) + 1, size) if last else size


# ---------------------------------------------------------------------------------------
# HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], hub: Hub, role: str, verbose: bool) -> None:
        self.hub = hub
        self.role = role  # "api" or "cdn"
        self.verbose = verbose
        self.cdn_origin = ""  # set once the CDN listens
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def close_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Reset(Exception):
    """The connection was reset on purpose (fault injection)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mmfs-testhub/1"
    server: _Server
    _counted = False

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _head(self, status: int, headers: Mapping[str, str | int], body: bytes = b"") -> None:
        """Write the status line, headers and (unless HEAD) ``body`` in one send."""
        if self._counted:
            self.server.hub.counters.status(status)
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                 f"Date: {self.date_time_string()}", f"Server: {self.server_version}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(data + body if self.command != "HEAD" else data)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str | int] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._head(status, {"Content-Type": "application/json; charset=utf-8", "Content-Length": len(body),
                            **(headers or {})}, body)

    def _error(self, err: HubError, headers: Mapping[str, str | int] | None = None) -> None:
        message = str(err)
        extra: dict[str, str | int] = {"X-Error-Message": message.encode("ascii", "replace").decode()}
        if err.code:
            extra["X-Error-Code"] = err.code
        status = err.status
        if isinstance(err, RepoNotFound) and not self.headers.get("Authorization"):
            status = 401  # as the Hub: an anonymous caller cannot tell missing from private
        self._json(status, {"error": message}, {**extra, **(headers or {})})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._counted = False
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k.removesuffix("[]"): v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body() if self.command == "POST" else b""
        hub = self.server.hub
        try:
            if segments[:1] == ["_hub"]:
                return self._control(segments[1:], body)
            self._counted = True
            kind = self._kind(segments)
            hub.counters.request(kind)
            latency = hub.faults.latency_s
            if latency:
                time.sleep(latency)
            if kind == "other" or (self.command == "POST") != (kind == "paths_info"):
                raise NoRoute(f"no route for {self.command} {url.path}")
            retry_after = hub.take_throttle()
            if retry_after is not None:
                hub.counters.fault("throttled")
                return self._json(429, {"error": "You have exceeded our rate limit. Retry later."},
                                  {"Retry-After": retry_after})
            if kind in ("lfs_head", "lfs_get"):
                return self._lfs(segments[1], query)
            if kind == "whoami":
                return self._whoami()
            if segments[0] == "api":
                repo_type = segments[1][:-1]
                if kind == "paths_info":  # a form: paths=a&paths=b&expand=false
                    form = parse_qs(body.decode("latin-1"))
                    query = {"expand": form.get("expand", ["false"])[-1], "paths": form.get("paths", [])}
                return self._api(repo_type, segments[2], segments[3], segments[4:], query)
            repo_type = "dataset" if segments[0] == "datasets" else "model"
            web = segments[1:] if repo_type == "dataset" else segments
            return self._resolve(repo_type, web[0], web[1], web[3], "/".join(web[4:]))
        except HubError as err:
            self._error(err)
        except (ConnectionError, _Reset):
            self.close_connection = True

    def _kind(self, segments: list[str]) -> str:
        verb = "head" if self.command == "HEAD" else "get"
        if self.server.role == "cdn":
            return f"lfs_{verb}" if len(segments) == 2 and segments[0] == "lfs" else "other"
        if segments == ["api", "whoami-v2"]:
            return "whoami"
        if len(segments) >= 4 and segments[0] == "api" and segments[1] in ("models", "datasets"):
            rest = segments[4:]
            if not rest or (rest[0] == "revision" and len(rest) >= 2):
                return f"{segments[1][:-1]}_info"
            if rest == ["refs"]:
                return "refs"
            kinds = {"tree": "tree", "paths-info": "paths_info", "commits": "commits", "xet-read-token": "xet_token"}
            return kinds.get(rest[0], "other") if len(rest) >= 2 else "other"
        web = segments[1:] if segments[:1] == ["datasets"] else segments
        if len(web) >= 5 and web[2] == "resolve":
            return f"resolve_{verb}"
        return "other"

    # -- control

    def _control(self, segments: list[str], body: bytes) -> None:
        hub = self.server.hub
        route = (self.command, "/".join(segments))
        try:
            if route == ("GET", "stats"):
                return self._json(200, hub.counters.snapshot().to_json())
            if route == ("POST", "reset"):
                hub.counters.reset()
                return self._json(200, {})
            if route == ("GET", "faults"):
                return self._json(200, hub.faults.to_json())
            if route == ("POST", "faults"):
                hub.set_faults(Faults.from_json(json.loads(body or b"{}")))
                return self._json(200, hub.faults.to_json())
            if route == ("POST", "config"):
                config = json.loads(body or b"{}")
                if "rate" in config:
                    rate = config["rate"]
                    hub.limiter.rate = parse_rate(rate) if isinstance(rate, str) else rate
                return self._json(200, {"rate": hub.limiter.rate})
            if route == ("POST", "push"):
                request = json.loads(body or b"{}")
                files = {path: None if data is None else base64.b64decode(data)
                         for path, data in request["files"].items()}
                return self._json(200, {"commit": hub.push(request["repo"], files, ref=request.get("ref", "main"))})
            if route == ("POST", "delete_ref"):
                request = json.loads(body or b"{}")
                hub.delete_ref(request["repo"], request["ref"])
                return self._json(200, {})
            if route == ("GET", "info"):
                return self._json(200, {"root": str(hub.root), "cdn_url": self.server.cdn_origin,
                                        "rate": hub.limiter.rate, "lfs_threshold": hub.lfs_threshold})
        except (ValueError, TypeError, KeyError, HubError) as err:
            return self._json(400, {"error": str(err)})
        self._json(404, {"error": f"no control route {route[0]} /_hub/{route[1]}"})

    # -- the Hub API

    def _at(self, snap: RepoSnapshot, revision: str) -> RepoSnapshot:
        found = self.server.hub.at(snap, revision)
        if not _is_commit(revision):
            self.server.hub.counters.ref_check(f"{snap.hub_path}@{revision}")
        return found

    def _api(self, repo_type: str, org: str, name: str, rest: list[str], query: Mapping[str, Any]) -> None:
        hub = self.server.hub
        snap = hub.snapshot(org, name, repo_type)
        self._check_private(snap)
        if rest[0:1] == ["xet-read-token"]:
            return self._xet_token(snap, rest[1])
        if rest == ["refs"]:
            return self._json(200, refs_json(hub.refs(snap), str(query.get("include_prs", "")) in ("1", "true")))
        if not rest or rest[0] == "revision":
            info = model_info_json(self._at(snap, "/".join(rest[1:]) or "main"), query.get("blobs") == "true")
            fields = str(query.get("expand", ""))
            if fields and fields.lower() not in ("true", "false"):  # only those fields (and the ids), as the Hub
                info = {k: info[k] for k in ("_id", "id", *fields.split(",")) if k in info}
            return self._json(200, info)
        snap = self._at(snap, "/".join(rest[1:]) if rest[0] != "tree" else rest[1])
        expand = str(query.get("expand", "false")).lower() in ("true", "1")
        if rest[0] == "commits":
            return self._json(200, [commit_json(snap)])
        if rest[0] == "paths-info":
            return self._json(200, path_entries(snap, [p.strip("/") for p in query.get("paths", [])], expand))
        path = "/".join(rest[2:]).strip("/")
        if path:
            _check_path(path)
        entries = tree_json(snap, path, str(query.get("recursive", "false")).lower() in ("true", "1"), expand)
        self._paged(entries, TREE_PAGE_EXPANDED if expand else TREE_PAGE, query)

    def _paged(self, entries: list[dict[str, Any]], size: int, query: Mapping[str, Any]) -> None:
        """One page of ``entries`` from ``?cursor=`` (an offset here; opaque to clients),
        with a ``Link`` to the next page as the Hub sends it."""
        cursor = str(query.get("cursor", "0"))
        start = int(cursor) if cursor.isdigit() else 0
        headers: dict[str, str | int] = {}
        if start + size < len(entries):
            url = urlsplit(self.path)
            params = {k: v for k, v in parse_qs(url.query).items() if k != "cursor"}
            params["cursor"] = [str(start + size)]
            host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
            headers["Link"] = f'<http://{host}{url.path}?{urlencode(params, doseq=True)}>; rel="next"'
        self._json(200, entries[start:start + size], headers)

    def _whoami(self) -> None:
        user = self.server.hub.user(self.headers.get("Authorization"))
        if user is None:
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        self._json(200, {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                         "fullname": user, "orgs": [], "auth": {"type": "access_token",
                                                               "accessToken": {"displayName": "test", "role": "read"}}})

    def _resolve(self, repo_type: str, org: str, name: str, revision: str, path: str) -> None:
        hub = self.server.hub
        snap = hub.snapshot(org, name, repo_type)
        self._check_private(snap)
        self._check_gate(snap)
        snap = self._at(snap, revision)
        commit = snap.commit
        _check_path(path)
        entry = snap.files.get(path)
        if entry is None:
            return self._error(EntryNotFound(f"{path} does not exist on {commit}"), {"X-Repo-Commit": commit})
        headers: dict[str, str | int] = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if entry.sha256:
            host = (self.headers.get("Host") or "").rpartition(":")[0] or self.server.server_address[0]
            cdn = self.server.cdn_origin.replace("{host}", host)
            target = f"{cdn}/lfs/{entry.sha256}?" + urlencode(
                {"repo": snap.hub_path, "path": entry.path, "sig": hub.sign(entry.sha256)})
            headers.update({"Location": target, "ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"',
                            "X-Linked-Size": entry.size, "Content-Length": 0})
            if snap.xet:
                api = f"http://{self.headers.get('Host') or host}/api/{snap.repo_type}s/{snap.repo_id}"
                headers.update({"X-Xet-Hash": xet_hash(entry.sha256),
                                "Link": f'<{api}/xet-read-token/{commit}>; rel="xet-auth"'})
            return self._head(302, headers)
        headers["ETag"] = f'"{entry.blob_id}"'
        self._serve_file(snap.hub_path, entry, headers)

    def _presented(self, tokens: str | None) -> bool:
        auth = self.headers.get("Authorization") or ""
        return any(hmac.compare_digest(auth.encode(), f"Bearer {t}".encode()) for t in _tokens(tokens))

    def _check_private(self, snap: RepoSnapshot) -> None:
        if snap.private_tokens is not None and not self._presented(snap.private_tokens):
            raise RepoNotFound(f"Repository {snap.repo_id} not found")

    def _check_gate(self, snap: RepoSnapshot) -> None:
        if snap.gated_token is None:
            return
        if self.headers.get("Authorization") is None:
            raise NotLoggedIn(f"Access to {snap.repo_type} {snap.repo_id} is restricted. You must have access to it "
                              "and be authenticated to access it. Please log in.")
        if not self._presented(snap.gated_token):
            raise GatedRepo(f"Access to {snap.repo_type} {snap.repo_id} is restricted and you are not in the "
                            "authorized list.")

    def _xet_token(self, snap: RepoSnapshot, revision: str) -> None:
        """The Xet read-token route: a token for a CAS nobody serves here."""
        self._check_gate(snap)
        snap = self._at(snap, revision)
        expires = int(time.time()) + 3600
        self._json(200, {"accessToken": "xet-test-token", "exp": expires, "casUrl": XET_CAS_URL},
                   {"X-Xet-Cas-Url": XET_CAS_URL, "X-Xet-Access-Token": "xet-test-token",
                    "X-Xet-Token-Expiration": expires})

    def _lfs(self, sha256: str, query: Mapping[str, str]) -> None:
        hub = self.server.hub
        if not hmac.compare_digest(query.get("sig", ""), hub.sign(sha256)):
            return self._json(403, {"error": "bad or missing signature"})
        entry = hub.lfs_file(sha256)
        if entry is None:
            raise EntryNotFound(f"no LFS object {sha256}")
        headers: dict[str, str | int] = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes",
                                         "Content-Disposition": f'inline; filename="{entry.path.rsplit("/", 1)[-1]}"'}
        self._serve_file(query.get("repo", ""), entry, headers)

    # -- file bodies

    def _serve_file(self, repo_id: str, entry: HubFile, headers: dict[str, str | int]) -> None:
        hub = self.server.hub
        span = parse_range(self.headers.get("Range"), entry.size)
        if span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{entry.size}"
            return self._json(416, {"error": f"range not satisfiable for a file of {entry.size} bytes"}, headers)
        status = 200
        start, end = 0, entry.size
        if isinstance(span, tuple):
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": end - start})
        if self.command == "HEAD":
            return self._head(status, headers)
        path = hub.readable(entry)
        if path is None:
            raise EntryNotFound(f"{entry.path}: its bytes are gone from the hub")
        fault = hub.take_fault()
        faults = hub.faults
        if fault == "fail":
            hub.counters.fault("failed")
            return self._json(faults.fail_status, {"error": "injected fault"})
        corrupt = hub.take_corruption(repo_id, entry, end - start)
        if corrupt:
            hub.counters.fault("corrupted")
        if fault == "reset":
            hub.counters.fault("reset")
        self._head(status, headers)
        sent = 0
        try:
            sent = self._send_range(path, start, end if fault != "reset" else start + (end - start) // 2, corrupt)
        finally:
            hub.counters.sent(f"{repo_id}/{entry.path}", entry.etag, sent)
        if fault == "reset":
            self._abort()
        if sent != end - start:  # the file shrank under us: the promised length is a lie now
            self.close_connection = True

    def _send_range(self, path: Path, start: int, end: int, corrupt: bool) -> int:
        hub = self.server.hub
        limiter = hub.limiter
        out = self.connection.fileno()
        sent = 0
        with open(path, "rb") as f:
            fd = f.fileno()
            while start + sent < end and not hub.closed:
                n = min(limiter.slice, end - start - sent)
                if corrupt:
                    n = min(n, _BLOCK)
                limiter.acquire(n)
                if corrupt:
                    block = bytearray(os.pread(fd, n, start + sent))
                    if not block:
                        break
                    _flip(block, start + sent, first=sent == 0)
                    self.connection.sendall(block)
                    sent += len(block)
                    continue
                done = 0
                while done < n:
                    k = os.sendfile(out, fd, start + sent + done, n - done)
                    if k == 0:
                        return sent + done
                    done += k
                sent += done
        return sent

    def _abort(self) -> None:
        """Reset the connection: RST, not FIN, like a dropped peer."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the makefile holds a reference that would keep the socket open
        self.connection.close()
        raise _Reset()


def _flip(block: bytearray, offset: int, first: bool) -> None:
    first_hit = -offset % CORRUPT_STRIDE
    block[first_hit::CORRUPT_STRIDE] = bytes(b ^ 0xFF for b in block[first_hit::CORRUPT_STRIDE])
    if first and first_hit != 0:
        block[0] ^= 0xFF


# ---------------------------------------------------------------------------------------
# Running it


class _Control:
    """Stats, faults and rate of a hub; the in-process and the HTTP flavours share it."""

    def stats(self) -> HubStats:
        raise NotImplementedError

    def reset_stats(self) -> None:
        raise NotImplementedError

    def _put_faults(self, faults: Faults) -> Faults:
        raise NotImplementedError

    def set_rate(self, rate: float | str | None) -> None:
        raise NotImplementedError

    def set_faults(self, faults: Faults | None = None, **fields: Any) -> Faults:
        """Replace the faults: ``set_faults(fail_next=2)``, ``set_faults()`` to clear them all."""
        return self._put_faults(faults if faults is not None else Faults(**fields))

    def clear_faults(self) -> None:
        self._put_faults(Faults())

    def push(self, repo_id: str, files: Mapping[str, bytes | None], *, ref: str = "main") -> str:
        """Move ``ref`` to a new commit with ``files`` changed (see :meth:`Hub.push`)."""
        raise NotImplementedError

    def delete_ref(self, repo_id: str, ref: str) -> None:
        raise NotImplementedError


class TestHub(_Control):
    """The hub in this process, on background threads; a context manager.

    ``port=0`` (the default) binds a free port; ``url`` and ``cdn_url`` say where.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path | str, *, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0,
                 rate: float | str | None = None, lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
                 verbose: bool = False) -> None:
        self.hub = Hub(root, lfs_threshold=lfs_threshold, rate=rate)
        self._host, self._port, self._cdn_port, self._verbose = host, port, cdn_port, verbose
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{_url_host(host)}:{port}"

    @property
    def cdn_url(self) -> str:
        host, port = self._servers[1].server_address[:2]
        return f"http://{_url_host(host)}:{port}"

    def start(self) -> "TestHub":
        api = _Server((self._host, self._port), self.hub, "api", self._verbose)
        cdn = _Server((self._host, self._cdn_port), self.hub, "cdn", self._verbose)
        self._servers = [api, cdn]
        api.cdn_origin = cdn.cdn_origin = "http://{host}:%d" % cdn.server_address[1]
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"testhub-{server.role}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.hub.closed = True
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> "TestHub":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def commit(self, repo_id: str, repo_type: str = "model") -> str:
        """The current commit of ``repo_id`` (what ``main`` resolves to)."""
        return self.hub.commit(repo_id, repo_type)

    def stats(self) -> HubStats:
        return self.hub.counters.snapshot()

    def reset_stats(self) -> None:
        self.hub.counters.reset()

    @property
    def faults(self) -> Faults:
        return self.hub.faults

    def _put_faults(self, faults: Faults) -> Faults:
        self.hub.set_faults(faults)
        return faults

    def set_rate(self, rate: float | str | None) -> None:
        self.hub.limiter.rate = parse_rate(rate) if isinstance(rate, str) else rate

    def push(self, repo_id: str, files: Mapping[str, bytes | None], *, ref: str = "main") -> str:
        return self.hub.push(repo_id, files, ref=ref)

    def delete_ref(self, repo_id: str, ref: str) -> None:
        self.hub.delete_ref(repo_id, ref)


class HubClient(_Control):
    """Stats and faults of a hub running elsewhere, over its ``/_hub/`` endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, route: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}/_hub/{route}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stats(self) -> HubStats:
        return HubStats.from_json(self._call("GET", "stats"))

    def reset_stats(self) -> None:
        self._call("POST", "reset", {})

    @property
    def faults(self) -> Faults:
        return Faults.from_json(self._call("GET", "faults"))

    def _put_faults(self, faults: Faults) -> Faults:
        return Faults.from_json(self._call("POST", "faults", faults.to_json()))

    def set_rate(self, rate: float | str | None) -> None:
        self._call("POST", "config", {"rate": rate})

    def push(self, repo_id: str, files: Mapping[str, bytes | None], *, ref: str = "main") -> str:
        encoded = {path: None if data is None else base64.b64encode(data).decode() for path, data in files.items()}
        return self._call("POST", "push", {"repo": repo_id, "files": encoded, "ref": ref})["commit"]

    def delete_ref(self, repo_id: str, ref: str) -> None:
        self._call("POST", "delete_ref", {"repo": repo_id, "ref": ref})


class HubProcess(HubClient):
    """The hub as a child process (``python -m mmfs.testing.hub``), free of this one's GIL.

    Controlled over HTTP, so it offers the same ``stats``/``set_faults``/``set_rate`` as
    :class:`TestHub`. A context manager; ``start`` waits for the "listening" line.
    """

    def __init__(self, root: Path | str, *, host: str = "127.0.0.1", port: int = 0,
                 rate: float | str | None = None, lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
                 python: str = sys.executable) -> None:
        super().__init__("")
        self.argv = [python, "-m", "mmfs.testing.hub", "--root", str(root), "--host", host, "--port", str(port),
                     "--lfs-threshold", str(lfs_threshold)]
        if rate is not None:
            self.argv += ["--rate", str(rate)]
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> "HubProcess":
        self.proc, line = start_until_ready(self.argv, child_env(), log_path=None, timeout=timeout)
        prefix = "hub listening on "
        if not line.startswith(prefix):
            self.stop()
            raise RuntimeError(f"the hub did not start within {timeout} s: {line or 'no output'!r}")
        self.url = line[len(prefix):].strip()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM, timeout=5)
            self.proc = None

    def __enter__(self) -> "HubProcess":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfs.testing.hub", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="folder of <org>/<name>/ repos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--cdn-port", type=int, default=0, help="port of the LFS 'CDN' origin (default: free)")
    parser.add_argument("--rate", default=None, help="aggregate bandwidth cap, e.g. 100MB/s (default: none)")
    parser.add_argument("--lfs-threshold", type=int, default=DEFAULT_LFS_THRESHOLD,
                        help="files of at least this many bytes are LFS (default: 1 MiB)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        hub = TestHub(args.root, host=args.host, port=args.port, cdn_port=args.cdn_port, rate=args.rate,
                      lfs_threshold=args.lfs_threshold, verbose=args.verbose).start()
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"hub listening on {hub.url}", flush=True)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
