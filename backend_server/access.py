"""Who may read what: gated and private repos through a shared cache.

The backend's cache is shared by every caller, so bytes fetched for one caller must not
reach a caller without access, and the backend's own token (``HF_TOKEN``) is for
warming, never a way around the upstream's rules. The rule:

1. Whether a repo is *restricted* is asked of the upstream without any credentials: a
   ``HEAD`` of a file's ``resolve`` URL, redirects not followed. ``GatedRepo`` makes it
   *gated*; ``RepoNotFound`` (401 or 404) or another 401/403 makes it *private*. The
   answer is kept for ``repo_ttl`` seconds and remembered on disk (``access.json`` under
   ``--data-dir``), so a restart never forgets a restricted repo whose bytes it holds.
2. For a restricted repo every caller's ``Authorization`` is checked the same way, with
   the caller's own header, before any of its content is served, cached or not. Gated
   repos show their metadata (revisions, listings, sizes) to anyone, as the Hub does;
   private ones show nothing without the check (``content=False``). An answer is cached
   for ``caller_ttl`` seconds per (repo, sha256 of the header), never the header itself
   and never longer: a revoked token stops reading within that bound.
3. The bytes of a restricted repo are fetched upstream with the backend's own token where
   it can read them (:meth:`AccessControl.upstream_auth`), so one caller's revoked token
   cannot fail the fetches other callers share; else with the checked caller's own.

When the upstream cannot be reached, the last known answer about a repo stands (a warm
backend keeps serving public models with the Hub down; a restricted one stays
restricted and its callers need a cached answer). A repo with no known answer fails
closed: :class:`TransientError` (503) until a probe succeeds.

The admin token (``MMFS_ADMIN_TOKEN``), when set, guards actions that spend the
backend's resources for everyone (``POST /v1/prefetch``): :func:`check_admin`.
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

from mmfs.artifacts import PUBLISH_TOKEN_HEADER
from mmfs.errors import AccessDenied, InvalidName, MmfsError, RepoNotFound, TransientError, UpstreamError
from mmfs.names import RepoRef
from mmfs.remote._http import error_from_response
from mmfs.remote.backend import ADMIN_HEADER
from mmfs.remote.hub import hub_path
from mmfs.remote.wire import proxy_url
from mmfs.singleflight import SingleFlight

log = logging.getLogger(__name__)

OPEN, GATED, PRIVATE = "open", "gated", "private"


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
    if not _same_token(presented, expected):
        raise PublishRefused("the publish token is wrong")


def _same_token(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


_MAX_CALLER_ENTRIES = 10_000
#: 404 codes that say the repo is visible and only the file or revision is missing.
_VISIBLE_404 = ("EntryNotFound", "RevisionNotFound")


def _key(repo: RepoRef) -> str:
    """How a repo is named in the answers kept here, in ``access.json`` and upstream.
    Repos that are not the Hub's (stores, artifacts) are never asked about, so never restricted."""
    try:
        return hub_path(repo)
    except InvalidName:
        return str(repo)


class AdminRequired(AccessDenied):
    """An admin action without the admin token."""

    status = 401

    @classmethod
    def code(cls) -> str:
        return "AdminRequired"


def check_admin(admin_token: str | None, presented: str | None) -> None:
    """Raise :class:`AdminRequired` unless no admin token is set or ``presented`` is it."""
    if not admin_token:
        return
    if presented is None or not _same_token(presented, admin_token):
        raise AdminRequired(f"this action needs the backend's admin token in the {ADMIN_HEADER} header "
                            "(MMFS_ADMIN_TOKEN; mmfs prefetch reads it from MMFS_ADMIN_TOKEN too)")


