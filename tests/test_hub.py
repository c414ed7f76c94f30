"""The test hub against the official huggingface_hub client and raw HTTP, on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open

from mmfs.testing.hub import Faults, HubClient, HubProcess, HubStats, TestHub
from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model, real_model_dir

REPO = REAL_REPO_ID
LFS_FILE = "model.safetensors"


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def source(path: str) -> bytes:
    return (real_model_dir() / path).read_bytes()


def raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A GET that sends ``path`` exactly as given (httpx would normalise ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture
def client(hub: TestHub):
    with httpx.Client(base_url=hub.url, timeout=10) as c:
        yield c


# -- the official client ------------------------------------------------------------------


def test_snapshot_download_is_byte_identical(hub: TestHub, tmp_path: Path) -> None:
    folder = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url))
    assert folder.name == hub.commit(REPO)
    src = real_model_dir()
    expected = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == expected
    assert "1_Pooling/config.json" in got and ".gitattributes" in got
    for rel in expected:
        assert (folder / rel).read_bytes() == source(rel), rel


def test_hf_hub_download_regular_lfs_and_subfolder(hub: TestHub, tmp_path: Path) -> None:
    for name in (LFS_FILE, "1_Pooling/config.json", "vocab.txt"):
        path = hf_hub_download(REPO, name, cache_dir=tmp_path / "cache", endpoint=hub.url)
        assert Path(path).read_bytes() == source(name)
    stats = hub.stats()
    assert stats.requests_by_kind["lfs_get"] == 1  # the LFS file came from the CDN origin
    assert stats.bytes_by_path[f"{REPO}/{LFS_FILE}"] == len(source(LFS_FILE))


def test_model_info_and_tree_shapes(hub: TestHub) -> None:
    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO, files_metadata=True)
    assert info.id == REPO and info.sha == hub.commit(REPO) and info.private is False and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings}
    weights = source(LFS_FILE)
    assert siblings[LFS_FILE].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings[LFS_FILE].lfs.size == siblings[LFS_FILE].size == len(weights)
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == blob_id(source("config.json"))
    assert siblings["tokenizer.json"].lfs is None  # under the 1 MiB LFS threshold

    assert api.model_info(REPO, revision=info.sha).sha == info.sha
    flat = {e.path: e for e in api.list_repo_tree(REPO)}
    assert "1_Pooling/config.json" not in flat and type(flat["1_Pooling"]).__name__ == "RepoFolder"
    deep = {e.path for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(siblings) | {"1_Pooling"} == deep
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="1_Pooling")] == ["1_Pooling/config.json"]
    lfs = next(e for e in api.list_repo_tree(REPO, recursive=True) if e.path == LFS_FILE).lfs
    assert lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.pointer_size > 100


def test_datasets_and_the_read_routes_as_the_hub_shapes_them(hub: TestHub, hub_root: Path, tmp_path: Path) -> None:
    """Datasets at the Hub's dataset routes, ``get_paths_info``, ``list_repo_commits``,
    ``whoami`` and paginated expanded trees, read by huggingface_hub's own client."""
    data = hub_root / "datasets" / "org" / "data"
    make_synthetic_model(data, 2 << 20, n_shards=1, seed=2)
    for i in range(60):
        (data / "notes").mkdir(exist_ok=True)
        (data / "notes" / f"n{i:02}.txt").write_text(str(i))
    (hub_root / ".hub").mkdir()
    (hub_root / ".hub" / "users.json").write_text(json.dumps({"hf_alice": "alice"}))
    api = HfApi(endpoint=hub.url)
    commit = hub.commit("org/data", "dataset")
    assert api.dataset_info("org/data").sha == commit
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/data")  # a dataset is no model
    folder = Path(snapshot_download("org/data", repo_type="dataset", endpoint=hub.url, cache_dir=tmp_path))
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == \
        {p.relative_to(data).as_posix(): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert all(k.startswith("datasets/org/data/") for k in hub.stats().bytes_by_path)
    found = api.get_paths_info("org/data", ["notes", "config.json", "missing"], repo_type="dataset")
    assert [(type(e).__name__, e.path) for e in found] == [("RepoFolder", "notes"), ("RepoFile", "config.json")]
    assert [c.commit_id for c in api.list_repo_commits("org/data", repo_type="dataset")] == [commit]
    assert api.whoami(token="hf_alice")["name"] == "alice"
    with pytest.raises(HfHubHTTPError):
        api.whoami(token="hf_nobody")
    hub.reset_stats()
    expanded = list(api.list_repo_tree("org/data", "notes", repo_type="dataset", expand=True))
    assert len(expanded) == 60 and all(e.last_commit.oid == commit for e in expanded)
    assert hub.stats().requests_by_kind["tree"] == 2  # 50 entries a page when expanded, as the Hub pages


def test_error_codes_through_the_client(hub: TestHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=hub.url).model_info(REPO, revision="0" * 40)


def test_error_codes_raw(hub: TestHub, client: httpx.Client) -> None:
    cases = [
        ("/api/models/nobody/nothing", 401, "RepoNotFound"),  # anonymous: the Hub says 401
        (f"/api/models/{REPO}/revision/nope", 404, "RevisionNotFound"),
        (f"/api/models/{REPO}/tree/main/nope", 404, "EntryNotFound"),
        (f"/{REPO}/resolve/main/missing.bin", 404, "EntryNotFound"),
        ("/nobody/nothing/resolve/main/config.json", 401, "RepoNotFound"),
    ]
    for path, status, code in cases:
        response = client.get(path)
        assert (response.status_code, response.headers.get("X-Error-Code")) == (status, code), path
        assert response.json()["error"] and response.headers["X-Error-Message"]
    with_token = client.get("/api/models/nobody/nothing", headers={"Authorization": "Bearer hf_x"})
    assert (with_token.status_code, with_token.headers.get("X-Error-Code")) == (404, "RepoNotFound")
    missing = client.head(f"/{REPO}/resolve/main/missing.bin")
    assert missing.headers["X-Repo-Commit"] == hub.commit(REPO)  # lets the client cache the absence


def test_gated_repo(hub: TestHub, hub_root: Path, client: httpx.Client, tmp_path: Path) -> None:
    (hub_root / REPO / ".hub").mkdir()
    (hub_root / REPO / ".hub" / "gated").write_text("hf_secret\n")
    url = f"/{REPO}/resolve/main/config.json"
    anonymous = client.get(url)
    assert (anonymous.status_code, anonymous.headers["X-Error-Code"]) == (401, "GatedRepo")
    wrong = client.get(url, headers={"Authorization": "Bearer hf_other"})
    assert (wrong.status_code, wrong.headers["X-Error-Code"]) == (403, "GatedRepo")
    right = client.get(url, headers={"Authorization": "Bearer hf_secret"})
    assert right.status_code == 200 and right.content == source("config.json")
    # As on the Hub, metadata stays public and says the repo is gated; .hub/ is not content.
    info = client.get(f"/api/models/{REPO}").json()
    assert info["gated"] == "manual" and not any(s["rfilename"].startswith(".hub") for s in info["siblings"])
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, LFS_FILE, cache_dir=tmp_path / "a", endpoint=hub.url, token=False)
    path = hf_hub_download(REPO, LFS_FILE, cache_dir=tmp_path / "b", endpoint=hub.url, token="hf_secret")
    assert Path(path).read_bytes() == source(LFS_FILE)


