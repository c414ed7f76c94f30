"""Backend CPU per GB served from its memory tier, several source trees side by side.

    python -m bench.send_cpu --tree before=/tmp/mmfs-base --tree after=. [--size 512MiB] [--repeats 5]

For each tree, a backend (``python -m backend_server.cli serve`` with that tree first on
``PYTHONPATH``) is started on one shared test hub holding a single file of ``--size``,
warmed with ``POST /v1/prefetch`` (so the file is verified and in the memory tier), and
then read with ``curl -o /dev/null`` (``--passes`` times per measurement), the backends
taking turns, ``--repeats`` times:

* ``file``: one ``GET /v1/file/...`` of the whole file (a stream);
* ``chunk``: every ``GET /v1/chunk/...?index=N`` in one curl (one keep-alive connection).

CPU is the backend process's user + system time (psutil) over the transfer. Prints one
line per measurement and a summary (best and median CPU-s per GB and GB/s per tree and
mode) as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from mmfs.sizes import parse_size
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model
from mmfs.testing.process import start_until_ready, stop

REPO = "org/sendcpu"
SHARD = "model-00001-of-00001.safetensors"


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _sys(proc: psutil.Process) -> float:
    return proc.cpu_times().system


def _curl(urls: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    args = ["curl", "-s", "-f", "-w", "%{size_download}\\n"]
    for url in urls:
        args += ["-o", "/dev/null", url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split()), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.send_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--chunk-size", default="4MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=4,
                        help="reads of the file per measurement (CPU times tick in 10 ms: measure seconds)")
    parser.add_argument("--modes", default="file,chunk")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--backend-arg", action="append", default=[], help="extra argument for every backend")
    parser.add_argument("--profile", metavar="PY_SPY", default=None,
                        help="after measuring, record each backend with this py-spy during one more pass per "
                             "mode (raw collapsed stacks in the work folder: keep it with --work)")
    args = parser.parse_args(argv)
    trees = [(t.partition("=")[0], str(Path(t.partition("=")[2]).resolve())) for t in args.tree]
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="send-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen[str], str]] = {}
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        make_synthetic_model(work / "hub" / REPO, size, n_shards=1)
        size = (work / "hub" / REPO / SHARD).stat().st_size
        with TestHub(work / "hub") as hub:
            commit = hub.commit(REPO)
            for name, tree in trees:
                env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": tree}
                env.pop("HF_TOKEN", None)
                argv_ = [sys.executable, "-m", "backend_server.cli", "serve", "--listen", "127.0.0.1:0",
                         "--data-dir", str(work / f"data-{name}"), "--memory-cache", str(2 * size + (64 << 20)),
                         "--chunk-size", args.chunk_size, *args.backend_arg]
                proc, line = start_until_ready(argv_, env, log_path=work / f"{name}.log", timeout=60)
                if "listening on " not in line:
                    raise SystemExit(f"{name}: backend did not start: {(work / f'{name}.log').read_text()[-2000:]}")
                url = line.split("listening on ", 1)[1].strip()
                procs[name] = (proc, url)
                req = urllib.request.Request(f"{url}/v1/prefetch/huggingface/{REPO}/main", method="POST")
                with urllib.request.urlopen(req, timeout=600) as response:
                    response.read()
            manifest = json.loads(urllib.request.urlopen(
                f"{procs[trees[0][0]][1]}/v1/manifest/huggingface/{REPO}/{commit}").read())
            chunk_size = next(f["chunk_size"] for f in manifest["files"] if f["path"] == SHARD)
            count = -(-size // chunk_size)
            modes = args.modes.split(",")

            def urls(base: str, mode: str) -> list[str]:
                if mode == "file":
                    return [f"{base}/v1/file/huggingface/{REPO}/{commit}/{SHARD}"]
                return [f"{base}/v1/chunk/huggingface/{REPO}/{commit}/{SHARD}?index={i}" for i in range(count)]

            for name, _ in trees:  # one unmeasured pass each: first-touch costs out of the way
                for mode in modes:
                    _curl(urls(procs[name][1], mode))
            for repeat in range(args.repeats):
                for mode in modes:
                    order = trees if repeat % 2 == 0 else trees[::-1]
                    for name, _ in order:
                        proc, base = procs[name]
                        ps = psutil.Process(proc.pid)
                        cpu0, sys0 = _cpu(ps), _sys(ps)
                        got, seconds = _curl(urls(base, mode) * args.passes)
                        cpu, system = _cpu(ps) - cpu0, _sys(ps) - sys0
                        assert got == size * args.passes, (name, mode, got, size)
                        gb = got / 1e9
                        results.setdefault(name, {}).setdefault(mode, []).append((cpu / gb, gb / seconds))
                        print(f"{repeat} {mode:5} {name:10} {cpu / gb:6.3f} CPU-s/GB ({system / gb:5.3f} system) "
                              f"{gb / seconds:6.2f} GB/s",
                              flush=True)
            if args.profile:
                for name, _ in trees:
                    for mode in modes:
                        out = work / f"profile-{name}-{mode}.txt"
                        spy = subprocess.Popen([args.profile, "record", "--format", "raw", "-r", "250", "--nonblocking",
                                                "-o", str(out), "--pid", str(procs[name][0].pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(1.0)
                        for _ in range(3):
                            _curl(urls(procs[name][1], mode))
                        spy.send_signal(2)
                        spy.wait(timeout=30)
                        print(f"profile: {out}", flush=True)
    finally:
        for proc, _ in procs.values():
            stop(proc, 15, 15)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {name: {mode: {"cpu_s_per_gb_best": round(min(c for c, _ in runs), 3),
                             "cpu_s_per_gb_median": round(statistics.median(c for c, _ in runs), 3),
                             "gb_per_s_best": round(max(r for _, r in runs), 3),
                             "gb_per_s_median": round(statistics.median(r for _, r in runs), 3)}
                      for mode, runs in modes_.items()} for name, modes_ in results.items()}
    print(json.dumps({"size": size, "repeats": args.repeats, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
