"""The main job on one machine, end to end, on the embedded defaults.

``python -m mmfs.demo`` starts the project's Hub-compatible test server with the real
sentence-transformers/all-MiniLM-L6-v2 model (the internet stand-in, capped at a
realistic rate), mounts mmfs in embedded mode (no backend: the node talks to the hub
itself), lists the repo, prefetches it, loads it with safetensors from the mount,
checks every tensor against the original files, prints what it did and how long each
step took, and unmounts. Every process it starts is stopped on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from .sizes import format_size
from .testing.hub import HubProcess
from .testing.models import REAL_REPO_ID, populate_hub_root, real_model_dir

MMFS = [sys.executable, "-m", "mmfs"]


def _step(what: str, started: float) -> None:
    print(f"  {what:<58} {time.perf_counter() - started:7.2f} s", flush=True)


@contextmanager
def mounted(mountpoint: Path, cache_dir: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``mmfs mount`` in embedded mode until the block ends, then unmount it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen([*MMFS, "mount", str(mountpoint), "--cache-dir", str(cache_dir),
                               "--cache-size", "2GiB", "--memory-cache", "256MiB"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            if "mounted" in line:
                break
        else:
            raise SystemExit(f"mmfs mount exited with {daemon.wait()} before mounting")
        yield daemon
    finally:
        subprocess.run([*MMFS, "unmount", str(mountpoint)], env=env, check=False)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def load_and_check(repo_dir: Path) -> tuple[int, int]:
    """Load every tensor through the mount and compare with the original; return counts."""
    from safetensors import safe_open
    import numpy as np

    tensors = params = 0
    original = real_model_dir() / "model.safetensors"
    with safe_open(repo_dir / "model.safetensors", framework="numpy") as mounted_file, \
            safe_open(original, framework="numpy") as reference:
        for name in mounted_file.keys():
            value = mounted_file.get_tensor(name)
            if not np.array_equal(value, reference.get_tensor(name)):
                raise SystemExit(f"tensor {name} read through the mount differs from the original")
            tensors += 1
            params += value.size
    return tensors, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100MB/s", help="bandwidth cap of the test hub (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="where to put the hub, mount and cache (default: a temp dir)")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmfs-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        print(f"mmfs demo in {workdir}: {REAL_REPO_ID} from a local Hub-compatible server capped at {args.rate}")

        hub_root = workdir / "hub"
        shutil.rmtree(hub_root, ignore_errors=True)
        populate_hub_root(hub_root)
        hub = stack.enter_context(HubProcess(hub_root, rate=args.rate))
        _step(f"test hub up at {hub.url}", started)

        env = {**os.environ, "HF_ENDPOINT": hub.url}
        env.pop("HF_HUB_OFFLINE", None)
        mountpoint = workdir / "models"
        stack.enter_context(mounted(mountpoint, workdir / "cache", env))
        _step(f"mounted {mountpoint} (embedded mode)", started)

        t = time.perf_counter()
        repo = mountpoint / "huggingface" / REAL_REPO_ID
        files = sorted(p.relative_to(repo / "main") for p in (repo / "main").rglob("*") if p.is_file())
        size = sum((repo / "main" / f).stat().st_size for f in files)
        listed_bytes = hub.stats().bytes_served
        _step(f"listed {len(files)} files, {format_size(size)}; main -> {os.readlink(repo / 'main')[:12]}…", t)
        print(f"    content bytes the listing cost the upstream: {listed_bytes}")

        t = time.perf_counter()
        subprocess.run([*MMFS, "prefetch", f"huggingface/{REAL_REPO_ID}", "--mount", str(mountpoint)],
                       env=env, check=True)
        _step("prefetched the whole repo into the node cache", t)

        t = time.perf_counter()
        tensors, params = load_and_check(repo / "main")
        _step(f"loaded {tensors} tensors ({params / 1e6:.1f} M parameters) with safetensors", t)
        print("    every tensor is identical to the original file")

        subprocess.run([*MMFS, "status", "--mount", str(mountpoint)], env=env, check=False)
        upstream = hub.stats().bytes_served
        print(f"  upstream bytes: {format_size(upstream)} for a {format_size(size)} model "
              f"({upstream / size:.2f} x)")
    _step("unmounted and stopped; total", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
