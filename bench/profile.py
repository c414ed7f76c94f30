"""py-spy recordings of the daemons and summaries of their collapsed stacks (``--format raw``).

py-spy's own idle detection misses trio's event loop waiting in ``epoll`` and trio's
worker threads waiting for a job (``--nonblocking`` samples them as running), so samples
whose leaf is one of those are counted as idle and left out of the percentages.

Own time is reported per source *line*, with the line's text read right after the
recording (the tree may change under a long benchmark run), because a line that calls
into C (a ``write``, a hash, a ``recv``) is where the native time is charged.
"""

from __future__ import annotations

import linecache
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .harness import BIN

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_IDLE_LEAVES = ("EpollIOManager.get_events (trio/_core/_io_epoll.py)", "WorkerThread._work (trio/_core/_thread_cache.py)")
_MARKERS = ("site-packages/", "/work/main/", "/lib/python3.11/", "/lib/python3.12/")


def _short(path: str) -> str:
    for marker in _MARKERS:
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith("/"):  # a checkout elsewhere: keep from the package folder on
        for pkg in ("mmfs/", "backend_server/"):
            if f"/{pkg}" in path:
                return pkg + path.split(f"/{pkg}", 1)[1]
    return path


def _parse(frame: str) -> tuple[str, str, int, str]:
    """(function, short path, line, full path) of one py-spy frame."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "", 0, ""
    full = m.group("file")
    return m.group("fn"), _short(full), int(m.group("line") or 0), full


def _frame_name(frame: str) -> str:
    fn, path, _, _ = _parse(frame)
    return f"{fn} ({path})" if path else fn


def _ours(name: str) -> bool:
    return "(mmfs/" in name or "(backend_server/" in name


def summarize_collapsed(text: str) -> dict[str, Any]:
    """Top functions by own samples, top lines by own samples (with their code), and
    (mmfs and backend_server only) top functions by inclusive samples; % of busy samples."""
    own: Counter[str] = Counter()
    own_lines: Counter[tuple[str, str, int, str]] = Counter()
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
        if any(names[-1].startswith(x) for x in _IDLE_LEAVES):
            idle += count
            continue
        own[names[-1]] += count
        own_lines[_parse(frames[-1])] += count
        for name in set(names):
            if _ours(name):
                incl[name] += count
    busy = total - idle
    if not busy:
        return {"samples": 0, "idle_pct": 100.0 if total else 0.0, "self": [], "lines": [], "inclusive": []}
    lines = []
    for (fn, short, lineno, full), c in own_lines.most_common(15):
        code = linecache.getline(full, lineno).strip() if full.startswith("/") and lineno else ""
        lines.append((f"{fn} ({short}:{lineno})", code, 100.0 * c / busy))
    return {"samples": busy, "idle_pct": 100.0 * idle / total,
            "self": [(fn, 100.0 * c / busy) for fn, c in own.most_common(25)],
            "lines": lines,
            "inclusive": [(fn, 100.0 * c / busy) for fn, c in incl.most_common(25)]}


class Profiler:
    """py-spy attached to a pid until :meth:`stop`; collapsed stacks into ``out``."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        linecache.clearcache()
        self.proc = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(pid), "--rate", "200",
                                      "--format", "raw", "--output", str(out), "--nonblocking", "--full-filenames"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # attach

    def stop(self) -> dict[str, Any] | None:
        """Stop recording; the summary (source lines resolved now), or None if py-spy wrote nothing."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        if not self.out.exists():
            return None
        return summarize_collapsed(self.out.read_text())
