"""Warm-backend streaming throughput against raw trio loopback throughput.

    python -m backend_server.bench [--size 1GiB] [--chunk-size 4MiB] [--repeat 3]

1. *Raw*: a child process runs a trio server that ``send_all``s ``--size`` bytes from memory
   in 4 MiB buffers to each connection; this process reads them with a blocking socket
   (``recv_into`` a preallocated buffer).
2. *Backend*: the test hub (a child process) serves a synthetic model with a ``--size``
   shard; ``mmfs-backend serve`` (a child process) is warmed with one full GET; then the
   same blocking-socket reader GETs the shard from the backend (memory tier warm), and
   again after a restart with a 64 MiB memory tier (disk tier warm).

Both readers are identical, so the ratio isolates the server. Prints one line per
measurement and the ratios.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from mmfs.sizes import format_size, parse_size

_BUFFER = 4 << 20


def _raw_server(size: int) -> None:
    import trio

    async def serve() -> None:
        payload = memoryview(bytes(_BUFFER))

        async def handler(stream: trio.SocketStream) -> None:
            left = size
            while left:
                n = min(left, _BUFFER)
                await stream.send_all(payload[:n])
                left -= n
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(handler, listeners)

    trio.run(serve)


def _read(host: str, port: int, request: bytes | None, size: int) -> float:
    """Seconds to receive ``size`` body bytes (after the response head, if ``request``)."""
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    with socket.create_connection((host, port)) as sock:
        started = time.perf_counter()
        left = size
        if request is not None:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed before the response head")
                head += data
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise RuntimeError(f"backend answered {head[:200]!r}")
            left -= len(head.split(b"\r\n\r\n", 1)[1])
        while left > 0:
            n = sock.recv_into(view)
            if n == 0:
                raise RuntimeError(f"short body: {left} bytes missing")
            left -= n
        return time.perf_counter() - started


def _best(label: str, size: int, runs: list[float]) -> float:
    best = size / min(runs)
    print(f"{label:<28} best {best / 1e9:6.2f} GB/s  (runs: {', '.join(f'{size / r / 1e9:.2f}' for r in runs)})",
          flush=True)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend_server.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--chunk-size", default="4MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.raw_server:
        _raw_server(size)
        return 0

    from mmfs.testing.hub import HubProcess
    from mmfs.testing.models import make_synthetic_model

    from .testing import BackendProcess

    raw = subprocess.Popen([sys.executable, "-m", "backend_server.bench", "--raw-server", "--size", args.size],
                           stdout=subprocess.PIPE, text=True)
    try:
        port = int(raw.stdout.readline())  # type: ignore[union-attr]
        raw_best = _best("raw trio loopback", size, [_read("127.0.0.1", port, None, size)
                                                      for _ in range(args.repeat)])
    finally:
        raw.terminate()
        raw.wait()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        repo = make_synthetic_model(root / "bench" / "model", size, n_shards=1)
        shard = next(repo.glob("*.safetensors"))
        file_size = shard.stat().st_size
        memory = format_size(file_size + (256 << 20)).replace(" ", "")
        with HubProcess(root) as hub:
            results = {}
            for phase in ("memory", "disk"):
                backend = BackendProcess(Path(tmp) / "data", hub_url=hub.url, chunk_size=args.chunk_size,
                                         memory_cache=memory if phase == "memory" else "64MiB")
                with backend:
                    url = urlsplit(backend.url)
                    target = f"/v1/file/huggingface/bench/model/main/{shard.name}"
                    if phase == "memory":
                        started = time.perf_counter()
                        with httpx.stream("GET", backend.url + target, timeout=600) as response:
                            for _ in response.iter_raw(1 << 20):
                                pass
                        print(f"{'cold (from the hub)':<28} {file_size / (time.perf_counter() - started) / 1e9:6.2f}"
                              " GB/s", flush=True)
                    request = f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                    runs = [_read(url.hostname, url.port, request, file_size) for _ in range(args.repeat)]
                    results[phase] = _best(f"backend warm ({phase} tier)", file_size, runs)
                    print(f"{'':<28} backend peak RSS so far {backend.rss() >> 20} MiB", flush=True)
    for phase, value in results.items():
        print(f"ratio backend({phase}) / raw = {value / raw_best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
