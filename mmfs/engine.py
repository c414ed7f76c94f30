"""The fetch engine: "chunk k of file F at commit C" into verified bytes.

One engine, two deployments. The node daemon runs it with the backend as its remote (or,
embedded, the Hub); the backend server runs it with the Hub as its remote. For each
chunk it asks the tiers in order (memory, then disk), then the remote, and writes what it
found back into the faster tiers::

    read_chunk ─▶ memory ─▶ disk ─▶ remote (single-flight, capped concurrency)
                   ▲          ▲          │ blake3 checked against the remote's digest
                   └──────────┴──────────┘ write-back

Verification. A chunk from a remote that vouches for a blake3 digest is checked against
it. A whole file is checked against its upstream hash (LFS sha256 or git blob id) by
hashing chunks in order as they arrive; a file's *last* chunk is held back until that
check passes, so a reader of a whole file never completes on corrupted bytes. On a
mismatch every tier forgets the file and readers get :class:`IntegrityError` (EIO).
When the remote is a backend, it does the whole-file check and holds the tail back
itself (``Remote.verifies_files``).

Use it as an async context manager: it owns a nursery in which fetches run, so a reader
that is cancelled never cancels a fetch other readers wait on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Sequence

import blake3
import trio

from .errors import CacheError, IntegrityError, MmfsError, NotFound, first_error
from .manifest import ChunkKey, FileEntry, Manifest
from .metadata import MetadataStore
from .names import RepoRef, is_commit
from .remote.base import FetchedChunk, FileSource, Remote
from .singleflight import SingleFlight
from .tiers.base import ChunkTier, TierStatistics

log = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    #: Chunks fetched from the remote at once, across all files.
    max_concurrent_fetches: int = 16
    #: Chunks handed to readers but not yet written to the slower tiers (disk), at most.
    max_pending_writes: int = 8
    #: Seconds a branch or tag resolution is trusted before asking the remote again.
    ref_ttl: float = 30.0
    #: Never ask the remote to resolve a revision; use what the metadata DB remembers.
    offline: bool = False
    #: Who holds chunks in memory, recorded per file (``POD_NAME``, else the host name).
    holder: str = ""

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
    tiers: tuple[TierStatistics, ...]


class _FileHash:
    """Whole-file hash of one content, advanced as chunks arrive in order, and the blake3
    of each chunk fed to it: once the file verifies, those become the reference every
    later fetch of the same chunk is checked against."""

    def __init__(self, entry: FileEntry) -> None:
        self.hasher = entry.new_hasher()
        self.chunk_digests: list[bytes] = []
        self.next_index = 0
        self.lock = trio.Lock()

    def feed(self, data: bytes) -> None:
        """Hash one more chunk (in a worker thread: hashlib and blake3 release the GIL)."""
        self.hasher.update(data)
        self.chunk_digests.append(blake3_digest(data))
        self.next_index += 1


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
        self._chunk_flights: SingleFlight[ChunkKey, bytes] = SingleFlight()
        self._meta_flights: SingleFlight[tuple, object] = SingleFlight()
        self._refs: dict[tuple[RepoRef, str], tuple[str, float]] = {}
        self._manifests: dict[tuple[RepoRef, str], Manifest] = {}
        self._file_hashes: OrderedDict[str, _FileHash] = OrderedDict()
        # content id -> the blake3 of each of its chunks, for files that passed verification
        self._verified: dict[str, bytes] = {}
        self._recorded: set[str] = set()
        self._purges: dict[str, int] = {}  # content id -> times it failed verification here
        self._write_slots = trio.Semaphore(config.max_pending_writes)
        self._pending_writes = 0
        self._writes_idle = trio.Event()
        self._written_behind: dict[ChunkKey, bytes] = {}  # on their way to the disk tier
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: trio.Nursery | None = None
        self._remote_fetches = self._remote_bytes = self._integrity_failures = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> "FetchEngine":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
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
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("FetchEngine used outside 'async with'")
        return self._nursery

    # -- revisions and manifests --------------------------------------------------------

    async def resolve(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> str:
        """The commit ``revision`` names now; branches are re-checked after ``ref_ttl``.

        When the remote cannot be reached (or in offline mode) the last commit the
        metadata DB remembers is used, so warm nodes keep working without a backend.
        """
        if is_commit(revision):
            return revision
        cached = self._refs.get((repo, revision))
        if cached and time.monotonic() - cached[1] < self.config.ref_ttl:
            return cached[0]
        remembered = self.metadata.get_ref(repo, revision) if self.metadata else None
        if self.config.offline:
            if remembered is None:
                raise NotFound(f"{repo}@{revision} is not in the local cache and HF_HUB_OFFLINE is set")
            return remembered.commit

        async def ask_remote() -> str:
            return await self.remote.resolve(repo, revision, auth=auth)

        try:
            commit = await self._meta_flights.run(("resolve", repo, revision, _auth_id(auth)), ask_remote,
                                                 self.nursery)
        except NotFound:
            raise
        except MmfsError as exc:
            if remembered is None:
                raise
            log.warning("cannot resolve %s@%s (%s); using last known commit %s", repo, revision, exc,
                        remembered.commit)
            # Trust it for a TTL too: readers must not wait out the retries on every lookup.
            self._refs[(repo, revision)] = (remembered.commit, time.monotonic())
            return remembered.commit
        assert isinstance(commit, str)
        self._refs[(repo, revision)] = (commit, time.monotonic())
        if self.metadata and (remembered is None or remembered.commit != commit):
            if remembered is not None:
                log.info("%s@%s moved from %s to %s", repo, revision, remembered.commit, commit)
            await trio.to_thread.run_sync(self.metadata.put_ref, repo, revision, commit)
        return commit

    async def manifest(self, repo: RepoRef, revision: str, *, auth: str | None = None) -> Manifest:
        """The manifest of the commit ``revision`` resolves to (cached for good per commit)."""
        commit = await self.resolve(repo, revision, auth=auth)
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

    # -- chunks -------------------------------------------------------------------------

    async def read(self, source: FileSource, offset: int, size: int, *, auth: str | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of a file, short only at end of file."""
        entry = source.entry
        indices = entry.chunks_for(offset, size)
        end = min(offset + size, entry.size)
        if len(indices) <= 1:
            return await self._read_span(source, indices[0], offset, end, auth) if indices else b""
        parts: dict[int, bytes] = {}

        async def fetch(index: int) -> None:
            parts[index] = await self._read_span(source, index, offset, end, auth)

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

    async def _read_span(self, source: FileSource, index: int, offset: int, end: int, auth: str | None) -> bytes:
        """The part of chunk ``index`` inside the file range ``[offset, end)``.

        A part smaller than the chunk is asked of each tier as a range, so the disk tier
        reads and verifies only the blocks it covers; a full miss loads the whole chunk."""
        entry = source.entry
        start, stop = entry.chunk_span(index)
        a, b = max(offset, start) - start, min(end, stop) - start
        key = entry.chunk_key(index)
        if b - a == stop - start or not self._servable(entry, index) or key in self._chunk_flights:
            # Whole chunks, held-back tails, and chunks already on their way (read-ahead):
            # through the chunk path, so the same bytes are not read twice.
            data = await self.read_chunk(source, index, auth=auth)
        else:
            for tier in self.tiers:
                part = await tier.get_range(key, a, b)
                if part is not None:
                    return part
            data = await self._chunk(source, index, auth, first_tier=len(self.tiers))
        return data if b - a == len(data) else data[a:b]

    def _servable(self, entry: FileEntry, index: int) -> bool:
        """Whether chunk ``index`` may be served now: all but a file's last chunk may; the
        last one once the whole file matched its hash (here or, per the remote, upstream)."""
        return index != entry.chunk_count - 1 or self.remote.verifies_files or self.is_verified(entry)

    def read_cached(self, source: FileSource, offset: int, size: int) -> bytes | memoryview | None:
        """:meth:`read` answered from the first tier alone, without waiting; ``None`` on a miss.

        The fast path of the FUSE read loop: no task switch, no copy when the range lies in
        one chunk (a ``memoryview`` into it). A range that reaches a file's last chunk is
        only served once the file is verified, as in :meth:`read_chunk`.
        """
        entry = source.entry
        indices = entry.chunks_for(offset, size)
        if not indices:
            return b""
        get = getattr(self.tiers[0], "get_nowait", None) if self.tiers else None
        if get is None or not self._servable(entry, indices[-1]):
            return None
        base = indices[0] * entry.chunk_size
        end = min(offset + size, entry.size)
        if len(indices) == 1:
            data = get(entry.chunk_key(indices[0]))
            return None if data is None else memoryview(data)[offset - base:end - base]
        parts = []
        for index in indices:
            data = get(entry.chunk_key(index))
            if data is None:
                return None
            parts.append(data)
        return b"".join(parts)[offset - base:end - base]

    async def read_chunk(self, source: FileSource, index: int, *, auth: str | None = None) -> bytes:
        """Chunk ``index`` of ``source``, verified; a file's last chunk only once the file is."""
        data = await self._chunk(source, index, auth)
        entry = source.entry
        if index == entry.chunk_count - 1 and not self.remote.verifies_files:
            await self._verify_file(source, auth)
        return data

    def prefetch(self, source: FileSource, indices: range, *, auth: str | None = None) -> None:
        """Start fetching chunks in the background; errors surface when they are read."""
        for index in indices:
            key = source.entry.chunk_key(index)
            if key in self._chunk_flights or self.tiers and self.tiers[0].peek(key) is not None:
                continue
            self._chunk_flights.start(key, lambda i=index: self._load(source, i, auth), self.nursery)

    async def _chunk(self, source: FileSource, index: int, auth: str | None, *, first_tier: int = 0) -> bytes:
        """A whole chunk from the tiers from ``first_tier`` on (the caller missed those above), or fetched."""
        key = source.entry.chunk_key(index)
        if first_tier == 0 and self.tiers:
            data = await self.tiers[0].get(key)
            if data is not None:
                return data
        load_from = max(first_tier, 1)
        try:
            return await self._chunk_flights.run(key, lambda: self._load(source, index, auth, load_from), self.nursery)
        except _PurgedWhileLoading:
            # Joined a load whose file failed verification meanwhile: its bytes are
            # suspect, but this reader asked afterwards; load the chunk afresh, once.
            return await self._chunk_flights.run(key, lambda: self._load(source, index, auth, 1), self.nursery)

    async def _load(self, source: FileSource, index: int, auth: str | None, first_tier: int = 1) -> bytes:
        """Find a chunk in the tiers from ``first_tier`` down, or fetch it; write it back up."""
        key = source.entry.chunk_key(index)
        purges = self._purges.get(key.content_id, 0)
        for depth in range(first_tier, len(self.tiers)):
            data = await self.tiers[depth].get(key)
            if data is not None:
                await self._store(key, data, self.tiers[:depth], purges)
                await self._advance_hash(source, index, data, purges)
                return data
        data = self._written_behind.get(key)  # evicted from memory before it reached the disk
        if data is not None:
            await self._store(key, data, self.tiers[:1], purges)
            await self._advance_hash(source, index, data, purges)
            return data
        data = await self._fetch(source, index, auth)
        await self._store(key, data, self.tiers, purges)
        await self._advance_hash(source, index, data, purges)
        return data

    async def _fetch(self, source: FileSource, index: int, auth: str | None) -> bytes:
        start, end = source.entry.chunk_span(index)
        async with self._fetch_limiter:
            try:
                fetched = await self.remote.fetch_chunk(source, index, auth=auth)
            except IntegrityError:
                await self._forget(source.entry, "the remote reported a failed verification")
                raise
        if len(fetched.data) != end - start:
            raise IntegrityError(f"{source.entry.path}: chunk {index} has {len(fetched.data)} bytes, "
                                 f"expected {end - start}")
        expected = self.known_digest(source.entry, index)
        if fetched.blake3 is not None or expected is not None:
            digest = await trio.to_thread.run_sync(blake3_digest, fetched.data)
            if fetched.blake3 is not None and digest.hex() != fetched.blake3 or \
                    expected is not None and digest != expected:
                self._integrity_failures += 1
                log.error("integrity: %s@%s %s chunk %d: blake3 %s, expected %s", source.repo, source.commit,
                          source.entry.path, index, digest.hex(), fetched.blake3 or expected.hex())  # type: ignore[union-attr]
                raise IntegrityError(f"{source.entry.path}: chunk {index} failed its blake3 check")
        self._remote_fetches += 1
        self._remote_bytes += len(fetched.data)
        await self._record_download(source, fetched)
        return fetched.data

    async def _record_download(self, source: FileSource, fetched: FetchedChunk) -> None:
        """Note where a file came from, once per content and process.

        While the engine verifies files itself, the record also names the download in
        flight (``<holder>:<id>``) until the whole file has passed its hash check."""
        content_id = source.entry.content_id
        if self.metadata is None or content_id in self._recorded:
            return
        self._recorded.add(content_id)
        changes: dict[str, object] = {}
        if not self.remote.verifies_files and content_id not in self._verified:
            changes["inflight_download"] = f"{self.config.holder}:{uuid.uuid4().hex[:16]}"
        record = self.metadata.get_file(content_id)
        if record is None or not record.downloaded_at:
            changes.update(source_url=fetched.source_url, etag=fetched.etag, last_modified=fetched.last_modified,
                           downloaded_at=time.time(), holder=self.config.holder)
        if changes:
            await trio.to_thread.run_sync(lambda: self.metadata.update_file(  # type: ignore[union-attr]
                content_id, **changes))

    async def _store(self, key: ChunkKey, data: bytes, tiers: Sequence[ChunkTier], purges: int) -> None:
        """Put a chunk into the first of ``tiers`` now and the others behind the reader.

        A reader waits for the memory copy only: local disk writes (the largest cost of a
        cold node on a busy disk) happen in the background, at most
        ``max_pending_writes`` chunks at a time (then loads wait: back-pressure).
        ``purges`` is the file's purge count when this load began: a file that failed
        verification meanwhile must not get the chunk back into any cache."""
        self._check_not_purged(key, purges)
        if not tiers:
            return
        await self._put(tiers[0], key, data)
        self._check_not_purged(key, purges)
        if len(tiers) > 1:
            await self._write_slots.acquire()
            self._pending_writes += 1
            self._written_behind[key] = data
            self.nursery.start_soon(self._write_behind, key, data, tiers[1:], purges)

    async def _write_behind(self, key: ChunkKey, data: bytes, tiers: Sequence[ChunkTier], purges: int) -> None:
        try:
            for tier in tiers:
                if self._purges.get(key.content_id, 0) != purges:
                    return  # the disk tier also drops writes a discard overtook
                await self._put(tier, key, data)
        finally:
            self._written_behind.pop(key, None)
            self._write_slots.release()
            self._pending_writes -= 1
            if not self._pending_writes:
                self._writes_idle.set()
                self._writes_idle = trio.Event()

    async def _put(self, tier: ChunkTier, key: ChunkKey, data: bytes) -> None:
        try:
            await tier.put(key, data)
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

    # -- whole-file verification --------------------------------------------------------

    def is_verified(self, entry: FileEntry) -> bool:
        """Whether the file matched its upstream hash (here, or in an earlier run)."""
        return self._chunk_digests(entry) is not None

    def _chunk_digests(self, entry: FileEntry) -> bytes | None:
        digests = self._verified.get(entry.content_id)
        if digests is None and self.metadata is not None:
            digests = self.metadata.get_chunk_digests(entry.content_id)
            if digests is not None and len(digests) == 32 * entry.chunk_count:
                self._verified[entry.content_id] = digests
            else:
                digests = None
        return digests

    def known_digest(self, entry: FileEntry, index: int) -> bytes | None:
        """The blake3 chunk ``index`` had when its file verified, if it did."""
        digests = self._chunk_digests(entry)
        return None if digests is None else digests[32 * index:32 * index + 32]

    async def _advance_hash(self, source: FileSource, index: int, data: bytes, purges: int) -> None:
        """Feed the file's running hash if this chunk is the next one it needs (and its
        load did not start before a purge of the file: such bytes are suspect)."""
        entry = source.entry
        if self.remote.verifies_files or self.is_verified(entry):
            return
        state = self._hash_state(entry)
        if state.next_index != index or state.lock.locked():
            return
        async with state.lock:
            if state.next_index != index or self._purges.get(entry.content_id, 0) != purges:
                return
            await trio.to_thread.run_sync(state.feed, data)
            # Chunks that arrived early (parallel read-ahead) are still in memory: catch up.
            while self.tiers and state.next_index < entry.chunk_count:
                ahead = self.tiers[0].peek(entry.chunk_key(state.next_index))
                if ahead is None:
                    break
                await trio.to_thread.run_sync(state.feed, ahead)

    def _hash_state(self, entry: FileEntry) -> _FileHash:
        state = self._file_hashes.get(entry.content_id)
        if state is None:
            state = self._file_hashes[entry.content_id] = _FileHash(entry)
            for content_id, old in list(self._file_hashes.items()):
                if len(self._file_hashes) <= _MAX_FILE_HASHES:
                    break
                if not old.lock.locked() and old is not state:
                    del self._file_hashes[content_id]
        self._file_hashes.move_to_end(entry.content_id)
        return state

    async def _verify_file(self, source: FileSource, auth: str | None) -> None:
        entry = source.entry
        if self.is_verified(entry):
            return

        async def verify() -> None:
            purges = self._purges.get(entry.content_id, 0)
            state = self._hash_state(entry)
            async with state.lock:
                while state.next_index < entry.chunk_count:
                    index = state.next_index
                    # Keep the chunks still to hash coming while this one is hashed.
                    self.prefetch(source, range(index + 1, min(entry.chunk_count, index + 1 + _VERIFY_AHEAD)),
                                  auth=auth)
                    data = await self._chunk_unlocked(source, index, auth)
                    await trio.to_thread.run_sync(state.feed, data)
                digest = state.hasher.hexdigest()
            self._file_hashes.pop(entry.content_id, None)
            if self._purges.get(entry.content_id, 0) != purges:
                raise _PurgedWhileLoading(f"{entry.path} failed verification while being verified again")
            if digest != entry.hash:
                self._integrity_failures += 1
                log.error("integrity: %s@%s %s: %s is %s, upstream said %s; purged from every tier",
                          source.repo, source.commit, entry.path, entry.hash_algo, digest, entry.hash)
                await self._forget(entry, f"{entry.hash_algo} mismatch: got {digest}")
                raise IntegrityError(f"{entry.path}: content does not match its {entry.hash_algo} {entry.hash}")
            digests = b"".join(state.chunk_digests)
            self._verified[entry.content_id] = digests
            if self.metadata is not None:
                await trio.to_thread.run_sync(self.metadata.mark_verified, entry.content_id, digests)

        await self._meta_flights.run(("verify", entry.content_id), verify, self.nursery)

    async def _chunk_unlocked(self, source: FileSource, index: int, auth: str | None) -> bytes:
        """A chunk for hashing: through the tiers and single-flight, without re-entering the hash."""
        key = source.entry.chunk_key(index)
        for tier in self.tiers:
            data = await tier.get(key)
            if data is not None:
                return data
        return await self._chunk_flights.run(key, lambda: self._load(source, index, auth), self.nursery)

    async def _forget(self, entry: FileEntry, why: str) -> None:
        self._purges[entry.content_id] = self._purges.get(entry.content_id, 0) + 1
        for key in [k for k in self._written_behind if k.content_id == entry.content_id]:
            del self._written_behind[key]
        self._file_hashes.pop(entry.content_id, None)
        self._verified.pop(entry.content_id, None)
        self._recorded.discard(entry.content_id)
        for tier in self.tiers:
            await tier.discard(entry.content_id)
        if self.metadata is not None:
            record = self.metadata.get_file(entry.content_id)
            failures = (record.failures if record else 0) + 1
            await trio.to_thread.run_sync(lambda: self.metadata.mark_failed(  # type: ignore[union-attr]
                entry.content_id, failures=failures, last_failure=why))

    # -- observability ------------------------------------------------------------------

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            remote_fetches=self._remote_fetches,
            remote_bytes=self._remote_bytes,
            coalesced=self._chunk_flights.coalesced,
            inflight=len(self._chunk_flights),
            integrity_failures=self._integrity_failures,
            files_verified=len(self._verified),
            tiers=tuple(tier.statistics() for tier in self.tiers),
        )


class _PurgedWhileLoading(IntegrityError):
    """A chunk load outlived by a failed verification of its file."""


def blake3_digest(data: bytes) -> bytes:
    """The blake3 of a chunk, as sent in ``X-Mmfs-Blake3`` (hex) and kept per verified file."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


def _auth_id(auth: str | None) -> str | None:
    """Callers' credentials as part of a flight key, without keeping (or logging) them."""
    return hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else None
