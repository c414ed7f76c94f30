"""The persistent record of published targets, so targets outlive a plugin restart.

One JSON file, ``<state-dir>/published.json``, rewritten whole (temporary file, fsync,
rename) after every change: small (one entry per published pod volume) and never torn.
It lives in its own directory (``--state-dir``), not next to the CSI socket, whose
directory kubelet scans and the spec keeps free of other files.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Published:
    """One target this plugin bind-mounted."""

    volume_id: str
    target_path: str
    #: The directory bound on the target: ``<mount-root>/<provider>/<org>/<name>/<commit>[/<subPath>]``.
    source: str
    provider: str
    repo: str
    #: The revision as asked (``main``) and the commit it was pinned to at publish time.
    revision: str
    commit: str
    sub_path: str

    def same_volume(self, other: Published) -> bool:
        """Whether *other* asks for the same volume (the pinned commit may differ)."""
        return (self.volume_id, self.provider, self.repo, self.revision, self.sub_path) == (
            other.volume_id,
            other.provider,
            other.repo,
            other.revision,
            other.sub_path,
        )


class StateStore:
    """Thread-safe map ``target_path -> Published`` persisted under *state_dir*."""

    def __init__(self, state_dir: str) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._file = self._dir / "published.json"
        self._lock = threading.Lock()
        self._entries: dict[str, Published] = self._load()

    def _load(self) -> dict[str, Published]:
        try:
            raw = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A corrupt record must not keep the plugin down: start empty, keep the file.
            log.error("cannot read %s (%s); starting with no published targets", self._file, exc)
            return {}
        entries = {}
        for item in raw.get("published", []):
            try:
                entry = Published(**item)
            except TypeError:
                log.error("skipping malformed record %r", item)
                continue
            entries[entry.target_path] = entry
        return entries

    def _save(self) -> None:
        data = {"version": FORMAT_VERSION, "published": [asdict(e) for e in self._entries.values()]}
        tmp = self._file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)

    def get(self, target_path: str) -> Published | None:
        with self._lock:
            return self._entries.get(target_path)

    def all(self) -> list[Published]:
        with self._lock:
            return list(self._entries.values())

    def put(self, entry: Published) -> None:
        with self._lock:
            self._entries[entry.target_path] = entry
            self._save()

    def remove(self, target_path: str) -> None:
        with self._lock:
            if self._entries.pop(target_path, None) is not None:
                self._save()
