"""The backend's access check against an upstream whose 404s carry no error code.

The Hub names every 404 (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``); a proxy
or another server may not. A 404 that does not say the repo exists proves no access: the
caller is refused, and for the anonymous probe the repo counts as restricted (private).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import trio

from backend_server.access import AccessControl
from mmfs.errors import AccessDenied, MmfsError, RepoNotFound
from mmfs.names import RepoRef

REPO = RepoRef("huggingface", "org", "private")
COMMIT = "c" * 40
OWN = "Bearer own-token"


class Upstream(ThreadingHTTPServer):
    """Answers HEAD of a resolve URL with what ``answers`` says for the Authorization sent."""

    answers: dict[str | None, tuple[int, dict[str, str]]]


class Handler(BaseHTTPRequestHandler):
    server: Upstream

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        status, headers = self.server.answers[self.headers.get("Authorization")]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def check(upstream: Upstream, state: Path, caller: str | None) -> None:
    access = AccessControl(f"http://127.0.0.1:{upstream.server_address[1]}", "own-token", state)
    refused: list[MmfsError] = []
    try:
        async with trio.open_nursery() as nursery:  # where the check's shared probes run
            try:
                await access.check(REPO, COMMIT, "model.safetensors", caller, nursery)
            except (AccessDenied, RepoNotFound) as exc:
                refused.append(exc)
    finally:
        await access.aclose()
    if refused:
        raise refused[0]


@pytest.mark.parametrize("caller_answer,allowed", [
    ((404, {}), False),
    ((404, {"X-Error-Code": "EntryNotFound"}), True),
    ((404, {"X-Error-Code": "RevisionNotFound"}), True),
    ((404, {"X-Error-Code": "RepoNotFound"}), False),
    ((200, {}), True),
])
async def test_a_callers_404_counts_as_access_only_when_it_shows_the_repo(
        upstream: Upstream, tmp_path: Path, caller_answer: tuple[int, dict[str, str]], allowed: bool) -> None:
    upstream.answers = {None: (401, {"X-Error-Code": "GatedRepo"}), OWN: (401, {"X-Error-Code": "GatedRepo"}),
                        "Bearer caller": caller_answer}
    if allowed:
        await check(upstream, tmp_path / "access.json", "Bearer caller")
    else:
        with pytest.raises(AccessDenied):
            await check(upstream, tmp_path / "access.json", "Bearer caller")


async def test_a_404_without_a_code_for_the_anonymous_probe_makes_the_repo_private(upstream: Upstream,
                                                                                  tmp_path: Path) -> None:
    upstream.answers = {OWN: (404, {}), None: (404, {})}
    with pytest.raises(RepoNotFound, match="private"):
        await check(upstream, tmp_path / "access.json", None)  # no token: refused, not served
    upstream.answers = {None: (404, {"X-Error-Code": "EntryNotFound"})}
    await check(upstream, tmp_path / "fresh.json", None)  # the repo shows, a file is missing: open