def test_bad_paths_never_leave_the_root(hub: TestHub, hub_root: Path) -> None:
    (hub_root / "secret.txt").write_text("TOP-SECRET")
    (hub_root / REPO / ".hub").mkdir()
    (hub_root / REPO / ".hub" / "gated-not").write_text("TOP-SECRET")
    for path in [
        f"/{REPO}/resolve/main/../../../secret.txt",
        f"/{REPO}/resolve/main/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        f"/{REPO}/resolve/main/..%2f..%2f..%2fsecret.txt",
        f"/{REPO}/resolve/main/%2fetc%2fpasswd",
        f"/{REPO}/resolve/main//etc/passwd",
        f"/{REPO}/resolve/main/config.json%00",
        f"/{REPO}/resolve/main/.hub/gated-not",
        f"/{REPO}/resolve/%2e%2e/config.json",
        "/sentence-transformers/..%2fsecret.txt/resolve/main/x",
        f"/api/models/{REPO}/tree/main/%2e%2e%2f%2e%2e",
    ]:
        status, _, body = raw_get(hub.url, path)
        assert status in (400, 404), path
        assert b"TOP-SECRET" not in body and b"root:" not in body, path


def test_range_requests(hub: TestHub, client: httpx.Client) -> None:
    vocab = source("vocab.txt")
    url = f"/{REPO}/resolve/main/vocab.txt"
    response = client.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == vocab[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(vocab)}"
    assert response.headers["Content-Length"] == "10" and response.headers["Accept-Ranges"] == "bytes"
    assert client.get(url, headers={"Range": "bytes=-7"}).content == vocab[-7:]
    assert client.get(url, headers={"Range": f"bytes={len(vocab) - 3}-"}).content == vocab[-3:]
    assert client.get(url, headers={"Range": f"bytes=5-{len(vocab) * 2}"}).content == vocab[5:]
    unsatisfiable = client.get(url, headers={"Range": f"bytes={len(vocab)}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["Content-Range"] == f"bytes */{len(vocab)}"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == vocab
    assert whole.headers["ETag"] == f'"{blob_id(vocab)}"' and whole.headers["X-Repo-Commit"] == hub.commit(REPO)
    # The LFS origin honours ranges too.
    weights = source(LFS_FILE)
    lfs = client.get(f"/{REPO}/resolve/main/{LFS_FILE}", headers={"Range": "bytes=1000-1999"}, follow_redirects=True)
    assert lfs.status_code == 206 and lfs.content == weights[1000:2000]


def test_lfs_redirect_headers(hub: TestHub, client: httpx.Client) -> None:
    weights = source(LFS_FILE)
    sha256 = hashlib.sha256(weights).hexdigest()
    head = client.head(f"/{REPO}/resolve/main/{LFS_FILE}")
    assert head.status_code == 302
    assert head.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["X-Repo-Commit"] == hub.commit(REPO) and head.headers["ETag"]
    location = head.headers["Location"]
    assert urlsplit(location).port != urlsplit(hub.url).port  # another origin, like the Hub's CDN
    with httpx.Client(timeout=10) as cdn:
        got = cdn.get(location)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha256
        forged = cdn.get(location.replace("sig=", "sig=0"))
        assert forged.status_code == 403


def test_keep_alive_serves_several_requests_per_connection(hub: TestHub) -> None:
    parts = urlsplit(hub.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        for name in ("config.json", "vocab.txt", "modules.json"):
            conn.request("GET", f"/{REPO}/resolve/main/{name}")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == source(name)
        sock = conn.sock
        conn.request("HEAD", f"/{REPO}/resolve/main/config.json")
        conn.getresponse().read()
        assert conn.sock is sock
    finally:
        conn.close()


# -- commits ------------------------------------------------------------------------------


def test_a_changed_file_moves_main_to_a_new_commit(hub: TestHub, hub_root: Path, client: httpx.Client) -> None:
    old = hub.commit(REPO)
    assert client.get(f"/api/models/{REPO}/revision/{old}").json()["sha"] == old
    assert hub.commit(REPO) == old  # stable while nothing changes
    config = hub_root / REPO / "config.json"
    config.write_text(config.read_text().replace("}", ', "changed": true}', 1))
    new = client.get(f"/api/models/{REPO}").json()["sha"]
    assert new != old and len(new) == 40 and new == hub.commit(REPO)
    fetched = client.get(f"/{REPO}/resolve/main/config.json")
    assert fetched.headers["X-Repo-Commit"] == new and b'"changed": true' in fetched.content
    assert client.get(f"/{REPO}/resolve/{new}/config.json").status_code == 200
    stale = client.get(f"/{REPO}/resolve/{old}/config.json")  # documented: old commits are not kept
    assert (stale.status_code, stale.headers["X-Error-Code"]) == (404, "RevisionNotFound")


def test_refs_file_adds_tags(hub: TestHub, hub_root: Path, client: httpx.Client) -> None:
    (hub_root / REPO / ".hub").mkdir()
    (hub_root / REPO / ".hub" / "refs.json").write_text(json.dumps(["v1.0", "refs/tags/v0.9", "refs/pr/1"]))
    commit = hub.commit(REPO)
    assert client.get(f"/api/models/{REPO}/revision/v1.0").json()["sha"] == commit
    assert client.get(f"/api/models/{REPO}/revision/v0.9").json()["sha"] == commit
    refs = HfApi(endpoint=hub.url).list_repo_refs(REPO)
    assert [r.ref for r in refs.branches] == ["refs/heads/main", "refs/heads/v1.0"]
    assert [(r.name, r.ref) for r in refs.tags] == [("v0.9", "refs/tags/v0.9")]
    assert client.get(f"/{REPO}/resolve/refs%2Fpr%2F1/config.json").headers["X-Repo-Commit"] == commit
    assert HfApi(endpoint=hub.url).model_info(REPO, revision="refs/pr/1").sha == commit


def test_push_moves_main_and_keeps_old_commits_readable(hub: TestHub, client: httpx.Client) -> None:
    old = hub.commit(REPO)
    new = hub.push(REPO, {"config.json": b'{"v": 2}', "extra/notes.txt": b"new file"})
    assert new != old and hub.commit(REPO) == new
    assert client.get(f"/api/models/{REPO}/revision/main").json()["sha"] == new
    assert client.get(f"/{REPO}/resolve/{old}/config.json").content == source("config.json")
    assert client.get(f"/{REPO}/resolve/main/config.json").content == b'{"v": 2}'
    assert client.get(f"/{REPO}/resolve/{old}/extra/notes.txt").headers["X-Error-Code"] == "EntryNotFound"
    # an old commit's LFS file stays downloadable through the CDN after main moved
    path = hf_hub_download(REPO, LFS_FILE, revision=old, endpoint=hub.url, cache_dir=str(hub.hub.root.parent / "c"))
    assert Path(path).read_bytes() == source(LFS_FILE)


def test_pull_request_and_convert_refs_as_on_the_hub(hub: TestHub, client: httpx.Client, tmp_path: Path) -> None:
    main = hub.commit(REPO)
    pr = hub.push(REPO, {"config.json": b'{"pr": 1}'}, ref="refs/pr/1")
    parquet = hub.push(REPO, {"data.parquet": b"PAR1"}, ref="refs/convert/parquet")
    tag = hub.push(REPO, {"config.json": b'{"tag": 2}'}, ref="refs/tags/v2")
    assert hub.commit(REPO) == main and len({main, pr, parquet, tag}) == 4  # the tree did not change
    api = HfApi(endpoint=hub.url)
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(r.name, r.ref, r.target_commit) for r in refs.branches] == [("main", "refs/heads/main", main)]
    assert [(r.name, r.ref, r.target_commit) for r in refs.tags] == [("v2", "refs/tags/v2", tag)]
    assert [(r.name, r.ref, r.target_commit) for r in refs.pull_requests] == [("1", "refs/pr/1", pr)]
    assert [(r.name, r.ref, r.target_commit) for r in refs.converts] == [("parquet", "refs/convert/parquet", parquet)]
    assert api.list_repo_refs(REPO).pull_requests is None
    # the Hub's exact JSON: four groups of {name, ref, targetCommit}; pullRequests only when asked
    raw = client.get(f"/api/models/{REPO}/refs", params={"include_prs": 1}).json()
    assert raw["pullRequests"] == [{"name": "1", "ref": "refs/pr/1", "targetCommit": pr}]
    assert set(raw) == {"branches", "tags", "converts", "pullRequests"}
    assert set(client.get(f"/api/models/{REPO}/refs").json()) == {"branches", "tags", "converts"}
    assert api.model_info(REPO, revision="v2").sha == tag  # a tag is addressed by its name
    path = hf_hub_download(REPO, "config.json", revision="refs/pr/1", endpoint=hub.url, cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == b'{"pr": 1}'
    assert client.get(f"/{REPO}/resolve/refs%2Fpr%2F1/config.json").headers["X-Repo-Commit"] == pr
    assert client.get(f"/api/models/{REPO}/revision/refs%2Fpr%2F1?expand=sha").json() == \
        {"_id": hashlib.sha1(REPO.encode()).hexdigest()[:24], "id": REPO, "sha": pr}
    hub.delete_ref(REPO, "refs/pr/1")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="refs/pr/1")
    assert client.get(f"/{REPO}/resolve/{pr}/config.json").content == b'{"pr": 1}'  # by hash, still there
    assert hub.stats().ref_checks[f"{REPO}@refs/pr/1"] >= 3


def test_push_over_http(hub_root: Path) -> None:
    with HubProcess(hub_root) as remote:
        commit = remote.push(REPO, {"config.json": b"{}"})
        assert httpx.get(f"{remote.url}/api/models/{REPO}").json()["sha"] == commit


# -- counters, rate, faults ----------------------------------------------------------------


def test_stats_count_requests_and_bytes(hub: TestHub, client: httpx.Client) -> None:
    client.get(f"/{REPO}/resolve/main/vocab.txt", headers={"Range": "bytes=0-99"})
    client.head(f"/{REPO}/resolve/main/vocab.txt")
    client.get(f"/api/models/{REPO}")
    client.get(f"/{REPO}/resolve/main/missing")
    stats = hub.stats()
    assert stats.bytes_served == 100
    assert stats.bytes_by_path == {f"{REPO}/vocab.txt": 100}
    assert stats.bytes_by_hash == {blob_id(source("vocab.txt")): 100}
    assert stats.requests == 4 and stats.content_requests == 2
    assert stats.requests_by_kind == {"resolve_get": 2, "resolve_head": 1, "model_info": 1}
    assert stats.statuses == {206: 1, 200: 2, 404: 1}
    over_http = HubStats.from_json(client.get("/_hub/stats").json())
    assert over_http == stats  # control requests are not counted
    assert client.post("/_hub/reset").status_code == 200
    assert hub.stats() == HubStats()


def test_rate_cap_is_shared_by_all_connections(hub_root: Path) -> None:
    rate = 20_000_000
    per_stream, streams = 3_000_000, 3
    with TestHub(hub_root, rate=rate) as hub:
        weights = source(LFS_FILE)

        def fetch(i: int) -> None:
            start = i * per_stream
            with httpx.Client(timeout=30, follow_redirects=True) as c:
                got = c.get(f"{hub.url}/{REPO}/resolve/main/{LFS_FILE}",
                            headers={"Range": f"bytes={start}-{start + per_stream - 1}"})
                assert got.content == weights[start:start + per_stream]

        began = time.monotonic()
        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        assert hub.stats().bytes_served == per_stream * streams
    # Correctness, not speed: a lower bound never fails on a slow machine, and a cap per
    # connection instead of a shared one would finish in a third of this.
    assert elapsed >= 0.8 * per_stream * streams / rate


def test_corrupt_fault_changes_only_the_chosen_file(hub: TestHub, client: httpx.Client) -> None:
    hub.set_faults(corrupt=["vocab.txt"])
    vocab = client.get(f"/{REPO}/resolve/main/vocab.txt")
    assert vocab.status_code == 200 and len(vocab.content) == len(source("vocab.txt"))
    assert vocab.content != source("vocab.txt")
    tail = client.get(f"/{REPO}/resolve/main/vocab.txt", headers={"Range": "bytes=5-9"})
    assert tail.content != source("vocab.txt")[5:10]  # even a small range is corrupted
    assert client.get(f"/{REPO}/resolve/main/config.json").content == source("config.json")
    # Over HTTP, every file: the LFS origin corrupts too.
    assert client.post("/_hub/faults", json={"corrupt": ["*"]}).json()["corrupt"] == ["*"]
    weights = client.get(f"/{REPO}/resolve/main/{LFS_FILE}", headers={"Range": "bytes=0-8191"},
                         follow_redirects=True)
    assert weights.content != source(LFS_FILE)[:8192]
    hub.clear_faults()
    assert client.get(f"/{REPO}/resolve/main/vocab.txt").content == source("vocab.txt")
    assert hub.stats().faults["corrupted"] == 3


def test_corrupt_bytes_ends_the_corruption_after_that_many_bytes(hub: TestHub, client: httpx.Client) -> None:
    vocab = source("vocab.txt")
    assert client.post("/_hub/faults", json={"corrupt": ["vocab.txt"], "corrupt_bytes": 150}).status_code == 200
    first = client.get(f"/{REPO}/resolve/main/vocab.txt", headers={"Range": "bytes=0-99"})
    assert first.content != vocab[:100]
    assert client.get(f"/{REPO}/resolve/main/config.json").content == source("config.json")  # not counted
    second = client.get(f"/{REPO}/resolve/main/vocab.txt", headers={"Range": "bytes=100-199"})
    assert second.content != vocab[100:200]  # began within the count: corrupted whole
    assert hub.faults.corrupt == () and hub.faults.corrupt_bytes == 0  # used up: over
    assert client.get(f"/{REPO}/resolve/main/vocab.txt").content == vocab
    assert hub.stats().faults["corrupted"] == 2
    with pytest.raises(ValueError):
        Faults(corrupt_bytes=-1)


def test_fail_fault_answers_5xx_for_the_next_n(hub: TestHub, client: httpx.Client) -> None:
    hub.set_faults(fail_next=2, fail_status=500)
    url = f"/{REPO}/resolve/main/config.json"
    assert client.head(url).status_code == 200  # metadata requests are not content requests
    assert [client.get(url).status_code for _ in range(3)] == [500, 500, 200]
    assert client.post("/_hub/faults", json={"fail_next": 1}).status_code == 200  # 503 by default
    assert client.get(url).status_code == 503
    assert client.post("/_hub/faults", json={"bogus": 1}).status_code == 400
    stats = hub.stats()
    assert stats.faults["failed"] == 3 and stats.statuses[500] == 2 and stats.statuses[503] == 1


def test_reset_fault_cuts_the_body(hub: TestHub, client: httpx.Client, tmp_path: Path) -> None:
    hub.set_faults(reset_next=1)
    url = f"/{REPO}/resolve/main/vocab.txt"
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(url)
    assert client.get(url).content == source("vocab.txt")  # the next one is whole
    stats = hub.stats()
    assert stats.faults["reset"] == 1
    assert stats.bytes_by_path[f"{REPO}/vocab.txt"] == len(source("vocab.txt")) * 3 // 2


def test_latency_fault(hub: TestHub, client: httpx.Client) -> None:
    hub.set_faults(latency_s=0.3)
    began = time.monotonic()
    client.head(f"/{REPO}/resolve/main/config.json")
    assert time.monotonic() - began >= 0.3
    with pytest.raises(ValueError):
        Faults(fail_status=404)


def test_hub_process_over_http(hub_root: Path) -> None:
    with HubProcess(hub_root, rate="1GB/s") as proc:
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            assert c.get(f"/{REPO}/resolve/main/config.json").content == source("config.json")
            info = c.get("/_hub/info").json()
            assert info["rate"] == 1e9 and info["cdn_url"]
        assert proc.stats().bytes_served == len(source("config.json"))
        proc.set_faults(fail_next=1)
        assert proc.faults.fail_next == 1
        assert httpx.get(f"{proc.url}/{REPO}/resolve/main/config.json").status_code == 503
        proc.set_rate(None)
        proc.reset_stats()
        assert HubClient(proc.url).stats().requests == 0


# -- synthetic models -------------------------------------------------------------------


def test_synthetic_model_is_deterministic_and_loadable(tmp_path: Path) -> None:
    a = make_synthetic_model(tmp_path / "a", 3_000_001, n_shards=3, seed=7)
    b = make_synthetic_model(tmp_path / "b", 3_000_001, n_shards=3, seed=7)
    c = make_synthetic_model(tmp_path / "c", 3_000_001, n_shards=3, seed=8)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json",
                     "tokenizer/tokenizer_config.json"]
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / files[1]).read_bytes() != (c / files[1]).read_bytes()
    index = json.loads((a / "model.safetensors.index.json").read_text())
    total = 0
    for shard in files[1:4]:
        with safe_open(a / shard, "np") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert tensor.dtype in (np.float16, np.uint8) and index["weight_map"][key] == shard
                total += tensor.nbytes
    assert total == index["metadata"]["total_size"] == 3_000_001


def test_synthetic_repo_through_snapshot_download(hub_root: Path, tmp_path: Path) -> None:
    repo = make_synthetic_model(hub_root / "synthetic" / "tiny", 4 << 20, n_shards=2, seed=1)
    with TestHub(hub_root) as hub:
        folder = Path(snapshot_download("synthetic/tiny", cache_dir=tmp_path / "cache", endpoint=hub.url))
        for path in repo.rglob("*"):
            if path.is_file():
                assert (folder / path.relative_to(repo)).read_bytes() == path.read_bytes()
        assert hub.stats().requests_by_kind["lfs_get"] == 2  # the two 2 MiB shards are LFS
    assert os.path.isdir(folder / "tokenizer")
