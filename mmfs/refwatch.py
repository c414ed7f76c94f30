"""Versioning: notice when a branch or tag moves, once per cluster, whether or not anyone reads.

Two roles, one per deployment:

* :class:`RefWatcher` runs where the upstream is the remote (the backend; an embedded
  node, alone). It tracks the refs *in use* — resolved recently by a node or a Hub client,
  reported by nodes that hold them, or asked for with ``mmfs watch`` / ``--watch`` — and
  asks the upstream where each points once per interval (``--ref-ttl``), through
  :meth:`FetchEngine.check_ref`, which any remote implements with its cheapest request
  (the Hub: ``/revision/<rev>?expand=sha``, a few bytes). Readers meanwhile trust the
  watcher's answer (:attr:`FetchEngine.watched`), so however many nodes read, the upstream
  sees one check per ref per interval. A move is recorded (metadata ``ref_history``),
  wakes the nodes waiting in :meth:`RefWatcher.wait_for_moves`, and, where asked, warms
  the new commit before anyone opens it.
* :class:`RefFollower` runs on a node with a backend: it long-polls the backend
  (``POST /v1/refs/watch``, docs/protocol.md) with every ref the node holds and the
  commits it pins, and applies the moves it is told of (:meth:`FetchEngine.note_ref`), so
  the branch symlinks flip without anyone reading. While the backend is unreachable the
  node keeps serving what it knows and asks again with backoff; the first answer after
  it returns carries every move it missed.

The flip itself is a change of the commit a ref's symlink names: commit directories are
immutable, so a reader never sees two commits mixed in one directory, and a file already
open keeps reading the commit it was opened at.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import trio

from .engine import FetchEngine
from .errors import InvalidName, MmfsError
from .metadata import RefMove, WatchRecord
from .names import RepoRef, check_revision, is_commit, parse_repo_id
from .remote._http import RetryPolicy, error_from_response, make_client

log = logging.getLogger(__name__)

#: Default seconds between checks of a watched ref (``--ref-ttl``).
DEFAULT_REF_TTL = 60.0
#: A ref no one resolved, reported or asked to watch for this long is no longer checked.
UNUSED_AFTER = 24 * 3600.0
#: Upstream checks in flight at once.
MAX_CHECKS = 8

#: Called with (repo, revision, old commit, new commit) when a ref moves: warms the new one.
Warmer = Callable[[RepoRef, str, str, str], Awaitable[None]]


def ref_key(repo: RepoRef, revision: str) -> str:
    return f"{repo}@{revision}"


def parse_ref_key(text: str) -> tuple[RepoRef, str]:
    """``huggingface/<org>/<name>@<rev>`` -> ``(repo, revision)``; :class:`InvalidName` if malformed."""
    repo_text, at, revision = text.partition("@")
    provider, _, repo_id = repo_text.partition("/")
    if not at or not provider:
        raise InvalidName(f"invalid ref {text[:200]!r}: expected <provider>/<org>/<name>@<revision>")
    return parse_repo_id(repo_id, provider), check_revision(revision)


@dataclass(slots=True)
class _Watched:
    repo: RepoRef
    revision: str
    last_used: float
    #: Why it is watched beyond use (``mmfs watch``, ``--watch``, ``csi``); empty: in use only.
    reasons: set[str] = field(default_factory=set)
    warm: bool = False
    checks: int = 0
    last_checked: float = 0.0
    error: str = ""


class RefWatcher:
    """Checks each ref in use once per ``interval`` and tells waiters when one moves."""

    def __init__(self, engine: FetchEngine, *, interval: float = DEFAULT_REF_TTL, warm_all: bool = False,
                 warmer: Warmer | None = None, unused_after: float = UNUSED_AFTER) -> None:
        self.engine = engine
        self.interval = interval
        self.warm_all = warm_all
        self.warmer = warmer
        self.unused_after = unused_after
        self._refs: dict[str, _Watched] = {}
        self._moved = trio.Event()
        self._moves = 0
        self._checks = 0
        self._warms: dict[str, str] = {}  # ref key -> "warming <commit>" / "warmed <commit>" / error
        engine.add_ref_listener(self._on_move)
        if engine.metadata is not None:
            for record in engine.metadata.watched():
                try:
                    repo, revision = parse_ref_key(record.ref)
                except InvalidName:
                    continue
                self.watch(repo, revision, reason=record.reason or "watch", warm=record.warm, persist=False)

    # -- what is watched ----------------------------------------------------------------

    def touch(self, repo: RepoRef, revision: str) -> None:
        """``revision`` of ``repo`` is in use (resolved, or held by a node): keep it watched."""
        if is_commit(revision):
            return
        key = ref_key(repo, revision)
        found = self._refs.get(key)
        if found is None:
            found = self._refs[key] = _Watched(repo, revision, time.time())
            self.engine.watched.add((repo, revision))
        found.last_used = time.time()

    def watch(self, repo: RepoRef, revision: str, *, reason: str, warm: bool = False, persist: bool = True) -> None:
        """Watch ``revision`` for good (``mmfs watch``, ``--watch``, a CSI volume); ``warm``:
        prefetch each new commit it moves to. Recorded in the metadata DB (survives restarts)."""
        if is_commit(revision):
            raise InvalidName(f"{revision} is a commit: commits never move, there is nothing to watch")
        self.touch(repo, revision)
        found = self._refs[ref_key(repo, revision)]
        changed = reason not in found.reasons or (warm and not found.warm)
        found.reasons.add(reason)
        found.warm = found.warm or warm
        if persist and changed and self.engine.metadata is not None:
            self.engine.metadata.put_watch(WatchRecord(ref_key(repo, revision), time.time(), found.warm,
                                                       ",".join(sorted(found.reasons))))

    # -- checking -----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every watched ref, then again each ``interval``, until cancelled."""
        task_status.started()
        while True:
            started = trio.current_time()
            await self.check_all()
            await trio.sleep_until(started + self.interval)

    async def check_all(self) -> None:
        now = time.time()
        for key, watched in list(self._refs.items()):
            if not watched.reasons and now - watched.last_used > self.unused_after:
                del self._refs[key]
                self.engine.watched.discard((watched.repo, watched.revision))
        limiter = trio.CapacityLimiter(MAX_CHECKS)

        async def check(watched: _Watched) -> None:
            async with limiter:
                watched.checks += 1
                self._checks += 1
                watched.last_checked = time.time()
                try:
                    await self.engine.check_ref(watched.repo, watched.revision)
                    watched.error = ""
                except MmfsError as exc:
                    if watched.error != str(exc):
                        log.warning("checking %s@%s upstream failed: %s", watched.repo, watched.revision, exc)
                    watched.error = str(exc)

        async with trio.open_nursery() as nursery:
            for watched in list(self._refs.values()):
                nursery.start_soon(check, watched)

    def _on_move(self, move: RefMove) -> None:
        self._moves += 1
        self._moved.set()
        self._moved = trio.Event()
        watched = self._refs.get(move.ref)
        if self.warmer is None or watched is None or not (self.warm_all or watched.warm):
            return
        self.engine.nursery.start_soon(self._warm, watched, move)

    async def _warm(self, watched: _Watched, move: RefMove) -> None:
        assert self.warmer is not None
        self._warms[move.ref] = f"warming {move.to_commit}"
        try:
            await self.warmer(watched.repo, watched.revision, move.from_commit, move.to_commit)
        except MmfsError as exc:
            log.warning("warming %s at %s failed: %s", move.ref, move.to_commit, exc)
            self._warms[move.ref] = f"failed {move.to_commit}: {exc}"
            return
        self._warms[move.ref] = f"warmed {move.to_commit}"
        log.info("%s: new commit %s warmed", move.ref, move.to_commit)

    # -- telling nodes ------------------------------------------------------------------

    def moved_since(self, known: dict[str, str]) -> dict[str, str]:
        """Of ``known`` (ref key -> the commit a node has), those that point elsewhere now."""
        moved = {}
        for key, commit in known.items():
            repo, revision = parse_ref_key(key)
            now = self.engine.known_ref(repo, revision)
            if now is not None and now != commit:
                moved[key] = now
        return moved

    async def wait_for_moves(self, known: dict[str, str], timeout: float) -> dict[str, str]:
        """Moves of ``known`` refs: at once if there are some, else the first within ``timeout``
        seconds (``{}`` after it: the node asks again)."""
        with trio.move_on_after(timeout):
            while True:
                moved = self.moved_since(known)
                if moved:
                    return moved
                await self._moved.wait()
        return {}

    # -- observability ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        refs = []
        for key, watched in sorted(self._refs.items()):
            refs.append({"ref": key, "commit": self.engine.known_ref(watched.repo, watched.revision),
                         "watched_because": sorted(watched.reasons) or ["in use"], "warm": watched.warm
                         or self.warm_all, "checks": watched.checks, "last_checked": watched.last_checked,
                         "last_used": watched.last_used, "error": watched.error or None,
                         "gone_upstream": (watched.repo, watched.revision) in self.engine.gone,
                         "warm_state": self._warms.get(key)})
        return {"interval_s": self.interval, "checks": self._checks, "moves": self._moves, "refs": refs}

    @property
    def checks(self) -> int:
        return self._checks

    @property
    def moves(self) -> int:
        return self._moves


