"""What every scenario gets: the config, the harness, the hub, the models, earlier results."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import BenchConfig, Models
from .harness import BackendHandle, Harness, HubHandle, MountHandle, Unavailable, rmtree
from .results import Scenario


@dataclass
class Context:
    cfg: BenchConfig
    harness: Harness
    work: Path
    out: Path
    models: Models
    hub: HubHandle
    results: dict[str, Scenario] = field(default_factory=dict)
    #: py-spy recordings: (what was profiled, collapsed-stack file, bytes/s of the traced read, summary).
    profiles: list[tuple[str, Path, float, dict[str, Any] | None]] = field(default_factory=list)
    #: Failures that did not stop a scenario (one repeat of one variant): the run exits 1.
    errors: list[str] = field(default_factory=list)
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def scratch(self, name: str) -> Path:
        """A fresh, empty folder under the work dir."""
        path = self.work / "scratch" / f"{name}-{next(self._counter)}"
        rmtree(path)
        path.mkdir(parents=True)
        return path

    def backend(self, name: str = "backend", nixl: bool = False, env: dict[str, str] | None = None) -> BackendHandle:
        """A cold backend (fresh data dir) in front of the hub; with ``nixl``, started with ``--nixl``."""
        return self.harness.start_backend(self.hub.url, self.scratch(name), self.cfg.backend_memory, name=name,
                                          nixl=nixl, env=env)

    def mount(self, backend: BackendHandle | None, name: str = "node", cache_dir: Path | None = None,
              transport: str | None = None) -> MountHandle:
        """A node daemon; cold unless ``cache_dir`` is an existing node cache."""
        mount = self.start_mount(backend, name, cache_dir, transport)
        self.harness.wait_mounted(mount)
        return mount

    def mounts(self, backend: BackendHandle | None, names: list[str],
               cache_dirs: list[Path | None] | None = None) -> list[MountHandle]:
        """Node daemons started at once (as a DaemonSet's are), returned once all are mounted."""
        started = [self.start_mount(backend, name, cache_dirs[i] if cache_dirs else None)
                   for i, name in enumerate(names)]
        for mount in started:
            self.harness.wait_mounted(mount)
        return started

    def start_mount(self, backend: BackendHandle | None, name: str = "node", cache_dir: Path | None = None,
                    transport: str | None = None) -> MountHandle:
        """Start a node daemon; ``transport`` (tcp, nixl): ``--transport``, where the mount has it."""
        base = self.scratch(name)
        extra = []
        if transport:
            if not self.harness.tools.transport_ok:
                raise Unavailable(f"`mmfs mount` has no --transport (asked for {transport})")
            extra = ["--transport", transport]
        return self.harness.start_mount(base / "mnt", cache_dir or base / "cache", cache_size=self.cfg.node_cache,
                                        memory_cache=self.cfg.node_memory, backend=backend.url if backend else None,
                                        hub_url=self.hub.url, name=name, extra=extra)

    def remount(self, mount: MountHandle, name: str = "node") -> MountHandle:
        """Restart a node daemon on the same disk cache (its memory tier starts empty)."""
        self.harness.unmount(mount)
        return self.harness.mount(mount.path, mount.cache_dir, cache_size=mount.cache_size,
                                  memory_cache=mount.memory_cache, backend=mount.backend, hub_url=self.hub.url,
                                  name=name, extra=mount.extra)

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
