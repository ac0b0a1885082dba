"""Token store: the tokenised examples of one task and split, on disk, read by row.

Layout of a store directory (zarr v3 arrays through tensorstore, local file kvstore):

    src/      int32 [N, Ls]  tag (+ source tokens + eos for translation), 0-padded
    tgt/      int32 [N, Lt]  target tokens + eos, truncated to Lt, 0-padded
    src_len/  int32 [N]      tokens before padding
    tgt_len/  int32 [N]
    meta.json                {"rows", "src_width", "tgt_width", "truncated", "kind", "tag_id", ...}

Rows are chunked in small blocks so a process reads only the chunks holding the rows it asks
for (`read_rows`). `ArrayRows` is the in-memory twin with the same interface (tests, tiny data).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from moe.data.cache import ContentHash, cache_lock
from moe.data.sources import Example
from moe.data.vocab import EOS_ID, Vocab

_CHUNK_ROWS = 256
_ARRAYS = ("src", "tgt", "src_len", "tgt_len")
# One decoded-chunk cache shared by all stores of this process.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


@dataclass(frozen=True)
class EncodedRows:
    """Padded token arrays of N examples (see the module docstring for the layout)."""

    src: np.ndarray  # int32 [N, Ls]
    tgt: np.ndarray  # int32 [N, Lt]
    src_len: np.ndarray  # int32 [N]
    tgt_len: np.ndarray  # int32 [N]
    truncated: int  # examples cut to fit the widths


def encode_examples(
    examples: Sequence[Example],
    vocab: Vocab,
    *,
    kind: str,
    tag_id: int,
    max_src_len: int,
    max_tgt_len: int,
) -> EncodedRows:
    """Tokenise examples into fixed-width rows.

    translate: src = [tag] + source[: max_src_len - 2] + [eos], width max_src_len.
    lm:        src = [tag] only, width 1 (the source text, "" for LM, is ignored).
    both:      tgt = target[: max_tgt_len - 1] + [eos], width max_tgt_len.
    """
    if kind not in ("lm", "translate"):
        raise ValueError(f"kind={kind!r}: expected 'lm' or 'translate'")
    if max_src_len < 3 or max_tgt_len < 2:
        raise ValueError(
            f"max_src_len={max_src_len} must be >= 3 and max_tgt_len={max_tgt_len} >= 2"
        )
    tgt_ids = vocab.encode_many([e.tgt for e in examples])
    if kind == "lm":
        src_rows = [[tag_id]] * len(examples)
        src_width, truncated = 1, [False] * len(examples)
    else:
        src_ids = vocab.encode_many([e.src for e in examples])
        src_rows = [[tag_id, *ids[: max_src_len - 2], EOS_ID] for ids in src_ids]
        src_width, truncated = max_src_len, [len(ids) > max_src_len - 2 for ids in src_ids]
    tgt_rows = [[*ids[: max_tgt_len - 1], EOS_ID] for ids in tgt_ids]
    truncated = [a or len(ids) > max_tgt_len - 1 for a, ids in zip(truncated, tgt_ids)]
    src, src_len = _pad(src_rows, src_width)
    tgt, tgt_len = _pad(tgt_rows, max_tgt_len)
    return EncodedRows(src, tgt, src_len, tgt_len, truncated=int(sum(truncated)))


def _pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(rows), width), np.int32)  # [N, L], 0 = pad
    lengths = np.zeros((len(rows),), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        lengths[i] = len(row)
    return out, lengths


class ArrayRows:
    """In-memory rows with the `TokenStore` reading interface."""

    def __init__(self, src: np.ndarray, tgt: np.ndarray):
        if len(src) != len(tgt):
            raise ValueError(f"src has {len(src)} rows but tgt has {len(tgt)}")
        self.src, self.tgt = np.asarray(src, np.int32), np.asarray(tgt, np.int32)

    @property
    def num_rows(self) -> int:
        return len(self.src)

    @property
    def widths(self) -> tuple[int, int]:
        return self.src.shape[1], self.tgt.shape[1]

    def read_rows(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        return self.src[idx], self.tgt[idx]

    def read_lengths(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens before the padding (0 never occurs inside an example)."""
        idx = np.asarray(indices, np.int64)
        src, tgt = self.src[idx], self.tgt[idx]
        return (src != 0).sum(1).astype(np.int32), (tgt != 0).sum(1).astype(np.int32)