class RefFollower:
    """A node's side: long-polls the backend for moves of the refs this node holds."""

    def __init__(self, engine: FetchEngine, backend_urls: list[str], *, wait: float, name: str,
                 auth: str | None = None,
                 pinned: Callable[[], Iterable[str]] = lambda: (),
                 published: Callable[[], Iterable[str]] = lambda: (), warmer: Warmer | None = None) -> None:
        self.engine = engine
        #: The backend, or its replicas (each watches the refs it is told of): the next one
        #: is asked when one does not answer.
        self.urls = [url.rstrip("/") for url in backend_urls]
        self.url = self.urls[0]
        self.wait = wait
        self.name = name  # this node to the backend (its pins are kept per name)
        self.auth = auth
        self.pinned = pinned
        self.published = published
        self.warmer = warmer
        self._client = make_client(RetryPolicy(connect_timeout=5.0, read_timeout=wait + 10.0,
                                               request_timeout=wait + 30.0))
        self.connected = False
        self.last_error = ""
        self._moves = 0
        engine.add_ref_listener(self._on_move)

    def known(self) -> dict[str, str]:
        """Every ref this node resolved -> the commit it points at here."""
        found: dict[str, str] = {}
        if self.engine.metadata is not None:
            found = {key: record.commit for key, record in self.engine.metadata.refs().items()}
        return found

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = 0.5
        while True:
            try:
                await self.poll_once()
            except MmfsError as exc:
                if self.connected or self.last_error != str(exc):
                    log.warning("ref updates from %s: %s; serving the refs known here, asking again", self.url, exc)
                self.connected, self.last_error = False, str(exc)
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
                await trio.sleep(backoff)
                backoff = min(backoff * 2, max(self.wait, 1.0))
                continue
            if not self.connected:
                log.info("ref updates from %s: connected", self.url)
            self.connected, self.last_error, backoff = True, "", 0.5

    async def poll_once(self) -> dict[str, str]:
        """One long poll; applies and returns the moves the backend reported."""
        known = self.known()
        body = json.dumps({"refs": known, "pinned": sorted(set(self.pinned())),
                           "published": sorted(set(self.published())), "holder": self.name})
        headers = {"Content-Type": "application/json", **({"Authorization": self.auth} if self.auth else {})}
        response = await self._client.request("POST", f"{self.url}/v1/refs/watch?wait={self.wait:g}", headers,
                                              max_body=16 << 20, payload=body.encode())
        if not response.is_success:
            raise error_from_response(response)
        try:
            moved = dict(response.json()["moved"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MmfsError(f"the backend sent an unreadable ref update: {exc}") from exc
        for key, commit in moved.items():
            try:
                repo, revision = parse_ref_key(key)
            except InvalidName:
                continue
            if key in known and is_commit(str(commit)):
                await self.engine.note_ref(repo, revision, str(commit), detected_by="backend")
        return moved

    def _on_move(self, move: RefMove) -> None:
        self._moves += 1
        if self.warmer is not None:
            repo, revision = parse_ref_key(move.ref)
            self.engine.nursery.start_soon(self._warm, repo, revision, move)

    async def _warm(self, repo: RepoRef, revision: str, move: RefMove) -> None:
        assert self.warmer is not None
        try:
            await self.warmer(repo, revision, move.from_commit, move.to_commit)
        except MmfsError as exc:
            log.warning("warming %s at %s failed: %s", move.ref, move.to_commit, exc)

    def status(self) -> dict[str, Any]:
        return {"backend": self.url, "connected": self.connected, "last_error": self.last_error or None,
                "moves": self._moves, "long_poll_s": self.wait}

    async def aclose(self) -> None:
        await self._client.aclose()


__all__ = ["DEFAULT_REF_TTL", "RefFollower", "RefWatcher", "parse_ref_key", "ref_key"]
