"""Scenario 10: node-to-node sharing, measured here and predicted by the simulator.

N/2 and then N node daemons read the synthetic model at the same instant from a warm
backend (the model verified there, so chunk maps exist), each twice: plain (every chunk
from the backend) and with ``--peer-listen`` on 127.0.0.x (docs/protocol.md,
"Node-to-node sharing"). Reported: time until every node is done, backend egress against
nodes × model (issue 12's target with sharing: ≤ 0.5 ×), bytes between peers, CPU.

Side by side, what :mod:`bench.simulate` predicts for the same runs in its ``host`` mode:
all daemons and readers share this machine's cores, at the CPU-seconds per byte measured
in the plain run with N nodes (backend: sending; everything else: receiving and reading),
with the cores that run got (its CPU-seconds over its wall time: other work on the
machine takes the rest). The other three runs are predictions from that one.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from mmfs.testing.net import free_port

from .context import Context
from .harness import CpuMeter, MountHandle, http_json, prometheus, rmtree
from .results import Scenario
from .simulate import Hardware, Setup, simulate

#: Issue 12: with node sharing, backend egress at most this × (nodes × model).
EGRESS_TARGET = 0.5
#: The chunk size the backend cuts files into (its default): the simulator's pieces.
CHUNK = 4 << 20
VARIANTS = {"plain": "every chunk from the backend", "sharing": "--peer-listen: chunks from peers where sent"}


def _served(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("mmfs_backend_served_bytes_total"))


def _peer_flags(i: int) -> tuple[list[str], str]:
    address = f"127.0.0.{10 + i}"
    listen = f"{address}:{free_port(address)}"
    return ["--transport", "tcp", "--peer-listen", listen], listen


def _wait_known(backend_url: str, count: int, timeout: float = 30.0) -> None:
    """Until every node's first heartbeat reached the backend (each sends one at start)."""
    deadline = time.monotonic() + timeout
    while len(http_json(f"{backend_url}/v1/peers")["nodes"]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} nodes heartbeated to the backend within {timeout:g} s")
        time.sleep(0.05)


def _read_at_once(ctx: Context, backend: Any, repo: str, n: int, sharing: bool) -> dict[str, Any]:
    h = ctx.harness
    mounts: list[MountHandle] = []
    listens: list[str] = []
    try:
        for i in range(n):
            base = ctx.scratch(f"s10-node{i}")
            extra, listen = _peer_flags(i) if sharing else (["--transport", "tcp"], "")
            listens.append(listen)
            mounts.append(h.start_mount(base / "mnt", base / "cache", cache_size=ctx.cfg.node_cache,
                                        memory_cache=ctx.cfg.node_memory, backend=backend.url, hub_url=ctx.hub.url,
                                        name=f"s10-node{i}", extra=extra))
        for mount in mounts:
            h.wait_mounted(mount)
        if sharing:
            _wait_known(backend.url, n)
        before = _served(backend.metrics())
        argvs = [["read", str(m.model_dir(repo)), "--threads", str(ctx.cfg.reader_threads)] for m in mounts]
        pids = {"backend": backend.pid, **{f"node{i}": m.pid for i, m in enumerate(mounts)}}
        with CpuMeter(pids) as meter:
            t0, res = h.workers("s10-read", argvs)
            meter.settle()
        times = [r["end"] - t0 for r in res]
        counters = [prometheus(f"http://{listen}/metrics") for listen in listens if listen]
        peer_bytes = sum(c.get("mmfs_peer_bytes_received_total", 0.0) for c in counters)
        return {"times": times, "egress": _served(backend.metrics()) - before, "peer_bytes": peer_bytes,
                "fallbacks": sum(c.get("mmfs_peer_fallbacks_total", 0.0) for c in counters),
                "redirects": sum(c.get("mmfs_peer_redirects_total", 0.0) for c in counters),
                "backend_cpu": meter.cpu.get("backend", 0.0),
                "cpu": sum(meter.cpu.values()) + sum(r.get("cpu", 0.0) for r in res),
                "bytes": sorted({r["bytes"] for r in res})}
    finally:
        h.unmount_many(mounts)
        for mount in mounts:
            rmtree(mount.cache_dir.parent)


