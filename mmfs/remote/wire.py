"""A lean HTTP/1.1 client for the data path: GETs whose bodies land in one buffer.

Why not httpx here: fetching 4 MiB chunks over loopback, httpx spent four fifths of its
time above the socket (64 KiB reads through anyio and h11, then a join), topping out near
0.4 GB/s on this machine's cores — below what one upstream link or one backend can give
a node. This client reads the status line and headers, then receives a
``Content-Length`` body straight into a preallocated buffer (``recv_into`` on plain TCP),
so the cost is the kernel's copy. It keeps connections alive per origin, follows
redirects (dropping ``Authorization`` when the origin changes, as the Hub's CDN needs),
speaks TLS through ``trio.SSLStream`` and decodes chunked bodies (error pages).

It goes through the proxy that ``HTTP_PROXY``/``HTTPS_PROXY`` name unless ``NO_PROXY``
exempts the host, as curl and the Hub's own clients do (plain HTTP in absolute form,
HTTPS through a ``CONNECT`` tunnel). It does no compression, cookies or HTTP/2.
Failures to connect, timeouts and broken connections raise
:class:`~mmfs.errors.TransientError`; the caller retries.
"""

from __future__ import annotations

import base64
import ctypes
import json
import re
import ssl
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import trio

from ..errors import TransientError, UpstreamError

