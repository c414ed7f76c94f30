"""Summaries of py-spy's collapsed stacks (``--format raw``): where a daemon spends its samples.

py-spy's own idle detection misses trio's event loop waiting in ``epoll`` and trio's
worker threads waiting for a job (``--nonblocking`` samples them as running), so samples
whose leaf is one of those are counted as idle and left out of the percentages.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from collections import Counter
from typing import Any

from .harness import BIN

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_IDLE_LEAVES = ("get_events (trio/_core/_io_epoll.py)", "WorkerThread._work (trio/_core/_thread_cache.py)")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "/lib/python3.11/", "/lib/python3.12/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    if path.startswith("/"):  # a checkout elsewhere: keep from the package folder on
        for pkg in ("mmfs/", "backend_server/"):
            if f"/{pkg}" in path:
                path = pkg + path.split(f"/{pkg}", 1)[1]
    return f"{m.group('fn')} ({path})"


def _ours(name: str) -> bool:
    return "(mmfs/" in name or "(backend_server/" in name


def summarize_collapsed(text: str) -> dict[str, Any]:
    """Top functions by own samples and (ours only) by inclusive samples, as % of busy samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = idle = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group(2))
        frames = [f for f in m.group(1).split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        if names[-1].endswith(_IDLE_LEAVES) or any(names[-1].startswith(x) for x in _IDLE_LEAVES):
            idle += count
            continue
        own[names[-1]] += count
        for name in set(names):
            if _ours(name):
                incl[name] += count
    busy = total - idle
    if not busy:
        return {"samples": 0, "idle_pct": 100.0 if total else 0.0, "self": [], "inclusive": []}
    return {"samples": busy, "idle_pct": 100.0 * idle / total,
            "self": [(fn, 100.0 * c / busy) for fn, c in own.most_common(25)],
            "inclusive": [(fn, 100.0 * c / busy) for fn, c in incl.most_common(25)]}


class Profiler:
    """py-spy attached to a pid until stopped; collapsed stacks into ``out``."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        exe = BIN / "py-spy"
        self.proc = subprocess.Popen([str(exe), "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                      "--output", str(out), "--nonblocking", "--full-filenames"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # attach

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""
