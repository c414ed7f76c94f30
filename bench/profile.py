"""Summaries of py-spy's collapsed stacks (``--format raw``): where a daemon spends its samples."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('fn')} ({path})"


def _ours(name: str) -> bool:
    return "mmfs/" in name or "backend_server/" in name


def summarize_collapsed(text: str) -> dict[str, Any]:
    """Top functions by own samples and (ours only) by inclusive samples, as percentages."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
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
        own[names[-1]] += count
        for name in set(names):
            if _ours(name):
                incl[name] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {"samples": total,
            "self": [(fn, 100.0 * c / total) for fn, c in own.most_common(25)],
            "inclusive": [(fn, 100.0 * c / total) for fn, c in incl.most_common(25)]}
