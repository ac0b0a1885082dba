"""What many languages need from the pipeline: reading the sources of ~100 tasks in parallel
(each distinct source once, progress shown), the language of each side of a task, a vocabulary
sample that gives every language its share, and the unknown-token rate per language.

Languages of a task's sides: a ``gettext:xx`` translate task is English -> xx (``reverse``: xx ->
English); an lm task on gettext is English; any other source is named after the task
(``<task>:src`` / ``<task>:tgt``), so the fairness of the vocabulary sample covers it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moe import catalogues
from moe.data.sources import Example, SourceStats, load_source
from moe.data.vocab import UNK_ID, Vocab

Loaded = tuple[list[Example], SourceStats]
PARALLEL_FROM = 6  # fewer distinct sources are read in this process (spawning costs ~1 s)


def _load(args: tuple[str, str, str, int | None]) -> Loaded:
    spec, kind, root, max_chars = args
    return load_source(spec, kind=kind, locale_root=root, max_chars=max_chars)


def load_sources(
    keys: Sequence[tuple[str, str]],
    *,
    locale_root: str | Path,
    max_chars: int | None,
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[tuple[str, str], Loaded]:
    """``{(source, kind): (examples, stats)}`` for each distinct key, read in ``workers``
    processes (default: the host's cores, at most 8) when there are many; a ``DataError`` of
    any source is raised here as it would be serially (the first in ``keys`` order).

    With ``cache_dir``, a gettext source's result is kept in ``<cache_dir>/sources/`` under a
    key of its catalogues (paths, sizes, mtimes), kind and max_chars: a second run reads ~100
    languages in seconds instead of minutes."""
    unique = list(dict.fromkeys(keys))
    out: dict[tuple[str, str], Loaded] = {}
    paths = {k: _cache_path(cache_dir, k, locale_root, max_chars) for k in unique}
    for key, path in paths.items():
        if path is not None and path.is_file():
            try:
                out[key] = _decode(path.read_bytes())
            except (OSError, ValueError, TypeError, KeyError):
                pass  # a damaged entry is read again
    todo = [k for k in unique if k not in out]
    jobs = [(spec, kind, str(locale_root), max_chars) for spec, kind in todo]
    workers = workers or min(8, os.cpu_count() or 1)
    if say and len(unique) >= PARALLEL_FROM:
        say(f"data: {len(unique) - len(todo)}/{len(unique)} sources cached, reading {len(todo)}")
    if workers < 2 or len(jobs) < PARALLEL_FROM:
        results = map(_load, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        results = pool.map(_load, jobs)
    step = max(1, len(jobs) // 10)
    try:
        for i, (key, result) in enumerate(zip(todo, results)):
            out[key] = result
            if paths[key] is not None:
                _write_atomic(paths[key], _encode(result))
            if say and pool and ((i + 1) % step == 0 or i + 1 == len(jobs)):
                say(f"data: read {i + 1}/{len(jobs)} sources ({workers} processes)")
    finally:
        if pool is not None:
            pool.shutdown()
    return {k: out[k] for k in unique}


SOURCES_FORMAT = 2  # bump when reading a source changes what it yields (2: JSON, not pickle)


def _encode(loaded: Loaded) -> bytes:
    """A cache entry as JSON (never pickle: a cache directory must not be able to run code)."""
    examples, stats = loaded
    return json.dumps(
        {"examples": [[e.src, e.tgt] for e in examples], "stats": dataclasses.asdict(stats)},
        ensure_ascii=False,
    ).encode("utf-8")


def _decode(data: bytes) -> Loaded:
    """Inverse of :func:`_encode`; ValueError/TypeError/KeyError for anything malformed."""
    raw = json.loads(data.decode("utf-8"))
    examples = []
    for pair in raw["examples"]:
        src, tgt = pair
        if not (isinstance(src, str) and isinstance(tgt, str)):
            raise TypeError("an example is not two strings")
        examples.append(Example(src, tgt))
    stats = dict(raw["stats"])
    stats["malformed_at"] = tuple(str(x) for x in stats.get("malformed_at", ()))
    return examples, SourceStats(**stats)


def _cache_path(cache_dir, key, locale_root, max_chars) -> Path | None:
    spec, kind = key
    scheme, _, lang = spec.partition(":")
    if cache_dir is None or scheme != "gettext":
        return None
    files = catalogues.catalogue_files(locale_root, lang) if lang and "/" not in lang else []
    if not files:
        return None  # the fallback corpus or an error: nothing worth keeping
    h = hashlib.blake2b(digest_size=16)
    h.update(f"sources/v{SOURCES_FORMAT}\0{spec}\0{kind}\0{max_chars}\0".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return Path(cache_dir) / "sources" / f"{h.hexdigest()}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation


def side_languages(name: str, kind: str, source: str, reverse: bool) -> tuple[str, str]:
    """(source language, target language) of a task (module docstring)."""
    scheme, _, arg = source.partition(":")
    if scheme == "gettext":
        if kind == "lm":
            return "en", "en"
        return (arg, "en") if reverse else ("en", arg)
    return f"{name}:src", f"{name}:tgt"


def _rank(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def vocab_sample(by_lang: dict[str, list[str]], per_language: int | None) -> list[str]:
    """The texts the vocabulary trains on: every language's distinct texts, each capped at
    ``per_language`` (a fixed hash-chosen subset) so a language with 50k sentences does not
    drown one with 3k; languages in sorted order, a text counted once. None: all texts."""
    texts: dict[str, None] = {}
    for lang in sorted(by_lang):
        items = [t for t in dict.fromkeys(by_lang[lang]) if t]
        if per_language is not None and len(items) > per_language:
            keep = set(sorted(items, key=_rank)[:per_language])
            items = [t for t in items if t in keep]
        for t in items:
            texts.setdefault(t)
    return list(texts)


def unknown_rates(
    vocab: Vocab, by_lang: dict[str, list[str]], sample: int = 300
) -> dict[str, float]:
    """Per language, the share of pieces that are <unk> over up to ``sample`` of its texts
    (a fixed hash-chosen subset): how well the shared vocabulary covers its script."""
    out = {}
    for lang in sorted(by_lang):
        texts = sorted(dict.fromkeys(t for t in by_lang[lang] if t), key=_rank)[:sample]
        ids = [i for row in vocab.encode_many(texts) for i in row]
        out[lang] = sum(i == UNK_ID for i in ids) / len(ids) if ids else 0.0
    return out


def add_texts(by_lang: dict[str, list[str]], langs: tuple[str, str], examples: Any) -> None:
    """Append the examples' source and target texts to their languages' lists."""
    src, tgt = langs
    for e in examples:
        if e.src:
            by_lang.setdefault(src, []).append(e.src)
        by_lang.setdefault(tgt, []).append(e.tgt)
