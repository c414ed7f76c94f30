"""Run ``mmfs-backend serve`` as a child process, for tests, benchmarks and the demo.

    with BackendProcess(data_dir, hub_url=hub.url, chunk_size="256KiB") as backend:
        httpx.get(f"{backend.url}/healthz")
        backend.metrics()["mmfs_backend_upstream_bytes_total"]

The child's stderr (its log) goes to ``log_path``; :meth:`BackendProcess.log_text` reads it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType

import psutil

from mmfs.testing.process import start_until_ready, stop


def backend_command() -> list[str]:
    """The installed ``mmfs-backend`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "mmfs-backend"
    if script.exists():
        return [str(script)]
    found = shutil.which("mmfs-backend")
    return [found] if found else [sys.executable, "-m", "backend_server.cli"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to ``{'name{labels}': value}`` (labels as written, in order)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


class BackendProcess:
    def __init__(self, data_dir: Path | str, *, hub_url: str, log_path: Path | str | None = None,
                 listen: str = "127.0.0.1:0", memory_cache: str | None = None, memory_ttl: str | None = None,
                 chunk_size: str | None = None, max_upstream_fetches: int | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        self.argv = backend_command() + ["serve", "--listen", listen, "--data-dir", str(self.data_dir)]
        for flag, value in (("--memory-cache", memory_cache), ("--memory-ttl", memory_ttl),
                            ("--chunk-size", chunk_size), ("--max-upstream-fetches", max_upstream_fetches)):
            if value is not None:
                self.argv += [flag, str(value)]
        self.argv += extra_args or []
        # The test's own HF_TOKEN never leaks into the child; pass one in ``env`` to set it.
        self.env = {**os.environ, "HF_ENDPOINT": hub_url}
        self.env.pop("HF_TOKEN", None)
        self.env.update(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> "BackendProcess":
        self.proc, line = start_until_ready(self.argv, self.env, log_path=self.log_path, timeout=timeout)
        prefix = "mmfs-backend listening on "
        if not line.startswith(prefix):
            code = self.proc.poll()
            self.kill()
            raise RuntimeError(f"mmfs-backend did not start (exit {code}): {line or 'no output'!r}\n"
                               f"{self.log_text()[-2000:]}")
        self.url = line[len(prefix):].strip()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server, wait for it, return its exit status."""
        if self.proc is None:
            return 0
        code = stop(self.proc, sig, timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return response.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics").decode())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "BackendProcess":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
