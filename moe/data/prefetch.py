"""Host batches made ahead of the training step, in a background thread.

The batcher's work for step ``s`` (planning, reading token stores, assembling rows) only depends
on ``s``, so a thread can run it for the next steps while the device computes. ``Prefetcher``
yields exactly what calling ``make(s)`` for ``s = start, start + 1, ...`` in order would; an
exception in the thread is raised in the consumer at the step it belongs to.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Prefetcher:
    """Iterate ``(step, make(step))`` for ``step`` in ``range(start, stop)``, ``depth`` ahead."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._range = range(start, stop)
        self._thread = threading.Thread(
            target=self._run, args=(make,), name="moe-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, make: Callable[[int], Any]) -> None:
        for step in self._range:
            try:
                item = (step, make(step), None)
            except BaseException as err:  # handed to the consumer, with its traceback
                item = (step, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for _ in self._range:
            step, value, err = self._queue.get()
            if err is not None:
                raise err
            yield step, value

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue)."""
        self._stop.set()
        self._thread.join(timeout=5)
