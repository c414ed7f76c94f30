"""Property-based fuzzing (Hypothesis) of every parser that takes input from outside.

Each property runs the real parser on generated input: it either returns a value that
satisfies the parser's promise (a name that cannot escape its directory, a range inside the
file, a manifest that survives a round trip) or raises the error it documents, never
anything else (a stray ``ValueError`` or ``IndexError`` becomes a 500 or a traceback).

Example counts come from the Hypothesis profile (``tests/conftest.py``): small by default
(CI), ``HYPOTHESIS_PROFILE=long`` for a long run.
"""

from __future__ import annotations

import argparse
import hashlib
import posixpath

import pytest
import trio
import trio.testing
from hypothesis import assume, example, given
from hypothesis import strategies as st

from backend_server.app import BadRange, _segments, parse_range
from csi_driver.volumes import InvalidVolume, parse_volume_context
from mmfs import options
from mmfs.chunkmap import BLOCK_SIZE, DIGEST_SIZE, ChunkMap, block_digests
from mmfs.errors import InvalidName, MmfsError, TransientError, UpstreamError, from_http
from mmfs.manifest import GIT_SHA1, SHA256, FileEntry, Manifest
from mmfs.mountutil import _unescape
from mmfs.names import PROVIDERS, check_path, check_repo_part, check_revision, parse_repo_id
from mmfs.remote._http import error_from_response
from mmfs.remote.wire import Headers, Response, WireClient, _BodyTooLarge, _Connection, _ConnectionClosed
from mmfs.sizes import parse_size

# Text as it arrives from URLs, headers and attributes: any code point, with the
# characters that matter to the parsers made frequent.
SPECIAL = st.sampled_from(["/", ".", "..", "\0", "-", "_", "%", "~", " ", "²", "١", "\r\n", ":", "@", ","])
TEXT = st.lists(st.one_of(st.text(max_size=8), SPECIAL), max_size=12).map("".join)
NAME_CHARS = st.text(alphabet=st.sampled_from("abcXYZ019._-/"), max_size=40)


# -- names --------------------------------------------------------------------------------


@given(st.one_of(TEXT, NAME_CHARS))
def test_accepted_paths_stay_inside_their_repo(path: str) -> None:
    try:
        assert check_path(path) == path
    except InvalidName:
        return
    root = "/cache/repo"
    joined = posixpath.normpath(posixpath.join(root, path))
    assert joined.startswith(root + "/") and joined == f"{root}/{path}"  # no '.', '..', '//' or leading '/'
    assert "\0" not in path


@given(st.one_of(TEXT, NAME_CHARS))
def test_accepted_revisions_name_no_directory_of_their_own(revision: str) -> None:
    try:
        assert check_revision(revision) == revision
    except InvalidName:
        return
    parts = revision.split("/")
    assert all(part and not part.startswith(".") for part in parts) and "\0" not in revision
    assert posixpath.normpath(posixpath.join("/repo", revision)) == f"/repo/{revision}"


@given(st.one_of(TEXT, NAME_CHARS), st.sampled_from(PROVIDERS + ("github", "")))
def test_repo_ids_parse_into_safe_parts_or_are_refused(repo_id: str, provider: str) -> None:
    try:
        ref = parse_repo_id(repo_id, provider)
    except InvalidName:
        return
    assert ref.provider == provider in PROVIDERS
    path = f"/{ref.provider}/{ref.org}/{ref.name}"  # where the repo shows on a mount
    assert posixpath.normpath(path) == path and "\0" not in path and ref.org and ref.name
    if provider.startswith("huggingface"):  # Hub repos: exactly <org>/<name>, each part checked
        assert ref.repo_id == repo_id and check_repo_part(ref.org) == ref.org and check_repo_part(ref.name)


# -- ranges, query values, request paths --------------------------------------------------


@given(TEXT, st.integers(min_value=0, max_value=1 << 40))
def test_range_headers_give_a_span_inside_the_file_or_416(text: str, size: int) -> None:
    for header in (text, f"bytes={text}", f"bytes={text}-", f"bytes=-{text}", f"bytes=0-{text}"):
        try:
            span = parse_range(header, size)
        except BadRange as exc:
            assert exc.status == 416
            continue
        assert span is not None
        start, end = span
        assert 0 <= start < end <= size


@given(st.integers(min_value=1, max_value=1 << 40), st.data())
def test_well_formed_ranges_round_trip(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(min_value=0, max_value=size - 1))
    last = data.draw(st.integers(min_value=start, max_value=size + 10))
    assert parse_range(f"bytes={start}-{last}", size) == (start, min(last + 1, size))
    assert parse_range(f"bytes={start}-", size) == (start, size)
    suffix = data.draw(st.integers(min_value=1, max_value=size + 10))
    assert parse_range(f"bytes=-{suffix}", size) == (max(size - suffix, 0), size)


