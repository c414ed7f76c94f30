"""The Hub's read routes the backend does not answer itself, passed to the upstream as the caller.

The backend answers what downloads read from its own engine (repo info, trees, paths-info,
``resolve``). Other routes a Hub client uses — ``list_repo_commits``, ``whoami``,
``list_repo_refs``, listings with ``expand=true`` (last commits, security scans), whatever
a newer huggingface_hub asks — only the upstream can answer. They go there as they came
(path and query), with the caller's ``Authorization`` and *never* the backend's own token:
a caller must not act as the backend nor see what only the backend's token may see (the
upstream applies its own access rules to the caller, as if it were asked directly).

Answers come back with three changes:

* pagination (``Link: <...>; rel="next"``) and redirects (``Location``) on the upstream's
  origin point to the backend, so the next page also comes through here;
* Xet hints are removed (``xetHash`` fields, ``X-Xet-*`` headers, ``rel="xet-auth"``
  links): a client given them downloads from the Xet storage, around the cluster cache
  (and from a storage it may not reach);
* only headers that describe the answer are kept (no cookies, no hop-by-hop headers).

Only ``GET`` and ``HEAD`` pass, plus the ``POST`` s listed in :data:`READ_POSTS`, which
read; the router refuses anything else (405): it would change the upstream, and the
backend is a read-only cache of the Hub.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx

from mmfs.errors import InvalidName, TransientError, UpstreamError

from .http import Request, Response

log = logging.getLogger(__name__)

#: ``POST`` routes of the Hub that only read (``/api/<type>s/<org>/<name>/<route>/<rev>``).
READ_POSTS = frozenset({"paths-info"})
#: Request headers passed on; all others (``Cookie``, ``Host``, ``X-Forwarded-*``...) stay here.
FORWARDED_REQUEST = ("authorization", "accept", "content-type", "user-agent")
#: Answer headers passed back (``Link`` and ``Location`` rewritten, see the module docstring).
FORWARDED_RESPONSE = ("content-type", "x-error-code", "x-error-message", "x-repo-commit", "etag", "last-modified",
                      "retry-after", "link", "location", "x-linked-etag", "x-linked-size")
#: Largest answer passed back: metadata only, never a model's bytes.
MAX_BODY = 64 << 20
_LINK = re.compile(r"<([^>]*)>([^,]*)")


class Passthrough:
    """Forwards requests to ``upstream`` (the Hub's URL) and cleans the answers."""

    def __init__(self, upstream: str, *, timeout: float = 30.0) -> None:
        self.upstream = upstream.rstrip("/")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False)

    async def forward(self, request: Request) -> Response:
        """The upstream's answer to ``request`` (a read: the router checked the method)."""
        url = self.upstream + request.target  # path and query exactly as the caller sent them
        headers = {name: value for name in FORWARDED_REQUEST if (value := request.header(name)) is not None}
        headers["Accept-Encoding"] = "identity"
        body = request.body if request.method == "POST" else None
        try:
            async with self._client.stream(request.method, url, headers=headers, content=body) as upstream:
                content = bytearray()
                async for piece in upstream.aiter_raw():
                    content += piece
                    if len(content) > MAX_BODY:
                        raise UpstreamError(f"{self.upstream} answered {request.path[:200]} with more than "
                                            f"{MAX_BODY >> 20} MiB; not passed through")
        except httpx.HTTPError as exc:
            raise TransientError(f"the upstream {self.upstream} cannot be reached for {request.path[:200]} "
                                 f"({type(exc).__name__}); retry later") from exc
        mine = _base_url(request)
        kept: list[tuple[str, str]] = []
        for name in FORWARDED_RESPONSE:
            for value in upstream.headers.get_list(name):
                if name == "link":
                    value = self._links(value, mine)
                elif name == "location" and value.startswith(self.upstream + "/"):
                    value = mine + value[len(self.upstream):]
                if value:
                    kept.append((name.title(), value))
        data = bytes(content)
        if "json" in upstream.headers.get("content-type", "") and data:
            data = _without_xet(data)
        if request.method == "HEAD":
            length = upstream.headers.get("content-length", "0")
            return Response(upstream.status_code, kept, content_length=int(length) if length.isdigit() else 0)
        return Response(upstream.status_code, kept, data)

    def _links(self, value: str, mine: str) -> str:
        """A ``Link`` header with upstream URLs pointing to ``mine`` and Xet links removed."""
        links = []
        for target, params in _LINK.findall(value):
            if "xet" in params.lower():
                continue
            if target.startswith(self.upstream + "/"):
                target = mine + target[len(self.upstream):]
            links.append(f"<{target}>{params}")
        return ", ".join(links)

    async def aclose(self) -> None:
        await self._client.aclose()


def _base_url(request: Request) -> str:
    """The backend's URL as the caller addressed it (its ``Host``, and the scheme a TLS
    front end names in ``X-Forwarded-Proto``)."""
    host = request.header("host") or ""
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
        raise InvalidName("a Host header naming this backend is needed to pass this route through")
    scheme = "https" if (request.header("x-forwarded-proto") or "").lower() == "https" else "http"
    return f"{scheme}://{host}"


def _without_xet(data: bytes) -> bytes:
    """The JSON ``data`` without ``xetHash`` fields (left as is when it is not JSON)."""
    try:
        payload = json.loads(data)
    except ValueError:
        return data

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "xetHash"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(payload), separators=(",", ":")).encode()
