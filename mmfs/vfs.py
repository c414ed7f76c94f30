"""The node filesystem's core, FUSE-agnostic: namespace, inode table, reads.

The namespace, looked up lazily::

    /                                   root
    ├── .mmfs/status.json               daemon state as JSON, regenerated on each open
    ├── .access/<key>/huggingface/…     the same namespace read with another token
    │                                   (one view per CSI volume token: mmfs/access.py)
    ├── .mmfs/gc.json, gc-dry-run.json  ``mmfs gc``: opening one runs it (retention.py)
    ├── .artifacts/<id>/<path…>         published derived artifacts (mmfs.artifacts): a
    │                                   commit directory of the pseudo repo ARTIFACTS
    └── huggingface/                    provider (and huggingface-datasets/: mmfs.names.PROVIDERS)
        └── <org>/                      any valid org name (listing: what is known locally)
            └── <name>/                 a repo: exists once the remote (or the DB) knows it
                ├── main -> <commit>    branch or tag: a relative symlink, short timeouts
                ├── refs/pr/1 -> ../../<commit>   revisions with slashes, as nested folders
                └── <commit>/           immutable: long timeouts, kernel page cache kept
                    └── <path…>         files 0444, folders 0555, sizes from the manifest

A ref's symlink names the commit the engine knows now: when the ref moves (a reader's
re-resolution after ``ref_ttl``, or a move pushed by :mod:`mmfs.refwatch`), the next
``readlink`` names the new commit — the flip is that one change, so no directory ever
mixes two commits, and files already open keep reading theirs.

Looking up, listing and ``stat`` need only the manifest, never file content. Inodes are
numbered as entries are first seen, keyed by (parent inode, name), and never reused.
Entries of repos that exist are permanent (the entries of the manifests that were looked
at: thousands, not millions), so their inode numbers stay stable while mounted.

Organisations are the exception: any valid org name must answer a lookup, because the
kernel looks up ``<org>`` before ``<org>/<name>`` of a repo not seen yet, and whether
an org exists is only known once a repo under it resolves. Such an org gets a
*provisional* node: freed when the kernel forgets it (its lookup count reaches zero), and
held in an LRU of at most ``VfsConfig.max_provisional_orgs`` entries, so probing
random names cannot grow the table. A provisional org becomes permanent once a repo
under it resolves or it shows in a listing. An inode the LRU dropped while the kernel
still held it answers ESTALE, after which the kernel looks the name up afresh.

Content is gated per view: a file opens only once its view's token was checked for its
repo (:class:`~mmfs.access.AccessGate`, cached for a bounded time and checked again on a
read after that), and listings of a repo known to be restricted are asked of the remote
with the view's token. Views never share inodes, so never the kernel's page cache.

Every call raises :class:`~mmfs.errors.MmfsError` children; the FUSE adapter
(:mod:`mmfs.fuse_ops`) maps them to errnos. Calls that may reach the remote are bounded by
``VfsConfig.remote_timeout``: a reader gets EIO after it, never a hang (the fetch itself
goes on in the engine, so a retry joins it).
"""

from __future__ import annotations

import errno
from collections import OrderedDict
import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from .access import ACCESS_DIR, AccessGate, Credentials
from .chunkmap import ChunkMap
from .engine import FetchEngine, Served
from .errors import IntegrityError, InvalidName, MmfsError, NotFound, RevisionNotFound, UpstreamError, first_error
from .manifest import FileEntry, Manifest
from .artifacts import ARTIFACTS_DIR
from .names import (ARTIFACTS, PROVIDERS, STORE_BRANCH, STORE_PROVIDERS, RepoRef, check_prefix_part, check_repo_part,
                    check_revision, check_store_part, is_commit)
from .prefetch import ReadAhead, ReadAheadConfig
from .remote.base import FileSource
from .tiers.base import Chunk
from .tiers.disk import hold_for_reader

log = logging.getLogger(__name__)

ROOT_INODE = 1
CONTROL_DIR = ".mmfs"
STATUS_FILE = "status.json"


class NotADirectory(MmfsError):
    errno = errno.ENOTDIR


class IsADirectory(MmfsError):
    errno = errno.EISDIR


class NotALink(MmfsError):
    errno = errno.EINVAL


class BadHandle(MmfsError):
    errno = errno.EBADF


class ReadOnly(MmfsError):
    errno = errno.EROFS


class StaleInode(MmfsError):
    """An inode this daemon no longer holds (a provisional org the LRU dropped)."""

    errno = errno.ESTALE


@dataclass(frozen=True, slots=True)
class VfsConfig:
    #: Seconds the kernel may cache entries and attributes of commit directories and their
    #: files: a commit never changes, so this may be long.
    immutable_timeout: float = 24 * 3600.0
    #: Seconds the kernel may cache a branch or tag symlink (it moves when the branch does).
    ref_timeout: float = 1.0
    #: Seconds for the namespace above commits (providers, orgs, repos: listings grow).
    namespace_timeout: float = 10.0
    #: Longest a file-system call waits on the remote before it fails with EIO.
    remote_timeout: float = 60.0
    #: Most organisations held while no repo under them has resolved (see the module
    #: docstring): bounds what looking up random org names costs.
    max_provisional_orgs: int = 1024
    #: Seconds a view's access to a repo is trusted before the remote is asked again.
    access_ttl: float = 60.0
    #: Read-ahead knobs for every open file.
    read_ahead: ReadAheadConfig = ReadAheadConfig()
    #: Owner reported for every entry (the daemon's by default).
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


