"""Scenario 8, node ingest: one cold node reads one file from a warm backend (issue 8's targets).

One backend (``--nixl`` where NIXL is installed) holds the file in its memory tier: it
was fetched once from the uncapped hub by a first, unmeasured ``curl``. Then, in each
repeat, in an order that rotates from repeat to repeat so that noise hits all alike:

- ``curl``: the baseline, a plain HTTP download of the same bytes from the same backend's
  Hub API (``GET /<org>/<name>/resolve/main/<file>`` to ``/dev/null``);
- ``tcp``: a fresh node daemon (``mmfs mount --transport tcp``, empty cache dir) and one
  reader reading the file through it with 16 MiB ``read()`` calls;
- ``nixl``: the same with ``--transport nixl`` (chunk bytes over NIXL READs).

Figures are best of N (highest GB/s, lowest CPU per GB; min/median/max are listed too).
CPU is user + system seconds of each process from the start of the read until node and
backend are idle again (work left after the last byte, such as write-behind to the node's
disk cache, is part of the read's cost), per GB of the file.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from .config import BIGFILE_NAME
from .context import Context
from .harness import BackendHandle, CpuMeter, MountHandle, rmtree
from .results import Scenario
from .workers import gbps, timed_read

#: Issue 8's targets.
NODE_CPU_TARGET = 1.0  # node daemon CPU s per GB on a cold read
BACKEND_CPU_TARGET = 0.3  # backend CPU s per GB serving from memory
VS_CURL_TARGET = 0.5  # cold node GB/s / curl GB/s


@dataclass
class ColdRead:
    """One read of a whole file through a fresh node daemon."""

    mount: MountHandle
    seconds: float
    nbytes: int
    #: CPU seconds by process ("node", "backend") from the read's start until both were idle.
    cpu: dict[str, float]
    #: Changes of the backend's counters over the read (``name{labels}`` -> delta).
    metrics: dict[str, float] = field(default_factory=dict)

    def cpu_per_gb(self, who: str) -> float:
        return self.cpu[who] / (self.nbytes / 1e9)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def cold_node_read(ctx: Context, backend: BackendHandle | None, path_in_mount: str, name: str,
                   transport: str | None = None) -> ColdRead:
    """Mount a cold node (``transport``: ``--transport``), read ``path_in_mount`` whole, measure.

    The mount is left mounted (the caller unmounts it, or keeps it as a warm node).
    Dirty pages of earlier steps are written back first, so their writeback is not charged here.
    """
    os.sync()
    mount = ctx.mount(backend, name=name, transport=transport)
    path = mount.path / path_in_mount
    pids = {"node": mount.pid, **({"backend": backend.pid} if backend else {})}
    before = backend.metrics() if backend else {}
    with CpuMeter(pids) as meter:
        secs, nbytes = timed_read(path)
        meter.settle()
    metrics = _delta(backend.metrics(), before) if backend else {}
    return ColdRead(mount, secs, nbytes, meter.cpu, metrics)


def served_from(metrics: dict[str, float]) -> str:
    """What the backend counters say about where a read's bytes came from ('' when all from memory)."""
    notes = []
    upstream = metrics.get("mmfs_backend_upstream_bytes_total", 0)
    if upstream:
        notes.append(f"{upstream / 1e6:.0f} MB from the upstream")
    for key, value in metrics.items():
        if key.startswith("mmfs_backend_tier_hit_bytes_total{") and 'tier="memory"' not in key and value:
            notes.append(f"{value / 1e6:.0f} MB from {key.split('{', 1)[1].rstrip('}')}")
    return ", ".join(notes)


