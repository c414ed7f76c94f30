"""Process management for the benchmarks: the hub, the backend, mounts and worker processes.

Everything a scenario starts goes through one :class:`Harness`, which is a context manager:
on exit (normal, exception, SIGTERM or Ctrl-C) it lazily unmounts every mount it made
(``fusermount3 -u -z``) and terminates, then kills, every child it started. Readiness is
waited for on each child's ready line ("hub listening on ...", "mmfs: mounted ...",
the backend's listen line or a successful ``GET /metrics``), never on a fixed sleep.

Worker processes (downloaders, readers) are started with :meth:`Harness.workers`: each
imports what it needs, prints ``ready``, waits for ``go`` on stdin and prints one JSON line
with absolute ``start``/``end`` wall-clock times, so N of them start at the same instant
and their Python start-up is not counted.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Unavailable(Exception):
    """A part this scenario needs (mmfs mount, the backend) is missing or broken."""


# ---------------------------------------------------------------------------------------
# Small helpers


def drop_caches() -> bool:
    """Write back dirty pages and drop the kernel page cache; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def machine_info() -> dict[str, Any]:
    mem = psutil.virtual_memory().total
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "platform": platform.platform()}


def env_for_children(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_XET": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("HF_TOKEN", None)
    if extra:
        env.update(extra)
    return env


def http_json(url: str, method: str = "GET", timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def prometheus(url: str, timeout: float = 10.0) -> dict[str, float]:
    """A ``/metrics`` page as ``{'name{labels}': value}`` (empty when it cannot be read)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def _reader_thread(stream: Any, sink: "queue.Queue[str | None]", log: Any) -> None:
    try:
        for line in iter(stream.readline, ""):
            if log is not None:
                log.write(line)
                log.flush()
            sink.put(line)
    except (ValueError, OSError):
        pass
    finally:
        sink.put(None)


@dataclass
class Child:
    """A started process; ``lines`` receives its combined stdout/stderr, line by line."""

    name: str
    proc: subprocess.Popen[str]
    lines: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no ready line within {timeout:.0f} s; output: {self.tail()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready: {self.tail()}")
            self.output.append(line)
            if predicate(line):
                return line

    def drain(self) -> list[str]:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return self.output
            if line is None:
                return self.output
            self.output.append(line)

    def tail(self, n: int = 15) -> str:
        self.drain()
        return "".join(self.output[-n:]).strip()


# ---------------------------------------------------------------------------------------
# Handles of long-running parts


@dataclass
class HubHandle:
    url: str
    child: Child
    root: Path
    rate: float | None

    def stats(self) -> dict[str, Any]:
        return http_json(f"{self.url}/_hub/stats")

    def reset(self) -> None:
        http_json(f"{self.url}/_hub/reset", "POST")

    def bytes_served(self) -> int:
        return int(self.stats()["bytes_served"])

    def set_rate(self, rate: float | None) -> None:
        req = urllib.request.Request(f"{self.url}/_hub/config", method="POST",
                                     data=json.dumps({"rate": rate}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        self.rate = rate


@dataclass
class BackendHandle:
    url: str
    child: Child
    data_dir: Path
    memory_cache: int
    nixl: bool = False

    @property
    def pid(self) -> int:
        return self.child.pid

    def metrics(self) -> dict[str, float]:
        return prometheus(f"{self.url}/metrics")


@dataclass
class MountHandle:
    path: Path
    child: Child
    cache_dir: Path
    cache_size: int
    memory_cache: int
    backend: str | None
    #: Further ``mmfs mount`` arguments it was started with (kept on a remount).
    extra: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.child.pid

    def model_dir(self, repo_id: str, revision: str = "main") -> Path:
        return self.path / "huggingface" / repo_id / revision


# ---------------------------------------------------------------------------------------
# mmfs discovery


def _help(cmd: str, *args: str) -> str | None:
    exe = BIN / cmd
    if not exe.exists():
        return None
    try:
        done = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True, timeout=60,
                              env=env_for_children())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


@dataclass(frozen=True)
class MmfsTools:
    """Which mmfs parts work here, and the flags their ``--help`` offers."""

    mount_help: str | None
    backend_help: str | None

    @classmethod
    def probe(cls) -> "MmfsTools":
        return cls(_help("mmfs", "mount"), _help("mmfs-backend", "serve"))

    @property
    def mount_ok(self) -> bool:
        return self.mount_help is not None

    @property
    def backend_ok(self) -> bool:
        return self.backend_help is not None

    @property
    def transport_ok(self) -> bool:
        """Whether ``mmfs mount`` has ``--transport`` (tcp / nixl)."""
        return "--transport" in (self.mount_help or "")

    def nixl_missing(self) -> str | None:
        """Why the NIXL data plane cannot be measured here, or None when it can."""
        if not self.backend_ok or "--nixl" not in (self.backend_help or ""):
            return "`mmfs-backend serve` has no --nixl"
        if not self.transport_ok:
            return "`mmfs mount` has no --transport"
        import importlib.util

        if importlib.util.find_spec("nixl_cu12") is None:
            return "the NIXL Python package is not installed (pip install --no-deps 'nixl-cu12>=1.5,<2')"
        return None

    def missing(self, backend: bool = True) -> str | None:
        parts = []
        if not self.mount_ok:
            parts.append("`mmfs mount` (mmfs/cli.py) is not available")
        if backend and not self.backend_ok:
            parts.append("`mmfs-backend serve` (backend_server/cli.py) is not available")
        return "; ".join(parts) or None


# ---------------------------------------------------------------------------------------
# The harness


class Harness:
    """Starts and tracks every process of a benchmark; tears all of them down on exit."""

    def __init__(self, workdir: Path, log_dir: Path, tools: MmfsTools | None = None) -> None:
        self.workdir = workdir
        self.log_dir = log_dir
        self.tools = tools or MmfsTools.probe()
        self.children: list[Child] = []
        self.mounts: list[MountHandle] = []
        self._logs: list[Any] = []
        self._old_handlers: dict[int, Any] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)

    # -- lifetime

    def __enter__(self) -> "Harness":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    @staticmethod
    def _on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def checkpoint(self) -> set[int]:
        return {id(x) for x in (*self.mounts, *self.children)}

    def cleanup_since(self, mark: set[int]) -> None:
        """Unmount and stop whatever was started after ``mark`` (a failed scenario's leftovers)."""
        for mount in [m for m in self.mounts if id(m) not in mark]:
            self.unmount(mount)
        for child in [c for c in self.children if id(c) not in mark]:
            self.stop(child)

    def close(self) -> None:
        for mount in list(self.mounts):
            self.unmount(mount)
        for child in list(self.children):
            self.stop(child)
        for log in self._logs:
            try:
                log.close()
            except OSError:
                pass
        self._logs.clear()

    # -- generic children

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdin: bool = False, log: bool = True) -> Child:
        logf = open(self.log_dir / f"{name}.log", "a") if log else None
        if logf is not None:
            self._logs.append(logf)
            logf.write(f"$ {' '.join(map(str, argv))}\n")
            logf.flush()
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True,
                                env=env or env_for_children(), cwd=str(REPO_ROOT), start_new_session=True)
        child = Child(name, proc)
        threading.Thread(target=_reader_thread, args=(proc.stdout, child.lines, logf), daemon=True).start()
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 10.0) -> int | None:
        """Terminate a child (its whole process group), kill it if it lingers."""
        proc = child.proc
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        else:
            try:  # leftovers of its group, if any
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if child in self.children:
            self.children.remove(child)
        return proc.returncode

    # -- the hub

    def start_hub(self, root: Path, rate: float | None, name: str = "hub") -> HubHandle:
        argv = [sys.executable, "-m", "mmfs.testing.hub", "--root", root, "--host", "127.0.0.1", "--port", "0"]
        if rate:
            argv += ["--rate", str(int(rate))]
        child = self.spawn(name, argv)
        line = child.wait_line(lambda s: s.startswith("hub listening on "), 60)
        return HubHandle(line.split("hub listening on ", 1)[1].strip(), child, root, rate)

    # -- the backend

    def start_backend(self, hub_url: str, data_dir: Path, memory_cache: int, name: str = "backend",
                      nixl: bool = False, env: dict[str, str] | None = None) -> BackendHandle:
        """A backend in front of the hub; with ``nixl``, also serving chunks over NIXL (``--nixl``);
        ``env``: more environment (``MMFS_PUBLISH_TOKEN``)."""
        if not self.tools.backend_ok:
            raise Unavailable(self.tools.missing() or "backend not available")
        if nixl and self.tools.nixl_missing():
            raise Unavailable(self.tools.nixl_missing() or "")
        from mmfs.testing.net import free_port

        port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        argv: list[Any] = [BIN / "mmfs-backend", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
                           "--memory-cache", str(memory_cache)]
        if nixl:
            argv.append("--nixl")
        child = self.spawn(name, argv, env=env_for_children({"HF_ENDPOINT": hub_url, **(env or {})}))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            child.drain()
            if child.proc.poll() is not None:
                raise RuntimeError(f"mmfs-backend exited ({child.proc.returncode}): {child.tail()}")
            try:
                with urllib.request.urlopen(f"{url}/metrics", timeout=2) as resp:
                    resp.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop(child)
                    raise RuntimeError(f"mmfs-backend did not answer /metrics within 60 s: {child.tail()}")
                time.sleep(0.1)
        return BackendHandle(url, child, data_dir, memory_cache, nixl)

    # -- mounts

    def mount(self, mountpoint: Path, cache_dir: Path, *, cache_size: int, memory_cache: int,
              backend: str | None, hub_url: str, name: str = "mount", extra: Iterable[str] = ()) -> MountHandle:
        handle = self.start_mount(mountpoint, cache_dir, cache_size=cache_size, memory_cache=memory_cache,
                                  backend=backend, hub_url=hub_url, name=name, extra=extra)
        self.wait_mounted(handle)
        return handle

    def start_mount(self, mountpoint: Path, cache_dir: Path, *, cache_size: int, memory_cache: int,
                    backend: str | None, hub_url: str, name: str = "mount", extra: Iterable[str] = ()) -> MountHandle:
        """Start a node daemon without waiting for it (:meth:`wait_mounted`): N nodes start at once."""
        if not self.tools.mount_ok:
            raise Unavailable(self.tools.missing(backend=False) or "mmfs mount not available")
        mountpoint.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv: list[Any] = [BIN / "mmfs", "mount", mountpoint, "--cache-dir", cache_dir,
                           "--cache-size", str(cache_size), "--memory-cache", str(memory_cache)]
        if backend:
            argv += ["--backend", backend]
        argv += list(extra)
        help_text = self.tools.mount_help or ""
        if "--foreground" in help_text:
            argv.append("--foreground")
        child = self.spawn(name, argv, env=env_for_children({"HF_ENDPOINT": hub_url}))
        handle = MountHandle(mountpoint, child, cache_dir, cache_size, memory_cache, backend, list(extra))
        self.mounts.append(handle)
        return handle

    def wait_mounted(self, handle: MountHandle) -> None:
        try:
            handle.child.wait_line(lambda s: s.startswith("mmfs: mounted"), 60)
        except (TimeoutError, RuntimeError) as err:
            self.unmount(handle)
            if not os.path.exists("/dev/fuse"):
                raise Unavailable(f"no /dev/fuse here: {err}") from err
            raise RuntimeError(f"mmfs mount failed: {err}") from err  # mmfs is there and broke: an error

    def unmount(self, mount: MountHandle) -> None:
        """Unmount (``mmfs unmount``, then lazily with fusermount3) and stop the daemon."""
        if mount.child.proc.poll() is None and os.path.ismount(mount.path):
            try:
                subprocess.run([str(BIN / "mmfs"), "unmount", str(mount.path)], capture_output=True, timeout=20,
                               env=env_for_children())
            except (OSError, subprocess.TimeoutExpired):
                pass
        if os.path.ismount(mount.path) or _in_proc_mounts(mount.path):
            subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], capture_output=True, timeout=20)
        try:
            mount.child.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.stop(mount.child)
        if _in_proc_mounts(mount.path):
            subprocess.run(["umount", "-l", str(mount.path)], capture_output=True, timeout=20)
        if mount in self.mounts:
            self.mounts.remove(mount)

    def unmount_many(self, mounts: Sequence[MountHandle]) -> None:
        """Unmount several mounts at once (each unmount mostly waits on its daemon)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(mounts))) as pool:
            for future in [pool.submit(self.unmount, m) for m in mounts]:
                future.result()

    # -- workers

    def workers(self, name: str, argvs: Sequence[Sequence[str]], *, env: dict[str, str] | None = None,
                timeout: float = 1800.0) -> tuple[float, list[dict[str, Any]]]:
        """Start worker processes, release them at once, return (t0, their JSON results)."""
        children = [self.spawn(f"{name}-{i}", [sys.executable, "-m", "bench.workers", *argv], env=env, stdin=True)
                    for i, argv in enumerate(argvs)]
        try:
            for child in children:
                child.wait_line(lambda s: s.strip() == "ready", 120)
            t0 = time.time()
            for child in children:
                child.proc.stdin.write("go\n")  # type: ignore[union-attr]
                child.proc.stdin.flush()  # type: ignore[union-attr]
            results = []
            for child in children:
                line = child.wait_line(lambda s: s.startswith("{"), timeout)
                results.append(json.loads(line))
                child.proc.wait(30)
            return t0, results
        finally:
            for child in children:
                self.stop(child)


def _in_proc_mounts(path: Path) -> bool:
    target = str(path.resolve()) if path.exists() else str(path)
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# CPU and memory of daemons


def family_sum(proc: psutil.Process, measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over a process and its children (0 once it is gone; children
    that exit meanwhile count nothing)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in family:
        try:
            total += measure(p)
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children."""
    return family_sum(proc, lambda p: sum(p.cpu_times()[:2]))


