"""Inside the built image (run by scripts/build-image.sh --check, chrooted into its root):
start the test hub from the image's Python, `mmfs mount` embedded with --cache-dir, read a
file twice (cold: lazy; warm: a new open once the file is complete) and compare sha256.

Usage: python image-check.py CACHE_DIR   (CACHE_DIR: not on overlayfs, for passthrough)
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from mmfs.testing.hub import TestHub
from mmfs.testing.mount import MountProcess


def main() -> int:
    cache_dir = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp(prefix="mmfs-image-check-"))
    repo = work / "hub" / "org" / "model"
    repo.mkdir(parents=True)
    data = os.urandom(24 * 1024 * 1024 + 12345)  # LFS (>= 1 MiB), several 4 MiB chunks and a tail
    (repo / "model.bin").write_bytes(data)
    (repo / "config.json").write_text('{"hidden_size": 8}\n')
    want = hashlib.sha256(data).hexdigest()
    with TestHub(work / "hub") as hub:
        mount = MountProcess(work / "models", cache_dir / "cache", hub_url=hub.url, log_path=work / "mount.log")
        mount.argv[:3] = ["mmfs"]  # the console script on the image's PATH, not python -m
        with mount:
            print(f"image-check: {mount.ready_line}")
            path = mount.repo("org/model") / "model.bin"
            cold = hashlib.sha256(path.read_bytes()).hexdigest()
            warm = hashlib.sha256(path.read_bytes()).hexdigest()
            config = (mount.repo("org/model") / "config.json").read_text()
            status = mount.status()
        print(f"image-check: log tail:\n{mount.log_text()[-1500:]}")
    ok = cold == want and warm == want and '"hidden_size"' in config
    passthrough = status.get("passthrough") or {}
    if passthrough.get("enabled") and not passthrough.get("opens"):
        print("image-check: passthrough is on, but the warm open of the complete file did not use it")
        ok = False
    print(f"image-check: sha256 want {want[:16]} cold {cold[:16]} warm {warm[:16]}; "
          f"passthrough {status.get('passthrough')!r}")
    print("image-check: OK" if ok else "image-check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
