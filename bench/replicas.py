"""Scenario 9: backend replicas (a rollout through two replicas) and compression at rest.

``replicas``: N node mounts read one model at once through R backend replicas sharing one
cold tier, the hub rate-capped as the internet. Reports upstream bytes as a multiple of the
model (target 1.00: each byte leaves the upstream once however many replicas), each
replica's share, and the time until every node has read the model against the link limit
(model / hub rate). Real processes on loopback addresses (127.0.0.2, 127.0.0.3, …).

``compression``: the shared cold tier's codec (:mod:`mmfs.tiers.codec`) on real weights:
the real all-MiniLM-L6-v2 (fp32), and a bf16 copy of it made here (each fp32 weight
rounded to bf16, as a bf16 checkpoint of the same model would hold). Ratio (stored / raw)
and CPU seconds per GB to compress and to decompress, one thread, for plain zstd and for
byte-grouped zstd (what ``--cold-compression zstd`` stores).

Both also run alone, without the rest of the benchmark::

    python -m bench.replicas [--nodes 16] [--replicas 2] [--size 256MiB] [--hub-rate 200MB/s]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import backend_server.testing as backend_testing
from mmfs.sizes import format_size, rate_argument, size_argument
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model, real_model_dir
from mmfs.testing.mount import MountProcess
from mmfs.testing.net import free_port
from mmfs.tiers import codec

from .results import Figure, Scenario

REPO = "bench/replicas"
CHUNK = 4 << 20


# -- a rollout through replicas -------------------------------------------------------------


def rollout(work: Path, *, nodes: int, replicas: int, size: int, hub_rate: float | None) -> dict[str, Any]:
    """Start a hub, ``replicas`` backends and ``nodes`` mounts; every node reads the model at once."""
    hub_root = work / "hub"
    model = make_synthetic_model(hub_root / REPO, size, n_shards=2, seed=9)
    files = {p.relative_to(model).as_posix(): p for p in model.rglob("*") if p.is_file()}
    expected = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files.items()}
    total = sum(p.stat().st_size for p in files.values())
    chunks = sum(-(-p.stat().st_size // CHUNK) for p in files.values())
    hosts = [f"127.0.0.{2 + i}" for i in range(replicas)]
    urls = [f"http://{h}:{free_port(h)}" for h in hosts]
    hub = TestHub(hub_root, rate=hub_rate).start()
    backends = [backend_testing.BackendProcess(work / f"replica{i}", hub_url=hub.url, listen=url[7:],
                                               memory_cache="512MiB",
                                               extra_args=["--stream-memory", "128MiB", "--replicas", ",".join(urls),
                                                           "--shared-dir", str(work / "rwx")])
                for i, url in enumerate(urls)]
    mounts = [MountProcess(work / f"mnt{i}", work / f"cache{i}", backend=",".join(urls)) for i in range(nodes)]
    try:
        for process in [*backends, *mounts]:
            process.start(timeout=60)
        hub.reset_stats()
        done: dict[int, float] = {}
        wrong: list[str] = []

        def read(i: int) -> None:
            for name in sorted(files):
                digest = hashlib.sha256((mounts[i].repo(REPO) / name).read_bytes()).hexdigest()
                if digest != expected[name]:
                    wrong.append(f"node {i}: {name}")
            done[i] = time.perf_counter() - t0

        t0 = time.perf_counter()
        threads = [threading.Thread(target=read, args=(i,)) for i in range(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = hub.stats()
        metrics = [b.metrics() for b in backends]
    finally:
        for process in [*mounts, *backends]:
            process.stop()
        hub.stop()
    return {"nodes": nodes, "replicas": replicas, "model_bytes": total, "chunks": chunks,
            "hub_rate": hub_rate, "upstream_bytes": stats.bytes_served,
            "upstream_chunk_gets": stats.requests_by_kind.get("resolve_get", 0),
            "replica_upstream_bytes": [m["mmfs_backend_upstream_bytes_total"] for m in metrics],
            "replica_egress_bytes": [m["mmfs_backend_response_bytes_total"] for m in metrics],
            "node_seconds": [done.get(i, float("nan")) for i in range(nodes)], "wrong": wrong,
            "finished": len(done)}


# -- compression at rest ----------------------------------------------------------------------


def bf16_copy(source: Path, target: Path) -> Path:
    """``source`` (a safetensors file) with every F32 tensor rounded to BF16 (to nearest even)."""
    import numpy as np

    raw = source.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + length])
    body = memoryview(raw)[8 + length:]
    out_header: dict[str, Any] = {"__metadata__": header.get("__metadata__", {})}
    parts, offset = [], 0
    for name, info in sorted((k, v) for k, v in header.items() if k != "__metadata__"):
        start, end = info["data_offsets"]
        data = bytes(body[start:end])
        dtype = info["dtype"]
        if dtype == "F32":
            bits = np.frombuffer(data, dtype="<u4").astype(np.uint64)
            data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
            dtype = "BF16"
        out_header[name] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + len(data)]}
        parts.append(data)
        offset += len(data)
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(parts))
    return target


def compression(path: Path, chunk_size: int = CHUNK) -> dict[str, dict[str, float]]:
    """Ratio and single-thread CPU-s/GB of plain and byte-grouped zstd over ``path``'s chunks."""
    import zstandard

    data = path.read_bytes()
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    gb = len(data) / 1e9
    results = {}
    plain = zstandard.ZstdCompressor(level=codec.LEVEL)
    unplain = zstandard.ZstdDecompressor()
    for label in ("zstd", "byte-grouped zstd (--cold-compression zstd)"):
        t = time.thread_time()
        if label == "zstd":
            stored = [plain.compress(p) for p in pieces]
        else:
            stored = [codec.encode(p, "zstd") for p in pieces]
        compress = time.thread_time() - t
        t = time.thread_time()
        for blob, piece in zip(stored, pieces):
            back = unplain.decompress(blob) if label == "zstd" else codec.decode(blob)
            assert len(back) == len(piece)
        decompress = time.thread_time() - t
        results[label] = {"ratio": sum(len(s) for s in stored) / len(data),
                          "compress_cpu_s_per_gb": compress / gb, "decompress_cpu_s_per_gb": decompress / gb}
    return results


