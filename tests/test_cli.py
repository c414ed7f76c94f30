"""The ``mmfs`` command line: argument handling and messages (no mount needed here)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mmfs import cli, options, warm
from mmfs.errors import InvalidName
from mmfs.names import RepoRef

MMFS = [sys.executable, "-m", "mmfs"]


def test_parse_target() -> None:
    assert warm.parse_target("huggingface/org/name") == warm.Target(RepoRef("huggingface", "org", "name"), "main")
    assert warm.parse_target("org/name@v1.0").revision == "v1.0"
    assert warm.parse_target("huggingface/org/name@" + "a" * 40).revision == "a" * 40
    assert warm.parse_target("s3/bucket/org/name") == warm.Target(RepoRef("s3", "bucket", "org/name"), "latest")
    for bad in ("org", "gcs/org/name", "s3/bucket", "huggingface/../x", "huggingface/org/name@", "a/b/c/d",
                "huggingface/org"):
        with pytest.raises(InvalidName):
            warm.parse_target(bad)
    with pytest.raises(InvalidName, match="expected huggingface/<org>/<name>"):
        warm.parse_target("huggingface/org")


def test_include_globs_match_paths_and_names() -> None:
    assert warm.matches("model-00001-of-00002.safetensors", ["*.safetensors"])
    assert warm.matches("1_Pooling/config.json", ["config.json"])
    assert warm.matches("1_Pooling/config.json", ["1_Pooling/*"])
    assert not warm.matches("tokenizer.json", ["*.safetensors", "config.json"])
    assert warm.matches("anything", [])


def test_format_status() -> None:
    status = {"mountpoint": "/m", "mode": "backend", "backend": "http://b:3000", "pid": 1, "uptime_s": 5,
              "repos": [{"repo": "huggingface/o/n", "refs": {"main": "c" * 40},
                         "commits": [{"commit": "c" * 40, "files": 2, "bytes": 2048}]}],
              "tiers": [{"name": "memory", "hits": 3, "misses": 1, "used_bytes": 10, "limit_bytes": 100,
                         "entries": 1, "evictions": 0, "errors": 0, "hit_rate": 0.75}],
              "remote": {"url": "http://b:3000", "bytes": 4096, "fetches": 1}, "integrity": {"failures": 2}}
    text = cli.format_status(status)
    assert "backend http://b:3000" in text and f"main -> {'c' * 40}" in text
    assert "hit rate 75.0%" in text and "2 failures" in text
    status["cache_problems"] = ["cannot open chunk cache at /c/chunks: [Errno 20] Not a directory"]
    assert "unavailable: cannot open chunk cache at /c/chunks" in cli.format_status(status)
    status["peers"] = {"node": "http://10.0.0.2:3001", "chunks_from_peers": 3, "bytes_from_peers": 3 << 20,
                       "chunks_from_backend": 1, "bytes_from_backend": 1 << 20, "chunks_served": 2,
                       "bytes_served": 2 << 20, "fallbacks": 1, "bad_peers": 1}
    assert "peers: node http://10.0.0.2:3001: from peers 3.0 MiB in 3 chunks" in cli.format_status(status)


def test_usage_errors() -> None:
    result = subprocess.run([*MMFS, "mount", "/tmp/x", "--cache-size", "lots"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid size" in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "huggingface/../x", "--mount", "/tmp"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "mmfs prefetch:" in result.stderr


@pytest.mark.parametrize("argv,message", [
    (["mount", ""], "argument MOUNTPOINT: must not be empty"),
    (["mount", "/tmp/m", "--backend", "127.0.0.1:18091"], "--backend: invalid replica URL '127.0.0.1:18091'"),
    (["mount", "/tmp/m", "--backend", "htp:/x"], "--backend: invalid replica URL 'htp:/x'"),
    (["mount", "/tmp/m", "--backend", "http://host:99999"], "--backend: invalid port in replica URL"),
    (["mount", "/tmp/m", "--chunk-size", "0"], "--chunk-size: '0' is out of range: must be from 64KiB to 256MiB"),
    (["mount", "/tmp/m", "--chunk-size", "1"], "--chunk-size: '1' is out of range"),
    (["mount", "/tmp/m", "--chunk-size", "1GiB"], "--chunk-size: '1GiB' is out of range"),
    (["mount", "/tmp/m", "--read-ahead", "1TB"], "--read-ahead: '1TB' is out of range: must be from 4KiB to 1GiB"),
    (["mount", "/tmp/m", "--remote-timeout", "nan"], "--remote-timeout: seconds must be a positive number"),
    (["mount", "/tmp/m", "--max-tasks", "0"], "--max-tasks: 0 is out of range"),
    (["mount", "/tmp/m", "--transport", "nixl"], "--transport nixl needs --backend"),
    (["mount", "/tmp/m", "--peer-listen", "127.0.0.1:3001"], "--peer-listen needs --backend"),
    (["mount", "/tmp/m", "--backend", "http://b:1", "--peer-listen", "127.0.0.1:0"], "--peer-listen needs a fixed port"),
    (["mount", "/tmp/m", "--backend", "http://b:1", "--peer-listen", "3001"], "--peer-listen: invalid address '3001'"),
    (["mount", "/tmp/m", "--backend", "http://b:1", "--peer-listen", "h:1", "--peer-labels", "zone"],
     "--peer-labels: peer label 'zone' is not KEY=VALUE"),
    (["mount", "/tmp/m", "--backend", "http://b:1", "--peer-listen", "h:1", "--peer-advertise", "h:1"],
     "--peer-advertise: invalid URL 'h:1'"),
    (["mount", "/tmp/m", "--backend", "http://b:1", "--peer-labels", "zone=a"], "need --peer-listen"),
    (["prefetch", "org/name", "--jobs", "0"], "--jobs/-j: 0 is out of range: must be from 1 to 1024"),
    (["prefetch", "org/name", "--jobs", "²"], "--jobs/-j: invalid whole number '²'"),
    (["prefetch", "org/name", "--backend", "localhost:3000"], "--backend: invalid URL 'localhost:3000'"),
    (["prefetch", "org/name", "--mount", ""], "--mount: must not be empty"),
])
def test_bad_options_are_refused_at_start_with_one_line(argv: list[str], message: str) -> None:
    result = subprocess.run([*MMFS, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"mmfs {argv[0]}: error: ")


@pytest.mark.parametrize("command", [["mmfs"], ["backend_server.cli"], ["csi_driver"]])
def test_every_command_tells_its_version(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *command, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split()[-1] == options.package_version() != "0.0.0+unknown"


def test_mountpoint_must_be_an_empty_directory(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    for mountpoint, message in ((a_file, f"{a_file} is not a directory"),
                                (a_file / "below", f"cannot create the mountpoint {a_file / 'below'}: Not a directory"),
                                (full, f"{full} is not empty (its files would be hidden while mounted); use an "
                                       "empty directory or pass --nonempty")):
        result = subprocess.run([*MMFS, "mount", str(mountpoint), "--cache-dir", str(tmp_path / "cache")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"mmfs mount: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert (full / "keep").read_text() == "mine" and a_file.read_text() == "x"


def test_unmount_and_status_without_a_mount(tmp_path) -> None:
    result = subprocess.run([*MMFS, "unmount", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "not mounted" in result.stderr
    for command in (["status"], ["prefetch", "org/name"]):
        result = subprocess.run([*MMFS, *command, "--mount", str(tmp_path)], capture_output=True, text=True)
        assert result.returncode == 1
        assert f"{tmp_path} is not an mmfs mount (not a mount); start one with 'mmfs mount {tmp_path}'" \
            in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "org/name", "--mount", "/proc"], capture_output=True, text=True)
    assert result.returncode == 1 and "/proc is not an mmfs mount (a proc mount)" in result.stderr


def test_prefetch_backend_gives_up_after_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = subprocess.run([*MMFS, "prefetch", "org/name", "--backend", url, "--timeout", "1"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "did not finish warming within 1 s" in result.stderr and "--timeout" in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "org/name", "--backend", url, "--timeout", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--timeout: seconds must be a positive number, not '0'" in result.stderr


def test_format_status_shows_the_transport_and_why() -> None:
    status = {"mountpoint": "/m", "mode": "backend", "backend": "http://b:3000", "pid": 1, "uptime_s": 5,
              "transport": "tcp", "transport_requested": "auto",
              "transport_reason": "--transport auto: no RDMA device on this node"}
    assert "transport: tcp (--transport auto): --transport auto: no RDMA device on this node" in \
        cli.format_status(status)
    status.update(transport="nixl", transport_requested="nixl", transport_reason="NIXL data plane on: agent a",
                  nixl={"chunks": 3, "bytes": 3 << 20, "fallbacks": 1})
    assert "transport: nixl (--transport nixl): NIXL data plane on: agent a; over NIXL so far: 3.0 MiB in 3 " \
           "chunks, 1 fallbacks to TCP" in cli.format_status(status)
    assert "transport" not in cli.format_status({"mode": "embedded"})


def test_rdma_devices(tmp_path) -> None:
    from mmfs.remote.nixl import rdma_devices

    assert rdma_devices(str(tmp_path / "missing")) == []
    (tmp_path / "mlx5_1").mkdir()
    (tmp_path / "mlx5_0").mkdir()
    assert rdma_devices(str(tmp_path)) == ["mlx5_0", "mlx5_1"]


@pytest.mark.parametrize("requested,rdma,installed,kind,why", [
    ("tcp", ["mlx5_0"], True, "tcp", "--transport tcp"),
    ("auto", [], True, "tcp", "no RDMA device on this node"),
    ("auto", ["mlx5_0"], False, "tcp", "nixl-cu12) is not installed"),
    ("auto", ["mlx5_0"], True, "nixl", "RDMA device mlx5_0 here; NIXL once the backend announces RDMA too"),
    ("nixl", [], True, "nixl", "--transport nixl"),
])
def test_transport_auto_is_tcp_unless_rdma(monkeypatch: pytest.MonkeyPatch, requested: str, rdma: list[str],
                                           installed: bool, kind: str, why: str) -> None:
    """--transport auto picks NIXL only with an RDMA device here (and the package); the
    NIXL remote then also needs the backend to announce RDMA (tests/test_nixl.py)."""
    from mmfs import daemon
    from mmfs.remote import nixl

    monkeypatch.setattr(nixl, "rdma_devices", lambda root=nixl.RDMA_SYSFS: rdma)
    monkeypatch.setattr(nixl, "nixl_available", lambda: installed)
    options = daemon.MountOptions("/m", backend="http://b:3000", transport=requested)
    choice = daemon.choose_transport(options)
    assert (choice.requested, choice.kind) == (requested, kind) and why in choice.reason
    remote = daemon.make_remote(options, choice)
    assert type(remote).__name__ == ("NixlBackendRemote" if kind == "nixl" else "BackendRemote")
    status = daemon.transport_status(remote, choice)
    assert (status["requested"], status["in_use"]) == (requested, kind)
    assert daemon.mode_text(options, choice) == f"backend http://b:3000, transport {kind} ({choice.brief})"


def test_transport_nixl_without_the_package_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfs import daemon
    from mmfs.errors import MmfsError
    from mmfs.remote import nixl

    monkeypatch.setattr(nixl, "nixl_available", lambda: False)
    with pytest.raises(MmfsError, match="nixl-cu12"):
        daemon.choose_transport(daemon.MountOptions("/m", backend="http://b:3000", transport="nixl"))
