"""The ``mmfs`` command against real mounts: background mode, status of every mount, and
the messages users see when something is wrong (a gated or unknown repo, a busy unmount,
Ctrl-C during a prefetch)."""

from __future__ import annotations

import errno
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import trio

from backend_server.testing import BackendProcess
from mmfs.errors import RepoNotFound
from mmfs.names import RepoRef
from mmfs.remote.hub import HubRemote
from mmfs.testing.hub import TestHub
from mmfs.testing.mount import MountProcess, force_unmount
from mmfs.testing.models import make_synthetic_model

MMFS = [sys.executable, "-m", "mmfs"]
pytestmark = pytest.mark.fuse


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MMFS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def mount(tmp_path: Path, hub: TestHub) -> Iterator[MountProcess]:
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", hub_url=hub.url) as running:
        yield running


def test_daemon_mode_returns_once_mounted_and_status_lists_every_mount(tmp_path: Path, hub: TestHub,
                                                                       mount: MountProcess) -> None:
    background = tmp_path / "bg"
    log = tmp_path / "bg.log"
    try:
        result = run_cli("mount", str(background), "--cache-dir", str(tmp_path / "bg-cache"), "--daemon",
                         "--log-file", str(log), env={"HF_ENDPOINT": hub.url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"mmfs: mounted {background} (embedded) in the background, pid ")
        assert (background / "huggingface" / "sentence-transformers" / "all-MiniLM-L6-v2" / "main" /
                "config.json").read_bytes() == (Path(hub.hub.root) / "sentence-transformers" / "all-MiniLM-L6-v2" /
                                                "config.json").read_bytes()
        listed = run_cli("status")  # every mount of the machine (other suites' too, which may be going away)
        assert f"mmfs at {mount.mountpoint} (embedded)" in listed.stdout
        assert f"mmfs at {background} (embedded)" in listed.stdout and f"log: {log}" in listed.stdout
        assert "INFO" in log.read_text()  # the daemon's logs went to its log file

        again = run_cli("mount", str(background), "--cache-dir", str(tmp_path / "bg-cache"), "--daemon",
                        "--log-file", str(log), env={"HF_ENDPOINT": hub.url})
        assert again.returncode == 1 and f"{background} is already an mmfs mount" in again.stderr
    finally:
        assert run_cli("unmount", str(background)).returncode == 0
    assert not os.path.ismount(background)


def test_busy_unmount_says_why_once_and_hints_lazy(mount: MountProcess) -> None:
    holder = subprocess.Popen(["sleep", "60"], cwd=mount.mountpoint / "huggingface")  # keeps the mount busy
    try:
        result = run_cli("unmount", str(mount.mountpoint))
        assert result.returncode == 1
        assert result.stderr.count("fusermount3:") == 1 and "busy" in result.stderr
        assert "mmfs unmount --lazy" in result.stderr and "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_gated_and_unknown_repos_are_named_through_a_mount(tmp_path: Path, hub: TestHub, hub_root: Path,
                                                           mount: MountProcess) -> None:
    gated = make_synthetic_model(hub_root / "org" / "gated", 256 << 10, n_shards=1)
    (gated / ".hub").mkdir()
    (gated / ".hub" / "gated").write_text("tok-secret")
    result = run_cli("prefetch", "huggingface/org/gated", "--mount", str(mount.mountpoint))
    assert result.returncode == 1
    assert "huggingface/org/gated is gated or private" in result.stderr and "mmfs mount?" not in result.stderr
    result = run_cli("prefetch", "huggingface/org/nothere", "--mount", str(mount.mountpoint))
    assert result.returncode == 1 and "unknown repo huggingface/org/nothere" in result.stderr
    result = run_cli("prefetch", "huggingface/org", "--mount", str(mount.mountpoint))
    assert result.returncode == 1 and "expected huggingface/<org>/<name>" in result.stderr


def test_an_unknown_repo_through_a_backend_is_named(tmp_path: Path, hub: TestHub) -> None:
    with BackendProcess(tmp_path / "data", hub_url=hub.url) as backend:
        result = run_cli("prefetch", "huggingface/org/nothere", "--backend", backend.url)
    assert result.returncode == 1 and "org/nothere" in result.stderr and "not found" in result.stderr, result.stderr


async def test_the_hubs_generic_not_found_is_named(nursery: trio.Nursery) -> None:
    """The real Hub answers an unknown repo with "Repository not found": the error says which."""
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        body = b'{"error":"Repository not found"}'
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nX-Error-Code: RepoNotFound\r\nContent-Type: "
                              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    remote = HubRemote(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    with pytest.raises(RepoNotFound, match="huggingface/org/hidden@main: Repository not found"):
        await remote.resolve(RepoRef("huggingface", "org", "hidden"), "main")
    await remote.aclose()


def test_ctrl_c_stops_a_prefetch_without_waiting_for_reads_in_flight(tmp_path: Path, hub: TestHub,
                                                                     hub_root: Path, mount: MountProcess) -> None:
    make_synthetic_model(hub_root / "org" / "slow", 48 << 20, n_shards=2)
    hub.set_rate("256KB/s")  # one 8 MiB block of a reader in flight would take over half a minute
    prefetch = subprocess.Popen([*MMFS, "prefetch", "huggingface/org/slow", "--mount", str(mount.mountpoint)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        def reading() -> bool:  # the readers wait on file content from the hub
            return hub.stats().requests_by_kind.get("lfs_get", 0) + hub.stats().requests_by_kind.get("resolve_get",
                                                                                                        0) > 0

        while not reading() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reading(), "the prefetch never started reading"
        prefetch.send_signal(signal.SIGINT)
        _, stderr = prefetch.communicate(timeout=20)  # far less than the reads in flight would take
    finally:
        if prefetch.poll() is None:
            prefetch.kill()
            prefetch.wait()
        hub.set_rate(None)
    assert prefetch.returncode == 130 and "mmfs prefetch: interrupted" in stderr and "Traceback" not in stderr
    assert hub.stats().bytes_served < 16 << 20  # stopped long before the end


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    for name in ("bg", "mnt"):
        if os.path.ismount(tmp_path / name):
            force_unmount(tmp_path / name)


def test_the_first_failure_of_each_kind_is_logged_with_its_cause_without_debug(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once closed
    with MountProcess(tmp_path / "mnt", tmp_path / "cache", backend=f"http://127.0.0.1:{port}") as mount:
        for _ in range(3):
            with pytest.raises(OSError) as info:
                os.listdir(mount.mountpoint / "huggingface" / "org" / "model")
            assert info.value.errno in (errno.EIO, errno.EAGAIN)
        log = mount.log_text()
    reported = [line for line in log.splitlines() if " ERROR mmfs.fuse_ops: lookup" in line]
    assert len(reported) == 1, log  # once per kind, not once per call
    assert f"cannot connect to 127.0.0.1:{port}" in reported[0]
