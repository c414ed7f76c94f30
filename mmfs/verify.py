"""``mmfs verify``: scrub the node's disk cache for bit rot.

Reads every chunk the disk tier holds and checks it against the block digests stored with
it (blake3 per 64 KiB block), and, where the file's chunk map is recorded in the metadata
DB, that the stored digests are the map's. Files read in FUSE passthrough are never
re-checked per read, so this is what finds bytes that rotted after they were verified.

Offline only: the cache dir is opened as the daemon opens it at start, so a daemon using
it must be stopped first (a live mmfs mount whose status names this cache dir is refused).
``repair`` drops damaged chunks (index entry first, then the hole punched), so the next
read fetches them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import mountutil
from .chunkmap import block_digests
from .errors import CacheError, MmfsError
from .metadata import MetadataStore
from .tiers.disk import DiskTier


@dataclass
class Damage:
    path: Path  # the data file
    chunk: int
    reason: str


@dataclass
class VerifyReport:
    chunks: int = 0
    bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)
    dropped: int = 0


def daemon_using(cache_dir: Path) -> str | None:
    """The mountpoint of a live mmfs mount whose daemon uses ``cache_dir``, if any."""
    import json

    target = os.path.realpath(cache_dir)
    for info in mountutil.mmfs_mounts():
        try:
            status = json.loads((Path(info.mountpoint) / ".mmfs" / "status.json").read_bytes())
        except (OSError, ValueError):
            continue  # dead (its daemon is gone) or not ours
        if os.path.realpath(status.get("cache_dir") or "") == target:
            return info.mountpoint
    return None


def verify(cache_dir: Path, *, repair: bool = False) -> VerifyReport:
    cache_dir = Path(cache_dir)
    if not (cache_dir / "chunks").is_dir():
        raise MmfsError(f"{cache_dir} holds no mmfs chunk cache (no chunks/)")
    live = daemon_using(cache_dir)
    if live is not None:
        raise MmfsError(f"{cache_dir} is in use by the mmfs mount at {live}: stop it first (mmfs unmount {live})")
    report = VerifyReport()
    disk = DiskTier(cache_dir / "chunks", 1 << 62)
    metadata: MetadataStore | None = None
    try:
        try:
            metadata = MetadataStore(cache_dir / "metadata")
        except CacheError:
            metadata = None
        entries = list(disk._index.items())
        digests = disk._stored_digests([key for key, _ in entries])
        maps: dict[tuple[str, int], object] = {}
        for key, entry in entries:
            path = disk._path(key.content_id, key.chunk_size)
            stored = digests.get(key)
            reason = None
            try:
                with open(path, "rb", buffering=0) as f:
                    data = os.pread(f.fileno(), entry.size, key.index * key.chunk_size)
            except OSError as exc:
                data, reason = b"", f"unreadable: {exc}"
            report.chunks += 1
            report.bytes += len(data)
            if reason is None and (stored is None or len(data) != entry.size or block_digests(data) != stored):
                reason = "bytes do not match their block digests"
            if reason is None and metadata is not None:
                ident = (key.content_id, key.chunk_size)
                if ident not in maps:
                    maps[ident] = metadata.get_map(*ident)
                chunk_map = maps[ident]
                if chunk_map is not None and (key.index >= chunk_map.chunk_count  # type: ignore[attr-defined]
                                              or not chunk_map.matches(key.index, stored)):  # type: ignore[attr-defined]
                    reason = "stored digests differ from the file's chunk map"
            if reason is not None:
                report.damaged.append(Damage(path, key.index, reason))
                if repair:
                    disk._drop_damaged(key, entry)
                    report.dropped += 1
    finally:
        disk._close()
        if metadata is not None:
            metadata.close()
    return report
