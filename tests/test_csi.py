"""The CSI node plugin as a real process, over a real unix socket, with real mounts.

The mount root is a real FUSE filesystem: ``tests/csi_fusefs.py`` (a test helper with
the mmfs layout), so killing it leaves genuinely dead (ENOTCONN) binds and restarting it
is a genuine remount. Needs root and /dev/fuse; skips without /dev/fuse only outside CI.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi_driver import csi_pb2 as pb
from csi_driver import csi_pb2_grpc as pb_grpc
from csi_driver.mounts import read_mountinfo

sys.path.insert(0, str(Path(__file__).parent))
from csi_fusefs import COMMIT_A, COMMIT_B  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "mmfs.csi.dynamo.io"
Mode = pb.VolumeCapability.AccessMode.Mode

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]


def lazy_umount_under(prefix: str) -> None:
    """Detach every mount at or below *prefix*, deepest first."""
    for entry in sorted(read_mountinfo(), key=lambda e: -len(e.mount_point)):
        if entry.mount_point == prefix or entry.mount_point.startswith(prefix + "/"):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True, check=False)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class FuseFs:
    """The test filesystem as a child process, with kill and restart."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str) -> None:
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "csi_fusefs.py"), str(self.root), *args],
            stdout=subprocess.PIPE,
            stderr=logf,
            text=True,
        )
        logf.close()
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"test FUSE fs did not start: {line!r}, see {self.log}"

    def kill(self) -> None:
        """SIGKILL: the mount stays, every access now fails with ENOTCONN."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self, *args: str) -> None:
        """What a restarted daemon does: drop the dead mount, mount afresh."""
        if self.proc and self.proc.poll() is None:
            self.kill()
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True, check=False)
        self.start(*args)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        lazy_umount_under(str(self.root))


class Plugin:
    """``python -m csi_driver`` as a child process and gRPC stubs to it."""

    def __init__(self, sock_dir: str, mount_root: Path, state_dir: Path, log: Path, extra: list[str],
                 kubelet_dir: Path) -> None:
        self.endpoint = f"unix://{sock_dir}/csi.sock"
        self.sock_dir = sock_dir
        self.mount_root = mount_root
        self.state_dir = state_dir
        self.log = log
        self.extra = extra
        self.kubelet_dir = kubelet_dir
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "csi_driver",
            "--endpoint", self.endpoint,
            "--node-id", "node-a",
            "--mount-root", str(self.mount_root),
            "--state-dir", str(self.state_dir),
            "--rebind-interval", "0.2",
            "--fs-timeout", "2",
            "--kubelet-dir", str(self.kubelet_dir),
            *self.extra,
        ]  # fmt: skip
        logf = open(self.log, "a")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=logf, stderr=logf, env=env)
        logf.close()
        self.channel = grpc.insecure_channel(self.endpoint)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=15)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"plugin did not serve {self.endpoint}:\n{self.log.read_text()}") from None
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)

    def kill(self) -> None:
        assert self.proc is not None
        self.channel.close()
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def probe(self) -> bool:
        return self.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value


@pytest.fixture
def env(tmp_path):
    """A live test FUSE mount, a running plugin, and a pods dir for targets."""
    sock_dir = tempfile.mkdtemp(prefix="csi-sock-")  # short: unix socket paths are capped at 108 bytes
    fs = FuseFs(tmp_path / "models", tmp_path / "fusefs.log")
    plugin = Plugin(sock_dir, fs.root, tmp_path / "state", tmp_path / "plugin.log", [], tmp_path / "kubelet")
    pods = tmp_path / "kubelet" / "pods"
    pods.mkdir(parents=True)
    box = {"fs": fs, "plugin": plugin, "pods": pods, "tmp": tmp_path}
    try:
        yield box
    finally:
        box["plugin"].close()
        lazy_umount_under(str(pods))
        fs.close()
        lazy_umount_under(str(tmp_path))
        subprocess.run(["rm", "-rf", sock_dir], check=False)


@pytest.fixture
def up(env):
    env["fs"].start()
    env["plugin"].start()
    return env


def target_in(env, pod: str) -> str:
    """Where kubelet puts the target of a CSI volume of ``pod``."""
    parent = env["pods"] / pod / "volumes" / "kubernetes.io~csi" / "vol"
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent / "mount")  # kubelet makes the parent; the plugin makes the target


def publish_request(target: str, volume_id: str = "csi-vol-1", ctx: dict | None = None, *,
                    mode: int = Mode.MULTI_NODE_READER_ONLY, readonly: bool = True,
                    block: bool = False, capability: bool = True) -> pb.NodePublishVolumeRequest:  # fmt: skip
    if ctx is None:
        ctx = {"repo": "acme/tiny"}
    req = pb.NodePublishVolumeRequest(volume_id=volume_id, target_path=target, readonly=readonly, volume_context=ctx)
    if capability:
        cap = req.volume_capability
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.SetInParent()
        if mode:
            cap.access_mode.mode = mode
    return req


def inline_ctx(**attrs: str) -> dict:
    """volume_context as kubelet sends it for an inline volume with podInfoOnMount."""
    ctx = {
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "worker-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": "0000-1111",
        "csi.storage.k8s.io/serviceAccount.name": "default",
    }
    ctx.update(attrs)
    return ctx


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=20)
    return info.value.code()


def serves(target: str, name: str = "config.json") -> bool:
    """Whether *target* really answers: reads go to the daemon (``os.path.exists`` would
    not do: the kernel answers stat from its attribute cache even after the daemon died)."""
    try:
        with open(os.path.join(target, name), "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def commit_seen(target: str) -> str:
    return json.loads(Path(target, "config.json").read_text())["commit"]


def mounted(path: str) -> list:
    return [e for e in read_mountinfo() if e.mount_point == path]


def records(env) -> list[dict]:
    f = env["tmp"] / "state" / "published.json"
    return json.loads(f.read_text())["published"] if f.exists() else []


# ---- identity and capabilities ----


def test_identity_info_capabilities_and_node_info(up):
    p = up["plugin"]
    info = p.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
    assert info.name == DRIVER and info.vendor_version
    assert list(p.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=5).capabilities) == []
    assert p.probe() is True
    assert p.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=5).node_id == "node-a"
    caps = {c.rpc.type for c in p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=5).capabilities}
    rpc = pb.NodeServiceCapability.RPC.Type
    assert caps == {rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION}  # no STAGE_UNSTAGE: publish only
    ctrl = p.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=5).capabilities
    assert len(ctrl) == 1 and ctrl[0].rpc.type == pb.ControllerServiceCapability.RPC.Type.UNKNOWN
    # The socket dir holds the socket only; the state lives in --state-dir.
    assert os.listdir(p.sock_dir) == ["csi.sock"]


# ---- publish / read / unpublish ----


def test_publish_read_stats_unpublish(up):
    p, target = up["plugin"], target_in(up, "pod1")
    p.node.NodePublishVolume(publish_request(target, ctx=inline_ctx(repo="acme/tiny")), timeout=20)
    assert commit_seen(target) == COMMIT_A
    assert Path(target, "weights", "part-0.bin").read_bytes() == bytes(range(256)) * 64
    (entry,) = mounted(target)
    assert "ro" in entry.options.split(",")
    with pytest.raises(OSError) as info:
        open(Path(target, "new-file"), "w")
    assert info.value.errno == errno.EROFS
    assert [r["commit"] for r in records(up)] == [COMMIT_A]

    stats = p.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1", volume_path=target), timeout=10)
    assert not stats.volume_condition.abnormal
    assert {u.unit for u in stats.usage} == {pb.VolumeUsage.Unit.BYTES, pb.VolumeUsage.Unit.INODES}

    p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-vol-1", target_path=target), timeout=20)
    assert not os.path.exists(target) and not mounted(target)
    assert records(up) == []
    log = p.log.read_text()
    assert "NodePublishVolume volume_id='csi-vol-1'" in log and "-> OK" in log
    assert log.count("NodeUnpublishVolume ") == 1


def test_revision_forms_and_subpath(up):
    node = up["plugin"].node
    cases = [
        ({"repo": "acme/tiny", "revision": "v1"}, COMMIT_B),  # a tag symlink
        ({"repo": "acme/tiny", "revision": COMMIT_B}, COMMIT_B),  # a commit
        ({"repo": "acme/tiny", "provider": "huggingface", "revision": "main"}, COMMIT_A),
    ]
    for i, (ctx, commit) in enumerate(cases):
        target = target_in(up, f"rev{i}")
        node.NodePublishVolume(publish_request(target, f"vol-{i}", ctx), timeout=20)
        assert commit_seen(target) == commit
    target = target_in(up, "sub")
    node.NodePublishVolume(publish_request(target, "vol-sub", {"repo": "acme/tiny", "subPath": "weights"}), timeout=20)
    assert os.listdir(target) == ["part-0.bin"]
    assert records(up)[-1]["source"].endswith(f"/acme/tiny/{COMMIT_A}/weights")


def test_publish_and_unpublish_are_idempotent_and_branch_is_pinned(up):
    fs, p = up["fs"], up["plugin"]
    target = target_in(up, "pod1")
    req = publish_request(target, ctx=inline_ctx(repo="acme/tiny"))
    p.node.NodePublishVolume(req, timeout=20)
    p.node.NodePublishVolume(req, timeout=20)  # same again: OK, nothing stacked
    assert len(mounted(target)) == 1

    # The branch moves (a new commit on main, daemon restarted). The plugin re-binds the
    # stale target to the commit pinned at publish time; a repeated publish keeps it too.
    fs.restart("--main", COMMIT_B)
    wait_for(lambda: serves(target, "config.json"), what="re-bind after restart")
    p.node.NodePublishVolume(req, timeout=20)
    assert commit_seen(target) == COMMIT_A
    # A new pod of the rollout after the move sees the new commit.
    target2 = target_in(up, "pod2")
    p.node.NodePublishVolume(publish_request(target2, "csi-vol-2"), timeout=20)
    assert commit_seen(target2) == COMMIT_B

    unpub = pb.NodeUnpublishVolumeRequest(volume_id="csi-vol-1", target_path=target)
    p.node.NodeUnpublishVolume(unpub, timeout=20)
    p.node.NodeUnpublishVolume(unpub, timeout=20)  # gone already: still OK
    assert not os.path.exists(target) and not mounted(target)
    never = pb.NodeUnpublishVolumeRequest(volume_id="nope", target_path=target_in(up, "never"))
    p.node.NodeUnpublishVolume(never, timeout=20)


def test_access_mode_writer_with_readonly_true_is_accepted(up):
    """kubelet sends SINGLE_NODE_WRITER for inline volumes; readOnly: true makes it a read."""
    target = target_in(up, "inline")
    req = publish_request(target, ctx=inline_ctx(repo="acme/tiny"), mode=Mode.SINGLE_NODE_WRITER, readonly=True)
    up["plugin"].node.NodePublishVolume(req, timeout=20)
    assert commit_seen(target) == COMMIT_A


# ---- error codes ----


def assert_nothing_left(env, target: str) -> None:
    assert not os.path.exists(target), f"{target} left behind"
    assert not mounted(target)
    assert all(r["target_path"] != target for r in records(env))


def test_invalid_argument(up):
    node = up["plugin"].node
    target = target_in(up, "bad")
    cases = {
        "no volume_id": publish_request(target, volume_id=""),
        "no target_path": publish_request(""),
        "relative target_path": publish_request("relative/mount"),
        "no capability": publish_request(target, capability=False),
        "no access mode": publish_request(target, mode=0),
        "no repo": publish_request(target, ctx={"revision": "main"}),
        "repo with ..": publish_request(target, ctx={"repo": "../tiny"}),
        "repo ../..": publish_request(target, ctx={"repo": "acme/.."}),
        "absolute repo": publish_request(target, ctx={"repo": "/etc/passwd"}),
        "repo with NUL": publish_request(target, ctx={"repo": "acme/ti\0ny"}),
        "one-part repo": publish_request(target, ctx={"repo": "tiny"}),
        "unknown provider": publish_request(target, ctx={"repo": "acme/tiny", "provider": "gcs"}),
        "revision ..": publish_request(target, ctx={"repo": "acme/tiny", "revision": ".."}),
        "revision .": publish_request(target, ctx={"repo": "acme/tiny", "revision": "."}),
        "revision ./main": publish_request(target, ctx={"repo": "acme/tiny", "revision": "./main"}),
        "revision .hidden": publish_request(target, ctx={"repo": "acme/tiny", "revision": ".hidden"}),
        "revision escaping": publish_request(target, ctx={"repo": "acme/tiny", "revision": "main/../../x"}),
        "absolute revision": publish_request(target, ctx={"repo": "acme/tiny", "revision": "/main"}),
        "revision with NUL": publish_request(target, ctx={"repo": "acme/tiny", "revision": "ma\0in"}),
        "subPath ..": publish_request(target, ctx={"repo": "acme/tiny", "subPath": "../v1"}),
        "absolute subPath": publish_request(target, ctx={"repo": "acme/tiny", "subPath": "/etc"}),
        "subPath with NUL": publish_request(target, ctx={"repo": "acme/tiny", "subPath": "wei\0ghts"}),
        "subPath is a file": publish_request(target, ctx={"repo": "acme/tiny", "subPath": "config.json"}),
        "bad prefetch": publish_request(target, ctx={"repo": "acme/tiny", "prefetch": "yes please"}),
        "typo in a key": publish_request(target, ctx={"repo": "acme/tiny", "revison": "v1"}),
    }
    wrong = {name: code_of(node.NodePublishVolume, req) for name, req in cases.items()}
    wrong = {name: code for name, code in wrong.items() if code != grpc.StatusCode.INVALID_ARGUMENT}
    assert wrong == {}
    assert_nothing_left(up, target)
    for req in (pb.NodeUnpublishVolumeRequest(target_path=target), pb.NodeUnpublishVolumeRequest(volume_id="v")):
        assert code_of(node.NodeUnpublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v")) == grpc.StatusCode.INVALID_ARGUMENT


def test_targets_outside_kubelets_pod_volumes_are_refused(up):
    """The plugin runs as root: it creates, mounts over, unmounts and removes only targets
    where kubelet puts them, never a directory it is merely told about."""
    node = up["plugin"].node
    elsewhere = up["tmp"] / "elsewhere"
    elsewhere.mkdir()
    keep = up["tmp"] / "keep"
    keep.mkdir()
    (keep / "file").write_text("mine")
    pods = up["pods"]
    for target in (str(elsewhere / "mount"), "/nonexistent/dir", str(pods / "pod1" / "mount"),
                   str(pods / "pod1" / "volumes" / "kubernetes.io~csi" / "vol" / "mount" / "deeper"),
                   str(pods / "pod1" / "volumes" / "kubernetes.io~csi" / ".." / ".." / "x" / "mount"),
                   str(pods / ".." / "pods" / ".." / "mount")):
        assert code_of(node.NodePublishVolume, publish_request(target)) == grpc.StatusCode.INVALID_ARGUMENT, target
        assert not os.path.exists(target), f"{target} was created"
    assert not os.path.exists("/nonexistent")
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(keep))
    assert code_of(node.NodeUnpublishVolume, unpublish) == grpc.StatusCode.INVALID_ARGUMENT
    assert (keep / "file").read_text() == "mine"


def test_volume_stats_only_for_a_published_volume_at_its_path(up):
    node = up["plugin"].node
    target = target_in(up, "pod1")
    node.NodePublishVolume(publish_request(target, volume_id="csi-vol-1"), timeout=20)
    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1", volume_path=target), timeout=10)
    assert not stats.volume_condition.abnormal
    for volume_id, path in (("csi-other", target), ("csi-vol-1", "/proc"), ("csi-vol-1", "relative/path"),
                            ("csi-vol-1", target_in(up, "pod2")), ("csi-vol-1", str(up["tmp"]))):
        request = pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)
        assert code_of(node.NodeGetVolumeStats, request) == grpc.StatusCode.NOT_FOUND, (volume_id, path)


def test_not_found(up):
    node = up["plugin"].node
    target = target_in(up, "missing")
    for ctx in (
        {"repo": "acme/unknown"},
        {"repo": "nobody/tiny"},
        {"repo": "acme/tiny", "revision": "no-such-branch"},
        {"repo": "acme/tiny", "revision": "c" * 40},
        {"repo": "acme/tiny", "subPath": "no/such/dir"},
    ):
        assert code_of(node.NodePublishVolume, publish_request(target, ctx=ctx)) == grpc.StatusCode.NOT_FOUND, ctx
        assert_nothing_left(up, target)
    stats = pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=str(up["pods"] / "nowhere"))
    assert code_of(node.NodeGetVolumeStats, stats) == grpc.StatusCode.NOT_FOUND


def test_already_exists(up):
    node = up["plugin"].node
    target = target_in(up, "pod1")
    node.NodePublishVolume(publish_request(target), timeout=20)
    for req in (
        publish_request(target, volume_id="csi-other"),
        publish_request(target, ctx={"repo": "acme/tiny", "revision": "v1"}),
        publish_request(target, ctx={"repo": "acme/tiny", "subPath": "weights"}),
    ):
        assert code_of(node.NodePublishVolume, req) == grpc.StatusCode.ALREADY_EXISTS
    assert commit_seen(target) == COMMIT_A and len(mounted(target)) == 1
    # A target that something else mounted is not ours to cover.
    foreign = target_in(up, "foreign")
    os.mkdir(foreign)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", foreign], check=True)
    assert code_of(node.NodePublishVolume, publish_request(foreign, "csi-f")) == grpc.StatusCode.ALREADY_EXISTS
    assert len(mounted(foreign)) == 1


def test_failed_precondition_for_writes_and_block(up):
    node = up["plugin"].node
    target = target_in(up, "rw")
    for req in (
        publish_request(target, block=True),
        publish_request(target, mode=Mode.SINGLE_NODE_WRITER, readonly=False),
        publish_request(target, mode=Mode.MULTI_NODE_MULTI_WRITER, readonly=False),
        publish_request(target, mode=Mode.SINGLE_NODE_MULTI_WRITER, readonly=False),
    ):
        assert code_of(node.NodePublishVolume, req) == grpc.StatusCode.FAILED_PRECONDITION
    assert_nothing_left(up, target)


def test_concurrent_operation_on_same_volume_is_aborted(env):
    env["fs"].start("--slow-repo", "acme/slow", "--slow-seconds", "0.8")
    env["plugin"].start()
    node = env["plugin"].node
    target = target_in(env, "slow")
    first: dict = {}

    def publish_slow() -> None:
        try:
            node.NodePublishVolume(publish_request(target, "vol-slow", {"repo": "acme/slow"}), timeout=20)
            first["ok"] = True
        except grpc.RpcError as exc:
            first["error"] = exc.code()

    thread = threading.Thread(target=publish_slow)
    thread.start()
    assert env["fs"].proc.stdout.readline().strip() == "slow lookup"  # the first publish holds the volume now
    other = target_in(env, "slow2")
    assert code_of(node.NodePublishVolume, publish_request(other, "vol-slow", {"repo": "acme/slow"})) == grpc.StatusCode.ABORTED
    unpub = pb.NodeUnpublishVolumeRequest(volume_id="vol-slow", target_path=target)
    assert code_of(node.NodeUnpublishVolume, unpub) == grpc.StatusCode.ABORTED
    thread.join(20)
    assert first == {"ok": True}
    assert not os.path.exists(other)
    node.NodePublishVolume(publish_request(other, "vol-slow-2", {"repo": "acme/tiny"}), timeout=20)  # other volumes unaffected


# ---- dead and restarted FUSE daemon ----


def test_unpublish_cleans_target_of_dead_fuse_daemon(up):
    fs, node = up["fs"], up["plugin"].node
    target = target_in(up, "pod1")
    node.NodePublishVolume(publish_request(target), timeout=20)
    fs.kill()
    with pytest.raises(OSError) as info:
        os.listdir(target)  # (stat may still succeed: the kernel caches attributes)
    assert info.value.errno == errno.ENOTCONN
    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1", volume_path=target), timeout=10)
    assert stats.volume_condition.abnormal
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-vol-1", target_path=target), timeout=20)
    assert not mounted(target) and not os.path.lexists(target)
    assert records(up) == []


def test_probe_not_ready_while_mount_down(up):
    fs, p = up["fs"], up["plugin"]
    wait_for(p.probe, what="probe ready with the mount up")  # a loaded machine may need a moment
    fs.kill()  # dead FUSE connection: stat fails with ENOTCONN
    assert p.probe() is False  # an answer, not a hang (probe's gRPC deadline is the guard)
    subprocess.run(["umount", "-l", str(fs.root)], check=True)  # no mount at all
    assert p.probe() is False
    target = target_in(up, "pod1")
    assert code_of(p.node.NodePublishVolume, publish_request(target)) == grpc.StatusCode.UNAVAILABLE
    assert_nothing_left(up, target)
    fs.start()
    wait_for(p.probe, what="probe ready again once the mount is back")


def test_targets_are_rebound_after_daemon_restart(up):
    fs, node = up["fs"], up["plugin"].node
    targets = [target_in(up, f"pod{i}") for i in range(3)]
    for i, t in enumerate(targets):
        ctx = {"repo": "acme/tiny", "subPath": "weights"} if i == 2 else {"repo": "acme/tiny"}
        node.NodePublishVolume(publish_request(t, f"vol-{i}", ctx), timeout=20)
    fs.kill()
    time.sleep(0.5)  # a few loop passes while down: nothing to do, nothing breaks
    fs.restart()
    for t in targets[:2]:
        wait_for(lambda t=t: serves(t, "config.json"), what=f"re-bind of {t}")
        assert commit_seen(t) == COMMIT_A
        assert len(mounted(t)) == 1 and "ro" in mounted(t)[0].options.split(",")
    wait_for(lambda: serves(targets[2], "part-0.bin"), what="re-bind of subPath target")
    assert "re-bound" in up["plugin"].log.read_text()


def test_plugin_restart_reloads_record_and_rebinds(up):
    fs, p = up["fs"], up["plugin"]
    target = target_in(up, "pod1")
    p.node.NodePublishVolume(publish_request(target), timeout=20)
    p.kill()  # plugin dies; the bind stays
    assert commit_seen(target) == COMMIT_A
    fs.restart("--main", COMMIT_B)  # and the daemon restarts while the plugin is down
    p.start()
    wait_for(lambda: serves(target, "config.json"), what="re-bind on plugin start")
    assert commit_seen(target) == COMMIT_A  # the pinned commit, from the record
    p.node.NodePublishVolume(publish_request(target), timeout=20)  # still idempotent after restart
    p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-vol-1", target_path=target), timeout=20)
    assert not os.path.exists(target) and records(up) == []


# ---- kernel tuning and prefetch ----


def test_read_ahead_is_set_on_the_fuse_device(env):
    env["fs"].start()
    env["plugin"].extra = ["--read-ahead-kb", "4096"]
    (entry,) = [e for e in read_mountinfo() if e.mount_point == str(env["fs"].root)]
    knob = Path("/sys/class/bdi", entry.device, "read_ahead_kb")
    if not os.access(knob, os.W_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{knob} is not writable, and CI is set: the read-ahead knob must be tested in CI")
        pytest.skip(f"{knob} is not writable here")
    knob.write_text("128\n")
    env["plugin"].start()
    wait_for(lambda: knob.read_text().strip() == "4096", what="read_ahead_kb = 4096")


def test_prefetch_runs_in_background(env, tmp_path):
    called = tmp_path / "prefetch-args"
    fake = tmp_path / "fake-mmfs"
    pidfile = tmp_path / "prefetch-pid"
    fake.write_text(f'#!/bin/sh\necho $$ > {pidfile}\necho "$@" > {called}\nexec sleep 30\n')
    fake.chmod(0o755)
    env["fs"].start()
    env["plugin"].extra = ["--prefetch-command", str(fake)]
    env["plugin"].start()
    target = target_in(env, "pod1")
    env["plugin"].node.NodePublishVolume(publish_request(target, ctx={"repo": "acme/tiny", "prefetch": "true"}), timeout=20)
    wait_for(called.exists, what="prefetch command")
    os.kill(int(pidfile.read_text()), 0)  # publish answered while the prefetch (sleep 30) still runs
    assert called.read_text().split() == ["prefetch", f"huggingface/acme/tiny@{COMMIT_A}", "--mount", str(env["fs"].root)]
    os.kill(int(pidfile.read_text()), signal.SIGTERM)  # the fake's own pid (exec kept it)
