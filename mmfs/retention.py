"""Retention: which commits a cache keeps once their refs moved on, and reclaiming the rest.

A commit is *live* while a ref points at it, while it is pinned (a CSI volume publishes
it: a bind mount of its directory; a file of it is open; on the backend, a node reports
either), and for ``grace`` seconds after the last time it was live or used (listed, or a
file of it opened: a client reading a commit by its hash keeps it). Commits the metadata
DB knows that are none of that are *retired*: the content only they use (no live commit
shares it) is dropped from every tier by :meth:`Retention.collect` — ``mmfs gc``, the
backend's ``POST /v1/gc``, and the periodic sweep both run it. Content a live commit also
uses stays: content addressing shares unchanged files between commits, so a retired
commit costs only what changed. Between two sweeps, :meth:`Retention.mark` tells the tiers
which contents those are, so a cache that needs room evicts them before anything else.

Derived artifacts (:mod:`mmfs.artifacts`, the pseudo repo ``ARTIFACTS``) are not commits
of their own here: they live and retire with their model commit, which the backend's gc
applies to them (``ArtifactStore.reclaim`` with :meth:`Retention.classify`'s live set).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import trio

from .engine import FetchEngine
from .errors import InvalidName
from .manifest import FileEntry, Manifest
from .names import ARTIFACTS, RepoRef
from .refwatch import parse_ref_key

log = logging.getLogger(__name__)

#: Default seconds a commit stays after it was last live (``--retain``).
DEFAULT_GRACE = 3600.0
#: Seconds between two markings of retired content (:meth:`Retention.mark`) by the sweep.
MARK_EVERY = 60.0

Commit = tuple[RepoRef, str]


@dataclass(frozen=True, slots=True)
class GcReport:
    dry_run: bool
    live_commits: int
    pinned: list[str]
    retired: list[str]
    #: Contents used only by retired commits: dropped (or, dry run, to be dropped).
    contents: int
    #: Bytes of those contents held in the tiers before (chunks present x their length).
    bytes: int
    #: Contents of retired commits kept because a live commit uses them too.
    shared_kept: int
    seconds: float = 0.0
    kept_in_grace: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        verb = "would reclaim" if self.dry_run else "reclaimed"
        return (f"{len(self.retired)} retired commits: {verb} {self.contents} files ({self.bytes} bytes); "
                f"{self.shared_kept} files shared with live commits kept; {len(self.pinned)} pinned, "
                f"{len(self.kept_in_grace)} in their grace period, {self.live_commits} live commits in all")


class Retention:
    """Tracks when each commit was last live; reclaims the content of retired ones."""

    def __init__(self, engine: FetchEngine, *, grace: float = DEFAULT_GRACE,
                 on_reclaim: Callable[[str], None] = lambda content_id: None) -> None:
        self.engine = engine
        self.grace = grace
        #: Told each content id dropped (the node drops the kernel's cached pages of it).
        self.on_reclaim = on_reclaim
        self._started = time.time()
        self._last_live: dict[Commit, float] = {}
        self._reclaimed_bytes = 0
        self._runs = 0

    def _known_commits(self) -> dict[Commit, Manifest | None]:
        found: dict[Commit, Manifest | None] = {}
        metadata = self.engine.metadata
        if metadata is not None:
            for repo, commit in metadata.manifest_keys():
                found[(repo, commit)] = None
        for manifest in self.engine.known_manifests():
            found[(manifest.repo, manifest.commit)] = manifest
        return {commit: manifest for commit, manifest in found.items() if commit[0] != ARTIFACTS}

    def _ref_targets(self) -> set[Commit]:
        targets: set[Commit] = set()
        metadata = self.engine.metadata
        keys = dict(metadata.refs()) if metadata is not None else {}
        for key, record in keys.items():
            try:
                repo, revision = parse_ref_key(key)
            except InvalidName:  # an unreadable old key pins nothing
                continue
            targets.add((repo, self.engine.known_ref(repo, revision) or record.commit))
        return targets

    def classify(self, pinned: Iterable[Commit]) -> tuple[set[Commit], set[Commit], set[Commit], set[Commit]]:
        """``(live, pinned, in grace, retired)`` of the commits known here, now."""
        now = time.time()
        pinned_set = set(pinned)
        current = self._ref_targets() | pinned_set
        for commit in current:
            self._last_live[commit] = now
        live, grace, retired = set(current), set(), set()
        for commit in self._known_commits():
            if commit in current:
                continue
            last = max(self._last_live.get(commit, self._started), self.engine.commit_used.get(commit, 0.0))
            if now - last < self.grace:
                grace.add(commit)
                live.add(commit)
            else:
                retired.add(commit)
        return live, pinned_set, grace, retired

    async def _manifest(self, commit: Commit) -> Manifest | None:
        repo, sha = commit
        found = next((m for m in self.engine.known_manifests() if m.repo == repo and m.commit == sha), None)
        if found is None and self.engine.metadata is not None:
            found = self.engine.metadata.get_manifest(repo, sha)
        return found

    async def _split_retired(self, live: set[Commit], retired: set[Commit]) -> tuple[list[FileEntry], set[str]]:
        """The files of retired commits that no live commit uses, and the content ids of
        retired commits' files that a live commit uses too (those stay)."""
        keep: set[str] = set()
        for commit in live:
            manifest = await self._manifest(commit)
            if manifest is not None:
                keep.update(entry.content_id for entry in manifest.files)
        only: list[FileEntry] = []
        shared: set[str] = set()
        for commit in retired:
            manifest = await self._manifest(commit)
            for entry in manifest.files if manifest is not None else ():
                if entry.content_id in keep:
                    shared.add(entry.content_id)
                else:
                    only.append(entry)
        return only, shared

    async def mark(self, pinned: Iterable[Commit]) -> int:
        """Tell every tier which contents only retired commits use (:meth:`ChunkTier.retire`):
        under space pressure they go first, before the next :meth:`collect` drops them.
        Returns how many contents are marked."""
        live, _, _, retired = self.classify(pinned)
        only, _ = await self._split_retired(live, retired)
        content_ids = {entry.content_id for entry in only}
        for tier in self.engine.tiers:
            tier.retire(content_ids)
        return len(content_ids)

    async def collect(self, pinned: Iterable[Commit], *, dry_run: bool = False) -> GcReport:
        """Drop from every tier the content only retired commits use (``dry_run``: say what)."""
        started = time.perf_counter()
        live, pinned_set, grace, retired = self.classify(pinned)
        only, shared = await self._split_retired(live, retired)
        doomed: dict[str, int] = {}  # content id -> bytes held
        for entry in only:
            held = sum(entry.chunk_span(i)[1] - entry.chunk_span(i)[0] for i in range(entry.chunk_count)
                       if any(tier.contains(entry.chunk_key(i)) for tier in self.engine.tiers))
            doomed[entry.content_id] = max(doomed.get(entry.content_id, 0), held)
        if not dry_run:
            for tier in self.engine.tiers:
                tier.retire(doomed)  # fetched again before the next sweep: evicted first
            for content_id in doomed:
                for tier in self.engine.tiers:
                    await tier.discard(content_id)
                self.on_reclaim(content_id)
            self._reclaimed_bytes += sum(doomed.values())
            self._runs += 1
            if doomed:
                log.info("gc: %d retired commits, %d files only they used dropped (%d bytes)", len(retired),
                         len(doomed), sum(doomed.values()))
        name = lambda c: f"{c[0]}@{c[1]}"  # noqa: E731
        return GcReport(dry_run, len(live), sorted(map(name, pinned_set)), sorted(map(name, retired)),
                        len(doomed), sum(doomed.values()), len(shared), round(time.perf_counter() - started, 3),
                        sorted(map(name, grace)))

    async def sweep(self, pinned: Callable[[], Iterable[Commit]]) -> None:
        """Until cancelled: mark retired commits' content every :data:`MARK_EVERY` seconds
        (tiers evict it first when they need room) and reclaim it every quarter of the
        grace period (between one minute and an hour)."""
        collect_every = min(max(self.grace / 4, 60.0), 3600.0)
        next_collect = trio.current_time() + collect_every
        while True:
            await trio.sleep(min(MARK_EVERY, next_collect - trio.current_time()))
            if trio.current_time() >= next_collect:
                next_collect = trio.current_time() + collect_every
                await self.collect(pinned())
            else:
                await self.mark(pinned())

    def status(self, pinned: Iterable[Commit]) -> dict[str, Any]:
        live, pinned_set, grace, retired = self.classify(pinned)
        name = lambda c: f"{c[0]}@{c[1]}"  # noqa: E731
        return {"grace_s": self.grace, "live_commits": len(live), "pinned": sorted(map(name, pinned_set)),
                "in_grace": sorted(map(name, grace)), "retired": sorted(map(name, retired)),
                "gc_runs": self._runs, "reclaimed_bytes": self._reclaimed_bytes}


__all__ = ["DEFAULT_GRACE", "GcReport", "Retention"]