@given(TEXT)
def test_request_paths_split_into_decoded_segments_or_400(path: str) -> None:
    for target in (path, "/" + path):
        try:
            segments = _segments(target)
        except InvalidName as exc:
            assert exc.status == 400
            continue
        assert target.startswith("/") and len(segments) == target.count("/")


@given(st.dictionaries(st.sampled_from(["repo", "revision", "subPath", "prefetch", "provider", "revison",
                                        "csi.storage.k8s.io/pod.name"]), st.one_of(TEXT, NAME_CHARS), max_size=6))
def test_csi_volume_attributes_are_a_spec_or_invalid_argument(context: dict[str, str]) -> None:
    try:
        spec = parse_volume_context(context)
    except InvalidVolume:
        return
    assert check_revision(spec.revision) == spec.revision
    if spec.sub_path:
        assert check_path(spec.sub_path) == spec.sub_path


@given(TEXT)
def test_mountinfo_fields_unescape_without_error(field: str) -> None:
    assert isinstance(_unescape(field), str)


# -- options and sizes ----------------------------------------------------------------------


@given(st.one_of(TEXT, st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,3})? ?[kKmMgGtT]?i?[bB]?\Z")))
def test_option_values_are_checked_or_refused_with_a_usage_error(text: str) -> None:
    checks = [options.chunk_size, options.read_ahead, options.int_between(1, 1024), options.seconds,
              options.http_url, options.listen_address, options.absolute_path, options.dns_name, options.non_empty]
    for check in checks:
        try:
            check(text)
        except argparse.ArgumentTypeError as exc:
            assert str(exc) and "\n" not in str(exc)
    try:
        assert parse_size(text) >= 0
    except ValueError:
        pass


# -- manifests and chunk maps -------------------------------------------------------------


HEX = "0123456789abcdef"
ENTRIES = st.builds(
    lambda path, size, lfs, digest, chunk: FileEntry(path, size, SHA256 if lfs else GIT_SHA1,
                                                    digest[:64] if lfs else digest[:40], chunk),
    st.from_regex(r"\A[a-z0-9_]{1,8}(/[a-z0-9_.-]{1,8}){0,2}\Z").filter(lambda p: ".." not in p.split("/")
                                                                      and "." not in p.split("/")),
    st.integers(min_value=0, max_value=1 << 40), st.booleans(), st.text(alphabet=HEX, min_size=64, max_size=64),
    st.sampled_from([4 << 10, 64 << 10, 4 << 20, 256 << 20]))


@given(st.lists(ENTRIES, max_size=6, unique_by=lambda e: e.path), st.text(alphabet=HEX, min_size=40, max_size=40))
def test_manifests_round_trip(entries: list[FileEntry], commit: str) -> None:
    manifest = Manifest(parse_repo_id("org/model"), commit, tuple(sorted(entries, key=lambda e: e.path)))
    again = Manifest.loads(manifest.dumps())
    assert again == manifest and again.dumps() == manifest.dumps()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


@given(st.data())
def test_manifests_from_the_network_parse_or_fail_as_documented(data: st.DataObject) -> None:
    """What :class:`BackendRemote` catches: ValueError, KeyError, TypeError, InvalidName."""
    valid = {"format": 1, "provider": "huggingface", "repo": "org/model", "commit": "a" * 40,
             "files": [{"path": "a.bin", "size": 5, "hash_algo": SHA256, "hash": "b" * 64, "chunk_size": 65536}]}
    document = data.draw(st.one_of(JSON, st.fixed_dictionaries({k: st.one_of(st.just(v), JSON)
                                                                for k, v in valid.items()})))
    if isinstance(document, dict) and isinstance(document.get("files"), list) and data.draw(st.booleans()):
        document["files"] = [data.draw(st.one_of(JSON, st.fixed_dictionaries(
            {k: st.one_of(st.just(v), JSON) for k, v in valid["files"][0].items()})))]
    try:
        manifest = Manifest.from_json(document)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError, InvalidName):
        return
    assert Manifest.loads(manifest.dumps()) == manifest


@given(st.binary(max_size=200))
def test_manifest_bytes_parse_or_fail_as_documented(raw: bytes) -> None:
    try:
        Manifest.loads(raw)
    except (ValueError, KeyError, TypeError, InvalidName):
        pass