_HEAD_LIMIT = 64 << 10
_RECEIVE = 1 << 20
_HEAD_RECEIVE = 8 << 10
_ERROR_BODY_LIMIT = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
_PAGE = 4096
_ALIGN_FROM = 1 << 20
_MAX_REDIRECTS = 5
#: Interim (1xx) answers skipped before the final one, and the longest chunk-size line.
_MAX_INTERIM = 16
_CHUNK_LINE_LIMIT = 4 << 10
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Headers(dict[str, str]):
    """Response headers; names are stored and looked up lower-cased."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


@dataclass(slots=True)
class Response:
    status_code: int
    headers: Headers
    #: The body; for ``Content-Length`` bodies the very buffer it was received into (a
    #: ``bytearray``, or for large bodies a page-aligned ``memoryview`` of one, spared one
    #: more copy). Nothing in mmfs writes to it: treat it as bytes.
    content: bytes
    url: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return bytes(self.content).decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(bytes(self.content) if isinstance(self.content, memoryview) else self.content)


@dataclass(eq=False)
class _Connection:
    stream: trio.abc.Stream
    buffer: bytearray = field(default_factory=bytearray)  # bytes received past the last response
    reused: bool = False

    async def receive_into(self, view: memoryview) -> int:
        """Fill ``view`` from the buffer, else straight from the socket; return bytes stored."""
        if self.buffer:
            n = min(len(view), len(self.buffer))
            view[:n] = self.buffer[:n]
            del self.buffer[:n]
            return n
        if isinstance(self.stream, trio.SocketStream):
            return await self.stream.socket.recv_into(view)
        data = await self.stream.receive_some(len(view))
        view[:len(data)] = data
        return len(data)

    async def receive_some(self) -> bytes:
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data
        return await self.stream.receive_some(_RECEIVE)


class Unreachable(TransientError):
    """The server is not there: the connection could not be made, or broke (reset, closed
    mid-answer: a process that died). Not a slow answer, which an overloaded server gives
    too, nor an HTTP error status: replica failover moves a chunk elsewhere only on this."""


class WireClient:
    """Keep-alive connections per origin; ``get``/``head`` return whole responses."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 request_timeout: float = 120.0, max_idle_per_origin: int = 32) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._request_timeout = request_timeout
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        #: Body bytes received so far, all requests together: progress, while a big or
        #: slow body is still arriving, for waiters that must tell "slow" from "stuck".
        self.received_bytes = 0
        self._tls: ssl.SSLContext | None = None
        self._proxies: dict[tuple[str, str, int], Proxy | None] = {}  # per origin, from the environment once

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None, *,
                      max_body: int = 64 << 20, payload: bytes = b"", follow_redirects: bool = True) -> Response:
        """Send ``method`` (GET, HEAD, or POST with a small ``payload``) to ``url``, following
        redirects unless told not to (a redirect is then answered like any response).

        A body over ``max_body`` bytes is refused before it is read (a server ignoring
        ``Range`` must not make us buffer a whole file), and the whole exchange, redirects
        included, must end within ``request_timeout`` however slowly bytes trickle in."""
        try:
            with trio.fail_after(self._request_timeout):
                if not follow_redirects:
                    return await self._send(method, url, dict(headers or {}), max_body, payload)
                return await self._follow(method, url, dict(headers or {}), max_body, payload)
        except trio.TooSlowError:
            raise TransientError(f"{method} {url.split('?', 1)[0]} took over {self._request_timeout:g} s") from None

    async def _follow(self, method: str, url: str, headers: dict[str, str], max_body: int,
                      payload: bytes) -> Response:
        origin = _origin(url)
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._send(method, url, headers, max_body, payload)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            url = urljoin(url, location)
            if _origin(url) != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise UpstreamError(f"more than {_MAX_REDIRECTS} redirects from {url.split('?', 1)[0]}")

    async def get(self, url: str, headers: dict[str, str] | None = None, *, max_body: int = 64 << 20) -> Response:
        return await self.request("GET", url, headers, max_body=max_body)

    async def _send(self, method: str, url: str, headers: dict[str, str], max_body: int,
                    payload: bytes = b"") -> Response:
        parts = urlsplit(url)
        key = _origin(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        proxy = self._proxy(key)
        if proxy is not None and key[0] == "http":  # plain HTTP goes to the proxy in absolute form
            target = f"http://{host}{target}"
            if proxy.authorization:
                headers = {**headers, "Proxy-Authorization": proxy.authorization}
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "host"]
        if payload or method == "POST":
            lines.append(f"Content-Length: {len(payload)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        while True:
            connection = await self._checkout(key)
            answered = False
            try:
                with trio.fail_after(self._read_timeout):
                    await connection.stream.send_all(request)
                    status, response_headers, keep_alive = await self._read_final_head(connection)
                answered = True
                body = await self._read_body(connection, method, status, response_headers, max_body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, _ConnectionClosed) as exc:
                await trio.aclose_forcefully(connection.stream)
                if connection.reused and not answered:
                    continue  # a kept-alive connection the server had closed: try a fresh one
                raise Unreachable(f"connection to {key[1]}:{key[2]} broke: {exc or type(exc).__name__}") from exc
            except _BodyTooLarge as exc:
                await trio.aclose_forcefully(connection.stream)
                raise UpstreamError(f"{key[1]}:{key[2]} {exc}") from None
            except trio.TooSlowError as exc:
                await trio.aclose_forcefully(connection.stream)
                raise TransientError(f"no answer from {key[1]}:{key[2]} within {self._read_timeout:g} s") from exc
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
            if keep_alive:
                self._checkin(key, connection)
            else:
                await trio.aclose_forcefully(connection.stream)
            return Response(status, response_headers, body, url)

    async def _read_head(self, connection: _Connection) -> tuple[int, Headers, bool]:
        while b"\r\n\r\n" not in connection.buffer:
            if len(connection.buffer) > _HEAD_LIMIT:
                raise UpstreamError("response head over 64 KiB")
            # Small reads: what comes after the head should land in the body buffer directly.
            data = await connection.stream.receive_some(_HEAD_RECEIVE)
            if not data:
                raise _ConnectionClosed("closed before the response head")
            connection.buffer += data
        end = connection.buffer.index(b"\r\n\r\n")
        head = connection.buffer[:end].decode("latin-1").split("\r\n")
        del connection.buffer[:end + 4]
        version, _, rest = head[0].partition(" ")
        if not re.fullmatch(r"[0-9]{3}", rest[:3]) or not version.startswith("HTTP/"):
            raise UpstreamError(f"malformed status line {head[0][:80]!r}")
        status = int(rest[:3])
        headers = Headers()
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return status, headers, keep_alive

    async def _read_final_head(self, connection: _Connection) -> tuple[int, Headers, bool]:
        """The final answer's head: interim 1xx answers (``100 Continue``, ``103 Early
        Hints``) are skipped, a bounded number of them."""
        for _ in range(_MAX_INTERIM):
            status, headers, keep_alive = await self._read_head(connection)
            if status >= 200:
                return status, headers, keep_alive
            if status == 101:
                raise UpstreamError("the server switched protocols (101), which was not asked for")
        raise UpstreamError(f"more than {_MAX_INTERIM} interim (1xx) answers before the final one")

    async def _read_body(self, connection: _Connection, method: str, status: int, headers: Headers,
                         max_body: int) -> bytes:
        if method == "HEAD" or status in (204, 304):
            return b""
        if not 200 <= status < 300:
            max_body = _ERROR_BODY_LIMIT  # error pages and redirects: small, whatever was expected
        if headers.get("transfer-encoding", "").lower() == "chunked":
            with trio.fail_after(self._read_timeout):
                return await self._read_chunked(connection, max_body)
        length = headers.get("content-length", "")
        if not (length.isascii() and length.isdigit()):
            raise _ConnectionClosed(f"unusable Content-Length {length[:20]!r}")  # never reuse it
        if int(length) > max_body:
            raise _BodyTooLarge(f"answered with {length} bytes, expected at most {max_body}")
        body = _body_buffer(int(length))
        view = memoryview(body)
        received = 0
        while received < len(body):
            with trio.move_on_after(self._read_timeout) as scope:
                n = await connection.receive_into(view[received:])
            if scope.cancelled_caught:
                raise trio.TooSlowError
            if n == 0:
                raise _ConnectionClosed(f"body cut short at {received} of {len(body)} bytes")
            received += n
            self.received_bytes += n
        return body  # type: ignore[return-value]  # the buffer itself: copying 4 MiB again cost 15 %

    async def _read_chunked(self, connection: _Connection, max_body: int) -> bytes:
        body = bytearray()
        while True:
            size_field = (await self._read_line(connection, _CHUNK_LINE_LIMIT)).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise _ConnectionClosed(f"malformed chunk size {size_field[:20]!r}")
            size = int(size_field, 16)
            if len(body) + size > max_body:
                raise _BodyTooLarge(f"chunked body over {max_body} bytes")
            if size == 0:
                trailers = 0
                while line := await self._read_line(connection, _HEAD_LIMIT - trailers):
                    trailers += len(line) + 2
                return bytes(body)
            while len(connection.buffer) < size + 2:
                data = await connection.stream.receive_some(_RECEIVE)
                if not data:
                    raise _ConnectionClosed("chunked body cut short")
                connection.buffer += data
            body += connection.buffer[:size]
            del connection.buffer[:size + 2]

    async def _read_line(self, connection: _Connection, limit: int) -> bytes:
        """One CRLF-terminated line of a chunked body; a line over ``limit`` bytes is refused
        (nothing but a hex size and short extensions belongs there)."""
        while b"\r\n" not in connection.buffer:
            if len(connection.buffer) > limit:
                raise _ConnectionClosed(f"chunked body line over {limit} bytes")
            data = await connection.stream.receive_some(_RECEIVE)
            if not data:
                raise _ConnectionClosed("chunked body cut short")
            connection.buffer += data
        end = connection.buffer.index(b"\r\n")
        line = bytes(connection.buffer[:end])
        del connection.buffer[:end + 2]
        return line

    async def _checkout(self, key: tuple[str, str, int]) -> _Connection:
        idle = self._idle.get(key)
        if idle:
            connection = idle.pop()
            connection.reused = True
            return connection
        scheme, host, port = key
        proxy = self._proxy(key)
        via = f" through the proxy {proxy.host}:{proxy.port}" if proxy else ""
        try:
            with trio.fail_after(self._connect_timeout):
                if proxy is None:
                    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                else:
                    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
                    if scheme == "https":
                        await self._tunnel(stream, proxy, host, port)
                if scheme == "https":
                    if self._tls is None:
                        self._tls = ssl.create_default_context()
                    stream = trio.SSLStream(stream, self._tls, server_hostname=host, https_compatible=True)
                    await stream.do_handshake()
        except trio.TooSlowError as exc:
            raise Unreachable(f"cannot connect to {host}:{port}{via} within {self._connect_timeout:g} s") from exc
        except (OSError, trio.BrokenResourceError, _ConnectionClosed) as exc:
            raise Unreachable(f"cannot connect to {host}:{port}{via}: {exc}") from exc
        return _Connection(stream)

    def _proxy(self, key: tuple[str, str, int]) -> Proxy | None:
        if key not in self._proxies:
            self._proxies[key] = proxy_for(key)
        return self._proxies[key]

    async def _tunnel(self, stream: trio.abc.Stream, proxy: Proxy, host: str, port: int) -> None:
        """Ask ``proxy`` for a tunnel to ``host:port`` (``CONNECT``), for TLS end to end."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        connection = _Connection(stream)
        status, _, _ = await self._read_final_head(connection)
        if status != 200:
            raise _ConnectionClosed(f"the proxy refused the tunnel with {status}")
        if connection.buffer:
            raise _ConnectionClosed("the proxy sent bytes before the tunnel was up")

    def _checkin(self, key: tuple[str, str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            trio.lowlevel.spawn_system_task(trio.aclose_forcefully, connection.stream)

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)
        self._idle.clear()


class _ConnectionClosed(Exception):
    """The server closed or broke the connection mid-response."""


class _BodyTooLarge(Exception):
    """The answer is bigger than the caller can want: not worth a retry."""


def _body_buffer(length: int) -> bytearray | memoryview:
    """A buffer for a body of ``length`` bytes; page-aligned from ``_ALIGN_FROM`` bytes on,
    so that the disk tier can write a chunk straight from it with ``O_DIRECT`` (no copy
    through the page cache: about 0.1 instead of 0.5-1.2 CPU-s per GB here)."""
    if length < _ALIGN_FROM:
        return bytearray(length)
    raw = bytearray(length + _PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = -address % _PAGE
    return memoryview(raw)[start:start + length]


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    #: ``Proxy-Authorization`` from the proxy URL's user and password, if it has them.
    authorization: str | None = None


def proxy_url(url: str) -> str | None:
    """The proxy ``HTTP_PROXY``/``HTTPS_PROXY`` (or their lower-case forms) name for ``url``,
    unless ``NO_PROXY`` exempts its host; ``None`` for a direct connection. (httpx clients
    here take it as ``proxy=``: its ``trust_env`` would also read ``.netrc`` credentials.)"""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    if urlsplit(proxy).scheme != "http" or not urlsplit(proxy).hostname:
        raise UpstreamError(f"unsupported proxy {proxy.split('@')[-1]!r} for {parts.scheme}:// (an http:// proxy "
                            "is expected)")
    return proxy


def proxy_for(origin: tuple[str, str, int]) -> Proxy | None:
    """:func:`proxy_url` for an origin, parsed."""
    scheme, host, port = origin
    url = proxy_url(f"{scheme}://{host}:{port}/")
    if url is None:
        return None
    parts = urlsplit(url)
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"unsupported URL {url.split('?', 1)[0]!r}")
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
