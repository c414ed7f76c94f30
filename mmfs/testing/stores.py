"""Real object stores on loopback for tests: moto's S3 server and Microsoft's Azurite, each
a child process (count what a store sends with :class:`mmfs.testing.net.TcpProxy`).

    with MotoS3() as s3:                      # S3 API at s3.url, IAM auth enforced
        s3.env                                # AWS_* variables of a valid key
    with Azurite(tmp / "azurite") as azure:   # Blob API at azure.url
        azure.env                             # AZURE_STORAGE_CONNECTION_STRING

Both stores check credentials: moto is started with IAM authentication on (a user, a policy
and an access key are made first), Azurite checks Shared Key signatures, so a wrong key is
refused as it is by the real services.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from .net import free_port
from .process import SOURCE_ROOT, stop

#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
#: IAM actions moto serves without authentication before it starts checking: the ones
#: :class:`MotoS3` uses to create its user, policy and key.
_MOTO_SETUP_ACTIONS = 3


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout} s")


def _spawn(argv: list[str], log_path: Path | None, env: dict[str, str] | None) -> subprocess.Popen:
    """Start ``argv`` with stdout and stderr appended to ``log_path`` (or discarded)."""
    if log_path is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    with open(log_path, "a") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log, env=env)


class _ChildServer:
    proc: subprocess.Popen | None = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, 15, 10.0)
            self.proc = None


class MotoS3(_ChildServer):
    """``moto.server`` on a free loopback port, IAM authentication on."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env: dict[str, str] = {}

    def start(self) -> "MotoS3":
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_MOTO_SETUP_ACTIONS),
               "PYTHONPATH": SOURCE_ROOT}
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = _spawn(argv, self.log_path, env)
        _wait_for_port("127.0.0.1", self.port, self.proc, 30.0, "moto.server")
        self.env = self._make_key()
        return self

    def _make_key(self) -> dict[str, str]:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="mmfs")
        iam.put_user_policy(UserName="mmfs", PolicyName="s3", PolicyDocument=(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'))
        key = iam.create_access_key(UserName="mmfs")["AccessKey"]
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}

    def client(self, **overrides: str):  # type: ignore[no-untyped-def]
        """A boto3 S3 client with this server's key (or ``overrides``)."""
        import boto3

        env = {**self.env, **overrides}
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def azurite_command() -> list[str] | None:
    """How to start Azurite's Blob service: ``AZURITE_BLOB`` (a path), the copy
    ``scripts/setup.sh`` installs in ``.deps/azurite``, or ``azurite-blob`` on the PATH."""
    candidates = [os.environ.get("AZURITE_BLOB", ""),
                  str(Path(SOURCE_ROOT) / ".deps/azurite/node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    return None


class Azurite(_ChildServer):
    """Azurite's Blob service on a free loopback port, data in ``location``."""

    def __init__(self, location: Path, log_path: Path | None = None) -> None:
        self.location = Path(location)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.log_path = log_path
        self.env = {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def connection_string(self, key: str = AZURITE_KEY, url: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={url or self.url};")

    def start(self) -> "Azurite":
        command = azurite_command()
        if command is None:
            raise RuntimeError("Azurite is not installed: run scripts/setup.sh (npm install into .deps/azurite)")
        self.location.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn([*command, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
                            str(self.location), "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
                           self.log_path, None)
        _wait_for_port("127.0.0.1", self.port, self.proc, 60.0, "azurite-blob")
        return self

    def client(self, key: str = AZURITE_KEY):  # type: ignore[no-untyped-def]
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string(key))


