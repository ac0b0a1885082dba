"""Token store: row layout vs a per-example reference, on-disk round trip, row reads, cache."""

from __future__ import annotations

import numpy as np
import pytest

from moe.data import token_store
from moe.data.corpus import fallback_pairs
from moe.data.sources import Example
from moe.data.token_store import ArrayRows, TokenStore, cached_store, encode_examples
from moe.data.vocab import EOS_ID, Vocab, train_vocab

TAG = 4  # "<2de>"
EXAMPLES = [Example(en, de) for en, de in fallback_pairs("de")[:40]]
LONG = Example("I see the dog. " * 10, "Ich sehe den Hund. " * 10)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    texts = [t for pair in fallback_pairs("de") for t in pair]
    return train_vocab(texts, 200, tmp_path_factory.mktemp("vocab"), ("<2de>", "<lm>"))


def _reference_row(ids: list[int], width: int, prefix: list[int]) -> list[int]:
    row = prefix + ids[: width - len(prefix) - 1] + [EOS_ID]
    return row + [0] * (width - len(row))


def test_translate_rows_are_tag_source_eos_and_target_eos(vocab):
    examples = [*EXAMPLES[:5], LONG]
    rows = encode_examples(
        examples, vocab, kind="translate", tag_id=TAG, max_src_len=12, max_tgt_len=10
    )
    for i, e in enumerate(examples):
        assert rows.src[i].tolist() == _reference_row(vocab.encode(e.src), 12, [TAG])
        assert rows.tgt[i].tolist() == _reference_row(vocab.encode(e.tgt), 10, [])
        assert rows.src_len[i] == np.count_nonzero(rows.src[i])
        assert rows.tgt_len[i] == np.count_nonzero(rows.tgt[i])
    assert rows.src.dtype == np.int32 and rows.src.shape == (6, 12) and rows.tgt.shape == (6, 10)
    cut = [len(vocab.encode(e.src)) > 10 or len(vocab.encode(e.tgt)) > 9 for e in examples]
    assert rows.truncated == sum(cut) and cut[-1]


def test_lm_rows_have_only_the_tag_as_source(vocab):
    rows = encode_examples(
        [Example("", "I see the dog.")], vocab, kind="lm", tag_id=5, max_src_len=8, max_tgt_len=8
    )
    assert rows.src.tolist() == [[5]]
    assert rows.tgt[0].tolist() == _reference_row(vocab.encode("I see the dog."), 8, [])


def test_store_round_trip_and_reads_rows_in_any_order(vocab, tmp_path):
    rows = encode_examples(
        EXAMPLES, vocab, kind="translate", tag_id=TAG, max_src_len=16, max_tgt_len=16
    )
    TokenStore.write(tmp_path / "store", rows, {"name": "demo"})
    store = TokenStore.open(tmp_path / "store")
    assert store.num_rows == 40 and store.widths == (16, 16) and store.meta["name"] == "demo"
    idx = np.array([39, 3, 3, 0, 17])
    src, tgt = store.read_rows(idx)
    np.testing.assert_array_equal(src, rows.src[idx])
    np.testing.assert_array_equal(tgt, rows.tgt[idx])
    src_len, tgt_len = store.read_lengths(idx)
    np.testing.assert_array_equal(src_len, rows.src_len[idx])
    np.testing.assert_array_equal(tgt_len, rows.tgt_len[idx])
    assert store.read_rows([])[0].shape == (0, 16)
    with pytest.raises(IndexError, match="out of range"):
        store.read_rows([40])


def test_empty_store_round_trips(vocab, tmp_path):
    rows = encode_examples([], vocab, kind="translate", tag_id=TAG, max_src_len=8, max_tgt_len=8)
    store = TokenStore.write(tmp_path / "empty", rows)
    assert store.num_rows == 0 and store.read_rows([])[1].shape == (0, 8)


def test_array_rows_reads_like_a_store(vocab):
    rows = encode_examples(
        EXAMPLES, vocab, kind="translate", tag_id=TAG, max_src_len=8, max_tgt_len=8
    )
    src, tgt = ArrayRows(rows.src, rows.tgt).read_rows([2, 1])
    np.testing.assert_array_equal(src, rows.src[[2, 1]])
    np.testing.assert_array_equal(tgt, rows.tgt[[2, 1]])


def test_cached_store_is_built_once_per_content(vocab, tmp_path, monkeypatch):
    kwargs = dict(kind="translate", tag_id=TAG, max_src_len=16, max_tgt_len=16)
    first = cached_store(tmp_path, "de-train", EXAMPLES, vocab, **kwargs)

    def fail(*args, **kw):
        raise AssertionError("re-encoded despite a cache hit")

    monkeypatch.setattr(token_store, "encode_examples", fail)
    again = cached_store(tmp_path, "de-train", EXAMPLES, vocab, **kwargs)
    assert again.path == first.path
    with pytest.raises(AssertionError, match="re-encoded"):
        cached_store(tmp_path, "de-train", EXAMPLES[:-1], vocab, **kwargs)
    with pytest.raises(AssertionError, match="re-encoded"):
        cached_store(tmp_path, "de-train", EXAMPLES, vocab, **{**kwargs, "max_tgt_len": 15})
