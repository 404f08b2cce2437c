"""A PolicyStore in memory: nothing survives the process (`query --no-cache`, `survey` without
--update-cache, and the fast tests of the entry rules).

The same semantics as the SQLite store where it matters to a caller: versioned puts (a write
based on a stale read is refused), entries in domain order, lookup times never moved back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import cachetools

from mtasts_policyd.store.base import Mirror, PolicyStore, StoreStats
from mtasts_policyd.store.entry import Entry


class MemoryStore(PolicyStore):
    """Entries in a dict; with `max_entries`, the least recently used go beyond it (a memory-only
    cache that surveys a long list of domains stays bounded)."""

    def __init__(self, max_entries: int | None = None) -> None:
        self.lock = threading.RLock()
        self.mirror: Mirror | None = None
        self.inserted = 0
        self._entries: dict[str, Entry] | cachetools.LRUCache[str, Entry] = (
            {} if max_entries is None else cachetools.LRUCache(maxsize=max_entries))
        self._notes: dict[str, str] = {}

    def get(self, domain: str) -> Entry | None:
        with self.lock:
            return self._entries.get(domain)

    def reload(self, domain: str) -> Entry | None:
        return self.get(domain)  # nothing waits to be written: what is known is what is stored

    def put(self, entry: Entry) -> Entry | None:
        with self.lock:
            current = self._entries.get(entry.domain)
            if (current.version if current is not None else 0) != entry.version:
                return None  # another writer was first
            stored = replace(entry, version=entry.version + 1)
            self._entries[entry.domain] = stored
            if current is None:
                self.inserted += 1
            return stored

    def delete(self, domain: str) -> bool:
        with self.lock:
            return self._entries.pop(domain, None) is not None

    def entries(self) -> Iterator[Entry]:
        with self.lock:
            snapshot = sorted(self._entries.values(), key=lambda entry: entry.domain)
        return iter(snapshot)

    def touch(self, seen: dict[str, float]) -> None:
        with self.lock:
            for domain, when in seen.items():
                entry = self._entries.get(domain)
                if entry is not None and entry.last_lookup < when:
                    self._entries[domain] = replace(entry, last_lookup=when)

    def note(self, key: str) -> str | None:
        with self.lock:
            return self._notes.get(key)

    def set_note(self, key: str, value: str) -> None:
        with self.lock:
            self._notes[key] = value

    def stats(self, *, count_rows: bool = True) -> StoreStats:
        return StoreStats(rows=len(self._entries), persistent=False, path=None, unsaved=0)

    def close(self) -> None:
        pass