@given(st.integers(min_value=0, max_value=3 * BLOCK_SIZE + 7), st.sampled_from([BLOCK_SIZE, 2 * BLOCK_SIZE, 100_000]),
       st.binary(max_size=4 * DIGEST_SIZE))
def test_chunk_maps_take_exactly_their_digests(size: int, chunk_size: int, digests: bytes) -> None:
    try:
        chunk_map = ChunkMap("sha256-" + "c" * 64, size, chunk_size, digests)
    except ValueError:
        return
    assert sum(len(chunk_map.chunk_digests(i)) for i in range(chunk_map.chunk_count)) == len(digests)
    with pytest.raises(IndexError):
        chunk_map.chunk_digests(chunk_map.chunk_count)


@given(st.binary(max_size=3 * BLOCK_SIZE + 100), st.sampled_from([BLOCK_SIZE, 2 * BLOCK_SIZE, 70_000]))
def test_a_chunk_map_matches_the_chunks_it_was_made_from(data: bytes, chunk_size: int) -> None:
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    chunk_map = ChunkMap(f"sha256-{hashlib.sha256(data).hexdigest()}", len(data), chunk_size,
                         b"".join(block_digests(c) for c in chunks))
    for index, chunk in enumerate(chunks):
        assert chunk_map.matches(index, block_digests(chunk))
        if chunk:
            flipped = bytes([chunk[0] ^ 1]) + chunk[1:]
            assert not chunk_map.matches(index, block_digests(flipped))
    recut = chunk_map.recut(2 * BLOCK_SIZE)
    if recut is not None:
        assert recut.digests == chunk_map.digests


# -- protocol messages: what a server answers, what an error says ---------------------------


STATUS_LINES = st.one_of(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 206 Partial", b"HTTP/1.1 103 Early",
                                          b"HTTP/1.0 404 Nope", b"HTTP/1.1 101 Up", b"HTTP/1.1 2x0 ?", b"ICY 200"]),
                         st.binary(max_size=30))
HEADER_LINES = st.lists(st.one_of(
    st.sampled_from([b"Content-Length: 5", b"Content-Length: \xb2", b"Content-Length: -1", b"Content-Length: 99",
                     b"Transfer-Encoding: chunked", b"Connection: close", b"X-Error-Code: RepoNotFound"]),
    st.binary(max_size=40)), max_size=4)
BODIES = st.one_of(st.binary(max_size=60), st.sampled_from([b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n",
                                                            b"ffffffffffffffffff\r\n", b"5;ext=1\r\nhello\r\n0\r\n\r\n"]))


@given(st.lists(st.tuples(STATUS_LINES, HEADER_LINES), min_size=1, max_size=3), BODIES,
       st.sampled_from(["GET", "HEAD"]))
def test_answers_from_a_server_parse_or_fail_as_documented(heads: list[tuple[bytes, list[bytes]]], body: bytes,
                                                           method: str) -> None:
    """The data-path client's parser on any bytes a server (or a proxy) may send: a
    response, or :class:`TransientError`/:class:`UpstreamError` (its private
    ``_ConnectionClosed``/``_BodyTooLarge`` become those in ``_send``)."""
    wire = b"".join(status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
                    for status, headers in heads) + body

    async def parse() -> Response | None:
        client = WireClient(read_timeout=1)
        sender, receiver = trio.testing.memory_stream_pair()
        await sender.send_all(wire)
        await sender.aclose()
        connection = _Connection(receiver)
        try:
            status, headers, _ = await client._read_final_head(connection)
            content = await client._read_body(connection, method, status, headers, 64)
        except (TransientError, UpstreamError, _ConnectionClosed, _BodyTooLarge, trio.TooSlowError):
            return None
        return Response(status, headers, content, "http://server/")

    response = trio.run(parse)
    if response is not None:
        assert 200 <= response.status_code <= 999 and len(response.content) <= max(64, 1 << 20)


@given(st.integers(min_value=100, max_value=999), st.dictionaries(st.sampled_from(
    ["X-Error-Code", "X-Error-Message", "Content-Type"]), TEXT, max_size=3), st.binary(max_size=80))
@example(502, {}, b"0")  # JSON that is no object: found by the long profile (an AttributeError)
@example(500, {}, b"[]")
def test_any_error_answer_maps_to_an_mmfs_error(status: int, headers: dict[str, str], body: bytes) -> None:
    assume(not 200 <= status < 300)
    response = Response(status, Headers({k.lower(): v for k, v in headers.items()}), body, "http://server/x")
    error = error_from_response(response)
    assert isinstance(error, MmfsError) and str(error)
    assert isinstance(from_http(status, "m", headers.get("X-Error-Code")), MmfsError)
