"""The backend under upstream faults: corrupted bytes, 5xx answers and connection resets
(injected by the test hub), against ``mmfs-backend serve`` as a child process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from backend_server.testing import BackendProcess
from mmfs.chunkmap import block_digests
from mmfs.remote.backend import VERIFIED_HEADER
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture
def repo(hub_root: Path) -> dict[str, bytes]:
    root = make_synthetic_model(hub_root / "org" / "faulty", 2 << 20, n_shards=1)
    return {p.name: p.read_bytes() for p in (root / SHARD, root / "config.json")}


@pytest.fixture
def backend(tmp_path: Path, hub: TestHub, repo: dict[str, bytes]) -> Iterator[BackendProcess]:
    with BackendProcess(tmp_path / "data", hub_url=hub.url, chunk_size="256KiB") as running:
        yield running


def file_url(backend: BackendProcess, path: str) -> str:
    return f"{backend.url}/v1/file/huggingface/org/faulty/main/{path}"


def read_streamed(url: str) -> tuple[int, bytes, Exception | None]:
    """Status, what arrived, and the error that cut the body short (if any)."""
    received = bytearray()
    with httpx.Client(timeout=60) as client:
        with client.stream("GET", url) as response:
            try:
                for block in response.iter_raw():
                    received += block
            except httpx.HTTPError as exc:
                return response.status_code, bytes(received), exc
            return response.status_code, bytes(received), None


def file_record(backend: BackendProcess, data: bytes) -> dict:
    records = {r["content_id"]: r for r in json.loads(backend.get("/v1/files"))["files"]}
    return records[f"sha256-{hashlib.sha256(data).hexdigest()}"]


def test_corrupted_upstream_is_an_error_and_never_cached(hub: TestHub, backend: BackendProcess,
                                                         repo: dict[str, bytes]) -> None:
    data = repo[SHARD]
    hub.set_faults(corrupt=[SHARD, "config.json"])

    # A multi-chunk file: headers went out, so the body is cut short (never complete).
    status, received, error = read_streamed(file_url(backend, SHARD))
    assert status == 200 and error is not None, "a corrupted file must not arrive complete"
    last_chunk = len(data) % (256 << 10) or 256 << 10
    assert len(received) <= len(data) - last_chunk  # the last chunk was held back

    # A one-chunk file: the failure is known before the headers, so it is a 502.
    response = httpx.get(file_url(backend, "config.json"))
    assert response.status_code == 502 and response.headers["X-Error-Code"] == "IntegrityError"
    assert "does not match" in response.json()["error"]

    # The node protocol: the last chunk of a file that fails verification is never served.
    commit = hub.commit("org/faulty")
    last = len(data) // (256 << 10)
    response = httpx.get(f"{backend.url}/v1/chunk/huggingface/org/faulty/{commit}/{SHARD}?index={last}")
    assert response.status_code == 502 and response.headers["X-Error-Code"] == "IntegrityError"

    metrics = backend.metrics()
    assert metrics["mmfs_backend_integrity_failures_total"] >= 2
    assert metrics["mmfs_backend_aborted_responses_total"] >= 1
    record = file_record(backend, data)
    assert not record["verified"] and record["failures"] >= 1 and "mismatch" in record["last_failure"]
    assert "integrity" in backend.log_text()

    # Nothing was kept as good: with the fault gone, the bytes come from upstream again, correct.
    hub.clear_faults()
    hub.reset_stats()
    status, received, error = read_streamed(file_url(backend, SHARD))
    assert (status, error) == (200, None) and received == data
    assert httpx.get(file_url(backend, "config.json")).content == repo["config.json"]
    assert hub.stats().bytes_served >= len(data) + len(repo["config.json"])
    record = file_record(backend, data)
    assert record["verified"] and record["inflight_download"] == ""


def test_upstream_5xx_and_resets_are_retried(hub: TestHub, backend: BackendProcess,
                                             repo: dict[str, bytes]) -> None:
    hub.set_faults(fail_next=2, fail_status=503)  # below the retry budget (4 attempts)
    response = httpx.get(file_url(backend, "config.json"), timeout=30)
    assert response.status_code == 200 and response.content == repo["config.json"]
    assert hub.stats().faults.get("failed") == 2

    hub.set_faults(reset_next=2)  # half a body, then a TCP reset
    status, received, error = read_streamed(file_url(backend, SHARD))
    assert (status, error) == (200, None) and received == repo[SHARD]
    assert hub.stats().faults.get("reset") == 2


@pytest.mark.timeout(60)  # hang guard: the retry budget ends in an answer
def test_upstream_failing_past_the_retry_budget_is_a_clear_error(hub: TestHub, backend: BackendProcess,
                                                                 repo: dict[str, bytes]) -> None:
    httpx.get(f"{backend.url}/v1/manifest/huggingface/org/faulty/main").raise_for_status()
    hub.set_faults(fail_next=1000, fail_status=500)
    response = httpx.get(file_url(backend, "config.json"), timeout=60)
    assert response.status_code == 502 and response.headers["X-Error-Code"] == "UpstreamError"
    assert "failed after 4 attempts" in response.json()["error"]
    assert 4 <= hub.stats().faults.get("failed", 0)
    hub.clear_faults()
    assert httpx.get(file_url(backend, "config.json")).content == repo["config.json"]


def test_chunk_map_follows_the_bytes_after_a_purge(hub: TestHub, backend: BackendProcess,
                                                   repo: dict[str, bytes]) -> None:
    data = repo[SHARD]
    size = 256 << 10
    path = f"huggingface/org/faulty/{hub.commit('org/faulty')}/{SHARD}"
    base = f"{backend.url}/v1/chunk/{path}"
    hub.set_faults(corrupt=[SHARD])
    bad = httpx.get(f"{base}?index=0")
    assert bad.status_code == 200 and bad.content != data[:size]  # not the last chunk: served provisionally
    assert VERIFIED_HEADER not in bad.headers
    pending = httpx.get(f"{backend.url}/v1/map/{path}")  # not verified, and not asked to wait
    assert pending.status_code == 202 and pending.json()["size"] == len(data)
    response = httpx.get(f"{base}?index={(len(data) - 1) // size}")
    assert response.status_code == 502 and response.headers["X-Error-Code"] == "IntegrityError"  # purged
    failed = httpx.get(f"{backend.url}/v1/map/{path}?wait=5", timeout=60)  # verifies afresh: still corrupt
    assert failed.status_code == 502 and failed.headers["X-Error-Code"] == "IntegrityError"

    hub.clear_faults()
    chunk_map = httpx.get(f"{backend.url}/v1/map/{path}?wait=20", timeout=60)
    assert chunk_map.status_code == 200
    expected = b"".join(block_digests(data[i:i + size]) for i in range(0, len(data), size))
    assert chunk_map.content == expected  # the map of the true bytes, never of the corrupt copy
    good = httpx.get(f"{base}?index=0")
    assert good.status_code == 200 and good.content == data[:size] and good.headers[VERIFIED_HEADER] == "1"
