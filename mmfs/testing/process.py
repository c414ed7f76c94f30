"""Start a daemon as a child process and wait for the one line that says it is ready.

The hub, the backend and ``mmfs mount`` all print a ready line on stdout (``hub listening
on …``, ``mmfs-backend listening on …``, ``mmfs: mounted …``) and log on stderr; tests,
benchmarks and the demo start them the same way, here.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Mapping

#: The folder that holds the ``mmfs`` and ``backend_server`` packages, for child processes
#: started from a checkout that is not installed.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the source root importable."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    return env


def start_until_ready(argv: list[str], env: Mapping[str, str], *, log_path: Path | None,
                      timeout: float) -> tuple[subprocess.Popen[str], str]:
    """Start ``argv`` (stdout piped, stderr appended to ``log_path`` or inherited) and
    return it with its first stdout line, or ``""`` when none came within ``timeout``.
    The caller checks the line and stops the process if it is not the ready line."""
    log = open(log_path, "a") if log_path is not None else None
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(env))
    finally:
        if log is not None:
            log.close()
    assert proc.stdout is not None
    stdout = proc.stdout
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return proc, line[0] if line else ""


def stop(proc: subprocess.Popen[str], signal_number: int, timeout: float) -> int:
    """Send ``signal_number``, wait up to ``timeout``, then SIGKILL; close stdout; return
    the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal_number)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if proc.stdout:
        proc.stdout.close()
    return code
