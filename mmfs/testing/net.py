"""Small networking helpers for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago.

    Racy by nature (another process may take it before you bind it); prefer binding port 0
    and reading the port back, as :class:`mmfs.testing.hub.TestHub` does, where you can.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TcpProxy:
    """A TCP proxy on loopback in front of ``target`` (``(host, port)``), for tests that
    need to see or break what passes between two real processes.

    ``target`` may be changed (a restarted server has a new port); :attr:`sent_bytes`
    counts what the target sent (status lines, headers and bodies: what a store bills as
    egress); :meth:`reset` kills every open connection with an RST; :meth:`stall` stops
    forwarding both ways for a while (connections stay open, bytes wait).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent_bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @classmethod
    def in_front_of(cls, url: str) -> tuple["TcpProxy", str]:
        """A proxy in front of an ``http://host:port[/path]`` URL, and that URL through it."""
        parts = urlsplit(url)
        proxy = cls((parts.hostname or "127.0.0.1", parts.port or 80))
        return proxy, f"{parts.scheme}://127.0.0.1:{proxy.port}{parts.path}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_target: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                self._flowing.wait()
                if from_target:
                    with self._lock:
                        self.sent_bytes += len(data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
            return
        except OSError:
            pass
        with self._lock:
            if source not in self._open:
                return  # reset() already cut it
            self._open -= {source, sink}
        for sock in (source, sink):
            _reset(sock)

    def reset(self) -> int:
        """RST every open connection; return how many were cut."""
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            _reset(sock)
        return len(doomed) // 2

    def stall(self, seconds: float) -> None:
        self._flowing.clear()
        time.sleep(seconds)
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._flowing.set()
        self.reset()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or cut peer would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass
