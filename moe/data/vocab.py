"""Shared SentencePiece vocabulary: trained in memory, cached by content, fixed special ids.

One vocabulary serves every task (as in GShard / Task-MoE, a single SentencePiece model over all
languages). Ids: pad=0, unk=1, bos=2, eos=3, then the task tags (`<2de>`, `<lm>`, ...) as
user-defined symbols, each encoding as one id.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from moe.data.cache import ContentHash, cache_lock

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = {"nfkc": "nmt_nfkc", "identity": "identity"}  # SentencePiece's rule names


class Vocab:
    """A loaded SentencePiece model with the fixed special ids above."""

    def __init__(self, model_proto: bytes, path: Path | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        self.model_hash = ContentHash("spm-model").add(model_proto).hexdigest()
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{path}: special ids (pad, unk, bos, eos) are {got}, expected 0..3")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        return cls(path.read_bytes(), path)

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._sp.encode(text, out_type=int)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over a list (SentencePiece batches it across threads)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=2) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos; pad and bos are skipped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; UNK_ID when it is not in the vocabulary."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def train_vocab(
    texts: Iterable[str],
    vocab_size: int,
    cache_dir: str | Path,
    user_symbols: Sequence[str] = (),
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    input_sentence_size: int = 200_000,
    normalization: str = "nfkc",
) -> Vocab:
    """Train (or load from cache) a SentencePiece model over `texts`.

    The model is cached in `cache_dir` as `spm-<hash>.model`, the hash covering the texts (in
    order), vocab_size, user_symbols and the training options, so a second call with the same
    inputs loads the file instead of training (a cached file that does not load is rebuilt).
    `vocab_size` is a soft limit: a corpus too small for it yields a smaller vocabulary
    (`Vocab.size`). BPE is the default because it trains about
    5x faster than unigram here (0.5 s vs 2.8 s for 100k gettext sentences) with equal compression.
    At most `input_sentence_size` sentences (a fixed-seed sample) are used for training;
    training is deterministic, so every host builds the same model from the same texts.
    character_coverage=1.0 keeps every character (no unknowns for rare accents in small corpora).
    ``normalization``: "nfkc" (SentencePiece's nmt_nfkc: full-width forms, `…`, `№` become
    ASCII, so the model never writes them) or "identity" (text as written).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {MODEL_TYPES}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_vocab: no non-empty texts to train on")
    symbols = list(dict.fromkeys(user_symbols))
    key = ContentHash("spm").add_texts(texts).add(vocab_size).add_texts(symbols)
    key.add(model_type).add(character_coverage).add(input_sentence_size)
    if normalization != "nfkc":  # (the keys of caches written before the option stay valid)
        key.add(normalization)
    path = Path(cache_dir) / f"spm-{key.hexdigest()}.model"
    with cache_lock(path):
        if path.is_file():
            try:
                return Vocab.load(path)
            except (RuntimeError, ValueError, OSError):  # a damaged cache entry: build it again
                pass
        proto = _train(
            texts, vocab_size, symbols, model_type, character_coverage, input_sentence_size,
            NORMALIZATIONS[normalization],
        )  # fmt: skip
        _write_atomic(path, proto)
    return Vocab.load(path)


def _train(texts, vocab_size, symbols, model_type, coverage, input_sentence_size, rule):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=symbols,
        hard_vocab_limit=False,
        character_coverage=coverage,
        normalization_rule_name=rule,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=100_000,  # unigram only; the 1M default makes it ~3x slower
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
