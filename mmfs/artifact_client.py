"""``mmfs artifact``: find, push and build derived artifacts (docs/artifacts.md).

* :func:`resolve_key` turns ``huggingface/<org>/<name>@<rev>`` plus kind, target and
  builder into an :class:`~mmfs.artifacts.ArtifactKey` (the revision resolved to its commit
  through the mount's symlink, or the backend);
* :func:`push` uploads a directory: blobs the backend lacks, from where an earlier push
  stopped, in pieces it verifies, then one publish that makes the artifact visible whole;
* :func:`build` runs a builder once per cluster: it takes the key's build lease on the
  backend (renewed while the builder runs), or waits for whoever holds it, and ends with
  the published artifact or the failed build's log tail.

Blocking code (threads for the lease heartbeat and the builder's output): this is a
command, not a daemon.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import httpx

from .artifacts import PUBLISH_TOKEN_HEADER, ArtifactKey, artifact_dir, scan_dir
from .errors import InvalidName, MmfsError, NotSupported, TransientError, UpstreamError, from_http
from .names import is_commit
from .remote.wire import proxy_url

log = logging.getLogger(__name__)

PUBLISH_TOKEN_ENV = "MMFS_PUBLISH_TOKEN"
#: Seconds a build lease lasts without renewal (the builder renews every third of it).
DEFAULT_LEASE_TTL = 30.0
#: Seconds between a waiter's asks.
POLL_INTERVAL = 1.0
#: Lines of a builder's output kept for the failure report.
LOG_TAIL_LINES = 40


class BuildFailed(MmfsError):
    """The builder exited non-zero (here or on the node that held the lease)."""


@dataclass(frozen=True, slots=True)
class Pushed:
    artifact_id: str
    created: bool
    files: int
    bytes: int
    sent_bytes: int


class ArtifactClient:
    """The backend's artifact routes, with the publish token when one is set."""

    def __init__(self, backend: str, *, publish_token: str | None = None, timeout: float = 60.0,
                 retries: int = 5) -> None:
        self.url = backend.split(",")[0].strip().rstrip("/")  # a replica list: its first member
        self._retries = max(1, retries)
        token = publish_token if publish_token is not None else os.environ.get(PUBLISH_TOKEN_ENV)
        headers = {PUBLISH_TOKEN_HEADER: token} if token else {}
        if os.environ.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
        self._http = httpx.Client(timeout=timeout, headers=headers, trust_env=False, proxy=proxy_url(self.url))

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request, retried on connection errors and 5xx (but 501: asking again changes
        nothing); the answer's JSON, or the
        :class:`MmfsError` the backend named."""
        for attempt in range(self._retries):
            try:
                response = self._http.request(method, f"{self.url}{path}", json=json, content=content, params=params)
            except httpx.HTTPError as exc:
                error: MmfsError = TransientError(f"cannot reach the backend {self.url}: {exc}")
            else:
                if response.status_code < 400:
                    return response.json()
                message = response.headers.get("X-Error-Message") or response.text[:500]
                error = from_http(response.status_code, message, response.headers.get("X-Error-Code"))
                error.status = response.status_code  # the exact status (push resumes on a 409)
                if response.status_code < 500 or isinstance(error, NotSupported):
                    raise error
            if attempt + 1 < self._retries:
                time.sleep(min(0.5 * 2 ** attempt, 5.0))
        raise error

    def resolve(self, provider_repo: str, revision: str) -> str:
        commit = str(self.call("GET", f"/v1/resolve/{provider_repo}/{quote(revision, safe='')}").get("commit", ""))
        if not is_commit(commit):
            raise UpstreamError(f"the backend {self.url} resolved {provider_repo}@{revision} to no commit")
        return commit

    def record(self, artifact_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/artifacts/{artifact_id}")

    def listing(self) -> dict[str, Any]:
        return self.call("GET", "/v1/artifacts")


# -- keys ---------------------------------------------------------------------------------


def resolve_key(model: str, kind: str, target: str, builder: str, *, mount: str | None,
                client: ArtifactClient | None) -> ArtifactKey:
    """The key for ``model`` (``huggingface/<org>/<name>[@<rev>]``, default ``main``): the
    revision becomes its commit by the mount's branch symlink, else by asking the backend."""
    from .warm import parse_target

    target_model = parse_target(model)
    revision = target_model.revision
    repo = target_model.repo
    commit = revision if is_commit(revision) else ""
    if not commit and mount is not None:
        link = Path(mount) / repo.provider / repo.org / repo.name / revision
        try:
            commit = os.readlink(link)
        except OSError as exc:
            if client is None:
                raise MmfsError(f"cannot resolve {repo}@{revision} through {mount}: {exc.strerror}") from None
    if not commit and client is not None:
        commit = client.resolve(str(repo), revision)
    if not is_commit(commit):
        raise MmfsError(f"cannot resolve {repo}@{revision} to a commit (no mount or backend answered)")
    return ArtifactKey(repo, commit, kind, target, builder)


