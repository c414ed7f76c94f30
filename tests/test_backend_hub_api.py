"""The backend's Hub drop-in API beyond downloads of models: datasets, and every other route
huggingface_hub's download side uses, driven by huggingface_hub's own client against a
real backend process over the test hub (``backend_server/app.py``, ``backend_server/passthrough.py``)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from backend_server.passthrough import Passthrough, _without_xet
from backend_server.testing import BackendProcess
from mmfs.testing.hub import TREE_PAGE_EXPANDED, TestHub
from mmfs.testing.models import make_synthetic_model, populate_hub_root

pytestmark = pytest.mark.timeout(120)

DATASET = "org/data"
MODEL = "org/web"
LOCKED = "org/locked"
#: More small files than one page of an expanded listing holds, so pagination shows.
NOTES = TREE_PAGE_EXPANDED + 5


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = populate_hub_root(tmp_path_factory.mktemp("hub"), include_real=False)
    make_synthetic_model(root / MODEL, 1 << 20, n_shards=1, seed=1)
    data = root / "datasets" / DATASET
    make_synthetic_model(data, 3 << 20, n_shards=2, seed=2)  # two LFS files, small JSON files
    (data / "notes").mkdir()
    for i in range(NOTES):
        (data / "notes" / f"n{i:03}.txt").write_text(f"note {i}\n")
    # The same id as a model: a dataset must never be answered with a model's files.
    make_synthetic_model(root / DATASET, 1 << 20, n_shards=1, seed=3)
    # A gated dataset beside a public model of the same id: access is per repo, not per id.
    make_synthetic_model(root / "datasets" / LOCKED, 1 << 20, n_shards=1, seed=4)
    (root / "datasets" / LOCKED / ".hub").mkdir()
    (root / "datasets" / LOCKED / ".hub" / "gated").write_text("hf_alice\n")
    make_synthetic_model(root / LOCKED, 1 << 20, n_shards=1, seed=5)
    (root / ".hub").mkdir()
    (root / ".hub" / "users.json").write_text(json.dumps({"hf_alice": "alice", "hf_backend": "backend-bot"}))
    return root


@pytest.fixture(scope="module")
def hub(hub_root: Path) -> Iterator[TestHub]:
    with TestHub(hub_root) as running:
        yield running


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, hub: TestHub) -> Iterator[BackendProcess]:
    # The backend has a token of its own: no answer to a caller may be given with it.
    with BackendProcess(tmp_path_factory.mktemp("backend") / "data", hub_url=hub.url, chunk_size="256KiB",
                        env={"HF_TOKEN": "hf_backend"}) as running:
        yield running


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".hub" not in p.parts}


def test_dataset_snapshot_through_the_backend(tmp_path: Path, hub: TestHub, hub_root: Path,
                                              backend: BackendProcess) -> None:
    hub.reset_stats()
    folder = Path(snapshot_download(DATASET, repo_type="dataset", endpoint=backend.url, cache_dir=tmp_path))
    assert folder.parent.parent.name == "datasets--org--data" and folder.name == hub.commit(DATASET, "dataset")
    assert tree(folder) == tree(hub_root / "datasets" / DATASET)
    # The bytes came from the dataset, through the backend's engine: none from the model of that id.
    served = hub.stats().bytes_by_path
    assert served and all(key.startswith(f"datasets/{DATASET}/") for key in served)
    one = hf_hub_download(DATASET, "notes/n007.txt", repo_type="dataset", endpoint=backend.url,
                          cache_dir=tmp_path / "one")
    assert Path(one).read_text() == "note 7\n"
    api = HfApi(endpoint=backend.url)
    commit = hub.commit(DATASET, "dataset")
    assert api.dataset_info(DATASET).sha == commit == api.dataset_info(DATASET, revision=commit).sha
    assert {s.rfilename for s in api.dataset_info(DATASET, revision="main", files_metadata=True).siblings} == \
        set(tree(hub_root / "datasets" / DATASET))
    assert api.model_info(DATASET).sha == hub.commit(DATASET)  # the model of the same id, told apart
    # HfFileSystem (what the datasets library reads with): listings, globs and reads.
    fs = HfFileSystem(endpoint=backend.url)
    assert len(fs.glob(f"datasets/{DATASET}/notes/*.txt")) == NOTES
    assert fs.info(f"datasets/{DATASET}/notes/n003.txt")["size"] == len("note 3\n")
    with fs.open(f"datasets/{DATASET}/model-00002-of-00002.safetensors", "rb") as f:
        assert f.read() == (hub_root / "datasets" / DATASET / "model-00002-of-00002.safetensors").read_bytes()


def test_paths_info_through_the_backend(hub: TestHub, backend: BackendProcess) -> None:
    api = HfApi(endpoint=backend.url)
    hub.reset_stats()
    found = api.get_paths_info(DATASET, ["notes", "config.json", "model-00001-of-00002.safetensors", "missing"],
                               repo_type="dataset")
    assert [(type(e).__name__, e.path) for e in found] == [
        ("RepoFolder", "notes"), ("RepoFile", "config.json"), ("RepoFile", "model-00001-of-00002.safetensors")]
    # Answered from the backend's manifest: the same entries the upstream gives.
    upstream = HfApi(endpoint=hub.url).get_paths_info(
        DATASET, ["notes", "config.json", "model-00001-of-00002.safetensors", "missing"], repo_type="dataset")
    assert found == upstream and found[2].lfs is not None
    expanded = api.get_paths_info(MODEL, ["config.json"], expand=True)  # last commits: the upstream's
    assert expanded[0].last_commit is not None and expanded[0].last_commit.oid == hub.commit(MODEL)
    with pytest.raises(RepositoryNotFoundError):
        api.get_paths_info("org/nothing", ["config.json"], repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.get_paths_info(DATASET, ["config.json"], repo_type="dataset", revision="no-such-branch")


def test_commits_whoami_and_expanded_trees_pass_through_as_the_caller(hub: TestHub, backend: BackendProcess) -> None:
    api = HfApi(endpoint=backend.url)
    commits = api.list_repo_commits(DATASET, repo_type="dataset")
    assert [c.commit_id for c in commits] == [hub.commit(DATASET, "dataset")]
    assert api.list_repo_commits(MODEL)[0].commit_id == hub.commit(MODEL)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_commits("org/nothing")
    assert api.whoami(token="hf_alice")["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as bad:
        api.whoami(token="hf_wrong")
    assert bad.value.response.status_code == 401
    # Without a token the caller is nobody, never the backend (whose own token the hub knows).
    assert httpx.get(f"{backend.url}/api/whoami-v2").status_code == 401
    # An expanded listing is paginated upstream; the next page's link leads back to the backend.
    first = httpx.get(f"{backend.url}/api/datasets/{DATASET}/tree/main/notes", params={"expand": "true"})
    assert first.status_code == 200 and len(first.json()) == TREE_PAGE_EXPANDED
    assert first.links["next"]["url"].startswith(backend.url + "/api/datasets/")
    entries = list(api.list_repo_tree(DATASET, "notes", repo_type="dataset", expand=True))
    assert len(entries) == NOTES and all(e.last_commit is not None for e in entries)


def test_the_backend_is_read_only_and_knows_its_routes(backend: BackendProcess) -> None:
    for method, path in (("DELETE", f"/api/models/{MODEL}"), ("POST", "/api/repos/create"),
                         ("PUT", f"/api/datasets/{DATASET}/settings"), ("POST", f"/api/models/{MODEL}/commit/main")):
        answer = httpx.request(method, backend.url + path)
        assert answer.status_code == 405, (method, path, answer.text)
        assert "use GET" in answer.json()["error"]
    answer = httpx.get(f"{backend.url}/nothing/at/all")
    assert answer.status_code == 404 and "no such endpoint" in answer.json()["error"]
    # Routes the backend has no answer of its own for are the upstream's to answer (this
    # hub serves no spaces: its own "no route" comes back, not the backend's).
    for path in ("/api/spaces/org/demo", "/spaces/org/demo/resolve/main/app.py", "/api/models-tags-by-type"):
        answer = httpx.get(backend.url + path)
        assert answer.status_code == 404 and "no route for GET" in answer.json()["error"], path


def test_missing_datasets_and_files_are_the_hub_exceptions(tmp_path: Path, backend: BackendProcess) -> None:
    api = HfApi(endpoint=backend.url)
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(DATASET, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nothing", "x.json", repo_type="dataset", endpoint=backend.url, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(DATASET, "nope.bin", repo_type="dataset", endpoint=backend.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(DATASET, "config.json", repo_type="dataset", revision="nope", endpoint=backend.url,
                        cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):  # "datasets" is no org: datasets are no models
        api.model_info("datasets/org")


def test_a_gated_dataset_needs_a_token_whatever_the_model_of_its_id(tmp_path: Path, hub_root: Path,
                                                                   backend: BackendProcess) -> None:
    weights = "model-00001-of-00001.safetensors"
    public = hf_hub_download(LOCKED, weights, endpoint=backend.url, cache_dir=tmp_path / "model")
    assert Path(public).read_bytes() == (hub_root / LOCKED / weights).read_bytes()
    for token in (False, "hf_wrong"):
        with pytest.raises(GatedRepoError):
            hf_hub_download(LOCKED, weights, repo_type="dataset", endpoint=backend.url, token=token,
                            cache_dir=tmp_path / "anonymous")
    got = hf_hub_download(LOCKED, weights, repo_type="dataset", endpoint=backend.url, token="hf_alice",
                          cache_dir=tmp_path / "alice")
    assert Path(got).read_bytes() == (hub_root / "datasets" / LOCKED / weights).read_bytes()
    for token in (False, "hf_wrong"):  # cached now, and still refused without the right token
        with pytest.raises(GatedRepoError):
            hf_hub_download(LOCKED, weights, repo_type="dataset", endpoint=backend.url, token=token,
                            cache_dir=tmp_path / "again")


def test_an_unreachable_upstream_is_a_clear_503(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    with BackendProcess(tmp_path / "backend", hub_url=dead) as lonely:
        answer = httpx.get(f"{lonely.url}/api/models/{MODEL}/commits/main")
        assert answer.status_code == 503 and answer.headers["X-Error-Code"] == "TransientError"
        assert "cannot be reached" in answer.json()["error"]


def test_passed_through_answers_lose_xet_hints() -> None:
    """What a Xet-backed upstream adds (a ``xetHash`` per file, an ``xet-auth`` link) would
    send clients to the Xet storage, around the cluster: it never reaches them."""
    listing = [{"type": "file", "path": "a.safetensors", "oid": "1" * 40, "size": 3, "xetHash": "f" * 64,
                "lfs": {"oid": "2" * 64, "size": 3, "pointerSize": 130}}]
    assert json.loads(_without_xet(json.dumps(listing).encode())) == \
        [{k: v for k, v in listing[0].items() if k != "xetHash"}]
    assert _without_xet(b"not json") == b"not json"
    links = Passthrough("https://hub.example")._links(
        '<https://hub.example/api/models/o/n/tree/main?cursor=x>; rel="next", '
        '<https://cas.example/token>; rel="xet-auth"', "http://mm:3000")
    assert links == '<http://mm:3000/api/models/o/n/tree/main?cursor=x>; rel="next"'
