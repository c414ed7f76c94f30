"""The upstream as one remote: the Hub, and the object stores and local roots this server
was told to serve, chosen by each repo's provider.

Stores are opt-in and named one by one (``--store`` or ``MMFS_STORES``), because the server
reads them with *its own* credentials on behalf of anyone who can reach it::

    s3:<bucket>        an S3 bucket (s3:* any bucket the credentials can read)
    azure:<container>  an Azure Blob container (azure:* any)
    file:<name>=<path> a local directory, shown as file/<name>/…
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..chunkmap import ChunkMap
from ..errors import InvalidName, NotFound
from ..manifest import Manifest
from ..names import HUB_REPO_TYPES, STORE_PROVIDERS, RepoRef, check_repo_part, check_store_part
from .base import FetchedChunk, FileSource, Remote
from .store import StoreRemote

STORES_ENV = "MMFS_STORES"


@dataclass(frozen=True)
class StoreConfig:
    """Which stores are served: provider -> allowed buckets (``*``: any), and file roots."""

    buckets: dict[str, frozenset[str]] = field(default_factory=dict)
    file_roots: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: list[str]) -> "StoreConfig":
        """From ``--store`` values (each may also be a comma-separated list)."""
        buckets: dict[str, set[str]] = {}
        roots: dict[str, Path] = {}
        for spec in (part.strip() for value in specs for part in value.split(",")):
            if not spec:
                continue
            provider, colon, rest = spec.partition(":")
            if not colon or provider not in STORE_PROVIDERS or not rest:
                raise InvalidName(f"invalid store {spec!r}: use s3:<bucket>, azure:<container> or "
                                  "file:<name>=<path> (s3:* and azure:* for any)")
            if provider == "file":
                name, eq, path = rest.partition("=")
                if not eq or not path.startswith("/"):
                    raise InvalidName(f"invalid store {spec!r}: a file root is file:<name>=<absolute path>")
                check_repo_part(name, "file root name")
                if not Path(path).is_dir():
                    raise InvalidName(f"file root {name!r}: {path} is not a directory")
                roots[name] = Path(path)
            else:
                if rest != "*":
                    check_store_part(rest, f"{provider} bucket or container name")
                buckets.setdefault(provider, set()).add(rest)
        return cls({p: frozenset(b) for p, b in buckets.items()}, roots)

    @classmethod
    def from_env(cls, specs: list[str] | None = None) -> "StoreConfig":
        """``specs`` plus ``MMFS_STORES`` (comma or space separated)."""
        return cls.parse([*(specs or []), *os.environ.get(STORES_ENV, "").split()])

    def allows(self, provider: str) -> Callable[[str], bool]:
        allowed = self.buckets.get(provider, frozenset())
        return lambda bucket: "*" in allowed or bucket in allowed

    def remotes(self, chunk_size: int) -> dict[str, Remote]:
        """A :class:`StoreRemote` per configured provider."""
        remotes: dict[str, Remote] = {}
        try:
            if "s3" in self.buckets:
                from .s3 import S3Store

                remotes["s3"] = StoreRemote(S3Store(), chunk_size=chunk_size, allowed=self.allows("s3"))
            if "azure" in self.buckets:
                from .azure import AzureStore

                remotes["azure"] = StoreRemote(AzureStore(), chunk_size=chunk_size, allowed=self.allows("azure"))
        except ImportError as exc:
            raise InvalidName(f"--store needs the store's client library ({exc.name}): "
                              "pip install 'mmfs[stores]'") from None
        if self.file_roots:
            from .localdir import LocalDirStore

            remotes["file"] = StoreRemote(LocalDirStore(self.file_roots), chunk_size=chunk_size)
        return remotes


class ProviderRemote(Remote):
    """Routes each call to the remote of the repo's provider; none of them verifies files
    (they are the upstream), so the engine verifies every file itself."""

    def __init__(self, remotes: dict[str, Remote]) -> None:
        self.remotes = remotes
        self._distinct = list({id(r): r for r in remotes.values()}.values())  # the Hub serves several
        hub = remotes.get("huggingface")
        self.url = hub.url if hub is not None else ", ".join(r.url for r in self._distinct)

    def _for(self, repo: RepoRef) -> Remote:
        remote = self.remotes.get(repo.provider)
        if remote is None:
            raise NotFound(f"{repo}: this server does not serve the {repo.provider!r} provider "
                           f"(it serves {', '.join(sorted(self.remotes))}; see --store)")
        return remote

    @property
    def received_bytes(self) -> int:
        return sum(r.received_bytes for r in self._distinct)

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        return await self._for(repo).resolve(repo, revision, auth=auth)

    async def manifest(self, repo: RepoRef, commit: str, *, auth: str | None = None) -> Manifest:
        return await self._for(repo).manifest(repo, commit, auth=auth)

    async def fetch_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> FetchedChunk:
        return await self._for(source.repo).fetch_chunk(source, index, auth=auth)

    async def check_access(self, source: FileSource, *, auth: str | None = None) -> str:
        return await self._for(source.repo).check_access(source, auth=auth)

    async def fetch_map(self, source: FileSource, *, wait: float = 0.0, auth: str | None = None) -> ChunkMap | int:
        return await self._for(source.repo).fetch_map(source, wait=wait, auth=auth)

    async def aclose(self) -> None:
        for remote in self._distinct:
            await remote.aclose()


def upstream(hub: Remote, stores: StoreConfig, chunk_size: int) -> ProviderRemote:
    """The Hub (models and datasets) and the configured stores; a provider not configured
    answers ``NotFound``."""
    return ProviderRemote({**{provider: hub for provider in HUB_REPO_TYPES}, **stores.remotes(chunk_size)})
