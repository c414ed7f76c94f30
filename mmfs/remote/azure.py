"""Azure Blob Storage, through Microsoft's ``azure-storage-blob``.

Configured the Azure way, as the ``az`` CLI is: ``AZURE_STORAGE_CONNECTION_STRING``; else
``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``
(``AZURE_STORAGE_BLOB_ENDPOINT`` for another endpoint than
``https://<account>.blob.core.windows.net``). A model is a container and a prefix.

The listing carries what a revision needs: name, size, ETag and the blob's Content-MD5,
which becomes the file's hash where present (the service keeps it for blobs uploaded in
one piece). Reads are pinned with ``If-Match: <ETag>``.
"""

from __future__ import annotations

import os
from typing import NoReturn

from ..errors import AccessDenied, EntryNotFound, InvalidName, MmfsError, RepoNotFound, StaleRevision, UpstreamError
from ..manifest import MD5, FileEntry
from .store import ObjectStore, StoredObject, relative_path


class AzureStore(ObjectStore):
    provider = "azure"

    def __init__(self, *, max_connections: int = 16) -> None:
        from azure.storage.blob import BlobServiceClient

        env = os.environ
        kwargs = {"connection_timeout": 5, "read_timeout": 30, "max_single_get_size": 256 << 20}
        try:
            if env.get("AZURE_STORAGE_CONNECTION_STRING"):
                self._client = BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"],
                                                                        **kwargs)
            elif env.get("AZURE_STORAGE_ACCOUNT"):
                account = env["AZURE_STORAGE_ACCOUNT"]
                endpoint = env.get("AZURE_STORAGE_BLOB_ENDPOINT") or f"https://{account}.blob.core.windows.net"
                credential: object = None
                if env.get("AZURE_STORAGE_KEY"):
                    credential = {"account_name": account, "account_key": env["AZURE_STORAGE_KEY"]}
                elif env.get("AZURE_STORAGE_SAS_TOKEN"):
                    credential = env["AZURE_STORAGE_SAS_TOKEN"].lstrip("?")
                self._client = BlobServiceClient(endpoint, credential=credential, **kwargs)
            else:
                raise InvalidName("Azure Blob is not configured: set AZURE_STORAGE_CONNECTION_STRING, or "
                                  "AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN")
        except ValueError as exc:
            raise InvalidName(f"unusable Azure storage configuration: {exc}") from None
        self.url = self._client.url.rstrip("/")

    def _fail(self, exc: Exception, container: str, name: str = "") -> NoReturn:
        raise _error(exc, self.address(container, name), container) from exc

    def list(self, bucket: str, prefix: str) -> list[StoredObject]:
        objects = []
        try:
            for blob in self._client.get_container_client(bucket).list_blobs(name_starts_with=prefix + "/"):
                path = relative_path(prefix, blob.name)
                if path is None:
                    continue
                md5 = blob.content_settings.content_md5 if blob.content_settings else None
                checksum = (MD5, bytes(md5).hex()) if md5 else None
                objects.append(StoredObject(path, blob.name, int(blob.size), str(blob.etag), f"etag:{blob.etag}",
                                            checksum))
        except Exception as exc:  # noqa: BLE001 - the SDK's errors are mapped in one place
            self._fail(exc, bucket, prefix + "/")
        return objects

    def read(self, bucket: str, entry: FileEntry, key: str, start: int, end: int) -> bytes:
        from azure.core import MatchConditions

        etag = entry.pin.partition(":")[2]
        try:
            blob = self._client.get_blob_client(bucket, key)
            return blob.download_blob(offset=start, length=end - start, etag=etag,
                                      match_condition=MatchConditions.IfNotModified).readall()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, bucket, key)

    def close(self) -> None:
        self._client.close()


def _error(exc: Exception, where: str, container: str) -> MmfsError:
    """azure-core's exceptions as the :mod:`mmfs.errors` a reader understands."""
    from azure.core.exceptions import (AzureError, ClientAuthenticationError, HttpResponseError,
                                       ResourceModifiedError, ResourceNotFoundError, ServiceRequestError)

    if isinstance(exc, MmfsError):
        return exc
    raw_code = getattr(exc, "error_code", "") or ""
    code = str(getattr(raw_code, "value", raw_code))  # a StorageErrorCode enum member, or a string
    status = getattr(exc, "status_code", 0) or 0
    if isinstance(exc, ResourceModifiedError) or code == "ConditionNotMet" or status == 412:
        return StaleRevision(f"{where} changed upstream since this revision was listed (its ETag no longer "
                                "matches); read 'latest' again")
    if code == "ContainerNotFound":
        return RepoNotFound(f"Azure container {container!r} does not exist ({where})")
    if isinstance(exc, ResourceNotFoundError) or code == "BlobNotFound":
        return EntryNotFound(f"{where} does not exist")
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        reason = code or type(exc).__name__
        return AccessDenied(f"Azure refused {where}: {reason} (check AZURE_STORAGE_CONNECTION_STRING, "
                            "AZURE_STORAGE_KEY or the SAS token)")
    if isinstance(exc, ServiceRequestError):
        return UpstreamError(f"{where}: cannot reach Azure Blob: {exc}")
    if isinstance(exc, HttpResponseError):
        return UpstreamError(f"Azure answered {status} {code} for {where}: {exc.reason}")
    if isinstance(exc, AzureError):
        return UpstreamError(f"{where}: {exc}")
    return UpstreamError(f"{where}: {type(exc).__name__}: {exc}")
