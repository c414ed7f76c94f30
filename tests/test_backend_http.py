"""The backend's HTTP surface: bad input, Range handling, /metrics, /healthz, the CLI,
logging and shutdown. Requests that HTTP clients would normalise (``..``, NUL) are sent
raw over a socket."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from backend_server.http import FileRegion, HTTPServer, Request, Response
from mmfs.budget import ByteBudget
from backend_server.testing import BackendProcess, backend_command, parse_metrics
from mmfs.errors import TransientError
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model, populate_hub_root

SHARD = "model-00001-of-00001.safetensors"
BASE = "/v1/file/huggingface/org/web/main"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHub]:
    root = populate_hub_root(tmp_path_factory.mktemp("hub"), include_real=False)
    make_synthetic_model(root / "org" / "web", (1 << 20) + 777, n_shards=1)
    with TestHub(root) as running:
        yield running


@pytest.fixture(scope="module")
def files(hub: TestHub) -> dict[str, bytes]:
    root = hub.hub.root / "org" / "web"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, hub: TestHub) -> Iterator[BackendProcess]:
    with BackendProcess(tmp_path_factory.mktemp("backend") / "data", hub_url=hub.url,
                        chunk_size="256KiB") as running:
        yield running


def raw(backend: BackendProcess, target: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the target exactly as given; (status, headers, body)."""
    url = urlsplit(backend.url)
    lines = [f"{method} {target} HTTP/1.1", "Host: backend", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        chunks = []
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


BAD_INPUTS = [
    # (target, method, headers, status, text in the error message)
    (f"{BASE}/../../../../etc/passwd", "GET", None, 400, "'..'"),
    (f"{BASE}/%2e%2e/%2e%2e/etc/passwd", "GET", None, 400, "'..'"),
    ("/org/web/resolve/main/..%2F..%2Fetc%2Fpasswd", "GET", None, 400, "'..'"),
    (f"{BASE}/./config.json", "GET", None, 400, "'.'"),
    (f"{BASE}//etc/passwd", "GET", None, 400, "absolute"),
    (f"{BASE}/config.json%00.txt", "GET", None, 400, "NUL"),
    ("/v1/resolve/huggingface/org/web/main%00", "GET", None, 400, "NUL"),
    (f"{BASE}/{'a' * 300}", "GET", None, 400, "longer than 255"),
    (f"{BASE}/{'/'.join(['abcdefgh'] * 600)}", "GET", None, 400, "4096"),
    (f"/v1/resolve/huggingface/org/{'x' * 200}/main", "GET", None, 400, "longer than 96"),
    ("/v1/resolve/huggingface/../web/main", "GET", None, 400, "organisation"),
    ("/v1/resolve/github/org/web/main", "GET", None, 400, "unknown provider"),
    ("/v1/resolve/huggingface/org/web/no-such-branch", "GET", None, 404, "RevisionNotFound"),
    ("/v1/resolve/huggingface/org/web/a%2F..%2Fb", "GET", None, 400, "invalid revision"),
    ("/v1/resolve/huggingface/org/nothere/main", "GET", None, 404, "RepoNotFound"),
    ("/api/models/org/nothere", "GET", None, 404, "RepoNotFound"),
    (f"{BASE}/nope.bin", "GET", None, 404, "does not exist"),
    ("/org/web/resolve/main/nope.bin", "HEAD", None, 404, "EntryNotFound"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=abc"}, 416, "malformed Range"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=500-100"}, 416, "end comes before the start"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=0-1,5-9"}, 416, "multiple ranges"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "items=0-9"}, 416, "malformed Range"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=999999999-"}, 416, "past the end"),
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=-0"}, 416, "not satisfiable"),
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}", "GET", None, 400, "index=N"),
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}?index=-1", "GET", None, 400, "index=N"),
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}?index=x", "GET", None, 400, "index=N"),
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}?index=%C2%B2", "GET", None, 400, "index=N"),  # '²'
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}?index=%D9%A1", "GET", None, 400, "index=N"),  # Arabic-Indic 1
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=\xb2-"}, 416, "malformed Range"),  # '²' in latin-1
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=0-\xb9"}, 416, "malformed Range"),  # '¹'
    (f"{BASE}/{SHARD}", "GET", {"Range": "bytes=-\xb3"}, 416, "malformed Range"),
    ("/v1/resolve/huggingface/org/web/.", "GET", None, 400, "invalid revision"),
    ("/v1/resolve/huggingface/org/web/refs/.hidden", "GET", None, 400, "invalid revision"),
    (f"/v1/chunk/huggingface/org/web/main/{SHARD}?index=99", "GET", None, 400, "out of range"),
    (f"{BASE}/%ff%fe", "GET", None, 400, "UTF-8"),
    (f"{BASE}/{SHARD}", "DELETE", None, 405, "not allowed"),
    ("/healthz", "POST", None, 405, "not allowed"),
    ("/v1/nothing/here", "GET", None, 404, "no such endpoint"),
    ("/v1/prefetch/huggingface/org/web/main", "GET", None, 405, "use POST"),
]


