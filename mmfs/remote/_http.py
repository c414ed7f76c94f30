"""HTTP plumbing shared by the remotes: one client per remote, retries, error mapping."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from typing import Any, Protocol

import trio

from ..errors import MmfsError, TransientError, UpstreamError, from_http
from .wire import Response, Unreachable, WireClient

log = logging.getLogger(__name__)

#: Largest answer expected for control requests (revision info and manifests of big repos).
_MAX_CONTROL_BODY = 64 << 20


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before a reader gets EIO: bounded, so no reader ever hangs."""

    attempts: int = 4  # tries in all, the first included
    backoff: float = 0.25  # seconds before the second try; doubles each time, jittered
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # between bytes
    request_timeout: float = 120.0  # for one whole request, however slowly its bytes come
    #: Raise :class:`~mmfs.remote.wire.Unreachable` at once instead of retrying it: the
    #: caller has another server to ask (a replica set fails over to the next replica).
    fail_over: bool = False
    #: Longest wait a ``Retry-After`` (on a 429 or 503) may ask for before the next try;
    #: a longer one is cut to this (the caller's own bound still applies).
    max_retry_after: float = 30.0


def policy_within(timeout: float) -> RetryPolicy:
    """Retries that fit well inside a caller's bound of ``timeout`` seconds (the node's
    ``--remote-timeout``, the backend's ``--upstream-timeout``): a silent peer is given up
    on after half of it, so a retry still fits."""
    return RetryPolicy(attempts=4, backoff=0.25, connect_timeout=min(5.0, max(timeout / 4, 0.5)),
                       read_timeout=min(30.0, max(timeout / 2, 1.0)))


def make_client(policy: RetryPolicy) -> WireClient:
    return WireClient(connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout,
                      request_timeout=policy.request_timeout)


class _AnyResponse(Protocol):
    """What :func:`error_from_response` reads: a WireClient or an httpx response."""

    status_code: int
    headers: Any
    url: Any

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def error_from_response(response: _AnyResponse) -> MmfsError:
    """Turn a non-2xx answer into the matching :class:`MmfsError`, message from the body."""
    message = response.headers.get("X-Error-Message", "")
    if not message:
        try:
            body = response.json()
        except ValueError:
            body = None
        # An error page may be any JSON (``0``, a list) or none: only an object has our field.
        message = str(body.get("error", "")) if isinstance(body, dict) else response.text[:200]
    return from_http(response.status_code, message or f"HTTP {response.status_code} from {response.url}",
                     response.headers.get("X-Error-Code"))


async def request(client: WireClient, policy: RetryPolicy, method: str, url: str, *,
                  headers: dict[str, str] | None = None, expect_length: int | None = None,
                  payload: bytes = b"", answer_redirects: bool = False) -> Response:
    """Send a request, retrying transient failures with backoff; return a 2xx response
    (or, with ``answer_redirects``, a redirect, which is then not followed).

    Transient failures are timeouts, connection errors and resets (also mid-body), 5xx
    and 429, and a body shorter than ``expect_length``. The wait before the next try is
    the backoff, or what the answer's ``Retry-After`` asks (up to ``max_retry_after``)
    when that is longer: a rate-limited client that retries sooner only gets 429 again.
    When the attempts run out the last one is raised as :class:`UpstreamError` (EIO),
    naming the URL and the cause.
    """
    delay = policy.backoff
    for attempt in range(1, policy.attempts + 1):
        asked = 0.0
        try:
            response = await client.request(method, url, headers, max_body=expect_length or _MAX_CONTROL_BODY,
                                            payload=payload, follow_redirects=not answer_redirects)
            if answer_redirects and 300 <= response.status_code < 400:
                return response
            if response.is_success:
                if expect_length is not None and len(response.content) != expect_length:
                    raise TransientError(f"short body: {len(response.content)} of {expect_length} bytes")
                return response
            asked = retry_after(response.headers.get("Retry-After"), policy.max_retry_after)
            raise error_from_response(response)
        except TransientError as exc:
            if policy.fail_over and isinstance(exc, Unreachable):
                raise
            error: MmfsError = exc
        if attempt == policy.attempts:
            raise UpstreamError(f"{method} {_redact(url)} failed after {attempt} attempts: {error}") from error
        wait = max(delay * random.uniform(0.8, 1.2), asked)
        log.warning("%s %s: %s; retrying in %.2fs", method, _redact(url), error, wait)
        await trio.sleep(wait)
        delay *= 2
    raise AssertionError("unreachable")


def retry_after(value: str | None, limit: float) -> float:
    """Seconds a ``Retry-After`` header asks for (delay-seconds form; an HTTP date or
    garbage counts as none), at most ``limit``."""
    text = (value or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return 0.0
    return min(float(text), limit)


def _redact(url: str) -> str:
    """URLs in logs lose their query string (signed CDN URLs carry credentials there)."""
    return url.split("?", 1)[0]