class CpuMeter:
    """CPU seconds some processes spend from now on: ``with CpuMeter({...}) as m: ...; m.settle()``.

    :meth:`settle` waits until they are idle (a daemon's write-behind continues after the
    reader got its last byte: that work is part of the read's cost); ``cpu`` holds the
    seconds per process once the ``with`` block ends (or after :meth:`stop`).
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        self._cpu0 = {name: cpu_seconds(p) for name, p in self.procs.items()}
        self.cpu: dict[str, float] = {}

    def now(self) -> dict[str, float]:
        return {name: cpu_seconds(p) - self._cpu0[name] for name, p in self.procs.items()}

    def settle(self, quiet: float = 0.3, idle: float = 0.02, timeout: float = 15.0) -> float:
        """Wait until the processes used under ``idle`` of a core over ``quiet`` seconds; seconds waited."""
        t0 = time.monotonic()
        last = sum(self.now().values())
        while time.monotonic() - t0 < timeout:
            time.sleep(quiet)
            total = sum(self.now().values())
            if total - last < idle * quiet:
                break
            last = total
        return time.monotonic() - t0

    def stop(self) -> dict[str, float]:
        self.cpu = self.now()
        return self.cpu

    def __enter__(self) -> "CpuMeter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RssSampler(CpuMeter):
    """A :class:`CpuMeter` that also samples the RSS of its processes in a thread (peaks in ``peak``)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        super().__init__(pids)
        self.interval = interval
        self.peak: dict[str, int] = {name: 0 for name in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, proc: psutil.Process) -> int:
        return int(family_sum(proc, lambda p: p.memory_info().rss))

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], self._rss(proc))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.stop()


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
