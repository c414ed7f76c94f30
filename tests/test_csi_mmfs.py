"""End to end: the CSI plugin publishing from a real ``mmfs mount`` (embedded mode,
against the test hub), including a daemon kill and restart under a published target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from csi_driver import csi_pb2 as pb
from csi_driver.mounts import read_mountinfo

sys.path.insert(0, str(Path(__file__).parent))
from test_csi import Plugin, lazy_umount_under, mounted, publish_request, serves, target_in, wait_for  # noqa: E402

REPO = "sentence-transformers/all-MiniLM-L6-v2"
MMFS = shutil.which("mmfs", path=str(Path(sys.executable).parent)) or shutil.which("mmfs")

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(90)]


class MmfsMount:
    def __init__(self, root: Path, cache: Path, hub_url: str, log: Path) -> None:
        self.root, self.cache, self.hub_url, self.log = root, cache, hub_url, log
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in {"HF_TOKEN", "HF_HUB_OFFLINE"}}
        env["HF_ENDPOINT"] = self.hub_url
        argv = [MMFS, "mount", str(self.root), "--cache-dir", str(self.cache), "--cache-size", "1GiB",
                "--memory-cache", "128MiB", "--remote-timeout", "20"]  # fmt: skip
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=logf, env=env)
        repo_dir = self.root / "huggingface" / REPO

        def ready() -> bool:
            assert self.proc.poll() is None, f"mmfs mount exited:\n{self.log.read_text()[-3000:]}"
            live = any(e.mount_point == str(self.root) and e.is_fuse for e in read_mountinfo())
            try:
                return live and (repo_dir / "main").exists()
            except OSError:  # the previous daemon's dead mount, not yet cleared
                return False

        wait_for(ready, timeout=30, what="mmfs mount")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        lazy_umount_under(str(self.root))


@pytest.fixture
def stack(tmp_path, hub):
    if MMFS is None:
        pytest.fail("the mmfs console script is not installed")
    sock_dir = tempfile.mkdtemp(prefix="csi-sock-")
    fs = MmfsMount(tmp_path / "models", tmp_path / "cache", hub.url, tmp_path / "mmfs.log")
    plugin = Plugin(sock_dir, fs.root, tmp_path / "state", tmp_path / "plugin.log",
                    ["--prefetch-command", MMFS], tmp_path / "kubelet")  # fmt: skip
    pods = tmp_path / "kubelet" / "pods"
    try:
        fs.start()
        plugin.start()
        yield {"fs": fs, "plugin": plugin, "pods": pods, "hub": hub, "tmp": tmp_path}
    finally:
        plugin.close()
        lazy_umount_under(str(pods))
        fs.close()
        lazy_umount_under(str(tmp_path))
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_publish_from_real_mmfs_mount_survives_daemon_restart(stack, hub_root):
    fs, node = stack["fs"], stack["plugin"].node
    target = target_in(stack, "pod1")
    ctx = {"repo": REPO, "revision": "main", "prefetch": "true", "csi.storage.k8s.io/ephemeral": "true"}
    node.NodePublishVolume(publish_request(target, ctx=ctx), timeout=60)

    commit = os.readlink(fs.root / "huggingface" / REPO / "main")
    (record,) = json.loads((stack["tmp"] / "state" / "published.json").read_text())["published"]
    assert record["commit"] == commit and len(commit) == 40
    expected = (hub_root / REPO / "config.json").read_bytes()
    assert Path(target, "config.json").read_bytes() == expected
    with open(Path(target, "model.safetensors"), "rb") as f, open(hub_root / REPO / "model.safetensors", "rb") as g:
        assert f.read(1 << 20) == g.read(1 << 20)
    assert "ro" in mounted(target)[0].options.split(",")
    wait_for(lambda: "prefetch pid" in stack["plugin"].log.read_text(), timeout=60, what="prefetch to finish")

    fs.kill()  # the daemon dies under the published target...
    with pytest.raises(OSError):
        os.listdir(target)
    # ...and comes back; the plugin re-binds. mmfs's own stale-mount check (stat of the
    # root) can miss a dead mount whose root attributes the kernel cached, so clear it the
    # way an operator (or a fixed daemon) would before starting again.
    subprocess.run(["umount", "-l", str(fs.root)], check=False, capture_output=True)
    fs.start()
    wait_for(lambda: serves(target), timeout=20, what="re-bind")
    assert Path(target, "config.json").read_bytes() == expected

    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-vol-1", target_path=target), timeout=30)
    assert not os.path.exists(target) and not mounted(target)