@pytest.mark.parametrize("target,method,headers,status,text", BAD_INPUTS,
                         ids=[f"{c[1]} {c[0][:60]} {c[2] or ''}" for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_with_a_message(backend: BackendProcess, target: str, method: str,
                                           headers: dict[str, str] | None, status: int, text: str) -> None:
    got, response_headers, body = raw(backend, target, method, headers)
    assert got == status, body[:300]
    message = response_headers.get("x-error-message", "") + response_headers.get("x-error-code", "")
    if method != "HEAD":
        message += json.loads(body)["error"]
    assert text in message


def test_raw_nul_and_garbage_requests(backend: BackendProcess) -> None:
    assert raw(backend, f"{BASE}/config.json\x00.txt")[0] == 400
    assert raw(backend, "not-a-path")[0] == 400
    assert raw(backend, "/" + "a" * 200_000)[0] == 431  # head larger than the limit
    url = urlsplit(backend.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{backend.url}/healthz").status_code == 200


def test_fuzzed_paths_never_escape_or_crash(backend: BackendProcess, files: dict[str, bytes]) -> None:
    rng = random.Random(1234)
    pieces = ["..", ".", "", "%2e%2e", "%2E%2e%2f", "%00", "%2f", "etc", "passwd", "config.json", SHARD, "~",
              "%ff", "a" * 260, "\\..\\", "%5c", "%252e%252e", "tokenizer", "tokenizer_config.json", "*", "?x=1",
              "%20", "main", "refs%2Fpr%2F1", "huggingface", "org", "web"]
    prefixes = [BASE, "/v1/chunk/huggingface/org/web/main", "/org/web/resolve/main", "/v1/manifest/huggingface/org",
                "/api/models/org/web/tree/main", "/v1/resolve/huggingface/org", ""]
    served = set(files.values())
    for _ in range(300):
        target = rng.choice(prefixes) + "/" + "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        status, _, body = raw(backend, target)
        assert status < 500, (target, body[:200])
        assert b"root:" not in body, target
        if status == 200 and target.startswith((BASE, "/org/web/resolve")):
            assert body in served, target
    assert httpx.get(f"{backend.url}/healthz").json()["status"] == "ok"


def test_ranges_and_hub_headers(backend: BackendProcess, hub: TestHub, files: dict[str, bytes]) -> None:
    data = files[SHARD]
    size = len(data)
    for spec, (start, end) in {"bytes=0-0": (0, 1), "bytes=10-": (10, size), "bytes=-100": (size - 100, size),
                               "bytes=262140-262150": (262140, 262151), f"bytes=5-{size * 2}": (5, size)}.items():
        response = httpx.get(f"{backend.url}/org/web/resolve/main/{SHARD}", headers={"Range": spec})
        assert response.status_code == 206, spec
        assert response.content == data[start:end], spec
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
    head = httpx.head(f"{backend.url}/org/web/resolve/main/{SHARD}")
    sha = __import__("hashlib").sha256(data).hexdigest()
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == hub.commit("org/web")
    assert head.headers["X-Linked-Etag"] == f'"{sha}"' and head.headers["ETag"] == f'"{sha}"'
    assert head.headers["X-Linked-Size"] == str(size) and head.headers["Content-Length"] == str(size)
    assert head.headers["Accept-Ranges"] == "bytes"
    info = httpx.get(f"{backend.url}/api/models/org/web/revision/main", params={"blobs": "true"}).json()
    upstream = httpx.get(f"{hub.url}/api/models/org/web/revision/main", params={"blobs": "true"}).json()
    assert info["sha"] == upstream["sha"]
    assert sorted(info["siblings"], key=lambda s: s["rfilename"]) == \
        sorted(upstream["siblings"], key=lambda s: s["rfilename"])
    for query in ({"recursive": "true"}, {}):
        ours = httpx.get(f"{backend.url}/api/models/org/web/tree/main", params=query).json()
        theirs = httpx.get(f"{hub.url}/api/models/org/web/tree/main", params=query).json()
        assert [(e["path"], e["type"], e.get("size")) for e in ours] == \
            [(e["path"], e["type"], e.get("size")) for e in theirs]
        assert [e["oid"] for e in ours if e["type"] == "file"] == [e["oid"] for e in theirs if e["type"] == "file"]
    sub = httpx.get(f"{backend.url}/api/models/org/web/tree/main/tokenizer").json()
    assert [e["path"] for e in sub] == ["tokenizer/tokenizer_config.json"]


def test_metrics_and_healthz(backend: BackendProcess, hub: TestHub, files: dict[str, bytes]) -> None:
    before = backend.metrics()
    assert httpx.get(f"{backend.url}{BASE}/config.json").content == files["config.json"]
    assert httpx.get(f"{backend.url}{BASE}/config.json").content == files["config.json"]
    assert httpx.get(f"{backend.url}{BASE}/missing.txt").status_code == 404
    response = httpx.get(f"{backend.url}/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name in ("mmfs_backend_upstream_bytes_total", "mmfs_backend_served_bytes_total",
                 "mmfs_backend_tier_hits_total", "mmfs_backend_tier_misses_total", "mmfs_backend_inflight_fetches",
                 "mmfs_backend_coalesced_requests_total", "mmfs_backend_integrity_failures_total",
                 "mmfs_backend_requests_total"):
        assert f"# TYPE {name} " in text, name
    after = parse_metrics(text)
    key = '{route="file",method="GET",status="%d"}'
    assert after["mmfs_backend_requests_total" + key % 200] - before.get("mmfs_backend_requests_total" + key % 200,
                                                                         0) == 2
    assert after["mmfs_backend_requests_total" + key % 404] >= 1
    assert after['mmfs_backend_tier_hits_total{tier="memory"}'] > before['mmfs_backend_tier_hits_total{tier="memory"}']
    assert after['mmfs_backend_served_bytes_total{tier="memory"}'] >= len(files["config.json"])
    assert after["mmfs_backend_upstream_bytes_total"] == hub.stats().bytes_served
    assert after['mmfs_backend_tier_limit_bytes{tier="memory"}'] == 2 << 30

    health = httpx.get(f"{backend.url}/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["upstream"] == hub.url and set(body["tiers"]) == {"memory", "disk"}


@pytest.mark.parametrize("args,text", [
    (["--memory-cache", "12XB"], "--memory-cache: invalid size '12XB'"),
    (["--chunk-size", "1KiB"], "--chunk-size: '1KiB' is out of range: must be from 64KiB to 256MiB"),
    (["--stream-memory", "0"], "--stream-memory: '0' is out of range: must be at least 64KiB"),
    (["--nixl", "--nixl-pool", "1MiB", "--chunk-size", "4MiB"], "holds no chunk of --chunk-size"),
    (["--max-connections", "²"], "--max-connections: invalid whole number '²'"),
    (["--memory-ttl", "-5"], "--memory-ttl: seconds must be a positive number"),
    (["--max-upstream-fetches", "0"], "must be at least 1"),
    (["--listen", "localhost"], "expected HOST:PORT"),
])
def test_cli_rejects_bad_values(tmp_path: Path, args: list[str], text: str) -> None:
    result = subprocess.run(backend_command() + ["serve", "--data-dir", str(tmp_path / "d"), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and text in result.stderr, result.stderr


def test_cli_reports_an_unusable_listen_address(tmp_path: Path, hub: TestHub) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        backend = BackendProcess(tmp_path / "d", hub_url=hub.url, listen=f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="did not start"):
            backend.start()
        assert "cannot listen on 127.0.0.1" in backend.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_logs_one_line_per_request_at_debug_without_credentials_and_stops_cleanly(tmp_path: Path, hub: TestHub,
                                                                                  sig: signal.Signals) -> None:
    backend = BackendProcess(tmp_path / "d", hub_url=hub.url, env={"HF_TOKEN": "hf_servertoken999"},
                             extra_args=["--log-level", "DEBUG"]).start()
    try:
        secret = {"Authorization": "Bearer hf_callersecret123"}
        assert httpx.get(f"{backend.url}/v1/resolve/huggingface/org/web/main", headers=secret).status_code == 200
        assert httpx.get(f"{backend.url}{BASE}/config.json", headers=secret).status_code == 200
        assert httpx.get(f"{backend.url}/healthz").status_code == 200
    finally:
        code = backend.stop(sig)
    assert code == 0
    log = backend.log_text()
    request_lines = [line for line in log.splitlines() if "backend_server.requests" in line]
    assert len(request_lines) == 3 and all(" DEBUG " in line for line in request_lines)
    assert '"GET /v1/file/huggingface/org/web/main/config.json" 200' in request_lines[1]
    assert "hf_callersecret123" not in log and "hf_servertoken999" not in log and "Bearer" not in log
    assert "shutting down" in log and "stopped" in log


def test_nothing_per_request_at_info(backend: BackendProcess) -> None:
    """The data path logs no line per request at the default level (INFO)."""
    before = backend.log_text().count("\n")
    for index in range(4):
        assert httpx.get(f"{backend.url}/v1/chunk/huggingface/org/web/main/{SHARD}",
                         params={"index": index}).status_code == 200
        assert httpx.get(f"{backend.url}{BASE}/{SHARD}").status_code == 200
    assert backend.log_text().count("\n") == before


def test_unknown_methods_share_one_metrics_series(backend: BackendProcess) -> None:
    for method in ("FOOBAR", "X" * 40, "BREW"):
        assert raw(backend, "/healthz", method)[0] == 405
    text = httpx.get(f"{backend.url}/metrics").text
    assert 'route="other",method="OTHER",status="405"} 3' in text
    assert "FOOBAR" not in text and "BREW" not in text


@pytest.mark.timeout(120)  # hang guard: before the fix the second download waited forever
def test_a_client_that_stops_reading_does_not_block_others(tmp_path: Path, hub: TestHub) -> None:
    root = hub.hub.root / "org" / "stall"
    make_synthetic_model(root, 24 << 20, n_shards=1)
    data = (root / SHARD).read_bytes()
    # One chunk of stream memory: the stalled stream holds all of it while its send blocks.
    with BackendProcess(tmp_path / "d", hub_url=hub.url, chunk_size="256KiB",
                        extra_args=["--stream-memory", "256KiB", "--send-timeout", "2"]) as backend:
        url = urlsplit(backend.url)
        target = f"/v1/file/huggingface/org/stall/main/{SHARD}"
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.settimeout(60)
            stalled.connect((url.hostname, url.port))
            stalled.sendall(f"GET {target} HTTP/1.1\r\nHost: backend\r\n\r\n".encode())
            # Wait until the stalled stream holds the stream memory, then read in full elsewhere.
            while httpx.get(f"{backend.url}/healthz").json()["stream_memory"]["used_bytes"] == 0:
                pass
            response = httpx.get(backend.url + target, timeout=60)
            assert response.status_code == 200 and response.content == data
            # The stalled client was cut off: its body ends short.
            received = b""
            try:
                while chunk := stalled.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass
            assert len(received.partition(b"\r\n\r\n")[2]) < len(data)
        log = backend.log_text()
    assert "ABORTED" in log


async def serve_in_process(nursery: trio.Nursery, **options: object) -> tuple[int, trio.Event]:
    """An :class:`HTTPServer` answering ``ok`` on a free loopback port; set the event to stop it."""
    async def handler(request: Request) -> Response:
        return Response.text("ok")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    stop = trio.Event()
    await nursery.start(partial(HTTPServer(handler, **options).serve, listeners, stop))  # type: ignore[arg-type]
    return listeners[0].socket.getsockname()[1], stop


async def test_a_trickled_request_head_is_cut_off() -> None:
    head_timeout = 0.5
    async with trio.open_nursery() as nursery:
        port, stop = await serve_in_process(nursery, head_timeout=head_timeout)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        answer = b""
        closed_by_server = False
        started = trio.current_time()
        with trio.move_on_after(60 * head_timeout):  # hang guard: each byte used to restart a 75 s timer
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while not closed_by_server:
                try:
                    await stream.send_all(b"a")  # a byte every 0.1 s: never idle, never done
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed_by_server = True
                    break
                with trio.move_on_after(0.1):
                    try:
                        data = await stream.receive_some(1 << 10)
                    except trio.BrokenResourceError:
                        data = b""
                    answer += data
                    closed_by_server = data == b""
        lasted = trio.current_time() - started
        await stream.aclose()
        stop.set()
    assert closed_by_server  # the server ended it, the hang guard did not
    assert answer == b""  # dropped, not answered: the request never completed
    assert lasted >= head_timeout  # counted from the first byte, not from the last one


async def get_over(stream: trio.SocketStream) -> bytes:
    """One keep-alive ``GET /`` on ``stream``; the status line and headers."""
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"\r\n\r\nok" not in received and b"Connection: close" not in received:
        data = await stream.receive_some(1 << 10)
        if not data:
            break
        received += data
    return received


async def test_connections_past_the_cap_get_503() -> None:
    async with trio.open_nursery() as nursery:
        port, stop = await serve_in_process(nursery, max_connections=2)
        with trio.fail_after(30):  # hang guard
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            for stream in held:
                assert (await get_over(stream)).startswith(b"HTTP/1.1 200")
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            answer = b""
            while data := await extra.receive_some(1 << 10):
                answer += data
            assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
            await extra.aclose()
            await held.pop().aclose()
            while True:  # once the server has seen that close, a new connection is served
                again = await trio.open_tcp_stream("127.0.0.1", port)
                reply = await get_over(again)
                await again.aclose()
                if reply.startswith(b"HTTP/1.1 200"):
                    break
                assert reply.startswith(b"HTTP/1.1 503")
                await trio.sleep(0.05)
            for stream in held:
                await stream.aclose()
        stop.set()


async def test_streams_wait_for_memory_only_so_long(autojump_clock: trio.abc.Clock) -> None:
    budget = ByteBudget(10)
    assert await budget.acquire(10) == 10
    with pytest.raises(TransientError, match="stayed in use by others for 60s"):
        await budget.acquire(5, timeout=60)
    budget.release(10)
    assert await budget.acquire(5, timeout=60) == 5


async def test_bodies_go_out_whole_from_memoryviews_of_any_shape() -> None:
    """Head and body share one writev; slices, typed views and multi-MiB pieces arrive intact."""
    payload = random.Random(5).randbytes((9 << 20) + 3)
    typed = memoryview(__import__("array").array("H", range(1000)))

    async def handler(request: Request) -> Response:
        if request.path == "/typed":
            return Response(200, [("Content-Type", "application/octet-stream")], typed)  # type: ignore[arg-type]

        async def stream(send) -> None:  # type: ignore[no-untyped-def]
            view = memoryview(payload)
            for start, end in ((0, 1), (1, 5 << 20), (5 << 20, 5 << 20), (5 << 20, len(payload))):
                await send(view[start:end])

        return Response(200, [], stream=stream, content_length=len(payload))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(HTTPServer(handler).serve, listeners, stop))  # type: ignore[arg-type]
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(60):
            with httpx.Client() as client:  # one keep-alive connection for both
                streamed = await trio.to_thread.run_sync(client.get, f"http://127.0.0.1:{port}/stream")
                small = await trio.to_thread.run_sync(client.get, f"http://127.0.0.1:{port}/typed")
        stop.set()
    assert streamed.status_code == 200 and streamed.content == payload
    assert small.content == typed.tobytes() and small.headers["Content-Length"] == "2000"


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One whole response (status, body) from a keep-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(1 << 16)
        assert data, "connection closed before the head"
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        data = sock.recv(1 << 20)
        assert data, "connection closed mid-body"
        body += data
    return int(head.split()[1]), body


@pytest.mark.timeout(120)
def test_chunk_answers_wait_within_stream_memory(tmp_path: Path, hub: TestHub) -> None:
    """/v1/chunk bodies count against --stream-memory until sent: with room for two chunks,
    six clients that do not read hold at most two chunks; the other four wait (no 503),
    and every one gets its chunk once the first ones read."""
    root = hub.hub.root / "org" / "budget"
    make_synthetic_model(root, 32 << 20, n_shards=1)
    data = (root / SHARD).read_bytes()
    chunk = 8 << 20  # more than a stalled connection's socket buffers take (4 MiB wmem max here)
    with BackendProcess(tmp_path / "d", hub_url=hub.url, chunk_size="8MiB",
                        extra_args=["--stream-memory", "16MiB"]) as backend:
        assert httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/budget/main", timeout=60).status_code == 200
        url = urlsplit(backend.url)
        clients = []
        for i in range(6):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(60)
            sock.connect((url.hostname, url.port))
            sock.sendall(f"GET /v1/chunk/huggingface/org/budget/main/{SHARD}?index={i % 4} HTTP/1.1\r\n"
                         "Host: backend\r\n\r\n".encode())
            clients.append((i % 4, sock))
        deadline = time.monotonic() + 30
        while True:
            memory = httpx.get(f"{backend.url}/healthz").json()["stream_memory"]
            assert memory["used_bytes"] <= memory["limit_bytes"] == 16 << 20
            if memory["used_bytes"] == 16 << 20 and memory["waiting"] == 4:
                break
            assert time.monotonic() < deadline, memory
            time.sleep(0.05)
        for _ in range(10):  # held there while nobody reads: no more than the limit, the rest waiting
            memory = httpx.get(f"{backend.url}/healthz").json()["stream_memory"]
            assert (memory["used_bytes"], memory["waiting"]) == (16 << 20, 4)
            time.sleep(0.05)
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = list(pool.map(lambda c: (c[0], _read_response(c[1])), clients))
        for index, (status, body) in answers:
            assert status == 200 and body == data[index * chunk:(index + 1) * chunk]
        for _, sock in clients:
            sock.close()
        memory = httpx.get(f"{backend.url}/healthz").json()["stream_memory"]
        assert memory == {"used_bytes": 0, "limit_bytes": 16 << 20, "peak_used_bytes": 16 << 20, "waiting": 0}
        assert 'mmfs_backend_requests_total{route="chunk",method="GET",status="200"} 6' in \
            httpx.get(f"{backend.url}/metrics").text


async def test_file_regions_go_out_with_sendfile(tmp_path: Path) -> None:
    """A FileRegion body (whole, or pieces of a stream) is sent from the file; a file that
    ends inside its region aborts the body instead of hanging or padding it."""
    payload = random.Random(7).randbytes((6 << 20) + 11)
    path = tmp_path / "data"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        async def handler(request: Request) -> Response:
            if request.path == "/whole":
                return Response(200, [], FileRegion(fd, 5, len(payload) - 5))
            if request.path == "/short":  # claims more than the file has
                return Response(200, [], FileRegion(fd, len(payload) - 10, 100))

            async def stream(send) -> None:  # type: ignore[no-untyped-def]
                await send(b"head:")
                await send(FileRegion(fd, 0, 1 << 20))
                await send(memoryview(payload)[1 << 20:3 << 20])
                await send(FileRegion(fd, 3 << 20, len(payload) - (3 << 20)))

            return Response(200, [], stream=stream, content_length=5 + len(payload))

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(HTTPServer(handler).serve, listeners, stop))  # type: ignore[arg-type]
            base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            with trio.fail_after(60), httpx.Client() as client:
                whole = await trio.to_thread.run_sync(client.get, f"{base}/whole")
                mixed = await trio.to_thread.run_sync(client.get, f"{base}/mixed")
                with pytest.raises(httpx.RemoteProtocolError):  # a short body, never a complete one
                    await trio.to_thread.run_sync(client.get, f"{base}/short")
            stop.set()
    finally:
        os.close(fd)
    assert whole.content == payload[5:] and whole.headers["Content-Length"] == str(len(payload) - 5)
    assert mixed.content == b"head:" + payload


@pytest.mark.timeout(120)
def test_chunk_answers_get_503_when_stream_memory_stays_busy(tmp_path: Path, hub: TestHub) -> None:
    """A /v1/chunk request that cannot get its share within twice --send-timeout gets 503
    TransientError before any header, while a slow (but not too slow) reader holds it."""
    root = hub.hub.root / "org" / "busy503"
    make_synthetic_model(root, 16 << 20, n_shards=1)
    data = (root / SHARD).read_bytes()[:16 << 20]  # chunk 0
    with BackendProcess(tmp_path / "d", hub_url=hub.url, chunk_size="16MiB",
                        extra_args=["--stream-memory", "16MiB", "--send-timeout", "3"]) as backend:
        assert httpx.post(f"{backend.url}/v1/prefetch/huggingface/org/busy503/main", timeout=60).status_code == 200
        url = urlsplit(backend.url)
        target = f"/v1/chunk/huggingface/org/busy503/main/{SHARD}?index=0"
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)  # a window of about 256 KiB
            slow.settimeout(60)
            slow.connect((url.hostname, url.port))
            slow.sendall(f"GET {target} HTTP/1.1\r\nHost: backend\r\n\r\n".encode())

            def read_slowly() -> bytes:  # about 1 MiB/s: well within 1 MiB per 3 s, so never dropped
                received = b""
                deadline = time.monotonic() + 60
                while len(received.partition(b"\r\n\r\n")[2]) < len(data) and time.monotonic() < deadline:
                    piece = slow.recv(256 << 10)
                    if not piece:
                        break
                    received += piece
                    if not hurry.is_set():
                        time.sleep(0.25)
                return received

            hurry = threading.Event()  # set once the 503 came: then read the rest at full speed

            with ThreadPoolExecutor(1) as pool:
                reading = pool.submit(read_slowly)
                while httpx.get(f"{backend.url}/healthz").json()["stream_memory"]["used_bytes"] == 0:
                    time.sleep(0.05)
                started = time.monotonic()
                busy = httpx.get(backend.url + target, timeout=60)
                waited = time.monotonic() - started
                assert busy.status_code == 503 and busy.headers["X-Error-Code"] == "TransientError"
                assert "--stream-memory" in busy.json()["error"] and 5.5 < waited < 30
                hurry.set()
                head, _, body = reading.result(timeout=60).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == data  # the slow reader got all of its chunk