class TokenStore:
    """One task-split's rows on disk; `open` it, then `read_rows(indices)`."""

    def __init__(self, path: Path, arrays: dict[str, ts.TensorStore], meta: dict):
        self.path, self._arrays, self.meta = path, arrays, meta

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a token store (no meta.json)")
        meta = json.loads(meta_file.read_text())
        arrays = {
            name: ts.open(_spec(path / name), open=True, context=_CONTEXT).result()
            for name in _ARRAYS
        }
        return cls(path, arrays, meta)

    @staticmethod
    def write(path: str | Path, rows: EncodedRows, meta: dict | None = None) -> TokenStore:
        """Write `rows` as a store at `path` (built in a temp dir, then renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
        try:
            for name in _ARRAYS:
                value = getattr(rows, name)
                chunk = [max(1, min(len(value), _CHUNK_ROWS)), *value.shape[1:]]
                arr = ts.open(
                    _spec(tmp / name),
                    create=True,
                    dtype=ts.int32,
                    shape=value.shape,
                    chunk_layout=ts.ChunkLayout(chunk_shape=chunk),
                ).result()
                arr.write(value).result()
            full_meta = {
                "rows": len(rows.src),
                "src_width": rows.src.shape[1],
                "tgt_width": rows.tgt.shape[1],
                "truncated": rows.truncated,
                **(meta or {}),
            }
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, sort_keys=True))
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return TokenStore.open(path)

    def verify(self) -> None:
        """Read every array once; raises ValueError when the store is damaged on disk."""
        for name in _ARRAYS:
            value = self._arrays[name].read().result()
            if len(value) != self.num_rows:
                raise ValueError(f"{self.path / name}: {len(value)} rows, meta.json says more")

    @property
    def num_rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def widths(self) -> tuple[int, int]:
        return int(self.meta["src_width"]), int(self.meta["tgt_width"])

    def read_rows(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(src int32 [k, Ls], tgt int32 [k, Lt]) for rows `indices`, in that order."""
        unique, inverse = self._unique(indices)
        src = self._arrays["src"][unique].read().result()
        tgt = self._arrays["tgt"][unique].read().result()
        return src[inverse], tgt[inverse]

    def read_lengths(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(src_len int32 [k], tgt_len int32 [k]) for rows `indices`."""
        unique, inverse = self._unique(indices)
        src_len = self._arrays["src_len"][unique].read().result()
        tgt_len = self._arrays["tgt_len"][unique].read().result()
        return src_len[inverse], tgt_len[inverse]

    def _unique(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"{self.path}: row index out of range [0, {self.num_rows})")
        return np.unique(idx, return_inverse=True)  # sorted reads touch each chunk once


def _spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def cached_store(
    cache_dir: str | Path,
    name: str,
    examples: Sequence[Example],
    vocab: Vocab,
    *,
    kind: str,
    tag_id: int,
    max_src_len: int,
    max_tgt_len: int,
) -> TokenStore:
    """The store for these examples under `cache_dir`, built once per content hash.

    The hash covers the examples (in order), the vocabulary model, kind, tag and widths; the
    directory is `<cache_dir>/<name>-<hash>`. A cached store that does not read back whole
    (truncated chunks, a bad meta.json) is rebuilt.
    """
    key = ContentHash("token-store").add(vocab.model_hash).add(kind).add(tag_id)
    key.add(max_src_len).add(max_tgt_len)
    key.add_texts(text for e in examples for text in (e.src, e.tgt))
    path = Path(cache_dir) / f"{name}-{key.hexdigest()}"
    with cache_lock(path):
        if (path / "meta.json").is_file():
            try:
                store = TokenStore.open(path)
                store.verify()
                return store
            except (ValueError, KeyError, OSError):  # a damaged cache entry: build it again
                shutil.rmtree(path, ignore_errors=True)
        rows = encode_examples(
            examples,
            vocab,
            kind=kind,
            tag_id=tag_id,
            max_src_len=max_src_len,
            max_tgt_len=max_tgt_len,
        )
        return TokenStore.write(path, rows, {"name": name, "kind": kind, "tag_id": tag_id})