class Kind(Enum):
    ROOT = "root"
    PROVIDER = "provider"
    ORG = "org"
    REPO = "repo"
    REF = "ref"  # symlink to a commit directory
    COMMIT = "commit"
    DIR = "dir"  # folder inside a commit
    FILE = "file"
    CONTROL = "control"  # .mmfs
    STATUS = "status"  # .mmfs/status.json and the other control files
    REFS = "refs"  # <repo>/refs and <repo>/refs/<kind>: folders of revisions with slashes
    ARTIFACTS = "artifacts"  # .artifacts: one commit directory per published artifact
    ACCESS = "access"  # .access: one view per token
    VIEW = "view"  # .access/<key>: a root read with that token

    @property
    def is_dir(self) -> bool:
        return self not in (Kind.REF, Kind.FILE, Kind.STATUS)


@dataclass(slots=True)
class Node:
    inode: int
    kind: Kind
    parent: int
    name: str
    provider: str = ""
    org: str = ""
    repo: RepoRef | None = None
    commit: str = ""
    #: Path inside the commit (DIR, FILE), or the revision name (REF).
    path: str = ""
    entry: FileEntry | None = None
    #: The access view this node belongs to ("": the mount's own token).
    view: str = ""


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows for an entry, plus how long the kernel may trust it."""

    inode: int
    mode: int
    size: int
    nlink: int
    mtime_ns: int
    uid: int
    gid: int
    timeout: float

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(frozen=True, slots=True)
class OpenFile:
    """What ``open`` tells the kernel: cache the pages (immutable) or bypass the cache;
    a non-zero ``backing_id``: FUSE passthrough on that backing file (no READ reaches us)."""

    handle: int
    keep_cache: bool
    direct_io: bool
    backing_id: int = 0


class PassthroughBackend:
    """How the VFS registers backing files with the kernel; the FUSE adapter supplies the
    real one (``pyfuse3.passthrough_open``/``close``). ``open`` gets a read-only fd and
    returns a backing id, raising :class:`OSError` with the kernel's errno."""

    def open(self, fd: int) -> int:
        raise OSError(errno.EOPNOTSUPP, "FUSE passthrough is not available")

    def close(self, backing_id: int) -> None:
        pass


#: Errors of ``passthrough_open`` that say passthrough cannot work on this mount at all
#: (privileges, a cache on overlayfs, a kernel without it): it is then switched off.
_FATAL_PASSTHROUGH_ERRORS = {errno.EPERM: "no-capability", errno.EACCES: "no-capability",
                             errno.ELOOP: "stacked-filesystem", errno.ENOTTY: "unsupported",
                             errno.EOPNOTSUPP: "unsupported", errno.ENOSYS: "unsupported",
                             errno.EINVAL: "unsupported"}


@dataclass(slots=True)
class _InodeIo:
    """An inode's I/O mode while files of it are open (the kernel allows one at a time)."""

    lazy: int = 0  # handles open in cached (lazy) mode
    passthrough: int = 0  # handles open in passthrough mode, all on ``backing_id``
    backing_id: int = 0
    pinned: tuple[str, int] | None = None  # (content id, chunk size) pinned in the disk tier
    failed: bool = False  # its content failed verification while passthrough handles were open


@dataclass(slots=True)
class _Handle:
    node: Node
    source: FileSource | None = None
    read_ahead: ReadAhead | None = None
    #: Provisional chunks this handle may have seen (checked before it gets the file's end).
    served: Served | None = None
    data: bytes = b""  # virtual files: content fixed at open
    passthrough: bool = False  # the kernel serves its reads from a backing file
    auth: str | None = None  # the view's credentials, checked at open


@dataclass(frozen=True, slots=True)
class VfsStatistics:
    lookups: int
    opens: int
    reads: int
    read_bytes: int
    read_errors: int
    open_handles: int
    inodes: int
    provisional_inodes: int
    readahead_chunks: int
    readahead_resets: int
    #: File opens answered in passthrough mode, and the lazy ones with why (``cold``:
    #: not complete in the disk cache; ``lazy-open``: the inode was open lazily then; see
    #: :meth:`Vfs.open`).
    passthrough_opens: int = 0
    lazy_opens: dict[str, int] = field(default_factory=dict)
    passthrough_reads: int = 0  # READs that reached us on a passthrough handle (expected: 0)
    file_reads: int = 0  # READs of model files (``reads`` also counts .mmfs/status.json)


class _HandleServed(Served):
    """What one handle may have seen: the bytes in its inode's page cache are shared by
    every handle of that inode (a read may be answered from pages another handle's read
    brought in), so provisional chunks are noted in the inode's current record, and a
    handle's end is checked against every record current while it was open. When the
    inode's pages are dropped (:meth:`Vfs._content_failed`) it gets a fresh record:
    handles opened afterwards do not inherit what the dropped pages held."""

    def __init__(self, inode: int, record_of: Callable[[int], Served]) -> None:
        super().__init__()
        self._inode = inode
        self._record_of = record_of
        self._records = [record_of(inode)]

    def _current(self) -> Served:
        record = self._record_of(self._inode)
        if record is not self._records[-1]:
            self._records.append(record)
        return record

    def note(self, index: int, chunk: Chunk) -> None:
        self._current().note(index, chunk)

    @property
    def holds_provisional(self) -> bool:
        self._current()
        return any(record.holds_provisional for record in self._records)

    def mismatches(self, chunk_map: ChunkMap) -> list[int]:
        self._current()
        return sorted({i for record in self._records for i in record.mismatches(chunk_map)})


