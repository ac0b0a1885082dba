"""The system's gettext catalogues: reading one language's message pairs, and counting the pairs
of every language under a locale root (cached), which task families (``tasks: [{family:
gettext, ...}]``) expand over.

A language ``xx`` has catalogues ``<root>/xx/LC_MESSAGES/*.mo``; each entry gives an English
msgid and its translation. Text is normalised (every whitespace run becomes one space), plural
entries keep form 0, a msgctxt prefix is dropped, and entries whose translation is empty or
equal to the msgid are skipped (the header too). Stdlib only: the config layer counts pairs
here when it expands a family, the data layer reads them (``moe.data.sources``).

Counting every language of /usr/share/locale parses ~7,000 catalogues (~20 s on this host), so
the counts are cached in ``<cache_dir>/catalogues/`` under a key of what they depend on: the
root, every catalogue's path, size and mtime, and ``max_chars``. A changed, added or removed
catalogue gives a new key; an unchanged tree is never parsed twice.
"""

from __future__ import annotations

import gettext
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

COUNTS_FORMAT = 1  # bump when the rule that counts a pair changes


def normalize(text: str) -> str:
    """Collapse newlines, tabs and repeated spaces to single spaces; strip the ends."""
    return " ".join(text.split())


def catalogue_files(root: str | Path, lang: str) -> list[Path]:
    """The ``.mo`` files of ``lang`` under ``root``, sorted (none: an empty list)."""
    return sorted((Path(root) / lang / "LC_MESSAGES").glob("*.mo"))


def languages(root: str | Path) -> list[str]:
    """Languages (directory names) under ``root`` that have at least one catalogue, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if catalogue_files(root, d.name))


def is_english(lang: str) -> bool:
    """English and its variants (en_GB, en@quot, ...): msgid and msgstr are both English."""
    return lang == "en" or lang.startswith(("en_", "en@"))


def read_pairs(files: Sequence[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(msgid, msgstr)`` pairs of the catalogues, sorted, and the unreadable files
    (``"name.mo (ErrorType)"``). Duplicates are kept (the caller counts and drops them)."""
    pairs: list[tuple[str, str]] = []
    malformed: list[str] = []
    for path in files:
        try:
            with open(path, "rb") as fp:
                catalog = gettext.GNUTranslations(fp)._catalog  # the only way to enumerate entries
        except (OSError, UnicodeDecodeError, ValueError, IndexError, struct.error) as err:
            malformed.append(f"{path.name} ({type(err).__name__})")
            continue
        pairs.extend(_catalog_pairs(catalog))
    return sorted(pairs), malformed


def _catalog_pairs(catalog: dict) -> list[tuple[str, str]]:
    out = []
    for key, msgstr in catalog.items():
        if isinstance(key, tuple):  # plural entry (msgid, form index): keep form 0 only
            key, form = key
            if form != 0:
                continue
        msgid = normalize(key.rpartition("\x04")[2])  # drop a msgctxt prefix
        msgstr = normalize(msgstr)
        if msgid and msgstr and msgstr != msgid:  # skips the header (empty msgid) too
            out.append((msgid, msgstr))
    return out


def usable_pairs(pairs: Sequence[tuple[str, str]], max_chars: int | None) -> int:
    """How many examples a translate task keeps of these pairs: distinct pairs with both sides
    at most ``max_chars`` long (``moe.data.sources.load_source``'s dedupe and length filter)."""
    return len(
        {
            p
            for p in pairs
            if max_chars is None or (len(p[0]) <= max_chars and len(p[1]) <= max_chars)
        }
    )


def _count_one(args: tuple[str, str, int | None]) -> int:
    root, lang, max_chars = args
    return usable_pairs(read_pairs(catalogue_files(root, lang))[0], max_chars)


def fingerprint(root: str | Path, max_chars: int | None) -> str:
    """The cache key of the counts: root, every catalogue's path, size and mtime, max_chars."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"counts/v{COUNTS_FORMAT}\0{Path(root).resolve()}\0{max_chars}\0".encode())
    for lang in languages(root):
        for path in catalogue_files(root, lang):
            st = path.stat()
            h.update(f"{lang}/{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def count_pairs(
    root: str | Path,
    max_chars: int | None,
    cache_dir: str | Path | None = None,
    *,
    workers: int = 2,
    say: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """``{lang: usable pairs}`` for every non-English language under ``root`` with catalogues.

    Read from ``<cache_dir>/catalogues/pairs-<fingerprint>.json`` when present; otherwise the
    catalogues are parsed in ``workers`` processes (parsing is pure Python: threads would share
    one core) and the result is written there (best effort: an unwritable cache is skipped).
    """
    key = fingerprint(root, max_chars)
    path = Path(cache_dir) / "catalogues" / f"pairs-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_text("utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            pass  # a damaged entry is recounted and replaced
    langs = [lang for lang in languages(root) if not is_english(lang)]
    jobs = [(str(root), lang, max_chars) for lang in langs]
    if say:
        say(f"counting the gettext pairs of {len(langs)} languages under {root} (cached after)")
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            counts = list(pool.map(_count_one, jobs, chunksize=4))
    else:
        counts = [_count_one(job) for job in jobs]
    result = dict(zip(langs, counts))
    if path is not None:
        _write_atomic(path, json.dumps(result, indent=0, sort_keys=True))
    return result


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation
