"""The ``mmfs`` command line: argument handling and messages (no mount needed here)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mmfs import cli, warm
from mmfs.errors import InvalidName
from mmfs.names import RepoRef

MMFS = [sys.executable, "-m", "mmfs"]


def test_parse_target() -> None:
    assert warm.parse_target("huggingface/org/name") == warm.Target(RepoRef("huggingface", "org", "name"), "main")
    assert warm.parse_target("org/name@v1.0").revision == "v1.0"
    assert warm.parse_target("huggingface/org/name@" + "a" * 40).revision == "a" * 40
    for bad in ("org", "s3/org/name", "huggingface/../x", "huggingface/org/name@", "a/b/c/d"):
        with pytest.raises(InvalidName):
            warm.parse_target(bad)


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


def test_usage_errors() -> None:
    result = subprocess.run([*MMFS, "mount", "/tmp/x", "--cache-size", "lots"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid size" in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "huggingface/../x", "--mount", "/tmp"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "mmfs prefetch:" in result.stderr


def test_unmount_and_status_without_a_mount(tmp_path) -> None:
    result = subprocess.run([*MMFS, "unmount", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "not mounted" in result.stderr
    result = subprocess.run([*MMFS, "status", "--mount", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "status.json" in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "org/name", "--mount", str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "org/name" in result.stderr


def test_prefetch_backend_gives_up_after_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = subprocess.run([*MMFS, "prefetch", "org/name", "--backend", url, "--timeout", "1"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "did not finish warming within 1 s" in result.stderr and "--timeout" in result.stderr
    result = subprocess.run([*MMFS, "prefetch", "org/name", "--backend", url, "--timeout", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--timeout must be positive" in result.stderr
