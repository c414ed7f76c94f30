"""Local directories as a store: models already on a parallel file system (NFS, Weka, DDN,
Lustre) mounted where mmfs runs.

Roots are named by the operator (``--store file:<name>=<path>``): a model is
``file/<name>/<folder…>`` and nothing outside a configured root is ever opened (symbolic
links that lead out of the root are not listed). Files carry no checksum, so a file's
version is its size, modification time and inode, and every read checks them before and
after reading: a file rewritten in place fails the read instead of mixing two versions.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from ..errors import AccessDenied, EntryNotFound, InvalidName, MmfsError, RepoNotFound, StaleRevision, UpstreamError
from ..manifest import FileEntry
from .store import ObjectStore, StoredObject, relative_path

log = logging.getLogger(__name__)


class LocalDirStore(ObjectStore):
    provider = "file"

    def __init__(self, roots: dict[str, Path]) -> None:
        self._roots = {name: Path(os.path.realpath(path)) for name, path in roots.items()}
        self.url = "file://" + ",".join(f"{n}={p}" for n, p in sorted(self._roots.items()))

    def _root(self, name: str) -> Path:
        root = self._roots.get(name)
        if root is None:
            known = ", ".join(sorted(self._roots)) or "none"
            raise RepoNotFound(f"no file root named {name!r} here (configured: {known})")
        return root

    def address(self, bucket: str, key: str = "") -> str:
        root = self._roots.get(bucket)
        return f"{root}/{key}" if root is not None else f"file://{bucket}/{key}"

    def list(self, bucket: str, prefix: str) -> list[StoredObject]:
        root = self._root(bucket)
        top = root / prefix
        objects: list[StoredObject] = []
        try:
            self._walk(root, top, prefix, objects)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise RepoNotFound(f"{top} is a file, not a model folder") from None
        except PermissionError as exc:
            raise AccessDenied(f"cannot read {exc.filename or top}: permission denied") from None
        return objects

    def _walk(self, root: Path, folder: Path, prefix: str, out: list[StoredObject]) -> None:
        with os.scandir(folder) as entries:
            for item in entries:
                key = os.path.relpath(item.path, root)
                if item.is_symlink() and not Path(os.path.realpath(item.path)).is_relative_to(root):
                    log.warning("%s leads out of its root %s: not listed", item.path, root)
                    continue
                if item.is_dir():
                    self._walk(root, Path(item.path), prefix, out)
                elif item.is_file():
                    path = relative_path(prefix, key)
                    if path is None:
                        continue
                    st = item.stat()
                    version = f"mtime:{st.st_mtime_ns}:{st.st_ino}"
                    out.append(StoredObject(path, key, st.st_size, version, version))

    def read(self, bucket: str, entry: FileEntry, key: str, start: int, end: int) -> bytes:
        path = self._root(bucket) / key
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EntryNotFound(f"{path} does not exist") from None
        except PermissionError:
            raise AccessDenied(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            raise _os_error(exc, path) from None
        try:
            self._check(fd, entry, path)
            data = os.pread(fd, end - start, start)
            self._check(fd, entry, path)
            return data
        except OSError as exc:
            raise _os_error(exc, path) from None
        finally:
            os.close(fd)

    @staticmethod
    def _check(fd: int, entry: FileEntry, path: Path) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or f"mtime:{st.st_mtime_ns}:{st.st_ino}" != entry.pin \
                or st.st_size != entry.size:
            raise StaleRevision(f"{path} changed since this revision was listed (size, mtime or inode); "
                                   "read 'latest' again")


def _os_error(exc: OSError, path: Path) -> MmfsError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"cannot read {path}: {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return EntryNotFound(f"{path} does not exist")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidName(f"{path}: {exc.strerror}")
    return UpstreamError(f"cannot read {path}: {exc.strerror}")
