"""The fetch engine: "chunk k of file F at commit C" into bytes whose trust is known.

One engine, two deployments. The node daemon runs it with the backend as its remote (or,
embedded, the Hub); the backend server runs it with the Hub as its remote. For each
chunk it asks the tiers in order (memory, then disk), then the remote, and writes what it
found back into the faster tiers::

    read_chunk ─▶ memory ─▶ disk ─▶ remote (single-flight, capped concurrency)
                   ▲          ▲          │ block digests computed once, on arrival
                   └──────────┴──────────┘ write-back (disk: behind the reader, bounded in bytes)

Trust (docs/datapath.md). A file's chunk map (:mod:`mmfs.chunkmap`) is the reference every
chunk copy is checked against. Where the remote is the upstream, this engine makes the map:
it feeds chunks in order to the whole-file hash (LFS sha256 or git blob id) and, when the
hash matches, the block digests it fed become the map. Where the remote is a backend
(``Remote.verifies_files``), the backend made the map and this engine fetches it. Chunks that
arrive before the map exists are provisional: readers may get them, except a file's last
chunk, which is served only once the map exists and only to a reader whose provisional
chunks (remembered in its :class:`Served`) all match it. When a map arrives, every
provisional copy held is settled against it; where a copy is dropped, or a file fails its
check, listeners (the FUSE layer: page caches) are told.

Use it as an async context manager: it owns a nursery in which fetches run, so a reader
that is cancelled never cancels a fetch other readers wait on.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Hashable, Sequence

import trio

from .budget import ByteBudget
from .chunkmap import ChunkMap, block_digests, map_key
from .errors import AccessDenied, CacheError, IntegrityError, MmfsError, NotFound, UpstreamError, first_error
from .manifest import ChunkKey, FileEntry, Manifest
from .metadata import MetadataStore, RefMove
from .names import RepoRef, is_commit
from .remote.base import FetchedChunk, FileSource, Remote
from .singleflight import SingleFlight
from .tiers.base import Chunk, ChunkTier, TierStatistics

log = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    #: Chunks fetched from the remote at once, across all files ...
    max_concurrent_fetches: int = 16
    #: ... and their bytes: what read-ahead and verification may have in flight.
    max_fetch_bytes: int = 64 << 20
    #: Bytes of chunks handed to readers but not yet written to the slower tiers (disk).
    max_pending_write_bytes: int = 64 << 20
    #: Seconds a branch or tag resolution is trusted before asking the remote again.
    ref_ttl: float = 30.0
    #: Never ask the remote to resolve a revision; use what the metadata DB remembers.
    offline: bool = False
    #: Who holds chunks in memory, recorded per file (``POD_NAME``, else the host name).
    holder: str = ""
    #: Seconds between asks for the map of a file this node holds provisional chunks of
    #: (remotes that verify files), and how long a "not verified yet" answer is trusted.
    map_poll_interval: float = 5.0
    #: Seconds one ask for a map may wait at the remote while it verifies the file; the
    #: engine asks again as long as the remote reports progress.
    map_wait: float = 10.0
    #: Longest a wait for a file's verification may go without any progress.
    stall_timeout: float = 60.0
    #: Bytes of chunk maps kept in memory (the metadata DB keeps them all).
    map_cache_bytes: int = 64 << 20

    @classmethod
    def from_env(cls, **overrides: object) -> "EngineConfig":
        defaults = {"offline": _env_flag("HF_HUB_OFFLINE"),
                    "holder": os.environ.get("POD_NAME") or socket.gethostname()}
        return cls(**{**defaults, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    remote_fetches: int
    remote_bytes: int
    coalesced: int
    inflight: int
    integrity_failures: int
    files_verified: int
    provisional_dropped: int
    pending_write_bytes: int
    tiers: tuple[TierStatistics, ...]


class Served:
    """What a reader was given before the file's map existed: chunk index -> fingerprint
    of the provisional copy. A reader is whoever may see those bytes again: a backend
    response, or (on a node) an inode's page cache, shared by its handles (see
    :mod:`mmfs.vfs`), which subclasses this to check several records at once."""

    def __init__(self) -> None:
        self.provisional: dict[int, bytes] = {}

    def note(self, index: int, chunk: Chunk) -> None:
        if not chunk.verified:
            self.provisional[index] = chunk.fingerprint

    @property
    def holds_provisional(self) -> bool:
        return bool(self.provisional)

    def mismatches(self, chunk_map: ChunkMap) -> list[int]:
        """Indices of chunks this reader got that the map says were wrong."""
        return sorted(i for i, fp in self.provisional.items() if chunk_map.chunk_fingerprint(i) != fp)


class _FileHash:
    """Whole-file hash of one content, advanced as chunks arrive in order, and the block
    digests of each chunk fed to it: if the file matches, those become its chunk map."""

    def __init__(self, entry: FileEntry) -> None:
        self.hasher = entry.new_hasher()
        self.digests: list[bytes] = []
        self.next_index = 0
        self.hashed_bytes = 0
        self.lock = trio.Lock()

    def feed(self, chunk: Chunk) -> None:
        """Hash one more chunk (in a worker thread: hashlib releases the GIL)."""
        self.hasher.update(chunk.data)
        self.digests.append(chunk.digests)
        self.next_index += 1
        self.hashed_bytes += len(chunk.data)


#: Chunks fetched ahead while a file's remaining chunks are hashed for verification.
_VERIFY_AHEAD = 8
#: Partly hashed files whose state is kept; beyond it the oldest idle one is dropped (its
#: file is then re-read from the tiers when verified).
_MAX_FILE_HASHES = 64


class FetchEngine:
    def __init__(self, tiers: Sequence[ChunkTier], remote: Remote, metadata: MetadataStore | None = None,
                 config: EngineConfig = EngineConfig()) -> None:
        self.tiers = list(tiers)
        self.remote = remote
        self.metadata = metadata
        self.config = config
        self._fetch_limiter = trio.CapacityLimiter(config.max_concurrent_fetches)
        self._fetch_budget = ByteBudget(config.max_fetch_bytes, "fetch budget")
        self._chunk_flights: SingleFlight[Hashable, Chunk] = SingleFlight()
        self._meta_flights: SingleFlight[tuple, object] = SingleFlight()
        self._refs: dict[tuple[RepoRef, str], tuple[str, float]] = {}
        #: Refs a watcher (:mod:`mmfs.refwatch`) checks every ``ref_ttl``: a reader trusts
        #: their commit for two TTLs, so readers do not add upstream checks of their own.
        self.watched: set[tuple[RepoRef, str]] = set()
        #: Refs whose revision the remote no longer knows: served at their last commit.
        self.gone: set[tuple[RepoRef, str]] = set()
        self._ref_listeners: list[Callable[[RefMove], None]] = []
        #: (repo, commit) -> when it was last listed or opened: use keeps a commit from
        #: being retired (:mod:`mmfs.retention`) even when no ref points at it.
        self.commit_used: dict[tuple[RepoRef, str], float] = {}
        self._manifests: dict[tuple[RepoRef, str], Manifest] = {}
        self._file_hashes: OrderedDict[str, _FileHash] = OrderedDict()  # map key -> running hash
        self._maps: OrderedDict[str, ChunkMap] = OrderedDict()  # map key -> map (LRU by bytes)
        self._map_bytes = 0
        self._no_local_map: set[str] = set()  # map keys the metadata DB was found not to hold
        self._next_map_ask: dict[str, float] = {}  # map key -> when to ask the remote again
        self._remote_progress: dict[str, int] = {}  # map key -> bytes the remote has verified
        self._provisional: dict[str, FileSource] = {}  # map key -> a file holding provisional chunks
        self._recorded: set[str] = set()
        self._purges: dict[str, int] = {}  # content id -> times it failed verification here
        self._tainted: dict[str, float] = {}  # content id -> see tainted_at()
        self._listeners: list[Callable[[str], None]] = []
        self._write_budget = ByteBudget(config.max_pending_write_bytes, "write-behind budget")
        self._pending_writes = 0
        self._writes_idle = trio.Event()
        self._written_behind: dict[ChunkKey, Chunk] = {}  # on their way to the disk tier
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: trio.Nursery | None = None
        self._remote_fetches = self._remote_bytes = self._integrity_failures = self._dropped = 0
        self._verified_count = 0
        self._activity = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> "FetchEngine":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        if self.remote.verifies_files:
            self._nursery.start_soon(self._poll_maps)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None and self._nursery_cm is not None
        if not await self.flush():
            log.warning("stopping with %d chunk writes to the disk cache unfinished", self._pending_writes)
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = None
            for tier in self.tiers:
                await tier.aclose()
            await self.remote.aclose()
            if self.metadata is not None:
                self.metadata.close()

    @property
    def activity(self) -> int:
        """Grows whenever bytes arrive or a remote reports verification progress: waiters
        with a deadline extend it while this moves (bytes are flowing, so no EIO)."""
        return self._activity + self.remote.received_bytes

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("FetchEngine used outside 'async with'")
        return self._nursery

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(content_id)`` whenever bytes of that content that readers may
        hold (page caches) turned out wrong: a provisional copy failed its map, or the
        file failed its whole-file check."""
        self._listeners.append(listener)

    def _tell(self, content_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(content_id)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop verification
                log.exception("integrity listener failed for %s", content_id)

    # -- revisions and manifests --------------------------------------------------------

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        """The commit ``revision`` names now; branches are re-checked after ``ref_ttl``.

        When the remote cannot be reached (or in offline mode) the last commit the
        metadata DB remembers is used, so warm nodes keep working without a backend.
        """
        if is_commit(revision):
            return revision
        cached = self._refs.get((repo, revision))
        ttl = self.config.ref_ttl * (2 if (repo, revision) in self.watched else 1)
        if cached and time.monotonic() - cached[1] < ttl:
            return cached[0]
        return await self.check_ref(repo, revision, auth=auth)

    async def check_ref(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        """Ask the remote where ``revision`` points now (one request however many ask at
        once), note a move, and return the commit.

        When the remote cannot be reached (or in offline mode) the last commit the metadata
        DB remembers is used, so warm nodes keep working without a backend; so is it, with
        a warning, when the remote no longer knows the revision (a branch or PR deleted
        upstream). A revision never resolved here and unknown upstream is :class:`NotFound`."""
        remembered = self.metadata.get_ref(repo, revision) if self.metadata else None
        known = self._refs.get((repo, revision))
        last = known[0] if known else remembered.commit if remembered else None
        if self.config.offline:
            if last is None:
                raise NotFound(f"{repo}@{revision} is not in the local cache and HF_HUB_OFFLINE is set")
            return last

        async def ask_remote() -> str:
            return await self.remote.resolve(repo, revision, auth=auth)

        try:
            commit = await self._meta_flights.run(("resolve", repo, revision, _auth_id(auth)), ask_remote,
                                                 self.nursery)
        except MmfsError as exc:
            if last is None or not isinstance(exc, (NotFound, UpstreamError)):
                raise
            if isinstance(exc, NotFound):
                if (repo, revision) not in self.gone:
                    log.warning("%s@%s is gone upstream (%s); serving its last known commit %s", repo, revision,
                                exc, last)
                self.gone.add((repo, revision))
            else:
                log.warning("cannot resolve %s@%s (%s); using last known commit %s", repo, revision, exc, last)
            # Trust it for a TTL too: readers must not wait out the retries on every lookup.
            self._refs[(repo, revision)] = (last, time.monotonic())
            return last
        assert isinstance(commit, str)
        self.gone.discard((repo, revision))
        await self.note_ref(repo, revision, commit, detected_by=self.config.holder)
        return commit

    async def note_ref(self, repo: RepoRef, revision: str, commit: str, *, detected_by: str) -> None:
        """``revision`` points at ``commit`` now (asked here, or told by the backend): readers
        see it at once; a move is recorded in the metadata DB and told to listeners."""
        # What this process knew, read and replaced with no await between: of concurrent
        # callers told the same move (a watcher's check, a reader's resolve), one records it.
        known = self._refs.get((repo, revision))
        self._refs[(repo, revision)] = (commit, time.monotonic())
        remembered = self.metadata.get_ref(repo, revision) if self.metadata and not known else None
        last = known[0] if known else remembered.commit if remembered else None
        if last == commit:
            return
        if self.metadata:
            await trio.to_thread.run_sync(self.metadata.put_ref, repo, revision, commit)
        if last is None:
            return
        move = RefMove(f"{repo}@{revision}", last, commit, time.time(), detected_by)
        log.info("%s@%s moved from %s to %s (detected by %s)", repo, revision, last, commit, detected_by)
        if self.metadata:
            await trio.to_thread.run_sync(self.metadata.record_move, move)
        for listener in self._ref_listeners:
            try:
                listener(move)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop resolution
                log.exception("ref listener failed for %s", move.ref)

    def add_ref_listener(self, listener: Callable[[RefMove], None]) -> None:
        """Call ``listener(move)`` whenever a ref is seen pointing at a new commit."""
        self._ref_listeners.append(listener)

    def known_ref(self, repo: RepoRef, revision: str) -> str | None:
        """The commit ``revision`` points at as far as this process knows (no remote call)."""
        known = self._refs.get((repo, revision))
        if known:
            return known[0]
        remembered = self.metadata.get_ref(repo, revision) if self.metadata else None
        return remembered.commit if remembered else None

    async def manifest(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> Manifest:
        """The manifest of the commit ``revision`` resolves to (cached for good per commit)."""
        commit = await self.resolve(repo, revision, auth=auth)
        self.commit_used[(repo, commit)] = time.time()
        found = self._manifests.get((repo, commit))
        if found is not None:
            return found
        if self.metadata is not None:
            found = self.metadata.get_manifest(repo, commit)
        if found is None:
            async def ask_remote() -> Manifest:
                manifest = await self.remote.manifest(repo, commit, auth=auth)
                if self.metadata is not None:
                    await trio.to_thread.run_sync(self.metadata.put_manifest, manifest)
                return manifest

            found = await self._meta_flights.run(("manifest", repo, commit, _auth_id(auth)), ask_remote,
                                                self.nursery)
        assert isinstance(found, Manifest)
        self._manifests[(repo, commit)] = found
        return found

    def known_manifests(self) -> list[Manifest]:
        return list(self._manifests.values())

    # -- reads --------------------------------------------------------------------------

    async def read(self, source: FileSource, offset: int, size: int, *, auth: str | None = None,
                   served: Served | None = None) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of a file, short only at end of file.

        ``served`` is the reader's record of provisional chunks it was given (see
        :class:`Served`); a reader without one is treated as a fresh reader each call."""
        entry = source.entry
        indices = entry.chunks_for(offset, size)
        end = min(offset + size, entry.size)
        served = served if served is not None else Served()
        if not indices:
            entry.check_empty()
            return b""
        if len(indices) == 1:
            return await self._read_span(source, indices[0], offset, end, auth, served)
        parts: dict[int, bytes | memoryview] = {}

        async def fetch(index: int) -> None:
            parts[index] = await self._read_span(source, index, offset, end, auth, served)

        try:
            async with trio.open_nursery() as nursery:
                for index in indices:
                    nursery.start_soon(fetch, index)
        except BaseExceptionGroup as group:
            error = first_error(group)
            if error is None:
                raise
            raise error from None
        return b"".join(parts[i] for i in indices)

    async def _read_span(self, source: FileSource, index: int, offset: int, end: int, auth: str | None,
                         served: Served) -> bytes | memoryview:
        """The part of chunk ``index`` inside the file range ``[offset, end)``.

        A part of a verified chunk is asked of each tier as a range, so the disk tier reads
        and checks only the blocks it covers; anything else loads the whole chunk."""
        entry = source.entry
        start, stop = entry.chunk_span(index)
        a, b = max(offset, start) - start, min(end, stop) - start
        key = entry.chunk_key(index)
        if b - a < stop - start and index != entry.chunk_count - 1 and key not in self._chunk_flights \
                and self.known_map(entry) is not None:
            for tier in self.tiers:
                part = await tier.get_range(key, a, b)
                if part is not None:
                    return part
        chunk = await self.read_chunk(source, index, auth=auth, served=served)
        return chunk.data if b - a == len(chunk.data) else memoryview(chunk.data)[a:b]  # no copy

    def read_cached(self, source: FileSource, offset: int, size: int,
                    served: Served | None = None) -> bytes | memoryview | None:
        """:meth:`read` answered from the first tier alone, without waiting; ``None`` on a miss.

        The fast path of the FUSE read loop: no task switch, no copy when the range lies in
        one chunk (a ``memoryview`` into it). A range reaching a file's last chunk is left
        to :meth:`read` unless the file's map is known and the reader holds no provisional
        chunk; provisional chunks served here are noted in ``served``."""
        entry = source.entry
        indices = entry.chunks_for(offset, size)
        if not indices:
            entry.check_empty()
            return b""
        get = getattr(self.tiers[0], "get_nowait", None) if self.tiers else None
        if get is None:
            return None
        if indices[-1] == entry.chunk_count - 1 and (self.known_map(entry) is None
                                                     or served is None or served.holds_provisional):
            return None
        chunks = []
        for index in indices:
            chunk = get(entry.chunk_key(index))
            if chunk is None or (not chunk.verified and (served is None or self.known_map(entry) is not None)):
                return None
            chunks.append(chunk)
        if served is not None:
            for index, chunk in zip(indices, chunks):
                served.note(index, chunk)
        base = indices[0] * entry.chunk_size
        end = min(offset + size, entry.size)
        if len(chunks) == 1:
            return memoryview(chunks[0].data)[offset - base:end - base]
        return b"".join(c.data for c in chunks)[offset - base:end - base]

    async def read_chunk(self, source: FileSource, index: int, *, auth: str | None = None,
                         served: Served | None = None) -> Chunk:
        """Chunk ``index`` of ``source`` for a reader.

        A file's last chunk only once the file's map exists, verified, and only when every
        provisional chunk this reader got (``served``) matches the map; other chunks may be
        provisional (noted in ``served``).

        The work readers share (a chunk's fetch, a whole file's check) runs with the
        credentials of whoever asked first. When the upstream refuses those (a token
        revoked meanwhile), a reader with credentials of its own tries again once, so that
        it fails only if its own token is refused too."""
        try:
            return await self._read_chunk(source, index, auth, served)
        except AccessDenied:
            if auth is None or _solo.get() is not None:
                raise
            token = _solo.set(_auth_id(auth))  # shared only with readers of the same token now
            try:
                return await self._read_chunk(source, index, auth, served)
            finally:
                _solo.reset(token)

    async def _read_chunk(self, source: FileSource, index: int, auth: str | None, served: Served | None) -> Chunk:
        entry = source.entry
        if index == entry.chunk_count - 1:
            chunk_map = await self.chunk_map(source, wait=True, auth=auth)
            assert chunk_map is not None
            wrong = served.mismatches(chunk_map) if served is not None else []
            if wrong:
                raise IntegrityError(f"{entry.path}: chunks {wrong[:8]} this reader was given before the file "
                                     f"was verified turned out wrong; open the file again")
        chunk = await self._chunk(source, index, auth)
        if served is not None:
            served.note(index, chunk)
        elif not chunk.verified and self.remote.verifies_files:
            self._want_map(source)
        return chunk

    async def held_chunk(self, key: ChunkKey, wait: float) -> Chunk | None:
        """A verified copy of a chunk held here, for a peer (:mod:`mmfs.peer_server`): from
        the tiers, or from a load already in flight (waited for up to ``wait`` seconds).
        Never starts a load: a node serves what it has, it does not fetch for others."""
        with trio.move_on_after(wait):
            await self._chunk_flights.join(key)
        chunk_map = self._maps.get(map_key(key.content_id, key.chunk_size))
        for tier in self.tiers:
            chunk = tier.peek(key) or (await tier.get(key) if tier.contains(key) else None)
            if chunk is None:
                continue
            if chunk.verified or (chunk_map is not None and chunk_map.matches(key.index, chunk.digests)):
                return chunk
            return None
        return None

    def held_keys(self) -> set[ChunkKey]:
        """The verified chunks the tiers hold now (no I/O): what this node can share."""
        return set().union(*(tier.verified_keys() for tier in self.tiers))

    async def warm(self, source: FileSource, *, auth: str | None = None, ahead: int = 8) -> None:
        """Read a whole file into the tiers (fetching, and so verifying, what is missing)
        with ``ahead`` chunks in flight, keeping none of it for a reader."""
        entry = source.entry
        for index in range(entry.chunk_count):
            self.prefetch(source, range(index + 1, min(entry.chunk_count, index + 1 + ahead)), auth=auth)
            await self.read_chunk(source, index, auth=auth)

    def prefetch(self, source: FileSource, indices: range, *, auth: str | None = None) -> None:
        """Start fetching chunks in the background; errors surface when they are read."""
        for index in indices:
            key = source.entry.chunk_key(index)
            if key in self._chunk_flights or self.tiers and self.tiers[0].peek(key) is not None:
                continue
            self._chunk_flights.start(key, lambda i=index: self._load(source, i, auth), self.nursery)

    async def _chunk(self, source: FileSource, index: int, auth: str | None) -> Chunk:
        """A whole chunk, from the tiers or fetched; checked against the map if one is known."""
        key = source.entry.chunk_key(index)
        chunk = await self.tiers[0].get(key) if self.tiers else None
        if chunk is None:
            chunk = await self._load_shared(source, index, auth)
        if not chunk.verified:
            chunk_map = self.known_map(source.entry)
            if chunk_map is not None:
                if chunk_map.matches(index, chunk.digests):
                    return Chunk(chunk.data, chunk.digests, True)
                # A copy that arrived while the map was on its way: settle drops it.
                await self._settle(source, chunk_map)
                chunk = await self._load_shared(source, index, auth)
                if not chunk.verified and not chunk_map.matches(index, chunk.digests):
                    raise IntegrityError(f"{source.entry.path}: chunk {index} does not match the file's chunk map")
        return chunk

    async def _load_shared(self, source: FileSource, index: int, auth: str | None) -> Chunk:
        key = source.entry.chunk_key(index)
        try:
            return await self._chunk_flights.run(_scoped(key), lambda: self._load(source, index, auth), self.nursery)
        except _PurgedWhileLoading:
            # Joined a load whose file failed verification meanwhile: its bytes are
            # suspect, but this reader asked afterwards; load the chunk afresh, once.
            return await self._chunk_flights.run(_scoped(key), lambda: self._load(source, index, auth), self.nursery)

    async def _load(self, source: FileSource, index: int, auth: str | None) -> Chunk:
        """Find a chunk in the tiers below the first, or fetch it; write it back up."""
        key = source.entry.chunk_key(index)
        purges = self._purges.get(key.content_id, 0)
        for depth in range(1, len(self.tiers)):
            chunk = await self.tiers[depth].get(key)
            if chunk is not None:
                await self._store(source, key, chunk, self.tiers[:depth], purges)
                await self._advance_hash(source, index, chunk, purges)
                return chunk
        chunk = self._written_behind.get(key)  # evicted from memory before it reached the disk
        if chunk is not None:
            await self._store(source, key, chunk, self.tiers[:1], purges)
            await self._advance_hash(source, index, chunk, purges)
            return chunk
        chunk = await self._fetch(source, index, auth)
        await self._store(source, key, chunk, self.tiers, purges)
        await self._advance_hash(source, index, chunk, purges)
        return chunk

    async def _fetch(self, source: FileSource, index: int, auth: str | None) -> Chunk:
        """Chunk ``index`` from the remote, hashed once into its block digests and checked
        against the file's map where one is known (else provisional)."""
        entry = source.entry
        start, end = entry.chunk_span(index)
        async with self._fetch_limiter:
            taken = await self._fetch_budget.acquire(end - start)
            try:
                fetched = await self.remote.fetch_chunk(source, index, auth=auth)
            except IntegrityError:
                await self._forget(source, "the remote reported a failed verification")
                raise
            finally:
                self._fetch_budget.release(taken)
        if len(fetched.data) != end - start:
            raise IntegrityError(f"{entry.path}: chunk {index} has {len(fetched.data)} bytes, expected {end - start}")
        digests = fetched.digests or await trio.to_thread.run_sync(block_digests, fetched.data)
        chunk_map = self.known_map(entry)
        if chunk_map is not None and not chunk_map.matches(index, digests):
            self._integrity_failures += 1
            log.error("integrity: %s@%s %s chunk %d does not match the file's chunk map (from %s)", source.repo,
                      source.commit, entry.path, index, self.remote.url or "the remote")
            raise IntegrityError(f"{entry.path}: chunk {index} does not match the file's chunk map")
        self._remote_fetches += 1
        self._remote_bytes += len(fetched.data)
        await self._record_download(source, fetched)
        if chunk_map is None and fetched.file_verified and self.remote.verifies_files:
            self._want_map(source, force=True)
        return Chunk(fetched.data, digests, chunk_map is not None)

    async def _record_download(self, source: FileSource, fetched: FetchedChunk) -> None:
        """Note where a file came from, once per content and process.

        While the engine verifies files itself, the record also names the download in
        flight (``<holder>:<id>``) until the whole file has passed its hash check."""
        content_id = source.entry.content_id
        if self.metadata is None or content_id in self._recorded:
            return
        self._recorded.add(content_id)
        changes: dict[str, object] = {}
        if not self.remote.verifies_files and self.known_map(source.entry) is None:
            changes["inflight_download"] = f"{self.config.holder}:{uuid.uuid4().hex[:16]}"
        record = self.metadata.get_file(content_id)
        if record is None or not record.downloaded_at:
            changes.update(source_url=fetched.source_url, etag=fetched.etag, last_modified=fetched.last_modified,
                           downloaded_at=time.time(), holder=self.config.holder)
        if changes:
            await trio.to_thread.run_sync(lambda: self.metadata.update_file(  # type: ignore[union-attr]
                content_id, **changes))

    # -- storing ------------------------------------------------------------------------

    async def _store(self, source: FileSource, key: ChunkKey, chunk: Chunk, tiers: Sequence[ChunkTier],
                     purges: int) -> None:
        """Put a chunk into the first of ``tiers`` now and the others behind the reader.

        A reader waits for the memory copy only: local disk writes happen in the
        background, at most ``max_pending_write_bytes`` at a time (then loads wait:
        back-pressure). ``purges`` is the file's purge count when this load began: a file
        that failed verification meanwhile must not get the chunk back into any cache."""
        self._check_not_purged(key, purges)
        if not chunk.verified:
            self._provisional.setdefault(map_key(key.content_id, key.chunk_size), source)
        if not tiers:
            return
        await self._put(tiers[0], key, chunk)
        self._check_not_purged(key, purges)
        if len(tiers) > 1:
            taken = await self._write_budget.acquire(len(chunk.data))
            self._pending_writes += 1
            self._written_behind[key] = chunk
            self.nursery.start_soon(self._write_behind, key, chunk, tiers[1:], purges, taken)

    async def _write_behind(self, key: ChunkKey, chunk: Chunk, tiers: Sequence[ChunkTier], purges: int,
                            taken: int) -> None:
        try:
            for tier in tiers:
                if self._purges.get(key.content_id, 0) != purges:
                    return  # the disk tier also drops writes a discard overtook
                chunk_map = self._maps.get(map_key(key.content_id, key.chunk_size))
                if not chunk.verified and chunk_map is not None:
                    # The map arrived while this write waited: store the settled copy only.
                    if not chunk_map.matches(key.index, chunk.digests):
                        return
                    chunk = Chunk(chunk.data, chunk.digests, True)
                await self._put(tier, key, chunk)
                chunk_map = self._maps.get(map_key(key.content_id, key.chunk_size))
                if not chunk.verified and chunk_map is not None:
                    # The map was adopted while this write was in flight, so the settling
                    # it did missed this copy: without this the copy would stay provisional
                    # (and its file never complete on disk, never a passthrough backing file).
                    try:
                        dropped = await tier.settle(chunk_map)
                    except CacheError as exc:
                        log.error("%s tier cannot settle %s: %s", tier.name, key.content_id, exc)
                        dropped = []
                    if dropped:
                        self._dropped += len(dropped)
                        self._tell(key.content_id)
        finally:
            self._written_behind.pop(key, None)
            self._write_budget.release(taken)
            self._pending_writes -= 1
            if not self._pending_writes:
                self._writes_idle.set()
                self._writes_idle = trio.Event()

    async def _put(self, tier: ChunkTier, key: ChunkKey, chunk: Chunk) -> None:
        try:
            await tier.put(key, chunk)
        except CacheError as exc:
            # Disk full or broken: keep serving from the other tiers.
            log.error("%s tier cannot store %s: %s", tier.name, key.content_id, exc)

    def _check_not_purged(self, key: ChunkKey, purges: int) -> None:
        if self._purges.get(key.content_id, 0) != purges:
            raise _PurgedWhileLoading(f"{key.content_id} failed verification while chunk {key.index} was loaded")

    async def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the chunks written behind readers are stored; False on timeout."""
        with trio.move_on_after(timeout):
            while self._pending_writes:
                await self._writes_idle.wait()
            return True
        return False

    # -- chunk maps ---------------------------------------------------------------------

    def is_verified(self, entry: FileEntry) -> bool:
        """Whether the file's chunk map is known here (it matched its upstream hash)."""
        return self.known_map(entry) is not None

    def known_map(self, entry: FileEntry) -> ChunkMap | None:
        """The file's chunk map if this process or its metadata DB has it (no remote call)."""
        key = map_key(entry.content_id, entry.chunk_size)
        found = self._maps.get(key)
        if found is not None:
            self._maps.move_to_end(key)
            return found
        if self.metadata is None or key in self._no_local_map:
            return None
        found = self.metadata.get_map(entry.content_id, entry.chunk_size)
        if found is None:
            for other in self.metadata.map_sizes(entry.content_id):
                stored = self.metadata.get_map(entry.content_id, other)
                found = stored.recut(entry.chunk_size) if stored is not None else None
                if found is not None:
                    break
        if found is not None and found.size == entry.size:
            self._cache_map(found)
            return found
        self._no_local_map.add(key)
        return None

    def _cache_map(self, chunk_map: ChunkMap) -> None:
        if chunk_map.key in self._maps:
            return
        self._maps[chunk_map.key] = chunk_map
        self._map_bytes += len(chunk_map.digests)
        while self._map_bytes > self.config.map_cache_bytes and len(self._maps) > 1:
            _, old = self._maps.popitem(last=False)
            self._map_bytes -= len(old.digests)

    def verification_progress(self, entry: FileEntry) -> int:
        """Bytes of the file hashed so far by a whole-file check under way here (0: none)."""
        state = self._file_hashes.get(map_key(entry.content_id, entry.chunk_size))
        return state.hashed_bytes if state is not None else 0

    async def chunk_map(self, source: FileSource, *, wait: bool = False, auth: str | None = None) -> ChunkMap | None:
        """The file's chunk map; with ``wait``, made (or waited for) if it does not exist yet.

        Without ``wait``: what is known here, or (remotes that verify files) what the
        remote has now, asked at most every ``map_poll_interval`` seconds. With ``wait``:
        this engine verifies the whole file itself, or waits while the remote does, for as
        long as it makes progress; :class:`IntegrityError` if the file fails its check."""
        entry = source.entry
        found = self.known_map(entry)
        if found is not None:
            return found
        if not self.remote.verifies_files:
            if not wait:
                return None
            await self._verify_file(source, auth)
            found = self.known_map(entry)
            if found is None:
                raise IntegrityError(f"{entry.path} failed verification while this reader waited")
            return found
        key = map_key(entry.content_id, entry.chunk_size)
        if not wait:
            # An ask in flight is joined (its answer is moments away); a recent one that said
            # "not verified yet" is trusted until the poll interval has passed.
            if ("map", key, False) not in self._meta_flights and self._next_map_ask.get(key, 0.0) > time.monotonic():
                return None
            return await self._meta_flights.run(_scoped(("map", key, False)), lambda: self._ask_map(source, auth, 0.0),
                                                self.nursery)  # type: ignore[return-value]
        last_progress, since = -1, time.monotonic()
        while True:
            answer = await self._meta_flights.run(_scoped(("map", key, True)),
                                                  lambda: self._ask_map(source, auth, self.config.map_wait),
                                                  self.nursery)
            if isinstance(answer, ChunkMap):
                return answer
            progress = self._remote_progress.get(key, 0)
            if progress != last_progress:
                last_progress, since = progress, time.monotonic()
            elif time.monotonic() - since > self.config.stall_timeout:
                raise UpstreamError(f"{entry.path}: {self.remote.url} made no verification progress for "
                                    f"{self.config.stall_timeout:g}s")

    async def _ask_map(self, source: FileSource, auth: str | None, wait: float) -> ChunkMap | None:
        """One ask of the remote; adopts the map it answers with."""
        entry = source.entry
        key = map_key(entry.content_id, entry.chunk_size)
        try:
            answer = await self.remote.fetch_map(source, wait=wait, auth=auth)
        except IntegrityError:
            await self._forget(source, "the remote reported a failed verification")
            raise
        if isinstance(answer, ChunkMap):
            if answer.content_id != entry.content_id or answer.size != entry.size \
                    or answer.chunk_size != entry.chunk_size:
                raise UpstreamError(f"{self.remote.url} sent a chunk map for another file than {entry.path}")
            self._remote_progress.pop(key, None)
            await self._adopt(source, answer, verified_here=False)
            return answer
        if answer != self._remote_progress.get(key):
            self._activity += 1
        self._remote_progress[key] = answer
        self._next_map_ask[key] = time.monotonic() + self.config.map_poll_interval
        return None

    def _want_map(self, source: FileSource, *, force: bool = False) -> None:
        """Ask the remote for a map in the background (at most every poll interval)."""
        key = map_key(source.entry.content_id, source.entry.chunk_size)
        if key in self._maps:
            return
        if not force and self._next_map_ask.get(key, 0.0) > time.monotonic():
            return
        self._next_map_ask[key] = time.monotonic() + self.config.map_poll_interval

        async def ask() -> None:
            try:
                await self._meta_flights.run(("map", key, False), lambda: self._ask_map(source, None, 0.0),
                                             self.nursery)
            except MmfsError as exc:
                log.debug("chunk map of %s not available: %s", source.entry.path, exc)

        self.nursery.start_soon(ask)

    async def _poll_maps(self) -> None:
        """Remotes that verify files: ask for the maps of files held provisionally here, so
        that what a node holds is settled even if nobody reads the file's end."""
        while True:
            await trio.sleep(self.config.map_poll_interval)
            for key, source in list(self._provisional.items()):
                if key in self._maps:
                    self._provisional.pop(key, None)
                else:
                    self._want_map(source)

    async def _adopt(self, source: FileSource, chunk_map: ChunkMap, *, verified_here: bool) -> None:
        """A file's map is known: keep it and settle every provisional copy held."""
        self._cache_map(chunk_map)
        self._next_map_ask.pop(chunk_map.key, None)
        self._no_local_map.discard(chunk_map.key)
        if verified_here:
            self._verified_count += 1
        if self.metadata is not None:
            await trio.to_thread.run_sync(lambda: self.metadata.put_map(  # type: ignore[union-attr]
                chunk_map, verified_here=verified_here))
        await self._settle(source, chunk_map)

    async def _settle(self, source: FileSource, chunk_map: ChunkMap) -> None:
        dropped: set[int] = set()
        for tier in self.tiers:
            dropped.update(await tier.settle(chunk_map))
        for key, chunk in list(self._written_behind.items()):
            if key.content_id == chunk_map.content_id and key.chunk_size == chunk_map.chunk_size \
                    and not chunk.verified and not chunk_map.matches(key.index, chunk.digests):
                dropped.add(key.index)  # _write_behind checks the map before writing
        self._provisional.pop(chunk_map.key, None)
        if dropped:
            self._dropped += len(dropped)
            self._tainted[chunk_map.content_id] = time.time()
            if self.metadata is not None:
                await trio.to_thread.run_sync(lambda: self.metadata.update_file(  # type: ignore[union-attr]
                    chunk_map.content_id, tainted_at=time.time()))
            log.warning("integrity: %s@%s %s: %d chunk copies received before the file was verified did not "
                        "match it and were dropped (chunks %s)", source.repo, source.commit, source.entry.path,
                        len(dropped), sorted(dropped)[:8])
            self._tell(chunk_map.content_id)

    # -- whole-file verification (remotes that do not verify files) ---------------------

    async def _advance_hash(self, source: FileSource, index: int, chunk: Chunk, purges: int) -> None:
        """Feed the file's running hash if this chunk is the next one it needs (and its
        load did not start before a purge of the file: such bytes are suspect)."""
        entry = source.entry
        if self.remote.verifies_files or self.known_map(entry) is not None:
            return
        state = self._hash_state(entry)
        if state.next_index != index or state.lock.locked():
            return
        async with state.lock:
            if state.next_index != index or self._purges.get(entry.content_id, 0) != purges:
                return
            await trio.to_thread.run_sync(state.feed, chunk)
            # Chunks that arrived early (parallel read-ahead) are still in memory: catch up.
            while self.tiers and state.next_index < entry.chunk_count:
                ahead = self.tiers[0].peek(entry.chunk_key(state.next_index))
                if ahead is None:
                    break
                await trio.to_thread.run_sync(state.feed, ahead)

    def _hash_state(self, entry: FileEntry) -> _FileHash:
        key = map_key(entry.content_id, entry.chunk_size)
        state = self._file_hashes.get(key)
        if state is None:
            state = self._file_hashes[key] = _FileHash(entry)
            for old_key, old in list(self._file_hashes.items()):
                if len(self._file_hashes) <= _MAX_FILE_HASHES:
                    break
                if not old.lock.locked() and old is not state:
                    del self._file_hashes[old_key]
        self._file_hashes.move_to_end(key)
        return state

    async def _verify_file(self, source: FileSource, auth: str | None) -> None:
        entry = source.entry
        if self.known_map(entry) is not None:
            return

        async def verify() -> None:
            published = await trio.to_thread.run_sync(self._published_map, entry)
            if published is not None:
                await self._adopt(source, published, verified_here=False)
                return
            purges = self._purges.get(entry.content_id, 0)
            state = self._hash_state(entry)
            async with state.lock:
                while state.next_index < entry.chunk_count:
                    index = state.next_index
                    # Keep the chunks still to hash coming while this one is hashed.
                    self.prefetch(source, range(index + 1, min(entry.chunk_count, index + 1 + _VERIFY_AHEAD)),
                                  auth=auth)
                    chunk = await self._chunk_for_hash(source, index, auth)
                    if self._purges.get(entry.content_id, 0) != purges:
                        break
                    await trio.to_thread.run_sync(state.feed, chunk)
                    self._activity += 1
                digest = state.hasher.hexdigest()
            self._file_hashes.pop(map_key(entry.content_id, entry.chunk_size), None)
            if self._purges.get(entry.content_id, 0) != purges:
                raise _PurgedWhileLoading(f"{entry.path} failed verification while being verified again")
            # A PINNED file (a store object without a checksum) has no upstream hash: its
            # first complete fetch, every chunk pinned to one object version, is the reference.
            if entry.has_upstream_hash and digest != entry.hash:
                self._integrity_failures += 1
                log.error("integrity: %s@%s %s: %s is %s, upstream said %s; purged from every tier",
                          source.repo, source.commit, entry.path, entry.hash_algo, digest, entry.hash)
                await self._forget(source, f"{entry.hash_algo} mismatch: got {digest}")
                raise IntegrityError(f"{entry.path}: content does not match its {entry.hash_algo} {entry.hash}")
            chunk_map = ChunkMap(entry.content_id, entry.size, entry.chunk_size, b"".join(state.digests))
            await self._adopt(source, chunk_map, verified_here=True)

        await self._meta_flights.run(_scoped(("verify", entry.content_id, entry.chunk_size)), verify, self.nursery)

    def _published_map(self, entry: FileEntry) -> ChunkMap | None:
        """A map of the file that a replica sharing a tier with this one made (it verified the
        whole file; trusted as a node trusts its backend), instead of verifying it again."""
        for tier in self.tiers:
            found = tier.find_map(entry.content_id, entry.chunk_size)
            if found is not None and found.size == entry.size:
                return found
        return None

    async def _chunk_for_hash(self, source: FileSource, index: int, auth: str | None) -> Chunk:
        """A chunk for hashing: through the tiers and single-flight, without re-entering the hash."""
        key = source.entry.chunk_key(index)
        for tier in self.tiers:
            chunk = await tier.get(key)
            if chunk is not None:
                return chunk
        return await self._chunk_flights.run(_scoped(key), lambda: self._load(source, index, auth), self.nursery)

    async def _forget(self, source: FileSource, why: str) -> None:
        """The file failed verification (here or at the remote): every copy of it goes."""
        entry = source.entry
        content_id = entry.content_id
        self._purges[content_id] = self._purges.get(content_id, 0) + 1
        for key in [k for k in self._written_behind if k.content_id == content_id]:
            del self._written_behind[key]
        for key in [k for k in self._file_hashes if k.startswith(content_id + ":")]:
            del self._file_hashes[key]
        for key in [k for k in self._maps if k.startswith(content_id + ":")]:
            self._map_bytes -= len(self._maps.pop(key).digests)
        for key in [k for k in self._provisional if k.startswith(content_id + ":")]:
            del self._provisional[key]
        self._recorded.discard(content_id)
        self._tainted[content_id] = time.time()
        for tier in self.tiers:
            await tier.discard(content_id)
        if self.metadata is not None:
            await trio.to_thread.run_sync(lambda: self.metadata.mark_failed(  # type: ignore[union-attr]
                content_id, last_failure=why))
        self._tell(content_id)

    def tainted_at(self, entry: FileEntry) -> float:
        """When readers were last given wrong bytes of this content here (it failed its
        check, or provisional copies of it did not match its map); 0.0: never."""
        record = self.metadata.get_file(entry.content_id) if self.metadata is not None else None
        return max(self._tainted.get(entry.content_id, 0.0), record.tainted_at if record is not None else 0.0)

    # -- observability ------------------------------------------------------------------

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            remote_fetches=self._remote_fetches,
            remote_bytes=self._remote_bytes,
            coalesced=self._chunk_flights.coalesced,
            inflight=len(self._chunk_flights),
            integrity_failures=self._integrity_failures,
            files_verified=self._verified_count,
            provisional_dropped=self._dropped,
            pending_write_bytes=self._write_budget.used,
            tiers=tuple(tier.statistics() for tier in self.tiers),
        )


class _PurgedWhileLoading(IntegrityError):
    """A chunk load outlived by a failed verification of its file."""


#: Set while a reader retries with its own credentials (see :meth:`FetchEngine.read_chunk`):
#: the work it starts or joins is shared only with readers of the same credentials. Tasks
#: started meanwhile (single-flight work) inherit it.
_solo: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmfs_solo", default=None)


def _scoped(key: Hashable) -> Hashable:
    """A single-flight key, narrowed to the credentials of a retrying reader (:data:`_solo`)."""
    solo = _solo.get()
    return key if solo is None else (key, solo)


def _auth_id(auth: str | None) -> str | None:
    """Callers' credentials as part of a flight key, without keeping (or logging) them."""
    return hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else None


__all__ = ["EngineConfig", "EngineStatistics", "FetchEngine", "Served"]
