"""Who may read what: gated and private repos through a shared cache.

The backend's cache is shared by every caller, so bytes fetched with one caller's token
must not reach a caller without access. The rule:

1. Before serving a repo's content, the backend asks the upstream whether *its own*
   credentials (``HF_TOKEN``, or none) can read it: a ``HEAD`` of the requested file's
   ``resolve`` URL, redirects not followed. 401/403 (``GatedRepo``) or 404
   ``RepoNotFound`` (private) mark the repo *restricted*; the answer is kept for
   ``own_ttl`` seconds, and restricted repos are also remembered on disk
   (``access.json`` under ``--data-dir``), so a restart never forgets one whose bytes it
   holds.
2. For a restricted repo every caller's ``Authorization`` is checked the same way, with
   the caller's own header; the answer is cached for ``caller_ttl`` seconds per
   (repo, sha256 of the header), never the header itself.

When the upstream cannot be reached, the last known answer stands: a repo the backend's
own token was last seen to read stays open (so a warm backend keeps serving public
models with the Hub down), a restricted one stays restricted. A repo with no known
answer fails closed: :class:`TransientError` (503) until a probe succeeds. Open repos
are remembered on disk too, with a fingerprint of the token that saw them, so a restart
with the Hub down keeps serving them, and a restart with another token does not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

from mmfs.errors import AccessDenied, MmfsError, TransientError, UpstreamError
from mmfs.names import RepoRef
from mmfs.remote._http import error_from_response
from mmfs.remote.hub import hub_path
from mmfs.remote.wire import proxy_url
from mmfs.singleflight import SingleFlight

log = logging.getLogger(__name__)

_RESTRICTED_CODES = ("GatedRepo", "RepoNotFound")
#: The codes of a 404 that still shows the repo to the asker (the Hub sends one on every 404).
_VISIBLE_REPO_CODES = ("EntryNotFound", "RevisionNotFound")
#: The header a publisher presents ``MMFS_PUBLISH_TOKEN`` in (``Authorization`` stays the
#: caller's upstream credential, as on every other route).
PUBLISH_TOKEN_HEADER = "X-Mmfs-Publish-Token"


class PublishRefused(AccessDenied):
    """A push, publish or build lease without the publish token."""

    status = 401

    @classmethod
    def code(cls) -> str:
        return "PublishRefused"


def check_publisher(presented: str | None, expected: str | None) -> None:
    """Only holders of the publish token may push artifacts or take build leases.

    ``expected`` is the backend's ``MMFS_PUBLISH_TOKEN``; without one, publishing is off."""
    if not expected:
        raise PublishRefused("publishing is off on this backend: it has no MMFS_PUBLISH_TOKEN")
    if not presented:
        raise PublishRefused(f"publishing needs the publish token ({PUBLISH_TOKEN_HEADER} header; "
                             "mmfs reads it from MMFS_PUBLISH_TOKEN)")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise PublishRefused("the publish token is wrong")
_MAX_CALLER_ENTRIES = 10_000


