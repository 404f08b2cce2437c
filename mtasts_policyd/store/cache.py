"""The policy cache: an LRU in memory in front of a PolicyStore (SQLite on disk, or memory only).

RFC 8461 §5.1 makes the cache part of the protocol: a cached policy is used until max_age after
its fetch, whatever DNS and HTTPS say meanwhile. The store is the truth; the memory layer only
saves its reads (a cached lookup takes microseconds). The store keeps the layer's copies true
when it changes entries by itself (another process wrote, pruning, repair): see base.Mirror.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import cachetools

from mtasts_policyd.store.base import Merge, PolicyStore, PruneSettings, StoreStats
from mtasts_policyd.store.entry import DAILY, Entry
from mtasts_policyd.store.memory import MemoryStore
from mtasts_policyd.store.sqlite import SqliteStore


class _Memory:
    """The LRU of entries, and the store's Mirror of it (called with the store's lock held)."""

    def __init__(self, maxsize: int) -> None:
        self.lru: cachetools.LRUCache[str, Entry] = cachetools.LRUCache(maxsize=maxsize)

    def held(self) -> list[Entry]:
        return list(self.lru.values())

    def stored(self, entry: Entry) -> None:
        if entry.domain in self.lru:
            self.lru[entry.domain] = entry

    def forget(self, domain: str) -> None:
        self.lru.pop(domain, None)

    def forget_all(self) -> None:
        self.lru.clear()


class PolicyCache:
    """Thread-safe: every method holds the store's lock (reads mostly hit memory)."""

    def __init__(self, path: str | None = None, memory_entries: int = 100_000, *, strict: bool = False,
                 store: PolicyStore | None = None) -> None:
        """The SQLite store at `path`, an empty one in memory (path None), or `store` itself.

        strict: writes that fail raise CacheWriteError. The daemon survives disk trouble by
        keeping entries in memory until the disk takes them; a command that edits the file must
        report it instead.
        """
        if store is None:
            store = (MemoryStore(max_entries=memory_entries) if path is None
                     else SqliteStore(path, strict=strict, memory_entries=memory_entries))
        elif path is not None:
            raise ValueError("PolicyCache takes a path or a store, not both")
        self.store = store
        self.memory_entries = memory_entries
        self._memory = _Memory(memory_entries)
        self._lock = store.lock
        store.mirror = self._memory

    # ----- what /health, /metrics and the logs say ----------------------------------------------

    def stats(self, *, count_rows: bool = True) -> StoreStats:
        """The store's rows, persistence, path and unsaved entries. Counting the rows takes a
        bounded while (SQLite: at most a second, on a connection of its own, never under the
        lock): call it off the event loop, or pass count_rows=False for an answer at once."""
        return self.store.stats(count_rows=count_rows)

    @property
    def path(self) -> str | None:
        """Where the store is (None: memory only)."""
        return self.store.stats(count_rows=False).path

    @property
    def persistent(self) -> bool:
        """True while answers reach the store: it is open and its last write succeeded."""
        return self.store.stats(count_rows=False).persistent

    @property
    def unsaved(self) -> int:
        """Entries known only in memory because the store refused them; maintain() writes them."""
        return self.store.stats(count_rows=False).unsaved

    @property
    def memory_size(self) -> int:
        return len(self._memory.lru)

    @property
    def inserted(self) -> int:
        """Entries this process added to the store (the daemon prunes after many: prune())."""
        return self.store.inserted

    # ----- entries ------------------------------------------------------------------------------

    def get(self, domain: str) -> Entry | None:
        with self._lock:
            self.store.sync()
            entry = self._memory.lru.get(domain)
            if entry is None:
                entry = self.store.get(domain)
                if entry is not None:
                    self._memory.lru[domain] = entry
            return entry

    def reload(self, domain: str) -> Entry | None:
        """The stored entry, bypassing memory: after a write conflict, what the other writer left."""
        with self._lock:
            self._memory.forget(domain)
            return self.store.reload(domain)

    def put(self, entry: Entry) -> Entry | None:
        """Store `entry` if the stored one is still at the version it was read at; None on a
        conflict (read again with reload() and merge). If the store refuses the write, the entry
        is kept (in memory, unsaved, at the version it was read at) and returned: maintain()
        writes it when the store takes writes again."""
        with self._lock:
            stored = self.store.put(entry)
            if stored is not None:
                self._memory.lru[entry.domain] = stored
            return stored

    def touch(self, seen: dict[str, float]) -> None:
        """Record when domains were last looked up (batched: lookups must not each write to disk)."""
        with self._lock:
            for domain, when in seen.items():
                entry = self._memory.lru.get(domain)
                if entry is not None:
                    self._memory.lru[domain] = replace(entry, last_lookup=when)
            self.store.touch(seen)

    def delete(self, domain: str) -> bool:
        with self._lock:
            found = self._memory.lru.pop(domain, None) is not None
            return self.store.delete(domain) or found

    def entries(self) -> Iterator[Entry]:
        """All stored entries and the unsaved ones, in domain order."""
        return self.store.entries()

    def due(self, now: float, refresh_after: float = DAILY) -> Iterator[Entry]:
        """The stored entries a resolution at `now` would ask the network about (Entry.due)."""
        return self.store.due(now, refresh_after)

    def note(self, key: str) -> str | None:
        """A fact kept across restarts beside the entries (PolicyStore.note)."""
        return self.store.note(key)

    def set_note(self, key: str, value: str) -> None:
        self.store.set_note(key, value)

    # ----- housekeeping -------------------------------------------------------------------------

    def prune(self, now: float, settings: PruneSettings, pause: float = 0.005) -> int:
        """Delete the entries that no longer serve; how many (README "Cache size")."""
        return self.store.prune(now, settings, pause)

    def maintain(self, merge: Merge) -> None:
        """The daemon's periodic check, off the event loop (README "Cache health")."""
        self.store.maintain(merge)

    def close(self) -> None:
        self.store.close()