def curl(url: str) -> tuple[float, int, float]:
    """(seconds, bytes, curl's CPU seconds) of ``curl URL -o /dev/null``; curl's own timer."""
    proc = subprocess.Popen(["curl", "-sS", "-f", "-L", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                             url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: this child only
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url} exited {proc.returncode}: {err.strip()[:300]}")
    nbytes, secs = out.split()
    return float(secs), int(float(nbytes)), usage.ru_utime + usage.ru_stime


def run(ctx: Context) -> list[Scenario]:
    cfg = ctx.cfg
    h = ctx.harness
    repo, fname = ctx.models.ingest, BIGFILE_NAME
    size = ctx.models.ingest_path().stat().st_size
    mb = f"{size / 2**20:.0f} MiB"
    s = Scenario("ingest", f"8. Node ingest: one cold node reads one {mb} file from a warm backend "
                           f"(best of {cfg.repeats}, alternating with curl)")
    tools = h.tools
    missing = tools.missing(backend=True)
    if missing:
        return [s.unavailable(missing)]
    if not tools.transport_ok:
        return [s.unavailable("`mmfs mount` has no --transport")]
    if not _has_curl():
        return [s.unavailable("curl is not installed")]
    nixl_missing = tools.nixl_missing()
    variants = ["curl", "tcp"] + ([] if nixl_missing else ["nixl"])
    ctx.hub.set_rate(None)
    backend = ctx.backend("ingest-backend", nixl=not nixl_missing)
    url = f"{backend.url}/{repo}/resolve/main/{fname}"
    try:
        secs, got, _ = curl(url)  # warms the backend: every chunk fetched from the hub once, into memory
        if got != size:
            raise RuntimeError(f"curl got {got} of {size} bytes from {url}")
        ctx.log(f"s8 backend warmed by curl in {secs:.1f} s")
        gb = size / 1e9
        labels = {"tcp": "mmfs cold node, --transport tcp", "nixl": "mmfs cold node, --transport nixl"}
        for rep in range(cfg.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for variant in order:
                ctx.log(f"s8 repeat {rep + 1}/{cfg.repeats}: {variant}")
                if variant == "curl":
                    os.sync()
                    before = backend.metrics()
                    with CpuMeter({"backend": backend.pid}) as meter:
                        secs, got, curl_cpu = curl(url)
                        meter.settle()
                    if got != size:
                        raise RuntimeError(f"curl got {got} of {size} bytes")
                    s.figure("curl.gbps", "curl of the same file from the backend's Hub API "
                                          "(/<org>/<name>/resolve/main/<file> to /dev/null)", "GB/s",
                             stat="max").add(gbps(size, secs))
                    s.figure("curl.cpu", "curl: CPU s per GB it downloads", "CPU s/GB", stat="min").add(
                        curl_cpu / gb)
                    s.figure("curl.backend_cpu", "backend serving curl from memory: CPU s per GB", "CPU s/GB",
                             stat="min").add(meter.cpu["backend"] / gb)
                    where = served_from(_delta(backend.metrics(), before))
                    if where:
                        s.notes.append(f"WARNING: repeat {rep + 1}, curl: not all from the backend's memory: {where}")
                    continue
                read = None
                try:
                    read = cold_node_read(ctx, backend, f"huggingface/{repo}/main/{fname}", f"ingest-{variant}",
                                          transport=variant)
                finally:
                    if read is not None:
                        h.unmount(read.mount)
                        rmtree(read.mount.cache_dir.parent)
                if read.nbytes != size:
                    raise RuntimeError(f"{variant}: read {read.nbytes} of {size} bytes through the mount")
                s.figure(f"{variant}.gbps", f"{labels[variant]}: GB/s", "GB/s", baseline="curl.gbps", stat="max",
                         target_ratio_min=VS_CURL_TARGET).add(gbps(size, read.seconds))
                s.figure(f"{variant}.node_cpu", f"{labels[variant]}: node daemon CPU s per GB", "CPU s/GB",
                         stat="min", target_value=NODE_CPU_TARGET).add(read.cpu_per_gb("node"))
                s.figure(f"{variant}.backend_cpu", f"{labels[variant]}: backend CPU s per GB, serving it from "
                                                   "memory", "CPU s/GB", stat="min",
                         target_value=BACKEND_CPU_TARGET).add(read.cpu_per_gb("backend"))
                where = served_from(read.metrics)
                if where:
                    s.notes.append(f"WARNING: repeat {rep + 1}, {variant}: not all from the backend's memory: {where}")
                if variant == "nixl":
                    over = read.metrics.get("mmfs_nixl_bytes_total", 0)
                    fallbacks = read.metrics.get("mmfs_nixl_fallbacks_total", 0)
                    if over < size or fallbacks:
                        s.notes.append(f"WARNING: repeat {rep + 1}, nixl: {over / 1e6:.0f} of {size / 1e6:.0f} MB "
                                       f"came over NIXL, {fallbacks:.0f} chunks fell back to TCP.")
        if "nixl" in variants:
            tcp, nixl = s.get("tcp.gbps"), s.get("nixl.gbps")
            if tcp and nixl:
                fig = s.figure("nixl.vs_tcp", "mmfs cold node: --transport nixl against --transport tcp", "GB/s",
                               baseline="tcp.gbps", stat="max")
                fig.values = list(nixl.values)
    finally:
        h.stop(backend.child)
        rmtree(backend.data_dir)
    if nixl_missing:
        s.notes.append(f"--transport nixl not measured: {nixl_missing}.")
    else:
        s.notes.append("The backend runs with --nixl for all variants; the tcp node reads chunks over "
                       "/v1/chunk, the nixl node READs them from the backend's registered slots.")
    s.notes.append(f"Targets (issue 8): node daemon ≤ {NODE_CPU_TARGET:g} CPU s/GB; backend ≤ {BACKEND_CPU_TARGET:g} "
                   f"CPU s/GB serving from memory; a cold node ≥ {VS_CURL_TARGET:g} × curl of the same bytes from "
                   "the same backend. The node's time runs from open() to the last byte (the path lookup, "
                   "commit resolution and manifest included, as curl's includes its request); CPU until both "
                   "daemons are idle again. Dirty pages are written back (sync) before each variant.")
    return [s]


def _has_curl() -> bool:
    import shutil

    return shutil.which("curl") is not None


__all__ = ["ColdRead", "cold_node_read", "curl", "run", "served_from"]