# -- pushing ------------------------------------------------------------------------------


def push(client: ArtifactClient, directory: Path, key: ArtifactKey) -> Pushed:
    """Upload ``directory`` as the artifact ``key`` and publish it.

    Resumable: the backend says how much of each blob it already holds (from an earlier
    push, broken or not) and only the rest is sent. Verified: the backend hashes every
    blob before keeping it. Atomic: nothing is visible before the final publish."""
    files = scan_dir(Path(directory))
    listing = [f.to_json() for f in files]
    answer = client.call("POST", "/v1/artifacts/upload", json={"key": key.to_json(), "files": listing})
    staged: dict[str, int] = answer["blobs"]
    piece = int(answer.get("piece", 1 << 20))
    sent = 0
    done: set[str] = set()
    for local in files:
        if local.sha256 in done:
            continue
        offset = int(staged.get(local.sha256, 0))
        with open(local.local, "rb") as f:
            while offset < local.size:
                data = os.pread(f.fileno(), min(piece, local.size - offset), offset)
                if not data:
                    raise InvalidName(f"{local.local} shrank while it was pushed")
                try:
                    reply = client.call("PUT", f"/v1/artifacts/blobs/{local.sha256}", content=data,
                                        params={"offset": offset, "size": local.size})
                except MmfsError as exc:
                    if getattr(exc, "status", 0) != 409:
                        raise
                    # Another push of the same blob moved on meanwhile: resume where it is.
                    reply = {"staged": client.call("POST", "/v1/artifacts/upload", json={
                        "key": key.to_json(), "files": [local.to_json()]})["blobs"][local.sha256]}
                    if reply["staged"] <= offset and reply["staged"] != local.size:
                        raise
                else:
                    sent += len(data)
                offset = int(reply["staged"])
        done.add(local.sha256)
    record = client.call("POST", "/v1/artifacts/publish", json={"key": key.to_json(), "files": listing})
    return Pushed(key.id, bool(record.get("created")), len(files), sum(f.size for f in files), sent)


# -- building once --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the builder's process: be killed when ``mmfs artifact build`` dies (a killed
    builder must not go on writing, nor hold the node's GPU)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class _Heartbeat(threading.Thread):
    """Renews the build lease every third of its TTL while the builder runs."""

    def __init__(self, client: ArtifactClient, key: ArtifactKey, lease: str, ttl: float) -> None:
        super().__init__(daemon=True, name="mmfs-lease")
        self.client, self.key, self.lease, self.ttl = client, key, lease, ttl
        self.stop = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self.client.call("POST", "/v1/artifacts/renew", json={"key": self.key.to_json(), "lease": self.lease})
            except MmfsError as exc:
                if not self.lost:
                    log.warning("build lease of %s: %s", self.key, exc)
                self.lost = True


