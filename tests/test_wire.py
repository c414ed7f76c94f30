"""The data-path HTTP client against small real servers on loopback."""

from __future__ import annotations

import functools

import pytest
import trio

from mmfs.errors import TransientError, UpstreamError
from mmfs.remote.wire import WireClient


async def serve(nursery: trio.Nursery, answer) -> tuple[int, list[bytes]]:
    """Run a raw TCP server whose ``answer(request_head, stream)`` writes each response."""
    heads: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            heads.append(head)
            if not await answer(head, stream):
                await stream.aclose()
                return

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], heads


async def test_body_headers_and_keep_alive(nursery):
    body = bytes(range(256)) * 4096

    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\nX-Thing: a b\r\n\r\n" % len(body) + body)
        return True

    port, heads = await serve(nursery, answer)
    client = WireClient()
    for _ in range(3):
        response = await client.get(f"http://127.0.0.1:{port}/x?y=1", {"Range": "bytes=0-9"})
        assert response.status_code == 206 and response.content == body
        assert response.headers["x-thing"] == "a b" and response.headers.get("X-THING") == "a b"
    assert len(heads) == 3 and heads[0].startswith(b"GET /x?y=1 HTTP/1.1")
    assert b"Range: bytes=0-9" in heads[0]
    await client.aclose()


async def test_chunked_error_page(nursery):
    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        return True

    port, _ = await serve(nursery, answer)
    response = await WireClient().get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 404 and response.text == "hello world"


async def test_redirect_to_another_origin_drops_authorization(nursery):
    async def cdn(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        return True

    cdn_port, cdn_heads = await serve(nursery, cdn)

    async def hub(head, stream):
        await stream.send_all(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/blob\r\n"
                              b"Content-Length: 0\r\n\r\n" % cdn_port)
        return True

    hub_port, hub_heads = await serve(nursery, hub)
    response = await WireClient().get(f"http://127.0.0.1:{hub_port}/f", {"Authorization": "Bearer secret"})
    assert response.content == b"abc"
    assert b"Bearer secret" in hub_heads[0] and b"Authorization" not in cdn_heads[0]


async def test_connection_closed_mid_body_is_transient(nursery):
    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        return False

    port, _ = await serve(nursery, answer)
    with pytest.raises(TransientError, match="cut short"):
        await WireClient().get(f"http://127.0.0.1:{port}/")


async def test_stale_kept_alive_connection_is_replaced(nursery):
    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False  # closes despite HTTP/1.1 keep-alive

    port, heads = await serve(nursery, answer)
    client = WireClient()
    assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
    await trio.sleep(0.05)
    assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
    assert len(heads) == 2


async def test_unreachable_and_silent_servers_fail_in_bounded_time(nursery):
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(TransientError, match="cannot connect"):
        await WireClient().get(f"http://127.0.0.1:{closed_port}/")

    async def silent(head, stream):
        await trio.sleep_forever()

    port, _ = await serve(nursery, silent)
    with trio.fail_after(5):
        with pytest.raises(TransientError, match="no answer"):
            await WireClient(read_timeout=0.3).get(f"http://127.0.0.1:{port}/")


async def test_oversized_and_trickling_answers_are_refused(nursery):
    async def huge(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 1000)
        return True

    port, _ = await serve(nursery, huge)
    with pytest.raises(UpstreamError, match="at most 4096"):
        await WireClient().get(f"http://127.0.0.1:{port}/", max_body=4096)

    async def trickle(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            await stream.send_all(b"x")
            await trio.sleep(0.05)
        return True

    port, _ = await serve(nursery, trickle)
    with trio.fail_after(10):
        with pytest.raises(TransientError, match="took over"):
            await WireClient(read_timeout=1, request_timeout=0.5).get(f"http://127.0.0.1:{port}/")


async def test_interim_1xx_answers_are_not_final(nursery):
    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello")
        return True

    port, _ = await serve(nursery, answer)
    client = WireClient()
    for _ in range(2):  # and the connection stays usable
        response = await client.get(f"http://127.0.0.1:{port}/")
        assert (response.status_code, bytes(response.content), response.headers.get("x-final")) == (200, b"hello", "yes")
    await client.aclose()

    async def endless(head, stream):
        await stream.send_all(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 100)
        return True

    port, _ = await serve(nursery, endless)
    with pytest.raises(UpstreamError, match="interim"):
        await WireClient().get(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("body,match", [
    (b"1" * 100_000, "line over 4096 bytes"),  # a size line that never ends
    (b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "malformed chunk size"),
    (b"-1\r\nx\r\n0\r\n\r\n", "malformed chunk size"),
    (b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "malformed chunk size"),
    (b"5\r\nhello\r\n0\r\n" + b"X-Trailer: y\r\n" * 10_000, "line over"),  # trailers without end
])
async def test_chunked_bodies_are_bounded_and_strict(nursery, body, match):
    async def answer(head, stream):
        await stream.send_all(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        return True

    port, _ = await serve(nursery, answer)
    with pytest.raises(TransientError, match=match):
        await WireClient().get(f"http://127.0.0.1:{port}/")


async def test_requests_go_through_the_proxy_the_environment_names(nursery, monkeypatch):
    async def proxy(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nproxied")
        return True

    async def origin(head, stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndirect")
        return True

    proxy_port, proxied = await serve(nursery, proxy)
    origin_port, direct = await serve(nursery, origin)
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy_port}")
    monkeypatch.setenv("NO_PROXY", "skip.example,localhost")
    response = await WireClient().get(f"http://127.0.0.1:{origin_port}/x?y=1")
    assert bytes(response.content) == b"proxied" and not direct
    assert proxied[0].startswith(f"GET http://127.0.0.1:{origin_port}/x?y=1 HTTP/1.1".encode())
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz" in proxied[0]  # user:p@ss

    response = await WireClient().get(f"http://localhost:{origin_port}/")  # NO_PROXY: straight there
    assert bytes(response.content) == b"direct" and len(proxied) == 1

    async def refuse(head, stream):
        await stream.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        return True

    refusing_port, tunnels = await serve(nursery, refuse)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{refusing_port}")
    with pytest.raises(TransientError, match=f"through the proxy 127.0.0.1:{refusing_port}.*407"):
        await WireClient().get("https://hub.example:8443/")
    assert tunnels[0].startswith(b"CONNECT hub.example:8443 HTTP/1.1")
