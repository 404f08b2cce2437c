"""Worker threads that never hold up the daemon's exit.

`concurrent.futures.ThreadPoolExecutor` joins its threads when the interpreter exits, so a
SIGTERM had to wait for every thread stuck in a DNS query or an HTTPS fetch (and for the work
queued behind them): 355 s in one measurement, far past systemd's stop timeout. These threads are
daemon threads: the daemon stops them from doing harm by closing the cache under its lock (no
thread can touch the file afterwards, cache.py), then exits without waiting for them. Whatever a
thread was fetching is lost; nothing half-written is, as every cache write is one SQLite
transaction.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(Executor):
    """At most `workers` daemon threads, started on demand, taking work in submission order."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: collections.deque[_Work | None] = collections.deque()
        self._threads = 0
        self._idle = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if self._idle == 0 and self._threads < self._workers:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()
            else:
                self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                while not self._queue:
                    self._ready.wait()
                self._idle -= 1
                item = self._queue.popleft()
            if item is None:
                with self._lock:
                    self._queue.append(None)  # pass the stop on to the next thread
                    self._ready.notify()
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued: nobody wants it any more
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: B902 - handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; `cancel_futures` drops what is still queued. Never joins a thread:
        `wait` is accepted for the Executor interface and ignored (see the module docstring)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    item = self._queue.popleft()
                    if item is not None:
                        item[0].cancel()
            self._queue.append(None)
            self._ready.notify_all()


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run `fn` in a fresh daemon thread (work that must not queue behind stuck workers, such as
    the last cache writes at shutdown); the caller bounds the wait."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, exc: BaseException | None = None) -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # noqa: B902 - handed to the waiting coroutine
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop has closed: nobody waits any more

    threading.Thread(target=run, name=getattr(fn, "__name__", "task"), daemon=True).start()
    return future
