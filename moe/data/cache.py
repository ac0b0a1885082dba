"""Content-addressed cache entries for derived data (vocabularies, token stores).

An entry's name is a hash of everything it was built from, so a changed input never reuses a
stale file, and an unchanged one is built once. Entries are written under a lock file and moved
into place atomically, so processes sharing a cache directory never see a half-written entry
and build it only once (the others wait on the lock, then load it).
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_FORMAT = 1  # bump when the on-disk layout of any entry changes


class ContentHash:
    """blake2b over a sequence of length-prefixed fields (so ("ab", "c") != ("a", "bc"))."""

    def __init__(self, kind: str):
        self._h = hashlib.blake2b(digest_size=16)
        self.add(f"{kind}/v{CACHE_FORMAT}")

    def add(self, value: str | bytes | int | float) -> ContentHash:
        data = value if isinstance(value, bytes) else repr(value).encode("utf-8")
        self._h.update(len(data).to_bytes(8, "little"))
        self._h.update(data)
        return self

    def add_texts(self, texts: Iterable[str]) -> ContentHash:
        """``add`` of each text, then of their count; the same digest, joined into few
        ``update`` calls (hashing the token stores of 100+ tasks was mostly call overhead)."""
        count, parts = 0, []
        for text in texts:
            data = text if isinstance(text, bytes) else repr(text).encode("utf-8")
            parts += (len(data).to_bytes(8, "little"), data)
            count += 1
            if len(parts) >= 1 << 16:
                self._h.update(b"".join(parts))
                parts.clear()
        self._h.update(b"".join(parts))
        return self.add(count)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<entry>.lock` (blocking) while an entry is built or checked."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