class AccessControl:
    def __init__(self, endpoint: str, token: str | None, state_file: Path, *, own_ttl: float = 600.0,
                 caller_ttl: float = 60.0, timeout: float = 10.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._state_file = Path(state_file)
        self.own_ttl = own_ttl
        self.caller_ttl = caller_ttl
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
                                         proxy=proxy_url(self.endpoint))
        self._own: dict[str, tuple[bool, float]] = {}  # hub_path -> (restricted, checked at)
        self._callers: dict[tuple[str, str], tuple[bool, float]] = {}  # (hub_path, token hash) -> (allowed, at)
        self._fingerprint = hashlib.sha256(f"mmfs-access\0{token or ''}".encode()).hexdigest()[:16]
        self._open: set[str] = set()  # repos (hub_path) our token was last seen to read (persisted)
        self._restricted: set[str] = self._load()
        self._flights: SingleFlight[tuple, bool] = SingleFlight()
        self.outcomes: dict[str, int] = {}

    # -- state on disk -------------------------------------------------------------------

    def _load(self) -> set[str]:
        try:
            state = json.loads(self._state_file.read_text())
            restricted = set(state.get("restricted", []))
            if state.get("token") == self._fingerprint:  # open for this token, not for another
                self._open = set(state.get("open", [])) - restricted
            return restricted
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.error("cannot read %s (%s): starting with no restricted repos known", self._state_file, exc)
            return set()

    def _save(self) -> None:
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        tmp.write_text(json.dumps({"restricted": sorted(self._restricted), "open": sorted(self._open),
                                   "token": self._fingerprint}))
        os.replace(tmp, self._state_file)

    # -- checks --------------------------------------------------------------------------

    def is_restricted(self, repo: RepoRef) -> bool:
        return hub_path(repo) in self._restricted

    def mark_restricted(self, repo: RepoRef) -> None:
        """Called when the upstream refused the backend's own credentials for ``repo``."""
        if hub_path(repo) not in self._restricted:
            log.info("%s is gated or private for the backend's own token: callers are checked", repo)
            self._restricted.add(hub_path(repo))
            self._open.discard(hub_path(repo))
            self._save()
        self._own[hub_path(repo)] = (True, time.monotonic())

    async def check(self, repo: RepoRef, commit: str, path: str, auth: str | None,
                    nursery: trio.Nursery) -> None:
        """Raise :class:`AccessDenied` unless the caller (``auth``) may read ``path`` of ``repo``."""
        if not await self._restricted_for_us(repo, commit, path, nursery):
            return
        if not auth:
            self._count("denied_no_token")
            raise AccessDenied(f"{hub_path(repo)} is gated or private: send an Authorization header with a token "
                               "that has access to it")
        key = (hub_path(repo), hashlib.sha256(auth.encode("latin-1", "replace")).hexdigest())
        cached = self._callers.get(key)
        if cached is not None and time.monotonic() - cached[1] < self.caller_ttl:
            self._count("cached_allowed" if cached[0] else "cached_denied")
            allowed = cached[0]
        else:
            allowed = bool(await self._flights.run(("caller",) + key,
                                                   lambda: self._ask_caller(repo, commit, path, auth), nursery))
            if len(self._callers) > _MAX_CALLER_ENTRIES:
                self._callers.clear()
            self._callers[key] = (allowed, time.monotonic())
        if not allowed:
            raise AccessDenied(f"the token sent has no access to {hub_path(repo)}")

    async def _restricted_for_us(self, repo: RepoRef, commit: str, path: str, nursery: trio.Nursery) -> bool:
        known = self._own.get(hub_path(repo))
        if known is not None and time.monotonic() - known[1] < self.own_ttl:
            return known[0]
        try:
            restricted = bool(await self._flights.run(("own", hub_path(repo)),
                                                      lambda: self._ask_own(repo, commit, path), nursery))
        except MmfsError as exc:
            if known is not None:
                fallback = known[0]
            elif hub_path(repo) in self._restricted or hub_path(repo) in self._open:
                fallback = hub_path(repo) in self._restricted
            else:  # never answered: fail closed
                log.warning("cannot check access to %s upstream (%s) and no answer is known: refusing", repo, exc)
                raise TransientError(f"cannot check access to {hub_path(repo)} upstream ({exc}); retry later") from exc
            log.warning("cannot check access to %s upstream (%s); using the last known answer: %s", repo, exc,
                        "restricted" if fallback else "open")
            return fallback
        if restricted:
            self.mark_restricted(repo)
        else:
            self._own[hub_path(repo)] = (False, time.monotonic())
            if hub_path(repo) in self._restricted or hub_path(repo) not in self._open:
                if hub_path(repo) in self._restricted:
                    log.info("%s is no longer restricted for the backend's own token", repo)
                self._restricted.discard(hub_path(repo))
                self._open.add(hub_path(repo))
                self._save()
        return restricted

    async def _head(self, repo: RepoRef, commit: str, path: str, auth: str | None) -> httpx.Response:
        url = f"{self.endpoint}/{hub_path(repo)}/resolve/{commit}/{quote(path)}"
        headers = {"User-Agent": "mmfs-backend/0.1", "Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = auth
        try:
            return await self._client.head(url, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"access check on {repo} failed: {type(exc).__name__}") from exc

    async def _ask_own(self, repo: RepoRef, commit: str, path: str) -> bool:
        response = await self._head(repo, commit, path, f"Bearer {self._token}" if self._token else None)
        if response.status_code < 400:
            return False
        if response.status_code in (401, 403) or response.headers.get("X-Error-Code") in _RESTRICTED_CODES:
            return True
        if response.status_code == 404:
            # Visible, only the file or revision is missing (the engine says so); a 404
            # that does not say so could be a hidden repo: restricted, callers checked.
            return not _shows_the_repo(response)
        raise error_from_response(response)

    async def _ask_caller(self, repo: RepoRef, commit: str, path: str, auth: str) -> bool:
        response = await self._head(repo, commit, path, auth)
        if response.status_code < 400:
            self._count("allowed")
            return True
        if response.status_code in (401, 403) or response.headers.get("X-Error-Code") in _RESTRICTED_CODES:
            self._count("denied")
            return False
        if response.status_code == 404:
            allowed = _shows_the_repo(response)  # without a code, a 404 proves no access
            self._count("allowed" if allowed else "denied")
            return allowed
        self._count("error")
        error = error_from_response(response)
        raise error if isinstance(error, UpstreamError) else UpstreamError(str(error))

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def aclose(self) -> None:
        await self._client.aclose()


def _shows_the_repo(response: httpx.Response) -> bool:
    """Whether a 404 says the repo exists for this caller (only a file or revision is missing)."""
    return response.headers.get("X-Error-Code") in _VISIBLE_REPO_CODES
