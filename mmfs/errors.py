"""The exceptions of mmfs, each knowing how it surfaces to a user.

Every layer raises the most specific child of :class:`MmfsError`; the FUSE adapter turns
it into ``errno``, the HTTP servers into ``status`` with the message as the body, the CLI
into a one-line message and a non-zero exit::

    MmfsError
    ├── InvalidName          malformed repo id, revision or path       EINVAL / 400
    ├── NotFound             unknown repo, revision or file            ENOENT / 404
    │   ├── RepoNotFound
    │   ├── RevisionNotFound
    │   │   └── StaleRevision  an object store changed since that revision ESTALE / 404
    │   └── EntryNotFound
    ├── AccessDenied         gated or private repo without a token     EACCES / 403
    ├── UpstreamError        upstream or backend failed for good       EIO    / 502
    │   └── TransientError   timeouts, resets, 5xx, 429: worth a retry EAGAIN / 503
    ├── IntegrityError       bytes that fail their hash                EIO    / 502
    ├── NotSupported         a feature this deployment cannot serve    EOPNOTSUPP / 501
    └── CacheError           the local cache cannot store or read      EIO    / 500
"""

from __future__ import annotations

import errno as _errno
import logging
import time


class MmfsError(Exception):
    """Base of every error mmfs raises on purpose."""

    errno: int = _errno.EIO
    status: int = 500

    @classmethod
    def code(cls) -> str:
        """The ``X-Error-Code`` header value: the Hub's own codes where it has one, else
        the class name, so a node maps a backend's error back to the same class."""
        return cls.__name__


class InvalidName(MmfsError):
    errno = _errno.EINVAL
    status = 400


class NotFound(MmfsError):
    errno = _errno.ENOENT
    status = 404


class RepoNotFound(NotFound):
    pass


class RevisionNotFound(NotFound):
    pass


class StaleRevision(RevisionNotFound):
    """A revision of an object store or local root that the store no longer holds: an
    object changed after the revision was listed (docs/providers.md). Reads of it fail
    instead of mixing two versions; ``latest`` names the new one."""

    errno = _errno.ESTALE


class EntryNotFound(NotFound):
    pass


class AccessDenied(MmfsError):
    errno = _errno.EACCES
    status = 403

    @classmethod
    def code(cls) -> str:
        return "GatedRepo"


class UpstreamError(MmfsError):
    errno = _errno.EIO
    status = 502


class TransientError(UpstreamError):
    errno = _errno.EAGAIN
    status = 503


class IntegrityError(MmfsError):
    errno = _errno.EIO
    status = 502


class NotSupported(MmfsError):
    """A request this deployment cannot serve as configured (not worth a retry)."""

    errno = _errno.EOPNOTSUPP
    status = 501


class CacheError(MmfsError):
    errno = _errno.EIO
    status = 500


_BY_CODE: dict[str, type[MmfsError]] = {
    cls.code(): cls
    for cls in (MmfsError, InvalidName, NotFound, RepoNotFound, RevisionNotFound, StaleRevision, EntryNotFound,
                AccessDenied, UpstreamError, TransientError, IntegrityError, NotSupported, CacheError)
}


def from_http(status: int, message: str, code: str | None = None) -> MmfsError:
    """Map an HTTP answer (status, body message, ``X-Error-Code``) to the most specific error."""
    if code in _BY_CODE:
        return _BY_CODE[code](message)
    if status == 400:
        return InvalidName(message)
    if status in (401, 403):
        return AccessDenied(message)
    if status == 404:
        return NotFound(message)
    if status == 429 or status >= 500:
        return TransientError(message)
    return UpstreamError(message)


def first_error(group: BaseExceptionGroup) -> MmfsError | None:
    """The first :class:`MmfsError` in a (nested) exception group from a nursery, if any.

    Readers that fan out over chunks want one errno, not a group."""
    for exc in group.exceptions:
        if isinstance(exc, MmfsError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_error(exc)
            if found is not None:
                return found
    return None


class FailureLog:
    """Failures that callers see as an errno or an HTTP status, logged without flooding.

    The first failure of each kind (what failed and the error class) goes to the log at
    WARNING (ERROR for upstream, integrity and cache failures) with its cause, so a mount
    whose every ``ls`` fails says why without ``--debug``; repeats of that kind are counted
    and summed up in one line at most every ``interval`` seconds, the rest at DEBUG.
    :class:`NotFound` is part of normal operation (lookups of names that are not there) and
    stays at DEBUG.
    """

    def __init__(self, logger: logging.Logger, interval: float = 300.0) -> None:
        self._log = logger
        self._interval = interval
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # kind -> (last logged, repeats since)

    def failed(self, what: str, exc: MmfsError) -> None:
        if isinstance(exc, NotFound):
            self._log.debug("%s: %s", what, exc)
            return
        kind = (what.split("(", 1)[0], type(exc).__name__)
        level = logging.ERROR if isinstance(exc, (UpstreamError, IntegrityError, CacheError)) else logging.WARNING
        now = time.monotonic()
        last = self._seen.get(kind)
        if last is None:
            self._seen[kind] = (now, 0)
            self._log.log(level, "%s failed: %s (%s; repeats of this kind are summed up)", what, exc, kind[1])
        elif now - last[0] >= self._interval:
            self._seen[kind] = (now, 0)
            self._log.log(level, "%s failed: %s (%s; %d more like it since the last report)", what, exc, kind[1],
                          last[1] + 1)
        else:
            self._seen[kind] = (last[0], last[1] + 1)
            self._log.debug("%s failed: %s", what, exc)
