"""Scenario 11: compile once per cluster. A torch.compile cache built by one node, used by another.

Two nodes (two mounts of one backend, each its own process tree and its own local inductor
cache folder, as on two machines). Node A runs ``mmfs artifact build --kind
torch-compile-cache -- python -m mmfs.testing.compile_worker``: the worker loads
all-MiniLM-L6-v2 from A's mount, compiles it with ``torch.compile`` (inductor, CPU), runs
its first inference, and its compile cache is pushed. Node B asks ``mmfs artifact path``,
and starts the same worker with that cache (inductor's cache folder, copied from B's
mount into B's own local cache folder, as a vLLM worker copies its cache). Figures: each
worker's time from its start to its first inference (the baseline is A's: compiling from
scratch), and whether the outputs are identical (they must be). The time a worker spends
before its Python code runs is the same for both and left out.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from mmfs.testing.models import REAL_REPO_ID

from .context import Context
from .harness import Unavailable, env_for_children, rmtree
from .results import Scenario

TOKEN = "bench-publish-token"


def _worker_result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{") and "first_inference_s" in line]
    if not lines:
        raise RuntimeError(f"the compile worker printed no result: {text[-2000:]}")
    return json.loads(lines[-1])


def run(ctx: Context) -> list[Scenario]:
    layers = 1 if ctx.cfg.quick else 6
    s = Scenario("artifacts", f"11. Compile once per cluster: torch.compile of all-MiniLM-L6-v2 ({layers} of 6 "
                              "layers), first node compiles and pushes, second node starts from its cache")
    if importlib.util.find_spec("torch") is None:
        return [s.unavailable("torch is not installed (pip install -e '.[compile]')")]
    if not ctx.harness.tools.backend_ok or not ctx.harness.tools.mount_ok:
        raise Unavailable(ctx.harness.tools.missing() or "mmfs mount or backend not available")
    rows = []
    for rep in range(ctx.cfg.repeats):
        ctx.log(f"s9 repeat {rep + 1}/{ctx.cfg.repeats}")
        backend = ctx.backend("s9-backend", env={"MMFS_PUBLISH_TOKEN": TOKEN})
        node_a, node_b = ctx.mounts(backend, ["s9-node-a", "s9-node-b"])
        scratch = ctx.scratch("s9-inductor")
        key = ["--kind", "torch-compile-cache", "--model", f"huggingface/{REAL_REPO_ID}@main",
               "--target", f"cpu-layers{layers}", "--builder", f"torch-2.13.0-bench{rep}-{time.time_ns()}"]

        def env(node: str) -> dict[str, str]:
            return env_for_children({"MMFS_PUBLISH_TOKEN": TOKEN, "MMFS_COMPILE_LAYERS": str(layers),
                                     "TORCHINDUCTOR_CACHE_DIR": str(scratch / node)})

        try:
            t0 = time.perf_counter()
            built = subprocess.run([sys.executable, "-m", "mmfs", "artifact", "build", *key,
                                    "--mount", str(node_a.path), "--", sys.executable, "-m",
                                    "mmfs.testing.compile_worker"], capture_output=True, text=True, timeout=1800,
                                   env=env("a"))
            build_wall = time.perf_counter() - t0
            if built.returncode != 0:
                raise RuntimeError(f"mmfs artifact build failed: {built.stderr[-2000:]}")
            first = _worker_result(built.stderr)
            t0 = time.perf_counter()
            found = subprocess.run([sys.executable, "-m", "mmfs", "artifact", "path", *key, "--mount",
                                    str(node_b.path)], capture_output=True, text=True, timeout=120, env=env("b"))
            lookup = time.perf_counter() - t0
            if found.returncode != 0:
                raise RuntimeError(f"mmfs artifact path failed on the second node: {found.stderr}")
            cache = Path(found.stdout.strip())
            worker = subprocess.run([sys.executable, "-m", "mmfs.testing.compile_worker", "--model",
                                     str(node_b.model_dir(REAL_REPO_ID)), "--cache-in", str(cache)],
                                    capture_output=True, text=True, timeout=1800, env=env("b"))
            if worker.returncode != 0:
                raise RuntimeError(f"the second worker failed: {worker.stderr[-2000:]}")
            second = _worker_result(worker.stdout)
        finally:
            for mount in (node_a, node_b):
                ctx.harness.unmount(mount)
            ctx.harness.stop(backend.child)
            rmtree(backend.data_dir)
            rmtree(scratch)
        s.figure("cold", "node A: start to first inference, compiling (no cache)", "s", stat="min").add(
            first["first_inference_s"])
        s.figure("warm", "node B: start to first inference, with A's cache from its mount", "s", stat="min",
                 baseline="cold").add(second["first_inference_s"])
        s.figure("build_wall", "node A: the whole `mmfs artifact build` (lease, compile, push)", "s",
                 stat="min").add(build_wall)
        s.figure("lookup", "node B: `mmfs artifact path`", "s", stat="min").add(lookup)
        s.figure("cache_mb", "the cache (the artifact: inductor's cache folder)", "MB").add(
            second["cache_in_bytes"] / 1e6)
        rows.append([rep + 1, first["fxgraph_cache_miss"], second["fxgraph_cache_hit"], second["fxgraph_cache_miss"],
                     "yes" if first["output_sha256"] == second["output_sha256"] else "NO"])
        if first["output_sha256"] != second["output_sha256"]:
            ctx.errors.append("artifacts: the second node's output differs from the first's")
    s.tables.append({"title": "What each node compiled, and their outputs",
                     "columns": ["repeat", "A: FX graphs compiled", "B: FX graphs from the cache",
                                 "B: FX graphs compiled", "identical outputs"], "rows": rows})
    s.notes.append("Each worker has its own fresh local inductor cache folder (TORCHINDUCTOR_CACHE_DIR), so B "
                   "finds nothing locally: what it skips came through its mount. Both still pay for importing "
                   "torch, loading the weights through their mount and tracing the model (dynamo): the ratio is "
                   "what a compile cache saves for a small model on a CPU, not the minutes of large models on GPUs.")
    return [s]
