"""A small HTTP/1.1 server on trio and h11: keep-alive, streamed bodies, one task per connection.

Why our own: the rest of mmfs is trio (pyfuse3 requires it), and the data path needs
exactly three things most frameworks make hard: sending multi-MiB ``bytes`` and
``memoryview`` slices straight to ``SocketStream.send_all`` (no copy, no per-4-KiB
framing: a response always declares its ``Content-Length``), aborting a response
mid-body (a file that fails verification must never look complete to the client), and
cancelling a connection's handler when the server shuts down.

A handler is ``async def handler(request) -> Response``. A :class:`Response` carries
either ``body`` (bytes) or ``stream``, an ``async def stream(send)`` that must hand
``send`` exactly ``content_length`` bytes. If ``stream`` raises, the connection is closed
without completing the body, which every HTTP client reports as an error (a short
body against ``Content-Length``). Requests are logged one line each at INFO, without
header values (``Authorization`` never reaches a log).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qsl

import h11
import trio

log = logging.getLogger("backend_server.requests")
errlog = logging.getLogger(__name__)

#: Largest request head accepted: paths may be up to PATH_MAX (4 KiB) percent-encoded.
MAX_HEAD_BYTES = 64 << 10
#: Largest request body read (only small JSON bodies are expected).
MAX_BODY_BYTES = 1 << 20
#: Seconds an idle keep-alive connection is kept, and the time allowed to send a request head.
KEEPALIVE_TIMEOUT = 75.0
HEAD_TIMEOUT = 30.0
RECEIVE_SIZE = 64 << 10

Send = Callable[[bytes | memoryview], Awaitable[None]]


@dataclass(slots=True)
class Request:
    method: str
    target: str  # as sent, percent-encoded, with the query
    path: str  # percent-encoded path without the query
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    client: str
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def query_value(self, name: str, default: str | None = None) -> str | None:
        found = [v for k, v in self.query if k == name]
        return found[-1] if found else default

    def query_values(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]


@dataclass(slots=True)
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    #: Streamed body: ``await stream(send)`` must send exactly ``content_length`` bytes.
    stream: Callable[[Send], Awaitable[None]] | None = None
    content_length: int | None = None
    #: Called once the response is over, sent or not (releases what ``stream`` holds).
    on_close: Callable[[], None] | None = None
    #: Route name for metrics and logs.
    route: str = ""

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> "Response":
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"), *headers], body)

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> "Response":
        return cls(status, [("Content-Type", content_type)], text.encode())


Handler = Callable[[Request], Awaitable[Response]]
#: Called after each response: (request, response, bytes of body sent, seconds, completed).
Observer = Callable[[Request, Response, int, float, bool], None]


class _Aborted(Exception):
    """The response body could not be completed; the connection must be dropped."""


class HTTPServer:
    """Serves ``handler`` on listeners until cancelled."""

    def __init__(self, handler: Handler, *, observer: Observer | None = None) -> None:
        self.handler = handler
        self.observer = observer
        self.connections = 0
        self.active_requests = 0

    async def serve(self, listeners: list[trio.SocketListener], stop: trio.Event, *, grace: float = 5.0,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until ``stop`` is set; then stop accepting, give requests in
        progress up to ``grace`` seconds to finish, and close every connection."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                await acceptors.start(partial(trio.serve_listeners, self._connection, listeners,
                                              handler_nursery=connections))
                task_status.started()
                await stop.wait()
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            with trio.move_on_after(grace):
                while self.active_requests:
                    await trio.sleep(0.05)
            connections.cancel_scope.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            peer = stream.socket.getpeername()
            client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        except OSError:
            client = "?"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while True:
                keep_going = await self._one_request(stream, conn, client)
                if not keep_going:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        finally:
            self.connections -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection, timeout: float) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(timeout):
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)
                continue
            return None  # timed out

    async def _one_request(self, stream: trio.SocketStream, conn: h11.Connection, client: str) -> bool:
        """Read one request and answer it; return whether the connection stays open."""
        try:
            event = await self._next_event(stream, conn, KEEPALIVE_TIMEOUT if conn.our_state is h11.IDLE
                                           else HEAD_TIMEOUT)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request), event
            body = bytearray()
            while True:
                part = await self._next_event(stream, conn, HEAD_TIMEOUT)
                if part is None:
                    return False
                if isinstance(part, h11.EndOfMessage):
                    break
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > MAX_BODY_BYTES:
                        await self._send_simple(stream, conn, 413, "request body too large")
                        return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                await self._send_simple(stream, conn, status, f"malformed request: {exc}")
                log.info('%s "<malformed>" %d 0 0.000s', client, status)
            return False

        started = time.perf_counter()
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request = Request(event.method.decode("ascii", "replace"), target, path,
                          parse_qsl(query, keep_blank_values=True), headers, client, bytes(body))
        self.active_requests += 1
        sent = 0
        completed = False
        response = Response(500)
        try:
            try:
                response = await self.handler(request)
            except Exception:  # a bug in a handler: answer 500, keep serving
                errlog.exception("internal error handling %s %s", request.method, request.path)
                response = Response.json({"error": "internal server error"}, 500)
            sent, completed = await self._send_response(stream, conn, request, response)
        finally:
            if response.on_close is not None:
                response.on_close()
            self.active_requests -= 1
            elapsed = time.perf_counter() - started
            log.info('%s "%s %s" %d %d %.3fs%s', client, request.method, _loggable(target), response.status, sent,
                     elapsed, "" if completed else " ABORTED")
            if self.observer is not None:
                self.observer(request, response, sent, elapsed, completed)
        if not completed or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    async def _send_response(self, stream: trio.SocketStream, conn: h11.Connection, request: Request,
                             response: Response) -> tuple[int, bool]:
        head_only = request.method == "HEAD"
        length = response.content_length if response.content_length is not None else len(response.body)
        headers = [(k.encode("latin-1"), _header_value(v)) for k, v in response.headers
                   if k.lower() != "content-length"]
        if length is not None:
            headers.append((b"Content-Length", str(length).encode()))
        headers.append((b"Server", b"mmfs-backend"))
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
        if head_only:
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return 0, True
        sent = 0
        if response.stream is None:
            if response.body:
                await self._send_data(stream, conn, response.body)
                sent = len(response.body)
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return sent, True

        async def send(data: bytes | memoryview) -> None:
            nonlocal sent
            if len(data):
                await self._send_data(stream, conn, data)
                sent += len(data)

        try:
            await response.stream(send)
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return sent, False  # the client hung up
        except h11.LocalProtocolError as exc:
            errlog.error("%s %s: response body did not match its length: %s", request.method, request.path, exc)
            return sent, False
        except Exception as exc:
            # Verification failed or the upstream gave up mid-body: the client must see a
            # broken transfer, never a complete one. Closing the socket does that.
            errlog.warning("%s %s: aborting the response after %d bytes: %s", request.method, request.path,
                           sent, exc)
            return sent, False
        return sent, True

    @staticmethod
    async def _send_data(stream: trio.SocketStream, conn: h11.Connection, data: bytes | memoryview) -> None:
        # send_with_data_passthrough hands the payload back untouched (no framing with a
        # Content-Length), so multi-MiB buffers go to the socket without a copy.
        for piece in conn.send_with_data_passthrough(h11.Data(data=data)):
            await stream.send_all(piece)

    @staticmethod
    async def _send_simple(stream: trio.SocketStream, conn: h11.Connection, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        try:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                (b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode()),
                (b"Connection", b"close"), (b"X-Error-Code", b"InvalidName")])))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            # Lingering close: closing with unread input would reset the connection and
            # could destroy the answer before the client reads it. Drain a little first.
            await stream.send_eof()
            with trio.move_on_after(1.0):
                drained = 0
                while drained < MAX_BODY_BYTES and (data := await stream.receive_some(RECEIVE_SIZE)):
                    drained += len(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass


def _header_value(value: str) -> bytes:
    """Header values are printable ASCII, trimmed; anything else is replaced, never injected."""
    return "".join(c if " " <= c <= "~" else "?" for c in value).strip().encode("ascii")


def _loggable(target: str) -> str:
    """Targets in logs are bounded and free of control characters."""
    text = target if len(target) <= 512 else target[:512] + "…"
    return "".join(c if c.isprintable() else "?" for c in text)
