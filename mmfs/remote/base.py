"""Where bytes come from when no cache tier has them: one interface for every upstream and the backend.

The node daemon talks to the cluster backend (:mod:`mmfs.remote.backend`); the backend and
an embedded node (no backend configured) talk to the upstream: the Hub (:mod:`mmfs.remote.hub`)
and the object stores and local roots they serve (:mod:`mmfs.remote.store`), one remote per
provider behind :class:`mmfs.remote.router.ProviderRemote`. The fetch engine does not know
which it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..chunkmap import ChunkMap
from ..manifest import FileEntry, Manifest
from ..names import RepoRef


@dataclass(frozen=True, slots=True)
class FileSource:
    """A file as found at one commit: enough to locate its bytes upstream."""

    repo: RepoRef
    commit: str
    entry: FileEntry


@dataclass(frozen=True, slots=True)
class FetchedChunk:
    """A chunk's bytes as the remote sent them, with what it said about them."""

    data: bytes
    #: The remote has the file's chunk map (the backend verified the whole file): worth
    #: asking for it, so that this and later chunks are verified on arrival.
    file_verified: bool = False
    source_url: str = ""
    #: Block digests where the remote already hashed the bytes (a peer's chunk, checked
    #: against the map on arrival): the engine then does not hash them again.
    digests: bytes | None = None
    etag: str = ""
    last_modified: str = ""


class Remote(ABC):
    """The last tier: resolves revisions, lists commits, fetches chunks.

    Every method raises a :class:`~mmfs.errors.MmfsError`: ``NotFound`` children for
    unknown repos, revisions and files, ``AccessDenied`` for gated repos,
    ``UpstreamError`` once retries are exhausted. ``auth`` is an ``Authorization`` header
    value that replaces the remote's own credentials for this call.
    """

    #: True when the remote checks whole files against their upstream hash and hands out
    #: their chunk maps (the backend does, :meth:`fetch_map`); the engine then fetches maps
    #: instead of hashing whole files itself.
    verifies_files: bool = False
    #: Human name for logs and ``mmfs status``.
    url: str = ""

    @property
    def received_bytes(self) -> int:
        """Bytes received from the remote so far (grows while a body arrives)."""
        return 0

    @abstractmethod
    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        """Return the 40-hex commit a branch, tag or commit names."""

    @abstractmethod
    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        """Return every file of ``repo`` at ``commit``."""

    @abstractmethod
    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        """Return chunk ``index`` of ``source`` (exactly its length, unverified unless stated)."""

    async def fetch_map(self, source: FileSource, *, wait: float = 0.0, auth: str | None = None) -> ChunkMap | int:
        """The file's chunk map, or (not verified yet) a progress counter that grows while
        the remote works; waits up to ``wait`` seconds for the remote to finish verifying.
        :class:`~mmfs.errors.IntegrityError` when the file failed its check there."""
        raise NotImplementedError(f"{type(self).__name__} does not verify files; the engine does")

    @abstractmethod
    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        """Whether ``auth`` (``None``: the remote's own credentials) may read ``source``'s
        content: returns the repo's kind (``open``, ``gated`` or ``private``), raises
        :class:`~mmfs.errors.AccessDenied` or a ``NotFound`` child when refused, and
        :class:`~mmfs.errors.UpstreamError` when no answer came (not a refusal)."""

    async def aclose(self) -> None:
        """Release connections."""