def run(ctx: Context) -> list[Scenario]:
    cfg = ctx.cfg
    repo = ctx.models.synthetic
    size = ctx.models.sizes[repo]
    counts = (max(2, cfg.nodes // 2), cfg.nodes)
    s = Scenario("sharing", f"10. Node-to-node sharing: {counts[0]} and {counts[1]} nodes read a {size / 1e6:.0f} MB "
                            "model at once from a warm backend")
    backend = ctx.backend("s10-backend")
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        ctx.hub.set_rate(None)
        http_json(f"{backend.url}/v1/prefetch/huggingface/{repo}/main", method="POST", timeout=600)
        for n in counts:
            total = n * size
            for rep in range(cfg.repeats):
                for variant in (("plain", "sharing") if rep % 2 == 0 else ("sharing", "plain")):
                    ctx.log(f"s10 {n} nodes, repeat {rep + 1}/{cfg.repeats}: {variant}")
                    out = _read_at_once(ctx, backend, repo, n, variant == "sharing")
                    if any(b != size for b in out["bytes"]):
                        s.notes.append(f"WARNING: {n} nodes {variant} repeat {rep + 1}: nodes read {out['bytes']} "
                                       f"bytes, the model has {size}.")
                    runs.setdefault((n, variant), []).append(out)
                    label = f"{n} nodes, {VARIANTS[variant]}"
                    s.figure(f"{n}.{variant}.all", f"{label}: all done", "s").add(max(out["times"]))
                    s.figure(f"{n}.{variant}.egress", f"{label}: backend egress / (nodes × model)", "x",
                             target_value=EGRESS_TARGET if variant == "sharing" else None).add(out["egress"] / total)
                    s.figure(f"{n}.{variant}.peers", f"{label}: bytes between peers / (nodes × model)", "x").add(
                        out["peer_bytes"] / total)
                    if variant == "sharing":
                        s.figure(f"{n}.sharing.fallbacks", f"{label}: chunks the backend sent to a peer that "
                                 "came from the backend after all (peer slow, gone, or without it)", "chunks").add(
                            out["fallbacks"])
                        s.figure(f"{n}.sharing.redirects", f"{label}: chunks the backend sent to a peer",
                                 "chunks").add(out["redirects"])
                    s.figure(f"{n}.{variant}.cpu", f"{label}: CPU s per GB delivered, all processes",
                             "CPU s/GB").add(out["cpu"] / (total / 1e9))
    finally:
        ctx.harness.stop(backend.child)
        rmtree(backend.data_dir)
    s.tables.append(_prediction(runs, counts, size))
    s.notes.append(
        f"The node daemons, their readers ({cfg.reader_threads} files at once, 16 MiB reads) and the backend share "
        f"this machine's {os.cpu_count()} cores (and other work running meanwhile): the runs are CPU-bound, so "
        "sharing changes where bytes come from (backend egress), not how fast they arrive. The simulator's host "
        "mode models exactly that: one CPU queue. Its sharing rows assume a peer costs what the backend costs to "
        "send a byte.")
    return [s]


def _prediction(runs: dict[tuple[int, str], list[dict[str, Any]]], counts: tuple[int, int],
                size: int) -> dict[str, Any]:
    """Measured against predicted (medians of the repeats); calibrated on the N-node plain run."""
    base = runs[(counts[1], "plain")]
    total = counts[1] * size
    send = _median([r["backend_cpu"] / total for r in base])
    receive = _median([(r["cpu"] - r["backend_cpu"]) / total for r in base])
    cores = _median([r["cpu"] / max(r["times"]) for r in base])
    hw = Hardware(host_cores=cores, receive_cpu=receive, send_cpu=send, upstream=math.inf)
    pieces = max(1, size // CHUNK)
    rows = []
    for n in counts:
        for variant, mode in (("plain", "backend"), ("sharing", "sharing")):
            got = simulate(Setup(n, float(size), mode, pieces=pieces), hw)
            measured = runs[(n, variant)]
            rows.append([n, VARIANTS[variant], f"{_median([max(r['times']) for r in measured]):.1f}",
                         f"{got.all_ready:.1f}", f"{_median([r['egress'] / (n * size) for r in measured]):.3f}",
                         f"{sum(got.backend_bytes) / (n * size):.3f}"])
    return {"title": f"Measured here and predicted by the simulator (host mode calibrated on the {counts[1]}-node "
                     f"plain run: {cores:.2f} cores busy, {receive * 1e9:.2f} CPU-s/GB receiving and reading, "
                     f"{send * 1e9:.2f} sending)",
            "columns": ["nodes", "variant", "all done s, measured", "predicted",
                        "backend egress × (nodes × model), measured", "predicted"],
            "rows": rows}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
