"""HTTP plumbing shared by the remotes: one client per remote, retries, error mapping."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import httpx
import trio

from ..errors import MmfsError, TransientError, UpstreamError, from_http

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before a reader gets EIO: bounded, so no reader ever hangs."""

    attempts: int = 4  # tries in all, the first included
    backoff: float = 0.25  # seconds before the second try; doubles each time, jittered
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # between bytes, not for the whole body


def make_client(policy: RetryPolicy, max_connections: int = 64) -> httpx.AsyncClient:
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=True, trust_env=False)


def error_from_response(response: httpx.Response) -> MmfsError:
    """Turn a non-2xx answer into the matching :class:`MmfsError`, message from the body."""
    message = response.headers.get("X-Error-Message", "")
    if not message:
        try:
            message = str(response.json().get("error", ""))
        except ValueError:
            message = response.text[:200]
    return from_http(response.status_code, message or f"HTTP {response.status_code} from {response.url}",
                     response.headers.get("X-Error-Code"))


async def request(client: httpx.AsyncClient, policy: RetryPolicy, method: str, url: str, *,
                  headers: dict[str, str] | None = None, expect_length: int | None = None) -> httpx.Response:
    """Send a request, retrying transient failures with backoff; return a 2xx response.

    Transient failures are timeouts, connection errors and resets (also mid-body), 5xx
    and 429, and a body shorter than ``expect_length``. When the attempts run out the
    last one is raised as :class:`UpstreamError` (EIO), naming the URL and the cause.
    """
    delay = policy.backoff
    for attempt in range(1, policy.attempts + 1):
        try:
            response = await client.request(method, url, headers=headers)
            if response.is_success:
                if expect_length is not None and len(response.content) != expect_length:
                    raise TransientError(f"short body: {len(response.content)} of {expect_length} bytes")
                return response
            raise error_from_response(response)
        except httpx.TimeoutException as exc:
            error: MmfsError = TransientError(f"timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            error = TransientError(f"connection failed ({type(exc).__name__}: {exc})")
        except TransientError as exc:
            error = exc
        if attempt == policy.attempts:
            raise UpstreamError(f"{method} {_redact(url)} failed after {attempt} attempts: {error}") from error
        log.warning("%s %s: %s; retrying in %.2fs", method, _redact(url), error, delay)
        await trio.sleep(delay * random.uniform(0.8, 1.2))
        delay *= 2
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    """URLs in logs lose their query string (signed CDN URLs carry credentials there)."""
    return url.split("?", 1)[0]
