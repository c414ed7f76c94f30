"""The committed gRPC stubs match csi.proto; the proto keeps the spec's field numbers;
volume attributes and mountinfo parsing, without mounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from csi_driver import csi_pb2 as pb
from csi_driver.gen_proto import stale_outputs
from csi_driver.mounts import read_mountinfo
from csi_driver.volumes import InvalidVolume, VolumeSpec, parse_volume_context

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current():
    assert stale_outputs() == [], "run: python -m csi_driver.gen_proto"


def test_field_numbers_follow_the_spec():
    def numbers(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert pb.DESCRIPTOR.package == "csi.v1"
    assert numbers(pb.NodePublishVolumeRequest) == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8,
    }  # fmt: skip
    assert numbers(pb.VolumeCapability) == {"block": 1, "mount": 2, "access_mode": 3}
    assert numbers(pb.GetPluginInfoResponse) == {"name": 1, "vendor_version": 2, "manifest": 3}
    assert numbers(pb.NodeGetInfoResponse) == {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}
    assert numbers(pb.VolumeUsage) == {"available": 1, "total": 2, "used": 3, "unit": 4}
    assert numbers(pb.NodeGetVolumeStatsResponse) == {"usage": 1, "volume_condition": 2}
    assert pb.VolumeCapability.AccessMode.Mode.Value("SINGLE_NODE_MULTI_WRITER") == 7
    assert pb.NodeServiceCapability.RPC.Type.Value("VOLUME_CONDITION") == 4
    services = {s.name: [m.name for m in s.methods] for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services["Identity"] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert services["Controller"] == ["ControllerGetCapabilities"]


def test_volume_attributes_defaults_and_validation():
    assert parse_volume_context({"repo": "acme/tiny"}) == VolumeSpec("huggingface", "acme/tiny", "main", "", False)
    spec = parse_volume_context(
        {"repo": "acme/tiny", "revision": "refs/pr/1", "subPath": "a/b/", "prefetch": "True", "csi.storage.k8s.io/pod.name": "p"}
    )
    assert spec == VolumeSpec("huggingface", "acme/tiny", "refs/pr/1", "a/b", True)
    for bad in ({}, {"repo": "acme/tiny", "subPath": "a/../../b"}, {"repo": "acme/tiny", "other": "x"}):
        with pytest.raises(InvalidVolume):
            parse_volume_context(bad)


def test_mountinfo_unescapes_paths(tmp_path):
    f = tmp_path / "mountinfo"
    f.write_text("36 35 0:42 / /var/lib/my\\040pods\\134x rw,relatime shared:1 - fuse mmfs rw,user_id=0\n")
    (entry,) = read_mountinfo(str(f))
    assert (entry.mount_point, entry.device, entry.fs_type, entry.is_fuse) == ("/var/lib/my pods\\x", "0:42", "fuse", True)


def test_csi_driver_does_not_import_the_data_path():
    code = "import sys, csi_driver.cli, csi_driver.server; print(sorted(m for m in sys.modules if m.startswith('mmfs')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert set(eval(out)) <= {"mmfs", "mmfs.names", "mmfs.errors", "mmfs.options", "mmfs.sizes"}


def test_cli_refuses_bad_arguments(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "csi_driver", *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    assert run("--endpoint", "unix:///x.sock").returncode == 2  # no --node-id
    bad = run("--node-id", "n", "--endpoint", "tcp://0:1", "--state-dir", str(tmp_path))
    assert bad.returncode == 2 and "unix://" in bad.stderr
