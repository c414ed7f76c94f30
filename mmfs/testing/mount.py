"""Run ``mmfs mount`` as a child process, for tests, benchmarks and the demo.

    with MountProcess(tmp / "mnt", tmp / "cache", hub_url=hub.url) as mount:
        data = (mount.repo("sentence-transformers/all-MiniLM-L6-v2") / "config.json").read_bytes()
        mount.status()["remote"]["bytes"]

``stop`` sends SIGTERM and waits; whatever happens, the mountpoint is left unmounted
(``fusermount3 -u -z`` as the last resort), so a failed test never leaves a dead mount.
The daemon's stderr (its log) goes to ``log_path``; :meth:`MountProcess.log_text` reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from ..background import READY_PREFIX
from .process import child_env, start_until_ready, stop



def fuse_available() -> bool:
    return os.path.exists("/dev/fuse")


def filesystem_type(path: Path | str) -> str:
    """The file system type of ``path`` as ``stat -f`` names it (``overlayfs``, ``ext2/ext3``, ...)."""
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def force_unmount(mountpoint: Path | str) -> None:
    """Detach whatever is mounted at ``mountpoint``, quietly."""
    for argv in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            if subprocess.run(argv, capture_output=True, timeout=10).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue


def _is_mounted(mountpoint: Path) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class MountProcess:
    def __init__(self, mountpoint: Path | str, cache_dir: Path | str, *, hub_url: str | None = None,
                 backend: str | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_path: Path | str | None = None) -> None:
        self.mountpoint = Path(mountpoint)
        self.cache_dir = Path(cache_dir)
        self.log_path = Path(log_path) if log_path else self.cache_dir.with_name(self.cache_dir.name + "-mount.log")
        self.argv = [sys.executable, "-m", "mmfs", "mount", str(self.mountpoint), "--cache-dir", str(self.cache_dir)]
        if backend:
            self.argv += ["--backend", backend]
        self.argv += args or []
        self.env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
        if hub_url:
            self.env["HF_ENDPOINT"] = hub_url
        self.env = child_env({**self.env, **(env or {})})
        self.proc: subprocess.Popen[str] | None = None
        self.ready_line = ""

    def start(self, timeout: float = 30.0) -> "MountProcess":
        self.mountpoint.mkdir(parents=True, exist_ok=True) if not _is_mounted(self.mountpoint) else None
        self.proc, line = start_until_ready(self.argv, self.env, log_path=self.log_path, timeout=timeout)
        if not line.startswith(READY_PREFIX):
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(f"mmfs mount did not get ready within {timeout} s (exit {code}): "
                               f"{line or 'no output'!r}\n{self.log_text()[-3000:]}")
        self.ready_line = line.strip()
        return self

    def repo(self, repo_id: str, revision: str = "main", provider: str = "huggingface") -> Path:
        return self.mountpoint / provider / repo_id / revision

    def status(self) -> dict[str, Any]:
        return json.loads((self.mountpoint / ".mmfs" / "status.json").read_bytes())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the mount is left dead (ENOTCONN), as after a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; return the exit status. The mountpoint is unmounted in any case."""
        code = None
        if self.proc is not None:
            code = stop(self.proc, signal.SIGTERM, timeout)
            self.proc = None
        if _is_mounted(self.mountpoint):
            force_unmount(self.mountpoint)
        return code

    def __enter__(self) -> "MountProcess":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
