"""Where bytes come from when no cache tier has them: one interface for the Hub and the backend.

The node daemon talks to the cluster backend (:mod:`mmfs.remote.backend`); the backend and
an embedded node (no backend configured) talk to the Hub (:mod:`mmfs.remote.hub`). The
fetch engine does not know which it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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
    #: blake3 hex digest the remote vouches for (the backend sends one), else ``None``.
    blake3: str | None = None
    source_url: str = ""
    etag: str = ""
    last_modified: str = ""


class Remote(ABC):
    """The last tier: resolves revisions, lists commits, fetches chunks.

    Every method raises a :class:`~mmfs.errors.MmfsError`: ``NotFound`` children for
    unknown repos, revisions and files, ``AccessDenied`` for gated repos,
    ``UpstreamError`` once retries are exhausted. ``auth`` is an ``Authorization`` header
    value that replaces the remote's own credentials for this call.
    """

    #: True when the remote serves a file's last chunk only once the whole file matched
    #: its upstream hash (the backend does); the engine then skips its own whole-file check.
    verifies_files: bool = False
    #: Human name for logs and ``mmfs status``.
    url: str = ""

    @abstractmethod
    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        """Return the 40-hex commit a branch, tag or commit names."""

    @abstractmethod
    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        """Return every file of ``repo`` at ``commit``."""

    @abstractmethod
    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        """Return chunk ``index`` of ``source`` (exactly its length, unverified unless stated)."""

    async def aclose(self) -> None:
        """Release connections."""
