"""The test hub answers as the real Hub does where mmfs depends on it, and mmfs copes.

Statuses and codes as huggingface.co sends them (and as huggingface_hub reads them):
unknown and private repos are 401 ``RepoNotFound`` to anonymous callers (404 with a
token), gated content is 401/403 ``GatedRepo`` while gated metadata is public, rate
limits are 429 with ``Retry-After``, and Xet-backed repos announce their CAS. Then the
product against those answers: errors mapped by code before status, ``Retry-After``
waited for, and no Xet header passed on to clients of the backend.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from backend_server.testing import BackendProcess
from mmfs.errors import AccessDenied, InvalidName, NotFound, RepoNotFound, TransientError, UpstreamError, from_http
from mmfs.names import parse_repo_id
from mmfs.remote._http import RetryPolicy
from mmfs.remote.base import FileSource
from mmfs.remote.hub import HubRemote
from mmfs.testing.hub import TestHub
from mmfs.testing.models import make_synthetic_model

SHARD = "model-00001-of-00001.safetensors"


def restricted(hub_root: Path, name: str, kind: str, token: str) -> Path:
    repo = make_synthetic_model(hub_root / "org" / name, 2 << 20, n_shards=1)
    (repo / ".hub").mkdir()
    (repo / ".hub" / kind).write_text(token)
    return repo


def test_unknown_private_and_gated_repos_answer_as_the_hub(hub: TestHub, hub_root: Path) -> None:
    restricted(hub_root, "secret", "private", "tok-p")
    restricted(hub_root, "gate", "gated", "tok-g")
    anonymous, other = {}, {"Authorization": "Bearer nobody"}
    for name in ("missing", "secret"):  # a private repo is indistinguishable from a missing one
        for headers, status in ((anonymous, 401), (other, 404)):
            for target in (f"/api/models/org/{name}", f"/org/{name}/resolve/main/config.json"):
                response = httpx.head(hub.url + target, headers=headers) if "resolve" in target \
                    else httpx.get(hub.url + target, headers=headers)
                assert (response.status_code, response.headers["X-Error-Code"]) == (status, "RepoNotFound"), target
    assert httpx.get(f"{hub.url}/api/models/org/secret", headers={"Authorization": "Bearer tok-p"}).json()["private"]
    # Gated: metadata public, content 401 without a token, 403 with one not on the list.
    assert httpx.get(f"{hub.url}/api/models/org/gate").json()["gated"] == "manual"
    resolve = f"{hub.url}/org/gate/resolve/main/config.json"
    assert [(r.status_code, r.headers["X-Error-Code"]) for r in (httpx.head(resolve), httpx.head(resolve, headers=other))] \
        == [(401, "GatedRepo"), (403, "GatedRepo")]
    assert httpx.head(resolve, headers={"Authorization": "Bearer tok-g"}).status_code == 200
    # huggingface_hub reads them as the Hub's.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("org/secret", token=False)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gate", "config.json", endpoint=hub.url, token=False, cache_dir=hub_root.parent / "c")


def test_errors_are_mapped_by_code_before_status() -> None:
    """The Hub's 401 means "not found" when it says ``RepoNotFound``; its status alone lies."""
    assert type(from_http(401, "", "RepoNotFound")) is RepoNotFound
    assert type(from_http(404, "", "GatedRepo")) is AccessDenied
    assert type(from_http(401, "")) is AccessDenied and type(from_http(404, "")) is NotFound
    assert type(from_http(429, "")) is TransientError and type(from_http(400, "")) is InvalidName
    assert type(from_http(418, "")) is UpstreamError


async def test_the_hub_remote_against_hub_answers(hub: TestHub, hub_root: Path) -> None:
    restricted(hub_root, "secret", "private", "tok-p")
    restricted(hub_root, "gate", "gated", "tok-g")
    remote = HubRemote(hub.url, token="", policy=RetryPolicy(attempts=1))
    try:
        for name in ("missing", "secret"):
            with pytest.raises(RepoNotFound):
                await remote.resolve(parse_repo_id(f"org/{name}"), "main")
        gate = parse_repo_id("org/gate")
        manifest = await remote.manifest(gate, await remote.resolve(gate, "main"))  # public metadata
        source = FileSource(gate, manifest.commit, manifest.file("config.json"))
        with pytest.raises(AccessDenied):
            await remote.fetch_chunk(source, 0)
        assert await remote.check_access(source, auth="Bearer tok-g") == "gated"
        with pytest.raises(AccessDenied):
            await remote.check_access(source, auth="Bearer nobody")
    finally:
        await remote.aclose()


async def test_a_rate_limit_is_waited_out_as_retry_after_asks(hub: TestHub) -> None:
    retry_after = 1
    hub.set_faults(throttle_next=1, retry_after=retry_after)
    policy = RetryPolicy(attempts=2, backoff=0.01)  # the backoff alone would retry at once
    remote = HubRemote(hub.url, token="", policy=policy)
    try:
        started = trio.current_time()
        commit = await remote.resolve(parse_repo_id("sentence-transformers/all-MiniLM-L6-v2"), "main")
        waited = trio.current_time() - started
    finally:
        await remote.aclose()
    assert len(commit) == 40 and hub.stats().faults == {"throttled": 1}
    assert waited >= retry_after  # not sooner than the Hub asked


def test_a_xet_backed_repo_reads_through_the_backend_without_xet(hub: TestHub, hub_root: Path,
                                                                 tmp_path: Path) -> None:
    repo = make_synthetic_model(hub_root / "org" / "xet", 2 << 20, n_shards=1)
    (repo / ".hub").mkdir()
    (repo / ".hub" / "xet").write_text("")
    commit = hub.commit("org/xet")
    # The hub announces Xet as huggingface.co does: a hash, an auth link, tree hashes, a CAS.
    direct = httpx.head(f"{hub.url}/org/xet/resolve/main/{SHARD}")
    assert direct.status_code == 302 and len(direct.headers["X-Xet-Hash"]) == 64
    assert f"/api/models/org/xet/xet-read-token/{commit}>" in direct.headers["Link"]
    assert 'rel="xet-auth"' in direct.headers["Link"]
    tree = httpx.get(f"{hub.url}/api/models/org/xet/tree/main").json()
    assert all(len(e["xetHash"]) == 64 for e in tree if "lfs" in e)
    token = httpx.get(f"{hub.url}/api/models/org/xet/xet-read-token/{commit}")
    assert token.status_code == 200 and token.headers["X-Xet-Cas-Url"] == token.json()["casUrl"]
    # The backend builds its own answers: no Xet header sends its clients around it (to a
    # CAS they may not reach), and huggingface_hub (with hf_xet installed) downloads from it.
    with BackendProcess(tmp_path / "backend", hub_url=hub.url) as backend:
        answer = httpx.head(f"{backend.url}/org/xet/resolve/main/{SHARD}")
        assert answer.status_code == 200 and "X-Xet-Hash" not in answer.headers
        assert "xet-auth" not in answer.headers.get("Link", "")
        assert "xetHash" not in httpx.get(f"{backend.url}/api/models/org/xet/tree/main").text
        path = hf_hub_download("org/xet", SHARD, endpoint=backend.url, cache_dir=tmp_path / "client")
        assert Path(path).read_bytes() == (repo / SHARD).read_bytes()
