"""The fleet's shared level on Redis (README "Fleet (Redis)"): store/shared.SharedLevel.

Keys under `prefix` (default "mtasts:v1:"):
- `d:<domain>`: the shared document of one domain (store/shared.encode), expiring at the entry's
  own end (entry.ends_at: policy expiry, negative TTL, back-off), never later;
- `due`: a sorted set of domains by the time they are due (entry.due_at), for the warmers (never
  KEYS or SCAN over the keyspace); members whose key expired are dropped when met, and every write
  drops the members that were due more than INDEX_KEEP ago (nobody refreshed them: not in use), so
  the index stays bounded without a scan;
- `lock:<domain>`: the short fetch lock (SET NX PX) that makes a cold domain one fetch per fleet;
- the channel `invalidate`: "<domain> <node>" after every write, so other nodes pick it up, and
  "<domain> <node> forget <time> [<HMAC>]" after `cache forget` (store/shared.read_notice: with
  `hmac_key`, a forget must be signed and fresh).

Writes are one Lua script: compare-and-set on the policy fetch time (entry.supersedes: a stale
write is refused), SET with PXAT, the index, PUBLISH. Redis must never slow a node down: redis-py
with no hidden retries, `timeout` on every socket operation, and a circuit breaker: after a
failure Redis is skipped for BREAK seconds, then one call probes it. A read-only node (a replica's
URL) sends no write command at all.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mtasts_policyd.store.entry import Entry
from mtasts_policyd.store.shared import Notice, SharedUnavailable, decode, encode, forget_message, read_notice

log = logging.getLogger("mtasts_policyd.redis")

BREAK = 3.0  # seconds Redis is skipped after a failure, before one call probes it again
INDEX_TRIM = 500  # members looked at per call when dropping index members whose key expired
INDEX_KEEP = 30 * 86400  # seconds an index member stays past its due time without a refresh

T = TypeVar("T")

# KEYS: entry, index, lock. ARGV: document, fetched_at, expire (ms since the epoch), due score,
# domain, channel, message, lock token, index cutoff (members due before it go).
_WRITE = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, doc = pcall(cjson.decode, old)
  if ok and type(doc) == 'table' and type(doc.record) == 'table' then
    local stored = tonumber(doc.record.fetched_at) or 0
    if stored > tonumber(ARGV[2]) then
      if redis.call('GET', KEYS[3]) == ARGV[8] then redis.call('DEL', KEYS[3]) end
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[9])
redis.call('PUBLISH', ARGV[6], ARGV[7])
if redis.call('GET', KEYS[3]) == ARGV[8] then redis.call('DEL', KEYS[3]) end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def client(url: str, timeout: float, name: str = "mtasts-policyd", ca_file: str | None = None) -> redis.Redis:
    """A client with no hidden retries and `timeout` on connecting and on every reply
    (`rediss://` for TLS, `redis://user:password@host` for an ACL user: redis-py reads the URL);
    `name`: what CLIENT LIST shows for its connections; `ca_file`: the CA bundle a rediss://
    server's certificate must chain to (None: the system's store; the host name is checked)."""
    tls: dict[str, Any] = {"ssl_ca_certs": ca_file} if ca_file and url.startswith("rediss:") else {}
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
                                client_name=name, **tls)


class RedisLevel:
    """A SharedLevel on Redis; thread-safe (redis-py's pool). See the module docstring."""

    def __init__(self, url: str, *, read_url: str | None = None, read_only: bool = False,
                 prefix: str = "mtasts:v1:", timeout: float = 0.2, hmac_key: bytes | None = None,
                 node: str | None = None, ca_file: str | None = None) -> None:
        self.read_only = read_only
        self.prefix = prefix
        self.hmac_key = hmac_key
        self.node = node or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.timeout = timeout
        name = f"mtasts-policyd/{self.node}"
        self._read = client(read_url or url, timeout, name, ca_file)
        self._write = None if read_only else client(url, timeout, name, ca_file)
        self._write_script = self._write.register_script(_WRITE) if self._write is not None else None
        self._release_script = self._write.register_script(_RELEASE) if self._write is not None else None
        self._tokens: dict[str, str] = {}  # domain -> the token of the lock this node holds
        self._lock = threading.Lock()
        self._open_until = 0.0  # monotonic time until which Redis is skipped (circuit open)
        self._probing = False
        self.up = True
        self.errors = 0
        self.last_error = ""
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    # ----- keys --------------------------------------------------------------------------------

    def _key(self, domain: str) -> str:
        return f"{self.prefix}d:{domain}"

    @property
    def index(self) -> str:
        return f"{self.prefix}due"

    @property
    def channel(self) -> str:
        return f"{self.prefix}invalidate"

    def _lock_key(self, domain: str) -> str:
        return f"{self.prefix}lock:{domain}"

    # ----- the circuit breaker -----------------------------------------------------------------

    def _call(self, what: str, action: Callable[[], T]) -> T:
        """Run one Redis operation through the breaker: skipped while it is open, one probe after."""
        with self._lock:
            if not self.up:
                if time.monotonic() < self._open_until or self._probing:
                    raise SharedUnavailable(f"redis down ({self.last_error})")
                self._probing = True
        try:
            result = action()
        except (redis.RedisError, OSError) as exc:
            self._failed(what, exc)
            raise SharedUnavailable(f"redis {what} failed: {exc}") from None
        if not self.up:
            with self._lock:
                self.up, self._probing = True, False
            log.info("redis up again")
        return result

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            was_up = self.up
            self.up, self._probing = False, False
            self._open_until = time.monotonic() + BREAK
            self.errors += 1
            self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        if was_up:  # one line per outage, not one per call
            log.error("redis down: %s failed (%s); working as a single node, probing every %gs",
                      what, exc, BREAK)

    def status(self) -> dict[str, Any]:
        state = "down" if not self.up else "read-only" if self.read_only else "up"
        return {"state": state, "errors": self.errors, "last_error": self.last_error or None, "node": self.node}

    # ----- entries -----------------------------------------------------------------------------

    def get(self, domain: str, now: float) -> Entry | None:
        raw = self._call("get", lambda: self._read.get(self._key(domain)))
        if raw is None:
            return None
        return decode(raw, domain, now, self.hmac_key)  # type: ignore[arg-type]

    def raw(self, domain: str) -> bytes | None:
        """The stored document as it is (`cache show`, tests)."""
        return self._call("get", lambda: self._read.get(self._key(domain)))  # type: ignore[return-value]

    def put(self, entry: Entry, due_at: float) -> bool:
        if self._write_script is None:
            return False
        ends = entry.ends_at()
        if ends <= time.time():
            self.release(entry.domain)
            return True  # nothing that still serves: nothing to share
        document = encode(entry, self.hmac_key)
        token = self._tokens.get(entry.domain, "")
        args: list[bytes | str | float | int] = [document, entry.fetched_at or 0.0, int(ends * 1000), due_at, entry.domain, self.channel,
                f"{entry.domain} {self.node}", token, time.time() - INDEX_KEEP]
        script = self._write_script
        written = self._call("write", lambda: script(
            keys=[self._key(entry.domain), self.index, self._lock_key(entry.domain)], args=args))
        self._tokens.pop(entry.domain, None)
        return bool(written)

    def delete(self, domain: str) -> bool:
        write = self._write
        if write is None:
            return False

        def remove() -> int:
            pipe = write.pipeline()
            pipe.delete(self._key(domain))
            pipe.zrem(self.index, domain)
            pipe.publish(self.channel, forget_message(domain, self.node, time.time(), self.hmac_key))
            return int(pipe.execute()[0])
        return bool(self._call("delete", remove))

    # ----- the fetch lock ----------------------------------------------------------------------

    def claim(self, domain: str, ttl: float) -> bool:
        write = self._write
        if write is None:
            return False
        token = f"{self.node}:{secrets.token_hex(8)}"
        taken = self._call("lock", lambda: write.set(self._lock_key(domain), token, nx=True,
                                                     px=max(int(ttl * 1000), 1)))
        if taken:
            self._tokens[domain] = token
        return bool(taken)

    def release(self, domain: str) -> None:
        token = self._tokens.pop(domain, None)
        script = self._release_script
        if token is None or script is None:
            return
        self._call("unlock", lambda: script(keys=[self._lock_key(domain)], args=[token]))

    def locked(self, domain: str) -> bool:
        return bool(self._call("lock", lambda: self._read.exists(self._lock_key(domain))))

    # ----- the index ---------------------------------------------------------------------------

    def due(self, until: float, limit: int) -> list[str]:
        members = self._call("index", lambda: self._read.zrangebyscore(self.index, "-inf", until, 0, limit))
        return self._live([m.decode() if isinstance(m, bytes) else str(m) for m in members])

    def domains(self) -> list[str]:
        members = self._call("index", lambda: self._read.zrange(self.index, 0, -1))
        return sorted(self._live([m.decode() if isinstance(m, bytes) else str(m) for m in members]))

    def _live(self, domains: list[str]) -> list[str]:
        """The domains whose key still exists; the others (expired) leave the index."""
        live: list[str] = []
        for start in range(0, len(domains), INDEX_TRIM):
            batch = domains[start:start + INDEX_TRIM]
            pipe = self._read.pipeline(transaction=False)
            for domain in batch:
                pipe.exists(self._key(domain))
            found = self._call("index", pipe.execute)
            live += [d for d, there in zip(batch, found) if there]
            gone = [d for d, there in zip(batch, found) if not there]
            write = self._write
            if gone and write is not None:
                self._call("index", lambda: write.zrem(self.index, *gone))
        return live

    # ----- invalidations -----------------------------------------------------------------------

    def listen(self, on_message: Callable[[str, str, Notice], None]) -> None:
        """Call on_message(domain, node, notice) for every write of any node (this one's too), from a
        thread of its own, reconnecting after a failure. Pub/sub reaches replicas: a read-only
        node on a replica hears the fleet's writes."""
        self._listener = threading.Thread(target=self._listen, args=(on_message,), name="redis-listen", daemon=True)
        self._listener.start()

    def _listen(self, on_message: Callable[[str, str, Notice], None]) -> None:
        while not self._closed.is_set():
            pubsub = self._read.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                    domain, node, notice = read_notice(text, time.time(), self.hmac_key)
                    try:
                        on_message(domain, node, notice)
                    except Exception as exc:  # the listener must outlive any surprise
                        log.error("redis invalidation domain=%s not applied: %r", domain, exc)
            except (redis.RedisError, OSError, ValueError) as exc:  # ValueError: its socket closed by close()
                if not self._closed.is_set():
                    log.debug("redis listener: %s; reconnecting", exc)
                    self._closed.wait(BREAK / 3)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError, ValueError):
                    pass

    def close(self) -> None:
        self._closed.set()
        for c in (self._read, self._write):
            if c is not None:
                try:
                    c.close()
                except (redis.RedisError, OSError):
                    pass
