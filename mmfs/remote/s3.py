"""Amazon S3 and S3-compatible stores, through boto3 (botocore signs and retries).

Configured the AWS way, as the AWS CLI is: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` and the shared config files, ``AWS_REGION``, and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for S3-compatible stores.

Listing is ``ListObjectsV2`` (key, size, ETag); each object of a new revision then gets one
``HeadObject`` with checksum mode on: a full-object ``x-amz-checksum-sha256`` becomes the
file's SHA-256 (verified like a Hub LFS file, and shared with identical Hub content), and a
version id (versioned buckets) becomes the pin, so old revisions stay readable. Without a
version id reads are pinned with ``If-Match: <ETag>``.
"""

from __future__ import annotations

import base64
from typing import Any, NoReturn

from ..errors import AccessDenied, EntryNotFound, MmfsError, RepoNotFound, StaleRevision, UpstreamError
from ..manifest import SHA256, FileEntry
from .store import ObjectStore, StoredObject, relative_path

#: Error codes that mean "these credentials may not do this".
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}


class S3Store(ObjectStore):
    provider = "s3"

    def __init__(self, *, max_connections: int = 16) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        self._client = session.client("s3", config=Config(
            max_pool_connections=max_connections, connect_timeout=5, read_timeout=30,
            retries={"mode": "standard", "max_attempts": 4}))
        self.url = self._client.meta.endpoint_url.rstrip("/")

    def _fail(self, exc: Exception, bucket: str, key: str = "") -> NoReturn:
        raise _error(exc, self.address(bucket, key), bucket) from exc

    def list(self, bucket: str, prefix: str) -> list[StoredObject]:
        objects = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for page in pages:
                for item in page.get("Contents", []):
                    path = relative_path(prefix, item["Key"])
                    if path is None:
                        continue
                    etag = str(item["ETag"])
                    objects.append(StoredObject(path, item["Key"], int(item["Size"]), etag, f"etag:{etag}"))
        except Exception as exc:  # noqa: BLE001 - botocore's errors are mapped in one place
            self._fail(exc, bucket, prefix + "/")
        return objects

    def describe(self, bucket: str, obj: StoredObject) -> StoredObject:
        try:
            head = self._client.head_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, bucket, obj.key)
        if str(head.get("ETag")) != obj.version or int(head.get("ContentLength", -1)) != obj.size:
            raise StaleRevision(f"{self.address(bucket, obj.key)} changed while its listing was read; "
                                   "resolve the revision again")
        checksum = None
        sha256 = head.get("ChecksumSHA256")
        # A composite checksum (multipart uploads: "<b64>-<parts>") is not the file's hash.
        if sha256 and "-" not in sha256 and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            checksum = (SHA256, base64.b64decode(sha256).hex())
        version = head.get("VersionId")
        pin = f"version:{version}" if version and version != "null" else obj.pin
        return StoredObject(obj.path, obj.key, obj.size, obj.version, pin, checksum)

    def read(self, bucket: str, entry: FileEntry, key: str, start: int, end: int) -> bytes:
        kind, _, value = entry.pin.partition(":")
        pin: dict[str, Any] = {"VersionId": value} if kind == "version" else {"IfMatch": value}
        try:
            answer = self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin)
            return answer["Body"].read()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, bucket, key)

    def close(self) -> None:
        self._client.close()


def _error(exc: Exception, where: str, bucket: str) -> MmfsError:
    """botocore's exceptions as the :mod:`mmfs.errors` a reader understands."""
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    if isinstance(exc, MmfsError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AccessDenied(f"{where}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return UpstreamError(f"{where}: cannot reach the S3 endpoint: {exc}")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or code
        if code == "NoSuchBucket":
            return RepoNotFound(f"S3 bucket {bucket!r} does not exist ({where})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return EntryNotFound(f"{where} does not exist")
        if code in ("NoSuchVersion",) or code in ("PreconditionFailed", "412") or status == 412:
            return StaleRevision(f"{where} changed upstream since this revision was listed "
                                    "(its ETag or version no longer matches); read 'latest' again")
        if code in _DENIED or status == 403:
            return AccessDenied(f"S3 refused {where}: {code}: {message} (check AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket policy)")
        return UpstreamError(f"S3 answered {status} {code} for {where}: {message}")
    if isinstance(exc, BotoCoreError):
        return UpstreamError(f"{where}: {exc}")
    return UpstreamError(f"{where}: {type(exc).__name__}: {exc}")
