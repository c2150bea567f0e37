"""What the server told garden about one repository, kept so that a second run asks it nothing again and
`HF_HUB_OFFLINE=1` works: the branch list, each revision's weight files (content id, size, shard map),
the parsed safetensors headers and `.bin` layouts by content id, and which downloads were verified.

Several jobs (and the prefetch threads of one) share a repository's manifest: every change goes through
`Manifest.record`, which merges what is on disk (another job may have added its own revisions) under the
manifest's file lock, then writes it atomically.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, TypeVar

from garden import cache

MANIFEST_FORMAT = 3  # bump when the manifest's records change shape: older ones are relearnt
SECTIONS = ("revisions", "headers", "verified")  # {key: record}, merged key by key with the disk's
T = TypeVar("T")


class Manifest:
    """The manifest of one repository (`manifest.json` in its folder of garden's cache)."""

    def __init__(self, path: Path, repo: str):
        self.path, self.repo = path, repo
        self._lock = threading.RLock()
        found = cache.read_json(path, "Hub manifest")
        if found is None or found.get("format") != MANIFEST_FORMAT:
            found = {"repo": repo, "format": MANIFEST_FORMAT, "branches": None, "revisions": {}}
        #: The manifest as saved (JSON); read it freely, change it only by `record`.
        self.data: dict = found

    @property
    def branches(self) -> list[str] | None:
        return self.data.get("branches")

    def get(self, section: str, key: str) -> Any:
        """A record of a section (revisions, headers, verified); None when not known."""
        return self.data.get(section, {}).get(key)

    def record(self, *keys: str, value: T, keep: bool = False) -> T:
        """Set `data[keys[0]]...[keys[-1]] = value` (or, with `keep`, leave a value already there) and
        save; returns the value now recorded. The one way the manifest changes."""
        with self._lock:
            *parents, last = keys
            node = self.data
            for key in parents:
                node = node.setdefault(key, {})
            if not (keep and last in node):
                node[last] = value
            self._save()
            return node[last]

    def _save(self) -> None:
        """Merge what this process learnt into the manifest on disk (other jobs may have added their own
        revisions meanwhile), under the manifest's lock, then write it atomically."""
        with self._lock, cache.producing(self.path, f"the manifest of {self.repo}"):
            on_disk = cache.read_json(self.path, "Hub manifest") or {}
            if on_disk.get("format") == MANIFEST_FORMAT:
                for section in SECTIONS:
                    self.data[section] = {**on_disk.get(section, {}), **self.data.get(section, {})}
                if self.data.get("branches") is None:
                    self.data["branches"] = on_disk.get("branches")
            cache.write_json(self.path, self.data)
