"""Storage of what is known per domain: the cache entry, its stores (memory, SQLite)."""