class _Tree:
    """The folders of one manifest: folder path ("" for the commit root) -> sorted children."""

    def __init__(self, manifest: Manifest) -> None:
        self.children: dict[str, dict[str, FileEntry | None]] = {"": {}}
        for directory in manifest.directories():
            parent, _, name = directory.rpartition("/")
            self.children.setdefault(directory, {})
            self.children.setdefault(parent, {})[name] = None
        for entry in manifest.files:
            parent, _, name = entry.path.rpartition("/")
            self.children.setdefault(parent, {})[name] = entry
        for key, value in self.children.items():
            self.children[key] = dict(sorted(value.items()))


class Vfs:
    """The filesystem over a :class:`~mmfs.engine.FetchEngine` (used inside its ``async with``)."""

    def __init__(self, engine: FetchEngine, config: VfsConfig = VfsConfig(), *,
                 describe: Callable[[], dict[str, Any]] | None = None,
                 controls: dict[str, Callable[[], Awaitable[dict[str, Any]]]] | None = None,
                 credentials: Credentials = Credentials(), access_state: Path | None = None) -> None:
        self.engine = engine
        self.config = config
        self.credentials = credentials
        self.gate = AccessGate(engine.remote, lambda: engine.nursery, access_state, ttl=config.access_ttl,
                               answer_timeout=config.remote_timeout / 2)
        self._describe = describe or (lambda: {})
        #: ``.mmfs/<name>`` files beside status.json whose opening runs an action and
        #: shows its JSON result (``mmfs gc``).
        self._controls = controls or {}
        self._nodes: dict[int, Node] = {}
        self._by_name: dict[tuple[int, str], int] = {}
        #: Provisional org inodes, least recently used first -> the kernel's lookup count.
        self._provisional: OrderedDict[int, int] = OrderedDict()
        self._next_inode = ROOT_INODE + 1
        self._trees: dict[tuple[RepoRef, str], _Tree] = {}
        self._handles: dict[int, _Handle] = {}
        self._suspect: set[int] = set()  # inodes whose kernel page cache must be dropped
        self._by_content: dict[str, set[int]] = {}  # content id -> file inodes showing it
        self._page_records: dict[int, Served] = {}  # inode -> what its page cache may hold now
        #: Drops the kernel's cached pages of an inode; set by the FUSE adapter.
        self.invalidate: Callable[[int], None] = lambda inode: None
        #: Registers backing files with the kernel; set by the FUSE adapter.
        self.backing: PassthroughBackend = PassthroughBackend()
        #: Why passthrough is off (``None``: on); see :meth:`enable_passthrough`.
        self.passthrough_off: str | None = "not enabled"
        self._io: dict[int, _InodeIo] = {}  # file inode -> its I/O mode while open
        self._passthrough_opens = self._passthrough_reads = self._file_reads = 0
        self._lazy_opens: dict[str, int] = {}
        self._logged_reasons: set[str] = set()
        engine.add_listener(self._content_failed)
        self._next_handle = 1
        self._started = time.time()
        self._mtime_ns = int(self._started * 1e9)
        self._lookups = self._opens = self._reads = self._read_bytes = self._read_errors = 0
        self._ra_requested = self._ra_resets = 0
        self._nodes[ROOT_INODE] = Node(ROOT_INODE, Kind.ROOT, ROOT_INODE, "")

    # -- inode table --------------------------------------------------------------------

    def _child(self, parent: Node, name: str, kind: Kind, *, provisional: bool = False, **fields: Any) -> Node:
        """The child ``name`` of ``parent``, made on first sight.

        ``provisional``: an org not known to exist (see the module docstring); otherwise
        the node is permanent, and so is its parent (a provisional org is promoted)."""
        if not provisional:
            self._promote(parent.inode)
        key = (parent.inode, name)
        inode = self._by_name.get(key)
        if inode is not None:
            node = self._nodes[inode]
            if kind is Kind.FILE:
                node.entry = fields.get("entry", node.entry)
            if provisional and inode in self._provisional:
                self._provisional.move_to_end(inode)
            elif not provisional:
                self._promote(inode)
            return node
        inode = self._next_inode
        self._next_inode += 1
        inherited = {"provider": parent.provider, "org": parent.org, "repo": parent.repo, "commit": parent.commit,
                     "view": parent.view}
        node = Node(inode, kind, parent.inode, name, **{**inherited, **fields})
        self._nodes[inode] = node
        if node.entry is not None:
            self._by_content.setdefault(node.entry.content_id, set()).add(inode)
        self._by_name[key] = inode
        if provisional:
            self._provisional[inode] = 0
            while len(self._provisional) > max(self.config.max_provisional_orgs, 1):
                self._drop(next(iter(self._provisional)))
        return node

    def _promote(self, inode: int) -> None:
        """Make a node permanent, and its provisional ancestors (store key prefixes nest)."""
        while inode in self._provisional:
            del self._provisional[inode]
            inode = self._nodes[inode].parent

    def _drop(self, inode: int) -> None:
        """Free a provisional node; its children can only be provisional too (a permanent
        child makes its ancestors permanent), and go with it."""
        for child in [i for i, _ in self._provisional.items() if self._nodes[i].parent == inode]:
            if child in self._provisional:
                self._drop(child)
        del self._provisional[inode]
        node = self._nodes.pop(inode)
        del self._by_name[(node.parent, node.name)]

    def forget(self, inode: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references to ``inode``; frees provisional nodes."""
        count = self._provisional.get(inode)
        if count is None:
            return  # permanent (stays until unmounted), or already dropped
        if count - nlookup > 0:
            self._provisional[inode] = count - nlookup
        else:
            self._drop(inode)

    def node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise StaleInode(f"inode {inode} is not known (stale handle)")
        return node

    def inode_count(self) -> int:
        """Inodes held now (``statfs``'s file count)."""
        return len(self._nodes)

    def path_of(self, node: Node) -> str:
        parts = []
        while node.inode != ROOT_INODE:
            parts.append(node.name)
            node = self._nodes[node.parent]
        return "/".join(reversed(parts))

    # -- bounded remote calls -----------------------------------------------------------

    async def _bounded(self, what: str, fn: Callable[..., Any], *args: Any, patient: bool = False) -> Any:
        """``fn(*args)``, failed after ``remote_timeout`` seconds; ``patient``: seconds
        without progress (a reader of a file's end waits while the whole file is fetched
        and verified: bytes flowing is not a hang)."""
        timeout = self.config.remote_timeout
        result: list[Any] = []

        async def extend_while_active(scope: trio.CancelScope) -> None:
            seen = self.engine.activity
            while True:
                await trio.sleep(min(1.0, timeout / 4))
                if self.engine.activity != seen:
                    seen = self.engine.activity
                    scope.deadline = trio.current_time() + timeout

        with trio.move_on_after(timeout) as scope:
            if not patient:
                result.append(await fn(*args))
            else:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(extend_while_active, scope)
                        result.append(await fn(*args))
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    error = first_error(group)
                    if error is None:
                        raise
                    raise error from None
        if scope.cancelled_caught and not result:
            raise UpstreamError(f"{what}: no answer from {self.engine.remote.url or 'the remote'} "
                                f"within {timeout:g} s") from None
        return result[0]

    async def _manifest(self, repo: RepoRef, commit: str, view: str) -> Manifest:
        return await self._bounded(f"{repo}@{commit}", partial(self.engine.manifest, auth=self.credentials.auth(view)),
                                   repo, commit)

    async def _tree(self, repo: RepoRef, commit: str, view: str) -> _Tree:
        tree = self._trees.get((repo, commit))
        if tree is None:
            manifest = await self._manifest(repo, commit, view)
            tree = self._trees[(repo, commit)] = _Tree(manifest)
        return tree

    # -- what is known locally (listings) -----------------------------------------------

    def _known(self) -> tuple[dict[RepoRef, dict[str, str]], dict[RepoRef, set[str]]]:
        """Repos known here: their refs (revision -> commit) and their commits."""
        refs: dict[RepoRef, dict[str, str]] = {}
        commits: dict[RepoRef, set[str]] = {}
        metadata = self.engine.metadata
        if metadata is not None:
            for key, record in metadata.refs().items():
                repo_text, _, revision = key.partition("@")
                repo = _parse_repo_key(repo_text)
                if repo is not None:
                    refs.setdefault(repo, {})[revision] = record.commit
                    commits.setdefault(repo, set())
            for repo, commit in metadata.manifest_keys():
                commits.setdefault(repo, set()).add(commit)
        for manifest in self.engine.known_manifests():
            commits.setdefault(manifest.repo, set()).add(manifest.commit)
        for repo, commit in self._trees:
            commits.setdefault(repo, set()).add(commit)
        return refs, commits

    # -- lookups ------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Attributes:
        self._lookups += 1
        parent = self.node(parent_inode)
        node = await self._lookup(parent, name)
        if node.inode in self._provisional:
            self._provisional[node.inode] += 1  # the kernel holds one more reference
        return self._attributes(node)

    async def _lookup(self, parent: Node, name: str) -> Node:
        kind = parent.kind
        if not kind.is_dir:
            raise NotADirectory(f"{self.path_of(parent)} is not a directory")
        if name in (".", ".."):
            raise NotFound(name)  # the kernel resolves these itself
        if kind in (Kind.ROOT, Kind.VIEW):
            if name in PROVIDERS:
                return self._child(parent, name, Kind.PROVIDER, provider=name)
            if name == CONTROL_DIR and kind is Kind.ROOT:
                return self._child(parent, name, Kind.CONTROL)
            if name == ARTIFACTS_DIR and kind is Kind.ROOT:
                return self._child(parent, name, Kind.ARTIFACTS, repo=ARTIFACTS)
            if name == ACCESS_DIR and kind is Kind.ROOT and self.credentials.token_dir is not None:
                return self._child(parent, name, Kind.ACCESS)
            raise NotFound(f"no provider {name!r}")
        if kind is Kind.ACCESS:
            self.credentials.auth(name)  # NotFound unless a token file exists for this view
            return self._child(parent, name, Kind.VIEW, view=name)
        if kind is Kind.ARTIFACTS:
            if not is_commit(name):
                raise NotFound(f"no artifact {name!r}: artifacts are named by their 40-hex id")
            await self._tree(ARTIFACTS, name, parent.view)  # NotFound until it is published
            return self._child(parent, name, Kind.COMMIT, commit=name)
        if kind is Kind.CONTROL:
            if name == STATUS_FILE or name in self._controls:
                return self._child(parent, name, Kind.STATUS)
            raise NotFound(name)
        if kind is Kind.PROVIDER:
            is_store = parent.provider in STORE_PROVIDERS
            _valid(check_store_part if is_store else check_repo_part, name, "bucket" if is_store else "organisation")
            return self._child(parent, name, Kind.ORG, provisional=True, org=name)
        if kind is Kind.ORG and parent.provider in STORE_PROVIDERS:
            # Any prefix may hold a model: the store is asked once a revision is looked up.
            _valid(check_prefix_part, name, "key prefix")
            return self._child(parent, name, Kind.REPO, provisional=True,
                               repo=RepoRef(parent.provider, parent.org, name))
        if kind is Kind.REPO and parent.provider in STORE_PROVIDERS and name != STORE_BRANCH and not is_commit(name):
            assert parent.repo is not None
            _valid(check_prefix_part, name, "key prefix")
            return self._child(parent, name, Kind.REPO, provisional=True,
                               repo=RepoRef(parent.provider, parent.org, f"{parent.repo.name}/{name}"))
        if kind is Kind.ORG:
            _valid(check_repo_part, name, "repo name")
            repo = RepoRef(parent.provider, parent.org, name)
            await self._check_repo(repo, parent.view)
            if self._nodes.get(parent.inode) is not parent:
                # Dropped while the remote answered: the kernel looks the org up afresh.
                raise StaleInode(f"organisation {parent.org!r} was forgotten meanwhile")
            return self._child(parent, name, Kind.REPO, repo=repo)
        if kind in (Kind.REPO, Kind.REFS):
            assert parent.repo is not None
            revision = _join(parent.path, name)
            _valid(check_revision, revision, "revision")
            if kind is Kind.REPO and is_commit(name):
                await self._tree(parent.repo, name, parent.view)
                return self._child(parent, name, Kind.COMMIT, commit=name)
            if revision == "refs" or (kind is Kind.REFS and "/" not in parent.path):
                # refs/, refs/pr/, refs/convert/: folders; the revision is refs/<kind>/<name>
                return self._child(parent, name, Kind.REFS, path=revision)
            commit = await self._resolve(parent.repo, revision, parent.view)
            await self._tree(parent.repo, commit, parent.view)
            if self._nodes.get(parent.inode) is not parent:
                raise StaleInode(f"{parent.repo} was forgotten meanwhile")
            return self._child(parent, name, Kind.REF, path=revision)
        if kind in (Kind.COMMIT, Kind.DIR):
            assert parent.repo is not None
            tree = await self._tree(parent.repo, parent.commit, parent.view)
            folder = parent.path
            children = tree.children.get(folder, {})
            if name not in children:
                raise NotFound(f"{parent.repo}@{parent.commit}: no {_join(folder, name)!r}")
            entry = children[name]
            if entry is None:
                return self._child(parent, name, Kind.DIR, path=_join(folder, name))
            return self._child(parent, name, Kind.FILE, path=entry.path, entry=entry)
        raise NotFound(name)

    async def _check_repo(self, repo: RepoRef, view: str) -> None:
        """A repo exists once anything about it is known here, or the remote knows it. A
        repo known to be restricted is asked of the remote with the view's token (a
        private repo's listing is not every view's to see)."""
        refs, commits = self._known()
        restricted = self.gate.kind(repo) not in (None, "open", "gated")  # gated listings are public
        if not restricted and (repo in refs or repo in commits):
            return
        try:
            if restricted:
                await self._bounded(f"{repo}", partial(self.engine.remote.resolve, auth=self.credentials.auth(view)),
                                    repo, "main")
            else:
                await self._resolve(repo, "main", view)
        except RevisionNotFound:
            pass  # the repo exists, it just has no "main"

    async def _resolve(self, repo: RepoRef, revision: str, view: str) -> str:
        return await self._bounded(f"{repo}@{revision}", partial(self.engine.resolve, auth=self.credentials.auth(view)),
                                   repo, revision)

    # -- attributes ---------------------------------------------------------------------

    async def getattr(self, inode: int) -> Attributes:
        return self._attributes(self.node(inode))

    def _attributes(self, node: Node) -> Attributes:
        kind = node.kind
        size, nlink = 0, 2
        if kind is Kind.FILE:
            assert node.entry is not None
            mode, size, nlink = stat.S_IFREG | 0o444, node.entry.size, 1
        elif kind is Kind.STATUS:
            mode, nlink = stat.S_IFREG | 0o444, 1
        elif kind is Kind.REF:
            mode, size, nlink = stat.S_IFLNK | 0o777, 40, 1
        else:
            mode = stat.S_IFDIR | 0o555
        if kind in (Kind.COMMIT, Kind.DIR, Kind.FILE):
            timeout = self.config.immutable_timeout
        elif kind is Kind.REF:
            timeout = self.config.ref_timeout
        elif kind is Kind.STATUS:
            timeout = 0.0
        else:
            timeout = self.config.namespace_timeout
        return Attributes(node.inode, mode, size, nlink, self._mtime_ns, self.config.uid, self.config.gid, timeout)

    async def readlink(self, inode: int) -> str:
        node = self.node(inode)
        if node.kind is not Kind.REF:
            raise NotALink(f"{self.path_of(node)} is not a symbolic link")
        assert node.repo is not None
        commit = await self._resolve(node.repo, node.path, node.view)
        return "../" * node.path.count("/") + commit  # relative: refs/pr/1 -> ../../<commit>

    # -- directories --------------------------------------------------------------------

    async def listdir(self, inode: int) -> list[tuple[str, Attributes]]:
        """Every entry of a directory with its attributes (a snapshot, taken at opendir)."""
        node = self.node(inode)
        if not node.kind.is_dir:
            raise NotADirectory(f"{self.path_of(node)} is not a directory")
        names: list[tuple[str, Kind, dict[str, Any]]] = []
        kind = node.kind
        if kind in (Kind.ROOT, Kind.VIEW):
            names = [(p, Kind.PROVIDER, {"provider": p}) for p in PROVIDERS]
            if kind is Kind.ROOT:
                names.append((CONTROL_DIR, Kind.CONTROL, {}))
                names.append((ARTIFACTS_DIR, Kind.ARTIFACTS, {"repo": ARTIFACTS}))
        elif kind is Kind.ACCESS:
            names = []  # views are not listed: a key is a hash of a token
        elif kind is Kind.CONTROL:
            names = [(n, Kind.STATUS, {}) for n in (STATUS_FILE, *sorted(self._controls))]
        elif kind is Kind.ARTIFACTS:
            _, commits = self._known()
            names = [(c, Kind.COMMIT, {"commit": c}) for c in sorted(commits.get(ARTIFACTS, set()))]
        elif kind in (Kind.PROVIDER, Kind.ORG, Kind.REPO, Kind.REFS):
            refs, commits = self._known()
            repos = sorted(set(refs) | set(commits), key=str)
            if kind is Kind.PROVIDER:
                orgs = sorted({r.org for r in repos if r.provider == node.provider})
                names = [(o, Kind.ORG, {"org": o}) for o in orgs]
            elif kind is not Kind.REFS:
                # Repos right below this folder: a store's key prefixes nest (a/b, a/b/c).
                base = f"{node.repo.name}/" if node.repo is not None else ""
                found = sorted({r.name[len(base):].split("/")[0] for r in repos if r.provider == node.provider
                                and r.org == node.org and r.name.startswith(base) and r.name != base[:-1]})
                names = [(n, Kind.REPO, {"repo": RepoRef(node.provider, node.org, base + n)}) for n in found]
            if kind in (Kind.REPO, Kind.REFS):
                assert node.repo is not None
                prefix = f"{node.path}/" if kind is Kind.REFS else ""
                below: set[str] = set()
                for revision in sorted(refs.get(node.repo, {})):
                    if is_commit(revision) or not revision.startswith(prefix):
                        continue
                    rest = revision[len(prefix):]
                    if "/" not in rest and (kind is Kind.REPO or prefix.count("/") == 2):
                        names.append((rest, Kind.REF, {"path": revision}))
                    elif "/" in rest and (kind is Kind.REFS or rest.startswith("refs/")):
                        below.add(rest.split("/", 1)[0])
                names += [(b, Kind.REFS, {"path": prefix + b}) for b in sorted(below)]
                if kind is Kind.REPO:
                    for commit in sorted(commits.get(node.repo, set())):
                        names.append((commit, Kind.COMMIT, {"commit": commit}))
        else:
            assert node.repo is not None
            tree = await self._tree(node.repo, node.commit, node.view)
            for name, entry in tree.children.get(node.path, {}).items():
                if entry is None:
                    names.append((name, Kind.DIR, {"path": _join(node.path, name)}))
                else:
                    names.append((name, Kind.FILE, {"path": entry.path, "entry": entry}))
        return [(name, self._attributes(self._child(node, name, k, **fields))) for name, k, fields in names]

    # -- files --------------------------------------------------------------------------

    async def open(self, inode: int, writable: bool = False) -> OpenFile:
        node = self.node(inode)
        if writable:
            raise ReadOnly(f"{self.path_of(node)}: mmfs is read-only")
        if node.kind.is_dir:
            raise IsADirectory(f"{self.path_of(node)} is a directory")
        self._opens += 1
        handle = self._next_handle
        self._next_handle += 1
        if node.kind is Kind.STATUS:
            action = self._controls.get(node.name)
            result = await action() if action is not None else self.status()
            data = (json.dumps(result, indent=2, sort_keys=True) + "\n").encode()
            self._handles[handle] = _Handle(node, data=data)
            return OpenFile(handle, keep_cache=False, direct_io=True)
        if node.kind is not Kind.FILE:
            raise NotALink(f"{self.path_of(node)} cannot be opened")
        assert node.repo is not None and node.entry is not None
        entry = node.entry
        try:
            entry.check_empty()  # the kernel never asks to read a file of size 0: its check is here
        except IntegrityError as exc:
            log.error("open of %s refused: %s", self.path_of(node), exc)
            raise
        source = FileSource(node.repo, node.commit, entry)
        auth = self.credentials.auth(node.view)
        if node.repo != ARTIFACTS:  # artifacts: the backend checks their model's access itself
            await self._bounded(f"access to {node.repo}", self.gate.check, source, auth)
        self.engine.commit_used[(node.repo, node.commit)] = time.time()
        state = _Handle(node, source, ReadAhead(entry.chunk_size, entry.chunk_count, self.config.read_ahead),
                        served=_HandleServed(inode, self._page_record), auth=auth)
        backing_id = await self._passthrough(node)
        if backing_id:
            state.passthrough = True
            self._handles[handle] = state
            return OpenFile(handle, keep_cache=False, direct_io=False, backing_id=backing_id)
        self._io.setdefault(inode, _InodeIo()).lazy += 1
        self._handles[handle] = state
        keep = inode not in self._suspect
        self._suspect.discard(inode)
        return OpenFile(handle, keep_cache=keep, direct_io=False)

    # -- FUSE passthrough ---------------------------------------------------------------

    def enable_passthrough(self, why_not: str | None) -> None:
        """Called once the kernel answered INIT: ``None`` turns passthrough on, else off
        with that reason (one log line either way)."""
        self.passthrough_off = why_not
        if why_not is None:
            log.info("FUSE passthrough: on (files complete in the disk cache are read by the kernel)")
        else:
            log.info("FUSE passthrough: off (%s); every read goes through the daemon", why_not)

    async def _passthrough(self, node: Node, *, settled: bool = False) -> int:
        """The backing id to open ``node`` with, or 0: the lazy path (counted, with why).

        Mode transitions, per inode (the kernel allows one I/O mode per inode at a time):
        while lazy handles are open, new opens stay lazy; once none are, the next open of a
        file complete and verified in the disk cache goes passthrough; while passthrough
        handles are open every new open shares their backing id (and the disk file stays
        pinned); the id is closed and the file unpinned with the last release."""
        assert node.entry is not None
        entry = node.entry
        io = self._io.get(node.inode) or _InodeIo()
        if io.passthrough:
            if io.failed:
                # Any other open of this inode would fail in the kernel (EIO) anyway; the
                # bytes behind the shared backing file are no longer vouched for.
                raise IntegrityError(f"{self.path_of(node)} failed verification while open in passthrough "
                                     "mode; it opens again once those files are closed")
            io.passthrough += 1
            self._passthrough_opens += 1
            return io.backing_id
        if io.lazy:
            return self._lazy("lazy-open")
        if self.passthrough_off is not None:
            return self._lazy("off")
        disk = next((t for t in self.engine.tiers if hasattr(t, "pin_complete")), None)
        if disk is None:
            return self._lazy("no-disk-cache")
        chunk_map = self.engine.known_map(entry)
        if chunk_map is None:
            return self._lazy("cold")
        path = disk.pin_complete(entry.content_id, entry.chunk_size, entry.chunk_count)
        if path is None and not settled and all(disk.contains(entry.chunk_key(i)) for i in range(entry.chunk_count)):
            # Every chunk is here but some were stored before the map (provisional): settle
            # them now (digests only, no reads), then decide afresh (other opens of this
            # inode may have been answered meanwhile).
            try:
                await disk.settle(chunk_map)
            except MmfsError as exc:
                log.warning("FUSE passthrough: cannot settle %s in the disk cache: %s", self.path_of(node), exc)
                return self._lazy("cold")
            return await self._passthrough(node, settled=True)
        if path is None:
            return self._lazy("cold")
        pinned = (entry.content_id, entry.chunk_size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                hold_for_reader(fd)  # eviction skips it while the kernel holds it, even after a restart
                backing_id = self.backing.open(fd)  # the kernel keeps its own reference
            finally:
                os.close(fd)
        except OSError as exc:
            disk.unpin(*pinned)
            fatal = _FATAL_PASSTHROUGH_ERRORS.get(exc.errno or 0)
            reason = fatal or f"error-{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            if fatal is not None:
                self.passthrough_off = f"{fatal}: {exc.strerror or exc}"
                log.warning("FUSE passthrough: off (%s, registering %s); every read goes through the daemon",
                            self.passthrough_off, path)
            elif reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                log.warning("FUSE passthrough: cannot register %s (%s); reading it through the daemon", path, exc)
            return self._lazy(reason)
        self._io[node.inode] = _InodeIo(passthrough=1, backing_id=backing_id, pinned=pinned)
        self._passthrough_opens += 1
        return backing_id

    def _lazy(self, reason: str) -> int:
        self._lazy_opens[reason] = self._lazy_opens.get(reason, 0) + 1
        return 0

    def _closed(self, state: _Handle) -> None:
        """Count a handle out of its inode's mode; the last passthrough one closes the id."""
        inode = state.node.inode
        io = self._io.get(inode)
        if io is None:
            return
        if state.passthrough:
            io.passthrough -= 1
            if io.passthrough == 0:
                try:
                    self.backing.close(io.backing_id)
                except OSError as exc:  # the id dies with the session anyway
                    log.warning("FUSE passthrough: cannot close backing id %d: %s", io.backing_id, exc)
                disk = next((t for t in self.engine.tiers if hasattr(t, "unpin")), None)
                if disk is not None and io.pinned is not None:
                    disk.unpin(*io.pinned)
                io.backing_id, io.pinned, io.failed = 0, None, False
        else:
            io.lazy -= 1
        if not io.lazy and not io.passthrough:
            del self._io[inode]

    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes at ``offset``; fewer only at end of file (a memoryview when zero-copy)."""
        state = self._handles.get(handle)
        if state is None:
            raise BadHandle(f"file handle {handle} is not open")
        self._reads += 1
        if state.passthrough:
            self._passthrough_reads += 1  # the kernel should not send these; serve them anyway
        if state.source is None:
            return state.data[offset:offset + size]
        source = state.source
        self._file_reads += 1
        if source.repo != ARTIFACTS and not self.gate.fresh(state.auth, source.repo):  # held open past the answer's time
            await self._bounded(f"access to {source.repo}", self.gate.check, source, state.auth)
        ahead = state.read_ahead.on_read(offset, size) if state.read_ahead is not None else range(0)
        if ahead:
            self._ra_requested += len(ahead)
            self.engine.prefetch(source, ahead, auth=state.auth)
        cached = self.engine.read_cached(source, offset, size, state.served)
        if cached is not None:
            self._read_bytes += len(cached)
            return cached
        try:
            # Only a read of the file's end may wait for the whole file to be fetched and
            # verified; other reads wait for their own chunks and keep the plain bound
            # (no watcher task on the common read path).
            tail = offset + size >= source.entry.size
            data = await self._bounded(f"{source.repo}@{source.commit}/{source.entry.path}", self._read_through,
                                       state, offset, size, patient=tail)
        except MmfsError as exc:
            self._read_errors += 1
            if isinstance(exc, IntegrityError):
                # The kernel may hold pages of this file from chunks that arrived before
                # the whole-file check failed: the next open must not keep them.
                self._suspect.add(state.node.inode)
            if exc.errno != errno.ENOENT:
                log.error("read of %s@%s %s at [%d, +%d) failed: %s", source.repo, source.commit,
                          source.entry.path, offset, size, exc)
            raise
        self._read_bytes += len(data)
        return data

    async def _read_through(self, state: _Handle, offset: int, size: int) -> bytes | memoryview:
        assert state.source is not None
        return await self.engine.read(state.source, offset, size, served=state.served, auth=state.auth)

    def _content_failed(self, content_id: str) -> None:
        """Bytes of ``content_id`` that readers may have turned out wrong: every inode
        showing that content (any repo, any commit) loses its cached pages, now and at
        its next open."""
        for inode in self._by_content.get(content_id, ()):
            io = self._io.get(inode)
            if io is not None and io.passthrough:
                io.failed = True  # new opens of it: EIO until its passthrough files are closed
            self._suspect.add(inode)
            if inode in self._page_records:
                self._page_records[inode] = Served()  # handles open now keep the old record
            self.invalidate(inode)

    def drop_pages(self, content_id: str) -> None:
        """The caches let go of ``content_id`` (gc): so does the kernel's page cache of
        every inode showing it, so the memory is really handed back."""
        for inode in self._by_content.get(content_id, ()):
            self.invalidate(inode)

    def _page_record(self, inode: int) -> Served:
        record = self._page_records.get(inode)
        if record is None:
            record = self._page_records[inode] = Served()
        return record

    async def release(self, handle: int) -> None:
        state = self._handles.pop(handle, None)
        if state is not None and state.read_ahead is not None:
            self._ra_resets += state.read_ahead.resets
        if state is not None and state.node.kind is Kind.FILE:
            self._closed(state)

    def shareable(self, content_id: str) -> bool:
        """Whether ``content_id`` may be offered to other nodes: it shows here only in repos
        known to be open (never restricted content, never content of unknown provenance)."""
        inodes = self._by_content.get(content_id)
        return bool(inodes) and all(
            (node := self._nodes.get(inode)) is not None and node.repo is not None
            and self.gate.kind(node.repo) == "open" for inode in inodes)

    # -- observability ------------------------------------------------------------------

    def statistics(self) -> VfsStatistics:
        open_resets = sum(h.read_ahead.resets for h in self._handles.values() if h.read_ahead)
        return VfsStatistics(self._lookups, self._opens, self._reads, self._read_bytes, self._read_errors,
                             len(self._handles), len(self._nodes), len(self._provisional), self._ra_requested,
                             self._ra_resets + open_resets, self._passthrough_opens, dict(self._lazy_opens),
                             self._passthrough_reads, self._file_reads)

    def open_commits(self) -> set[tuple[RepoRef, str]]:
        """Commits with a file open now: pinned (their content must stay while read)."""
        return {(h.node.repo, h.node.commit) for h in self._handles.values()
                if h.node.kind is Kind.FILE and h.node.repo is not None}

    def passthrough_status(self) -> dict[str, Any]:
        """The passthrough part of status: mode, opens each way, files open each way."""
        disk = next((t for t in self.engine.tiers if hasattr(t, "pinned")), None)
        return {
            "enabled": self.passthrough_off is None,
            "off_reason": self.passthrough_off,
            "opens": self._passthrough_opens,
            "lazy_opens": dict(sorted(self._lazy_opens.items())),
            "open_files": {"passthrough": sum(io.passthrough for io in self._io.values()),
                           "lazy": sum(io.lazy for io in self._io.values())},
            "backing_ids": sum(1 for io in self._io.values() if io.backing_id),
            "pinned_files": len(disk.pinned()) if disk is not None else 0,
            "pin_skips": disk.pin_skips if disk is not None else 0,
            "reads_reaching_daemon": self._passthrough_reads,
        }

    def status(self) -> dict[str, Any]:
        """Everything ``mmfs status`` shows, as plain JSON-able data."""
        refs, commits = self._known()
        repos = []
        artifacts = [{"id": m.commit, "files": len(m.files), "bytes": m.total_size}
                     for m in self.engine.known_manifests() if m.repo == ARTIFACTS]
        for repo in sorted((set(refs) | set(commits)) - {ARTIFACTS}, key=str):
            known_commits = sorted(commits.get(repo, set()))
            manifests = {m.commit: m for m in self.engine.known_manifests() if m.repo == repo}
            repos.append({
                "repo": str(repo),
                "refs": dict(sorted(refs.get(repo, {}).items())),
                "commits": [{"commit": c, "files": len(manifests[c].files) if c in manifests else None,
                             "bytes": manifests[c].total_size if c in manifests else None}
                            for c in known_commits],
            })
        stats = self.engine.statistics()
        tiers = []
        for tier in stats.tiers:
            tiers.append({**asdict(tier), "hit_rate": round(tier.hit_rate, 4)})
        return {
            **self._describe(),
            "started_at": self._started,
            "uptime_s": round(time.time() - self._started, 3),
            "repos": repos,
            "artifacts": sorted(artifacts, key=lambda a: a["id"]),
            "tiers": tiers,
            "remote": {"url": self.engine.remote.url, "fetches": stats.remote_fetches, "bytes": stats.remote_bytes,
                       "coalesced": stats.coalesced, "inflight": stats.inflight},
            "integrity": {"failures": stats.integrity_failures, "files_verified": stats.files_verified},
            "vfs": asdict(self.statistics()),
            "passthrough": self.passthrough_status(),
        }


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _valid(check: Callable[..., str], name: str, what: str) -> None:
    """A name that cannot exist is simply not there (ENOENT), whatever is wrong with it."""
    try:
        check(name, what) if check in (check_repo_part, check_store_part) else check(name)
    except InvalidName as exc:
        raise NotFound(f"no {what} {name!r}: {exc}") from None


def _parse_repo_key(text: str) -> RepoRef | None:
    parts = text.split("/", 2)  # a store model's prefix may hold "/"
    if len(parts) != 3:
        return None
    return RepoRef(parts[0], parts[1], parts[2])
