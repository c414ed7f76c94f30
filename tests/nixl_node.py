"""A node reading a repo through ``NixlBackendRemote``, as a child process of the NIXL tests.

    python tests/nixl_node.py BACKEND_URL ORG/NAME [--attempts N] [--damage] [--auto] [--token T]
    python tests/nixl_node.py BACKEND_URL ORG/NAME --dump-pool FILE

Reads every file of the repo at ``main`` through a node ``FetchEngine`` (which checks each
chunk's blake3) and prints one JSON line: ``{"files": {path: sha256 hex}, "stats": {...},
"errors": {path: "ErrorClass: message"}}``. ``--damage`` flips one byte of every chunk
after its NIXL READ, to show the node's check catches bytes damaged on that path.
``--auto`` builds the remote as ``--transport auto`` does on a node with RDMA (NIXL only
if the backend announces RDMA too); the result then also has ``"transport"``. ``--token``
is sent as the node's own (``--token-file`` of a mount).

``--dump-pool FILE`` plays an attacker holding the backend's agent metadata: it leases one
chunk of ORG/NAME to learn where the pool lies, then READs every slot of the pool
(one-sided: the backend is not asked) into FILE.

Why a child process: NIXL's bundled abseil and grpc_tools' protoc compiler (which the CSI
tests load into the pytest process) crash when both are loaded in one process, in either
order. The node daemon never loads grpc_tools, so this only concerns the test process.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys

import trio

from mmfs.engine import FetchEngine
from mmfs.errors import MmfsError
from mmfs.names import parse_repo_id
from mmfs.remote._http import RetryPolicy
from mmfs.remote.base import FileSource
from mmfs.remote.nixl import NixlBackendRemote, _Plane
from mmfs.tiers.memory import MemoryTier


async def read_repo(url: str, repo_id: str, attempts: int, auto: bool = False, token: str | None = None) -> dict:
    remote = NixlBackendRemote(url, policy=RetryPolicy(attempts=attempts), auto=auto,
                               auth=f"Bearer {token}" if token else None)
    repo = parse_repo_id(repo_id)
    files: dict[str, str] = {}
    errors: dict[str, str] = {}
    async with FetchEngine([MemoryTier(256 << 20)], remote) as engine:
        manifest = await engine.manifest(repo, "main")
        for entry in manifest.files:
            try:
                data = await engine.read(FileSource(repo, manifest.commit, entry), 0, entry.size)
            except MmfsError as exc:
                errors[entry.path] = f"{type(exc).__name__}: {exc}"
            else:
                files[entry.path] = hashlib.sha256(data).hexdigest()
        stats = dataclasses.asdict(remote.statistics())  # before the engine closes the remote
        transport = remote.transport()
    return {"files": files, "stats": stats, "errors": errors, "transport": transport}


async def dump_pool(url: str, repo_id: str, out: str) -> dict:
    """READ the backend's whole NIXL pool, as any process with its agent metadata can."""
    remote = NixlBackendRemote(url)
    repo = parse_repo_id(repo_id)
    try:
        manifest = await remote.manifest(repo, await remote.resolve(repo, "main"))
        plane = await remote._plane(None)
        assert plane is not None, "the backend's NIXL plane is not reachable"
        entry = manifest.files[0]
        path = f"{url}/v1/nixl/chunk/{repo}/{manifest.commit}/{entry.path}?index=0"
        lease = await remote._control("GET", path, None)
        await remote._release(str(lease["lease_id"]), None)
        info = await remote._control("GET", f"{url}/v1/nixl/agent", None)
        slot_size, slots = int(info["slot_size"]), int(info["slots"])
        base = int(lease["addr"]) - int(lease["slot"]) * slot_size
        with open(out, "wb") as f:
            for slot in range(slots):
                f.write(await trio.to_thread.run_sync(plane.read, 0, base + slot * slot_size, slot_size))
        return {"slots": slots, "slot_size": slot_size}
    finally:
        await remote.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("repo")
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument("--damage", action="store_true")
    parser.add_argument("--auto", action="store_true")
    parser.add_argument("--token")
    parser.add_argument("--dump-pool", metavar="FILE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.damage:
        real_read = _Plane.read

        def damaged(self: _Plane, slot: int, addr: int, length: int) -> bytes:
            data = bytearray(real_read(self, slot, addr, length))
            data[length // 2] ^= 0xFF
            return bytes(data)

        _Plane.read = damaged  # type: ignore[method-assign]
    if args.dump_pool:
        result = trio.run(dump_pool, args.url, args.repo, args.dump_pool)
    else:
        result = trio.run(read_repo, args.url, args.repo, args.attempts, args.auto, args.token)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
