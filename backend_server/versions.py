"""The backend's versioning face: refs watched for the cluster, nodes told of moves, gc.

Routes (docs/protocol.md, "Versions"):

* ``POST /v1/refs/watch?wait=SECONDS`` — a node's long poll: it sends every ref it holds
  with the commit it has, the commits it pins and the refs its CSI volumes publish; the
  answer lists the refs that point elsewhere now, at once if any do, else as soon as one
  moves (``{}`` after ``wait``). Sending its refs keeps them watched, so a restarted
  backend learns them again from the first polls.
* ``GET /v1/refs`` — what is watched, the moves seen (from the metadata DB), retention.
* ``POST /v1/watch/<provider>/<org>/<name>/<rev>[?warm=0]`` — ``mmfs watch``: watch a ref
  for good (and, unless ``warm=0``, warm each commit it moves to).
* ``POST /v1/gc[?dry_run=1]`` — reclaim the content of retired commits now.
* ``GET /api/<type>s/<org>/<name>/refs[?include_prs=1]`` — the Hub's ``list_repo_refs``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from mmfs.errors import InvalidName, MmfsError, NotFound
from mmfs.names import RepoRef, check_revision, is_commit
from mmfs.refwatch import RefWatcher, parse_ref_key, ref_key
from mmfs.remote.hub import HubRemote, git_ref, refs_json
from mmfs.retention import Retention

from .http import Request, Response

if TYPE_CHECKING:
    from .app import BackendApp

log = logging.getLogger(__name__)

#: Longest a node's long poll is held, seconds.
MAX_POLL_WAIT = 60.0
#: A node's pins count while it reported them within this many seconds (a few polls).
PIN_REPORT_TTL = 3 * MAX_POLL_WAIT


class VersionRoutes:
    def __init__(self, app: BackendApp, watcher: RefWatcher, retention: Retention, *, warm_published: bool,
                 hub: HubRemote | None = None) -> None:
        self.app = app
        self.hub = hub  # lists a Hub repo's refs (list_repo_refs)
        self.watcher = watcher
        self.retention = retention
        self.warm_published = warm_published
        self._node_pins: dict[str, tuple[set[tuple[RepoRef, str]], float]] = {}  # holder -> pins, when

    def pinned(self) -> set[tuple[RepoRef, str]]:
        """Commits nodes reported pinned (open files, CSI volumes) in the last few polls."""
        now = time.monotonic()
        found: set[tuple[RepoRef, str]] = set()
        for holder, (pins, at) in list(self._node_pins.items()):
            if now - at > PIN_REPORT_TTL:
                del self._node_pins[holder]
            else:
                found |= pins
        return found

    def metrics(self) -> dict[str, float]:
        status = self.retention.status(self.pinned())
        return {"mmfs_backend_refs_watched": len(self.watcher.status()["refs"]),
                "mmfs_backend_ref_checks_total": self.watcher.checks,
                "mmfs_backend_ref_moves_total": self.watcher.moves,
                "mmfs_backend_commits_pinned": len(status["pinned"]),
                "mmfs_backend_commits_retired": len(status["retired"]),
                "mmfs_backend_gc_reclaimed_bytes_total": status["reclaimed_bytes"]}

    # -- node protocol ------------------------------------------------------------------

    async def refs_watch(self, request: Request, s: list[str]) -> Response:
        try:
            body = json.loads(request.body or b"{}")
            known = {str(k): str(v) for k, v in dict(body.get("refs", {})).items()}
            pins = [str(p) for p in body.get("pinned", [])]
            published = {str(p) for p in body.get("published", [])}
            holder = str(body.get("holder", request.client))[:200]
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidName(f"the body must be JSON {{\"refs\": {{ref: commit}}, \"pinned\": [...]}}: {exc}") from None
        wait = _seconds(request.query_value("wait") or "0", MAX_POLL_WAIT)
        followed: dict[str, str] = {}
        for key, commit in known.items():
            repo, revision = parse_ref_key(key)
            if is_commit(revision) or self.app.access.is_restricted(repo):
                continue  # restricted repos: nodes learn moves when they read (access checked then)
            followed[key] = commit
            if key in published:
                self.watcher.watch(repo, revision, reason="csi", warm=self.warm_published)
            else:
                self.watcher.touch(repo, revision)
        node_pins = set()
        for text in pins:
            repo, commit = parse_ref_key(text)
            if is_commit(commit):
                node_pins.add((repo, commit))
        self._node_pins[holder] = (node_pins, time.monotonic())
        moved = await self.watcher.wait_for_moves(followed, wait)
        return Response.json({"moved": moved})

    async def refs(self, request: Request, s: list[str]) -> Response:
        metadata = self.app.engine.metadata
        history = [vars_of(m) for m in metadata.ref_history()] if metadata is not None else []
        return Response.json({**self.watcher.status(), "history": history,
                              "retention": self.retention.status(self.pinned())})

    async def watch(self, request: Request, s: list[str]) -> Response:
        from .app import _repo

        repo = _repo(s[2], s[3], s[4])
        revision = check_revision("/".join(s[5:]))
        if is_commit(revision):
            raise InvalidName(f"{revision} is a commit: commits never move, there is nothing to watch")
        await self.app._listing(repo, revision, request.header("authorization"))  # exists, may be read
        warm = (request.query_value("warm") or "1").lower() not in ("0", "false")
        self.watcher.watch(repo, revision, reason="watch", warm=warm)
        return Response.json({"ref": ref_key(repo, revision), "commit": self.app.engine.known_ref(repo, revision),
                              "warm": warm, "interval_s": self.watcher.interval})

    async def gc(self, request: Request, s: list[str]) -> Response:
        dry_run = (request.query_value("dry_run") or "").lower() in ("1", "true")
        pinned = self.pinned()
        report = await self.retention.collect(pinned, dry_run=dry_run)
        answer = report.to_json()
        artifacts = self.app.artifacts
        if artifacts is not None:  # artifacts go with their model commit
            live = self.retention.classify(pinned)[0]
            answer["artifacts_unpublished"] = await trio.to_thread.run_sync(
                lambda: artifacts.store.reclaim(lambda repo, commit: (repo, commit) in live, dry_run=dry_run))
        return Response.json(answer)

    # -- the Hub's list_repo_refs --------------------------------------------------------

    async def hub_refs(self, request: Request, s: list[str]) -> Response:
        """The repo's refs as the upstream lists them (moves it shows are noted); from the
        refs known here when the upstream cannot answer."""
        from .app import _api_repo

        repo = _api_repo(s)
        auth = request.header("authorization")
        include_prs = (request.query_value("include_prs") or "").lower() in ("1", "true")
        await self.app._listing(repo, "main", auth)
        answer: dict[str, Any] | None = None
        if self.hub is not None:
            try:
                answer = await self.hub.list_refs(repo, include_prs=include_prs,
                                                  auth=self.app._upstream_auth(repo, auth))
            except NotFound:
                raise
            except MmfsError as exc:
                log.warning("listing the refs of %s upstream failed (%s); answering with the refs known here",
                            repo, exc)
        if answer is None:
            answer = self._known_refs(repo, include_prs)
        else:
            await self._note(repo, answer)
        return Response.json(answer)

    def _known_refs(self, repo: RepoRef, include_prs: bool) -> dict[str, Any]:
        metadata = self.app.engine.metadata
        refs = {}
        prefix = f"{repo}@"
        for key, record in (metadata.refs() if metadata is not None else {}).items():
            if key.startswith(prefix) and not is_commit(key[len(prefix):]):
                revision = key[len(prefix):]
                refs[git_ref(revision)] = self.app.engine.known_ref(repo, revision) or record.commit
        return refs_json(refs, include_prs)

    async def _note(self, repo: RepoRef, answer: dict[str, Any]) -> None:
        """Refs known here that the listing shows elsewhere have moved: note it (one
        listing checks every ref of the repo)."""
        for group in answer.values():
            for item in group if isinstance(group, list) else ():
                ref, commit = str(item.get("ref", "")), str(item.get("targetCommit", ""))
                revision = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
                if not is_commit(commit):
                    continue
                try:
                    check_revision(revision)
                except InvalidName:
                    continue
                known = self.app.engine.known_ref(repo, revision)
                if known is not None and known != commit:
                    await self.app.engine.note_ref(repo, revision, commit, detected_by=self.app.engine.config.holder)


def vars_of(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _seconds(text: str, most: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidName(f"wait must be a number of seconds, not {text[:40]!r}") from None
    if not value >= 0:
        raise InvalidName(f"wait must not be negative, not {text[:40]!r}")
    return min(value, most)


__all__ = ["VersionRoutes"]
