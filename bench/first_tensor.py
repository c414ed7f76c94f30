"""Scenario 2: time to first tensor through a cold mount, against a full download of the file.

Through a fresh mount (cold node cache): ``open`` the safetensors file (the path lookup
resolves ``main`` too), read its 8-byte header length and JSON header, then its first
tensor (lowest data offset) with ``pread``. The baseline is ``snapshot_download`` of that
one file from the hub (a fresh cache dir), with the hub capped at the same rate. Two
states: everything cold (backend too, so the bytes come from the capped hub), and node
cold with a warm backend (the usual case once any node of the cluster has loaded it).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from .config import BIGFILE_NAME
from .context import Context
from .harness import Unavailable, rmtree
from .results import Scenario
from .workers import read_file


def first_tensor(path: Path) -> tuple[float, int, str]:
    """(seconds, bytes read, tensor name): open, header, first tensor."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(_pread_all(fd, n, 8))
        name, info = min(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        start, end = info["data_offsets"]
        data = _pread_all(fd, end - start, 8 + n + start)
    finally:
        os.close(fd)
    return time.perf_counter() - t0, 8 + n + len(data), name


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise EOFError(f"short read at {offset + got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def run(ctx: Context) -> list[Scenario]:
    cfg = ctx.cfg
    s = Scenario("first_tensor", f"2. Time to first tensor (cold node cache), hub capped at "
                                 f"{cfg.hub_rate / 1e6:.0f} MB/s")
    tools = ctx.harness.tools
    if not tools.mount_ok:
        return [s.unavailable(tools.missing(backend=False) or "mmfs mount not available")]
    use_backend = tools.backend_ok
    ctx.hub.set_rate(cfg.hub_rate)
    cases = [("bigfile", ctx.models.bigfile, BIGFILE_NAME), ("real", ctx.models.real, "model.safetensors")]
    for tag, repo, fname in cases:
        fsize = (ctx.models.path(repo) / fname).stat().st_size
        label = f"{tag} ({repo}/{fname}, {fsize / 1e6:.0f} MB)"
        for rep in range(cfg.repeats):
            ctx.log(f"s2 {tag} repeat {rep + 1}/{cfg.repeats}")
            # Baseline: a full download of that file.
            base = ctx.scratch("s2-dl")
            t0, res = ctx.harness.workers("s2-dl", [["download", ctx.hub.url, repo, str(base), "--include", fname]])
            s.figure(f"{tag}.download", f"{label}: snapshot_download of the file", "s").add(res[0]["end"] - t0)
            rmtree(base)
            backend = ctx.backend("s2-backend") if use_backend else None
            src = "cold backend" if backend else "embedded, straight from the hub (backend not available)"
            try:
                mount = ctx.mount(backend, name="s2-node")
                path = mount.model_dir(repo) / fname
                ctx.hub.reset()
                secs, nbytes, tname = first_tensor(path)
                s.figure(f"{tag}.cold", f"{label}: first tensor, node cold, {src}", "s",
                         baseline=f"{tag}.download", target_ratio=0.05).add(secs)
                s.figure(f"{tag}.cold.bytes", f"{label}: bytes the first tensor needs (header + tensor)",
                         "MB").add(nbytes / 1e6)
                s.figure(f"{tag}.cold.upstream", f"{label}: upstream bytes by the first tensor", "MB").add(
                    ctx.hub.bytes_served() / 1e6)
                if backend is not None:
                    read_file(path)  # the whole file: now the backend holds it
                    ctx.harness.unmount(mount)
                    rmtree(mount.cache_dir)
                    mount = ctx.mount(backend, name="s2-node")
                    secs, _, _ = first_tensor(mount.model_dir(repo) / fname)
                    s.figure(f"{tag}.warm_backend", f"{label}: first tensor, node cold, backend warm", "s",
                             baseline=f"{tag}.download", target_ratio=0.05).add(secs)
                ctx.harness.unmount(mount)
                rmtree(mount.cache_dir.parent)
            except Unavailable:
                raise
            finally:
                if backend is not None:
                    ctx.harness.stop(backend.child)
                    rmtree(backend.data_dir)
        s.notes.append(f"{tag}: the first tensor is `{tname}` ({nbytes / 1e6:.1f} MB with the header).")
    s.notes.append("The target (issue 2) is time to first tensor ≤ 5 % of a full download of the file; "
                   "the ratio is bounded below by (header + first tensor) / file size for any scheme that "
                   "must fetch those bytes through the same capped link.")
    ctx.hub.set_rate(None)
    return [s]
