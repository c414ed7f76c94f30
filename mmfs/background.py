"""``mmfs mount --daemon``: start the mount in the background, return once it is mounted.

The daemon is the same ``mmfs mount`` command without ``--daemon``, started in a session
of its own with its output (the ready line, logs, a start-up error) appended to the log
file. The caller waits until the ready line appears there, then prints it and exits 0; if
the daemon exits first, it prints the daemon's one-line error and exits 1, so a script
running ``mmfs mount --daemon && next-step`` never proceeds without a mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import MmfsError

#: The line ``mmfs mount`` prints once the mount serves (and its readahead is raised).
READY_PREFIX = "mmfs: mounted "
#: Longest a start may take (opening a big cache index, a slow first contact is not
#: waited for: the mount serves before it talks to the remote).
START_TIMEOUT = 120.0


def daemon_argv(argv: Sequence[str], log_file: Path) -> list[str]:
    """The foreground command the daemon runs: ``argv`` without ``--daemon``, with the log file."""
    kept = [a for a in argv if not (len(a) > 3 and "--daemon".startswith(a))]  # argparse takes "--dae" too
    if not any(a == "--log-file" or a.startswith("--log-file=") for a in kept):
        kept += ["--log-file", str(log_file)]
    return [sys.executable, "-m", "mmfs", *kept]


def start(argv: Sequence[str], log_file: Path, *, timeout: float = START_TIMEOUT) -> str:
    """Start the daemon; return its ready line. :class:`MmfsError` with its own error line if
    it exits before mounting (or is stopped after ``timeout`` seconds without a mount)."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "ab")
    except OSError as exc:
        raise MmfsError(f"cannot write the log file {log_file}: {exc.strerror or exc}") from None
    with log:
        offset = log.seek(0, os.SEEK_END)
        proc = subprocess.Popen(daemon_argv(argv, log_file), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        written = _since(log_file, offset)
        ready = next((line for line in written if line.startswith(READY_PREFIX)), None)
        if ready is not None:
            return f"{ready} in the background, pid {proc.pid}, log {log_file}"
        code = proc.poll()
        if code is not None:
            said = [line for line in written if line.startswith("mmfs mount:")] or written[-3:]
            raise MmfsError(" / ".join(line.removeprefix("mmfs mount: ") for line in said)
                            or f"the daemon exited with status {code} before mounting (log: {log_file})")
        if time.monotonic() > deadline:
            proc.terminate()
            raise MmfsError(f"not mounted after {timeout:g} s; stopped the daemon (log: {log_file})")
        time.sleep(0.05)


def _since(log_file: Path, offset: int) -> list[str]:
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
