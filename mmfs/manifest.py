"""What a commit of a model repo holds: every file with its size, content hash and chunking.

A manifest is immutable once made (a commit never changes), so nodes cache it forever and
ship it over the wire as JSON. Chunks are named by the file's *content* hash, not its path
or commit: identical files across revisions share their cached chunks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import IntegrityError
from .names import RepoRef, check_path, is_commit

#: Default chunk size: small enough that the first tensor of a cold file arrives after one
#: short upstream request, big enough that per-request overhead stays a few percent.
DEFAULT_CHUNK_SIZE = 4 << 20
MANIFEST_FORMAT = 1

SHA256 = "sha256"  # LFS files: the Hub's X-Linked-Etag; S3 objects with a full-object SHA-256 checksum
GIT_SHA1 = "git-sha1"  # regular files: the git blob id
MD5 = "md5"  # Azure blobs with a Content-MD5
#: No content hash upstream (object stores without checksums, local files): ``hash`` is a
#: fingerprint of the object *version* (store, key, ETag or version id, size), and the
#: chunk map of the first complete fetch is the reference (docs/providers.md).
PINNED = "pinned"
_HASH_FORMS = {SHA256: re.compile(r"[0-9a-f]{64}"), GIT_SHA1: re.compile(r"[0-9a-f]{40}"),
               MD5: re.compile(r"[0-9a-f]{32}"), PINNED: re.compile(r"[0-9a-f]{64}")}
#: Longest ``FileEntry.pin`` accepted from the wire.
PIN_MAX = 1024
#: The hash of empty content in each form: what a zero-byte file must carry.
_EMPTY_HASHES = {SHA256: hashlib.sha256(b"").hexdigest(), GIT_SHA1: hashlib.sha1(b"blob 0\0").hexdigest(),
                 MD5: hashlib.md5(b"", usedforsecurity=False).hexdigest()}
#: Chunk sizes a manifest may carry: a remote cannot make us allocate absurd buffers.
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 256 << 20


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Chunk ``index`` of the content ``content_id`` cut into ``chunk_size`` pieces."""

    content_id: str
    chunk_size: int
    index: int

    def encode(self) -> bytes:
        return f"{self.content_id}:{self.chunk_size}:{self.index}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ChunkKey":
        content_id, chunk_size, index = raw.decode().rsplit(":", 2)
        return cls(content_id, int(chunk_size), int(index))


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a commit."""

    path: str
    size: int
    hash_algo: str  # SHA256 or GIT_SHA1
    hash: str  # lowercase hex
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Object stores: the version every byte must come from (``etag:<ETag>``,
    #: ``version:<id>``, ``mtime:<ns>``), so an object rewritten between two chunk fetches
    #: is refused, never mixed. Empty for the Hub (its URLs name a commit).
    pin: str = ""

    def __post_init__(self) -> None:
        # Manifests come from the network; their hashes name files in the chunk store, so
        # a malformed one must never get as far as a path.
        check_path(self.path)
        form = _HASH_FORMS.get(self.hash_algo)
        if form is None or not form.fullmatch(self.hash):
            raise ValueError(f"{self.path}: invalid {self.hash_algo!r} hash {self.hash[:80]!r}")
        if self.size < 0 or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"{self.path}: invalid size {self.size} or chunk size {self.chunk_size}")
        if len(self.pin) > PIN_MAX or "\0" in self.pin:
            raise ValueError(f"{self.path}: invalid pin {self.pin[:80]!r}")

    @property
    def is_lfs(self) -> bool:
        return self.hash_algo == SHA256

    @property
    def content_id(self) -> str:
        return f"{self.hash_algo}-{self.hash}"

    @property
    def chunk_count(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def chunk_key(self, index: int) -> ChunkKey:
        return ChunkKey(self.content_id, self.chunk_size, index)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``index``."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range for {self.path} ({self.chunk_count} chunks)")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def chunks_for(self, offset: int, length: int) -> range:
        """Indices of the chunks covering ``[offset, offset+length)`` clipped to the file."""
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def check_empty(self) -> None:
        """For a zero-byte file, raise :class:`IntegrityError` unless its hash is that of
        empty content. Such a file has no chunk to verify, so this is its whole check: an
        upstream listing an empty file under another content's hash is as wrong as a
        flipped byte, and readers must not take the empty file as that content."""
        if self.size == 0 and self.has_upstream_hash and self.hash != _EMPTY_HASHES[self.hash_algo]:
            raise IntegrityError(f"{self.path}: listed as empty, but its {self.hash_algo} {self.hash} is not the "
                                 "hash of empty content")

    @property
    def has_upstream_hash(self) -> bool:
        """False for :data:`PINNED` files: nothing upstream to check the whole file against."""
        return self.hash_algo != PINNED

    def new_hasher(self) -> "hashlib._Hash | _NoHash":
        """A hasher that, fed the whole content, must end in :attr:`hash` (where
        :attr:`has_upstream_hash`; otherwise one that hashes nothing)."""
        if self.hash_algo == SHA256:
            return hashlib.sha256()
        if self.hash_algo == MD5:
            return hashlib.md5(usedforsecurity=False)
        if self.hash_algo == PINNED:
            return _NoHash()
        hasher = hashlib.sha1()
        hasher.update(b"blob %d\0" % self.size)
        return hasher

    def to_json(self) -> dict[str, Any]:
        data = {"path": self.path, "size": self.size, "hash_algo": self.hash_algo, "hash": self.hash,
                "chunk_size": self.chunk_size}
        if self.pin:
            data["pin"] = self.pin
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FileEntry":
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("path", "hash_algo", "hash")) \
                or not all(type(data.get(k)) is int for k in ("size", "chunk_size")):
            raise ValueError(f"malformed file entry {str(data)[:200]!r}")
        return cls(data["path"], data["size"], data["hash_algo"], data["hash"], data["chunk_size"],
                   str(data.get("pin", "")))


class _NoHash:
    """The whole-file "hash" of a :data:`PINNED` file: there is nothing to compare with."""

    def update(self, data: bytes | memoryview) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


@dataclass(frozen=True)
class Manifest:
    """Every file of ``repo`` at ``commit``, sorted by path."""

    repo: RepoRef
    commit: str
    files: tuple[FileEntry, ...]
    _by_path: dict[str, FileEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path", {f.path: f for f in self.files})

    def file(self, path: str) -> FileEntry | None:
        return self._by_path.get(path)

    def directories(self) -> Iterator[str]:
        """Every directory implied by the file paths (not the root)."""
        seen: set[str] = set()
        for entry in self.files:
            parts = entry.path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in seen:
                    seen.add(directory)
                    yield directory

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "provider": self.repo.provider,
            "repo": self.repo.repo_id,
            "commit": self.commit,
            "files": [f.to_json() for f in self.files],
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        """Parse and validate; raise ``ValueError`` (or ``InvalidName``) on anything malformed."""
        from .names import repo_of

        if not isinstance(data, dict) or not isinstance(data.get("files"), list) \
                or not all(isinstance(data.get(k), str) for k in ("repo", "provider", "commit")):
            raise ValueError(f"malformed manifest {str(data)[:200]!r}")
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r}")
        if not is_commit(str(data.get("commit", ""))):
            raise ValueError(f"invalid commit {str(data.get('commit'))[:80]!r}")
        files = tuple(sorted((FileEntry.from_json(f) for f in data["files"]), key=lambda f: f.path))
        return cls(repo_of(data["provider"], data["repo"]), data["commit"], files)

    @classmethod
    def loads(cls, raw: bytes) -> "Manifest":
        return cls.from_json(json.loads(raw))