class AccessControl:
    def __init__(self, endpoint: str, token: str | None, state_file: Path, *, repo_ttl: float = 600.0,
                 caller_ttl: float = 60.0, timeout: float = 10.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._state_file = Path(state_file)
        self.repo_ttl = repo_ttl
        self.caller_ttl = caller_ttl
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
                                         proxy=proxy_url(self.endpoint))
        self._probed: dict[str, tuple[str, float]] = {}  # repo id -> (OPEN | GATED | PRIVATE, checked at)
        self._own_reads: dict[str, tuple[bool, float]] = {}  # restricted repo id -> (our token reads it, at)
        self._callers: dict[tuple[str, str], tuple[bool, float]] = {}  # (repo id, token hash) -> (allowed, at)
        self._kinds: dict[str, str] = self._load()  # last known answer per repo (persisted)
        self._flights: SingleFlight[tuple, object] = SingleFlight()
        self.outcomes: dict[str, int] = {}

    # -- state on disk -------------------------------------------------------------------

    def _load(self) -> dict[str, str]:
        try:
            state = json.loads(self._state_file.read_text())
            kinds = {str(r): OPEN for r in state.get("open", [])}
            kinds.update({str(r): PRIVATE for r in state.get("restricted", [])})  # unknown kind: the stricter
            kinds.update({str(r): GATED for r in state.get("gated", [])})
            kinds.update({str(r): PRIVATE for r in state.get("private", [])})
            return kinds
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.error("cannot read %s (%s): starting with no restricted repos known", self._state_file, exc)
            return {}

    def _save(self) -> None:
        by_kind = {kind: sorted(r for r, k in self._kinds.items() if k == kind) for kind in (OPEN, GATED, PRIVATE)}
        state = {"restricted": by_kind[GATED] + by_kind[PRIVATE], **by_kind}
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_file)

    def _remember(self, repo: RepoRef, kind: str) -> None:
        self._probed[_key(repo)] = (kind, time.monotonic())
        if self._kinds.get(_key(repo)) != kind:
            if kind != OPEN:
                log.info("%s is %s: every caller's token is checked before its content is served", repo, kind)
            elif _key(repo) in self._kinds:
                log.info("%s is no longer restricted", repo)
            self._kinds[_key(repo)] = kind
            self._save()

    # -- checks --------------------------------------------------------------------------

    def kind(self, repo: RepoRef) -> str:
        """The last known answer: ``OPEN``, ``GATED`` or ``PRIVATE`` (``OPEN`` if never asked)."""
        return self._kinds.get(_key(repo), OPEN)

    def is_restricted(self, repo: RepoRef) -> bool:
        return self.is_restricted_id(_key(repo))

    def is_restricted_id(self, repo_id: str) -> bool:
        return self._kinds.get(repo_id, OPEN) != OPEN

    def upstream_auth(self, repo: RepoRef, auth: str | None) -> str | None:
        """The ``Authorization`` the engine sends upstream for ``repo``, once :meth:`check`
        passed: none (the backend's own ``HF_TOKEN``) unless the repo is restricted and
        our token was refused, then the caller's, already checked."""
        if not self.is_restricted(repo):
            return None
        own = self._own_reads.get(_key(repo))
        return None if own is not None and own[0] else auth

    def own_token_refused(self, repo: RepoRef) -> None:
        """The upstream refused the backend's own credentials for ``repo`` (seen by the engine)."""
        self._own_reads[_key(repo)] = (False, time.monotonic())
        if not self.is_restricted(repo):  # gated or private: the next check probes which
            self._probed.pop(_key(repo), None)
            self._kinds[_key(repo)] = PRIVATE
            self._save()

    async def check(self, repo: RepoRef, commit: str, path: str, auth: str | None, nursery: trio.Nursery,
                    *, content: bool = True) -> None:
        """Raise :class:`AccessDenied` unless the caller (``auth``) may read ``path`` of
        ``repo`` (``content``), or see the repo's metadata (not ``content``: everyone may
        for a gated repo, as on the Hub)."""
        kind = await self._kind(repo, commit, path, nursery)
        if kind == OPEN or (kind == GATED and not content):
            return
        own = self._own_reads.get(_key(repo))
        if self._token and (own is None or time.monotonic() - own[1] >= self.repo_ttl):
            await self._flights.run(("own", _key(repo)), lambda: self._ask_own(repo, commit, path), nursery)
        if not auth:
            self._count("denied_no_token")
            raise self._refusal_error(repo, kind, f"{_key(repo)} is gated: send an Authorization header with a "
                                      "token that has access to it")
        key = (_key(repo), hashlib.sha256(auth.encode("latin-1", "replace")).hexdigest())
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
            raise self._refusal_error(repo, kind, f"the token sent has no access to {_key(repo)}")

    @staticmethod
    def _refusal_error(repo: RepoRef, kind: str, message: str) -> MmfsError:
        """A private repo does not exist for those who may not see it (as on the Hub)."""
        if kind == PRIVATE:
            return RepoNotFound(f"Repository {_key(repo)} not found (or it is private and the token sent, if "
                                "any, has no access to it)")
        return AccessDenied(message)

    async def _kind(self, repo: RepoRef, commit: str, path: str, nursery: trio.Nursery) -> str:
        probed = self._probed.get(_key(repo))
        if probed is not None and time.monotonic() - probed[1] < self.repo_ttl:
            return probed[0]
        try:
            kind = str(await self._flights.run(("anonymous", _key(repo)),
                                               lambda: self._ask_anonymous(repo, commit, path), nursery))
        except MmfsError as exc:
            known = self._kinds.get(_key(repo))
            if known is None:  # never answered: fail closed
                log.warning("cannot check access to %s upstream (%s) and no answer is known: refusing", repo, exc)
                raise TransientError(f"cannot check access to {_key(repo)} upstream ({exc}); retry later") from exc
            log.warning("cannot check access to %s upstream (%s); using the last known answer: %s", repo, exc, known)
            return known
        self._remember(repo, kind)
        return kind

    async def _head(self, repo: RepoRef, commit: str, path: str, auth: str | None) -> httpx.Response:
        url = f"{self.endpoint}/{_key(repo)}/resolve/{commit}/{quote(path)}"
        headers = {"User-Agent": "mmfs-backend/0.1", "Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = auth
        try:
            return await self._client.head(url, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"access check on {repo} failed: {type(exc).__name__}") from exc

    @staticmethod
    def _refusal(response: httpx.Response) -> str | None:
        """``GATED``/``PRIVATE`` when ``response`` refuses access, ``None`` when it grants it
        (2xx/3xx, or a 404 about a file or revision of a visible repo); else the error."""
        status, code = response.status_code, response.headers.get("X-Error-Code")
        if status < 400:
            return None
        if code == "GatedRepo":
            return GATED
        if code == "RepoNotFound" or status in (401, 403):
            return PRIVATE
        if status == 404:  # a 404 shows the repo only when it says a file or revision is missing
            return None if code in _VISIBLE_404 else PRIVATE
        raise error_from_response(response)

    async def _ask_anonymous(self, repo: RepoRef, commit: str, path: str) -> str:
        return self._refusal(await self._head(repo, commit, path, None)) or OPEN

    async def _ask_own(self, repo: RepoRef, commit: str, path: str) -> None:
        try:
            reads = self._refusal(await self._head(repo, commit, path, f"Bearer {self._token}")) is None
        except MmfsError as exc:
            log.warning("cannot check whether our own token reads %s (%s): using callers' tokens", repo, exc)
            reads = False
        self._own_reads[_key(repo)] = (reads, time.monotonic())

    async def _ask_caller(self, repo: RepoRef, commit: str, path: str, auth: str) -> bool:
        try:
            refused = self._refusal(await self._head(repo, commit, path, auth))
        except UpstreamError:
            self._count("error")
            raise
        except MmfsError as exc:
            self._count("error")
            raise UpstreamError(f"access check on {_key(repo)}: {exc}") from exc
        self._count("denied" if refused else "allowed")
        return refused is None

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def aclose(self) -> None:
        await self._client.aclose()
