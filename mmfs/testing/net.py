"""Small networking helpers for tests and benchmarks."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago.

    Racy by nature (another process may take it before you bind it); prefer binding port 0
    and reading the port back, as :class:`mmfs.testing.hub.TestHub` does, where you can.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
