"""The storage seam: what a policy store does, whatever holds the entries (README "Layout").

A store holds the entries that survive this process (SQLite today, Redis for a fleet next) or
none (memory, for `query --no-cache` and the fast tests). PolicyCache, the LRU memory layer in
front of it, is what the resolver uses. A new store is one module implementing PolicyStore.

Writes are versioned ("put if newer"): several processes share a store (the daemon, the warmer,
`cache` commands), and a write based on a stale read must be refused, not silently replace what
another process stored meanwhile; the writer then reads again and merges (entry.merge).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from mtasts_policyd.store.entry import DAILY, Entry


class CacheWriteError(Exception):
    """A write did not reach the store (raised only by a store opened with strict=True)."""


@dataclass(frozen=True)
class StoreStats:
    """What /health and /metrics say about a store."""

    rows: int | None  # entries stored; None: not counted (not asked, not persistent, or too slow)
    persistent: bool  # the store is open and its last write succeeded: answers survive a restart
    path: str | None  # where the store is, for operators (None: nowhere, memory only)
    unsaved: int  # entries the store refused, kept in memory until it takes them (maintain)


@dataclass(frozen=True)
class PruneSettings:
    """Which rows no longer serve (README "Cache size"); the values are the `cache` config keys."""

    prune_after: float = 30 * 86400  # a row not looked up for this long goes, unless its policy is usable
    negative_grace: float = 86400  # a row without a policy goes this long after its TTL and back-off end
    max_negative_entries: int = 100_000  # rows without a policy beyond this go, least recently used first


class Mirror(Protocol):
    """A memory layer's copies of a store's entries, which the store keeps true when it changes
    entries by itself (housekeeping, other processes). Called with the store's lock held."""

    def held(self) -> list[Entry]:
        """Every entry the layer holds (a store that lost its file writes them again)."""
        ...

    def stored(self, entry: Entry) -> None:
        """The store wrote `entry` (at a new version): replace the copy, if one is held."""
        ...

    def forget(self, domain: str) -> None:
        """The store deleted the domain."""
        ...

    def forget_all(self) -> None:
        """Anything may have changed (another process wrote, or the file was replaced)."""
        ...


Merge = Callable[[Entry | None, Entry], Entry]  # entry.merge: (what is stored, ours) -> what to write


class PolicyStore(Protocol):
    """Entries by domain, shared with other processes; thread-safe.

    `lock` (re-entrant) is held by every method; a memory layer in front holds it too, so that
    what the store tells its `mirror` and what the layer does itself happen in one order. The
    housekeeping methods at the end have defaults for a store that needs none.
    """

    lock: threading.RLock
    mirror: Mirror | None  # the memory layer in front, if any
    inserted: int  # entries this process added (the daemon prunes after many)

    def get(self, domain: str) -> Entry | None:
        """What the store knows for the domain: an entry waiting to be written first."""
        ...

    def reload(self, domain: str) -> Entry | None:
        """The entry as stored now, as another writer may have left it: the version a put compares
        against (after a conflict, what to merge with)."""
        ...

    def put(self, entry: Entry) -> Entry | None:
        """Store `entry` if the stored one is still at entry.version (0: none); return it at its
        new version, or None on a conflict. A store that cannot write now may keep the entry
        (unsaved, returned at its old version) and write it in maintain(); a strict one raises
        CacheWriteError."""
        ...

    def delete(self, domain: str) -> bool:
        """Forget the domain; whether it was stored."""
        ...

    def entries(self) -> Iterator[Entry]:
        """Every entry (the unsaved ones included), in domain order: one consistent snapshot."""
        ...

    def due(self, now: float, refresh_after: float = DAILY) -> Iterator[Entry]:
        """The entries a resolution at `now` would ask the network about (Entry.due)."""
        return (entry for entry in self.entries() if entry.due(now, refresh_after))

    def touch(self, seen: dict[str, float]) -> None:
        """Record when domains were last looked up (batched; no version bump, never backwards)."""
        ...

    def stats(self, *, count_rows: bool = True) -> StoreStats:
        """The store's state. Counting the rows may take a bounded while (call it off the event
        loop); count_rows=False answers at once (rows None unless counting costs nothing)."""
        ...

    def close(self) -> None:
        ...

    # ----- housekeeping: a store that needs none keeps these defaults ------------------------

    def sync(self) -> None:
        """Notice other processes' writes (cheap, called on every lookup): the mirror forgets
        what they may have changed."""
        return None

    def maintain(self, merge: Merge) -> None:
        """The periodic health check: mend the store, write what it refused (README "Cache health")."""
        return None

    def prune(self, now: float, settings: PruneSettings, pause: float = 0.005) -> int:
        """Delete the entries that no longer serve (PruneSettings); how many."""
        return 0

    def note(self, key: str) -> str | None:
        """A small fact the daemon keeps across restarts beside the entries (the DANE trust probe's
        last word), or None."""
        return None

    def set_note(self, key: str, value: str) -> None:
        """Keep a note (best effort: a note that is lost is asked again)."""
        return None
