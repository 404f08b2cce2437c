"""Working through a list of domains a few at a time, with a progress line: what `warm` and
`survey` share.

A bounded pool keeps a long list from opening thousands of DNS and TLS connections at once (the
remote servers and our file descriptors both have limits). The progress line is only for a
person at a terminal: in a pipe or a log file its carriage returns would be noise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import IO, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_bounded(work: Callable[[T], R], items: Sequence[T], concurrency: int,
                on_result: Callable[[R], None] | None = None, *, stop: threading.Event | None = None,
                name: str = "worker") -> list[R]:
    """`work` over `items` with at most `concurrency` running at once; results in item order.

    `on_result(result)` runs in the calling thread as each item finishes (completion order).
    An exception there or in `work` (KeyboardInterrupt included) ends the run: `stop` is set so
    that work in flight can give up early, work not started is dropped, work in flight is waited
    for (its cache writes are whole), and the exception propagates.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)
    try:
        futures: dict[Future[R], int] = {pool.submit(work, item): index for index, item in enumerate(items)}
        done: dict[int, R] = {}
        for future in as_completed(futures):
            result = future.result()
            done[futures[future]] = result
            if on_result is not None:
                on_result(result)
    except BaseException:
        if stop is not None:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [done[index] for index in range(len(items))]


class Progress:
    """One line on `stream`, redrawn in place after each item, only when `stream` is a terminal.

    Two looks: `[done/total] item` (the item just finished), or with `bar` a label and a bar,
    `label [#####.....] done/total`. `clear()` erases the line, before other output and at the end.
    """

    WIDTH = 30

    def __init__(self, stream: IO[str], total: int, bar: str | None = None) -> None:
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(total) and isatty is not None and isatty()
        self.total = total
        self.done = 0
        self._stream = stream
        self._bar = bar
        if bar is not None:
            self._draw("")

    def advance(self, item: str = "") -> None:
        self.done += 1
        self._draw(item)

    def _draw(self, item: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            filled = self.WIDTH * self.done // self.total
            text = f"{self._bar} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}"
        else:
            text = f"[{self.done}/{self.total}] {item}"
        self._stream.write(f"\r{text}\033[K")
        self._stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self._stream.write("\r\033[K")
            self._stream.flush()