# -- the scenario -----------------------------------------------------------------------------


def run(ctx: Any) -> list[Scenario]:
    nodes = 4 if ctx.cfg.quick else 16
    size = 32 << 20 if ctx.cfg.quick else 256 << 20
    return [replicas_scenario(rollout(ctx.scratch("replicas"), nodes=nodes, replicas=2, size=size,
                                      hub_rate=ctx.cfg.hub_rate)),
            compression_scenario(ctx.scratch("compression"))]


def replicas_scenario(got: dict[str, Any]) -> Scenario:
    s = Scenario("replicas", f"9. {got['nodes']} nodes read a model through {got['replicas']} backend replicas")
    model = got["model_bytes"]
    fig = Figure("upstream_ratio", "upstream bytes / model bytes", "x", target_value=1.0,
                 note="each byte leaves the upstream once for the cluster (target 1.00)")
    fig.add(got["upstream_bytes"] / model)
    s.figures.append(fig)
    if got["hub_rate"]:
        limit = model / got["hub_rate"]
        done = Figure("all_done", "every node read the model, × link limit (model / hub rate)", "x")
        done.add(max(got["node_seconds"]) / limit)
        s.figures.append(done)
    s.tables.append({"title": "Replicas' shares", "columns": ["replica", "upstream MB", "egress to nodes MB"],
                     "rows": [[i, f"{u / 1e6:.1f}", f"{e / 1e6:.1f}"] for i, (u, e) in
                              enumerate(zip(got["replica_upstream_bytes"], got["replica_egress_bytes"]))]})
    s.notes.append(f"Model {format_size(model)} in {got['chunks']} chunks of 4 MiB; the hub answered "
                   f"{got['upstream_chunk_gets']} ranged GETs; {got['finished']} of {got['nodes']} nodes "
                   f"finished, {len(got['wrong'])} with wrong bytes. Two replicas on 127.0.0.2/3 share one cold "
                   "tier (--shared-dir); every process shares this machine's cores.")
    return s


def compression_scenario(work: Path) -> Scenario:
    s = Scenario("compression", "9b. Compression at rest in the shared cold tier (real weights)")
    original = real_model_dir() / "model.safetensors"
    bf16 = bf16_copy(original, work / "model-bf16.safetensors")
    rows = []
    for label, path in (("all-MiniLM-L6-v2, bf16 copy", bf16), ("all-MiniLM-L6-v2, fp32 (as published)", original)):
        for codec_label, got in compression(path).items():
            rows.append([label, codec_label, f"{got['ratio']:.3f}", f"{got['compress_cpu_s_per_gb']:.2f}",
                         f"{got['decompress_cpu_s_per_gb']:.2f}"])
    s.tables.append({"title": f"Stored / raw bytes and CPU (one thread, 4 MiB chunks, zstd level {codec.LEVEL})",
                     "columns": ["file", "codec", "ratio", "compress CPU-s/GB", "decompress CPU-s/GB"],
                     "rows": rows})
    s.notes.append("The bf16 copy is the real model's fp32 weights rounded to bf16 here (no bf16 checkpoint of "
                   "it ships in a package); byte grouping splits 16-bit words into high and low byte planes "
                   "before zstd (fp32: 4 planes; the stride is chosen per chunk from a sample).")
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--size", type=size_argument, default=256 << 20, help="model size (default 256MiB)")
    parser.add_argument("--hub-rate", type=rate_argument, default=200e6, help="upstream cap (default 200MB/s)")
    parser.add_argument("--skip-rollout", action="store_true", help="only the compression measurement")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mmfs-bench-replicas-"))
    try:
        scenarios = [compression_scenario(work)]
        if not args.skip_rollout:
            scenarios.insert(0, replicas_scenario(rollout(work / "rollout", nodes=args.nodes, replicas=args.replicas,
                                                          size=args.size, hub_rate=args.hub_rate)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for s in scenarios:
        print(f"## {s.title}")
        for fig in s.figures:
            print(f"- {fig.label}: {fig.value:.3f} {fig.unit}")
        for table in s.tables:
            print(f"{table['title']}: {table['columns']}")
            for row in table["rows"]:
                print(f"  {row}")
        for note in s.notes:
            print(f"  ({note})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