def _run_builder(command: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the builder, its output passed through to stderr; ``(exit status, log tail)``."""
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    try:
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
    except OSError as exc:
        return 127, f"cannot run {command[0]}: {exc.strerror or exc}"
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        tail.append(line)
    return proc.wait(), "".join(tail)


def build(client: ArtifactClient, key: ArtifactKey, command: Sequence[str], *, mountpoint: str,
          lease_ttl: float = DEFAULT_LEASE_TTL, poll: float = POLL_INTERVAL, work_dir: str | None = None,
          timeout: float | None = None) -> Path:
    """The artifact ``key`` on the mount, built by ``command`` here if nobody has yet.

    Only one requester across the cluster builds at a time (the backend's lease); the
    others wait and read the published result, or take over when the builder's lease
    expires. :class:`BuildFailed` with the log tail when the build this call ran or waited
    for failed (nothing was published)."""
    holder = f"{socket.gethostname()}:{os.getpid()}"
    waited_on: int | None = None
    announced = None
    deadline = time.monotonic() + timeout if timeout else None
    model_path = Path(mountpoint) / key.repo.provider / key.repo.org / key.repo.name / key.commit
    while True:
        answer = client.call("POST", "/v1/artifacts/lease", json={
            "key": key.to_json(), "holder": holder, "ttl": lease_ttl, "waited_on": waited_on})
        state = answer.get("state")
        if state == "published":
            return artifact_dir(mountpoint, key.id)
        if state == "failed":
            raise BuildFailed(f"the build of {key} on {answer.get('holder')} failed; its log ends with:\n"
                              + str(answer.get("log_tail", "")).rstrip())
        if state == "building":
            waited_on = int(answer["generation"])
            if announced != waited_on:
                print(f"mmfs artifact build: {answer.get('holder')} is building {key}; waiting", file=sys.stderr,
                      flush=True)
                announced = waited_on
            if deadline is not None and time.monotonic() > deadline:
                raise TransientError(f"gave up waiting for the build of {key}")
            time.sleep(poll)
            continue
        if state != "granted":
            raise UpstreamError(f"the backend answered the build lease with {state!r}")
        if answer.get("took_over"):
            print(f"mmfs artifact build: the previous builder of {key} stopped renewing its lease; building here",
                  file=sys.stderr, flush=True)
        _build_here(client, key, command, str(answer["lease"]), float(answer.get("ttl", lease_ttl)),
                    model_path, work_dir)
        return artifact_dir(mountpoint, key.id)


def _build_here(client: ArtifactClient, key: ArtifactKey, command: Sequence[str], lease: str, ttl: float,
                model_path: Path, work_dir: str | None) -> None:
    heartbeat = _Heartbeat(client, key, lease, ttl)
    heartbeat.start()
    out = Path(tempfile.mkdtemp(prefix="mmfs-artifact-", dir=work_dir))
    failure = ""
    try:
        env = {**os.environ, "MMFS_MODEL_PATH": str(model_path), "MMFS_ARTIFACT_OUT": str(out),
               "MMFS_ARTIFACT_KIND": key.kind, "MMFS_ARTIFACT_TARGET": key.target}
        code, tail = _run_builder(command, env)
        if code != 0:
            failure = f"{tail}\n[{command[0]} exited with status {code}]"
        elif not any(p.is_file() for p in out.rglob("*")):
            failure = f"{tail}\n[{command[0]} wrote nothing to MMFS_ARTIFACT_OUT]"
        else:
            pushed = push(client, out, key)
            print(f"mmfs artifact build: published {key} ({pushed.files} files, {pushed.bytes} bytes)",
                  file=sys.stderr, flush=True)
    except MmfsError as exc:
        failure = f"publishing the result failed: {exc}"
    finally:
        heartbeat.stop.set()
        shutil.rmtree(out, ignore_errors=True)
        try:
            client.call("POST", "/v1/artifacts/release",
                        json={"key": key.to_json(), "lease": lease, "failed": bool(failure), "log_tail": failure})
        except MmfsError as exc:
            log.warning("could not release the build lease of %s: %s", key, exc)
    if failure:
        raise BuildFailed(f"the build of {key} failed; its log ends with:\n{failure.strip()}")


__all__ = ["ArtifactClient", "BuildFailed", "Pushed", "build", "push", "resolve_key"]
