"""Vocabulary: special ids, single-id tags, decode rules, content-hash cache."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from moe.data.corpus import fallback_pairs
from moe.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab, train_vocab

TAGS = ("<2de>", "<2fr>", "<lm>")


def _texts() -> list[str]:
    return [t for pair in fallback_pairs("de") + fallback_pairs("fr") for t in pair]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    return train_vocab(_texts(), 300, tmp_path_factory.mktemp("vocab"), TAGS)


def test_special_ids_are_fixed(vocab):
    pieces = [vocab.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]
    assert 250 <= vocab.size <= 300


def test_task_tags_are_single_ids_after_the_specials(vocab):
    ids = [vocab.piece_to_id(t) for t in TAGS]
    assert ids == [4, 5, 6]
    encoded = vocab.encode("<2de> I see the dog.")
    assert encoded.count(4) == 1
    assert vocab.decode([4]) == "<2de>"


def test_encode_decode_round_trip_with_accents(vocab):
    text = "Je rentre à la maison. Schließ bitte die Tür."
    assert vocab.decode(vocab.encode(text)) == text
    assert UNK_ID not in vocab.encode(text)
    assert vocab.encode_many([text, ""]) == [vocab.encode(text), []]


def test_decode_stops_at_eos_and_skips_pad_and_bos(vocab):
    hello, world = vocab.encode("Hallo."), vocab.encode("Welt")
    ids = [BOS_ID, *hello, PAD_ID, EOS_ID, *world, PAD_ID]
    assert vocab.decode(ids) == "Hallo."


def test_second_call_loads_the_cached_model_without_training(tmp_path, monkeypatch):
    first = train_vocab(_texts(), 300, tmp_path, TAGS)

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", fail)
    second = train_vocab(_texts(), 300, tmp_path, TAGS)
    assert second.path == first.path and second.model_hash == first.model_hash
    with pytest.raises(AssertionError, match="retrained"):
        train_vocab(_texts(), 280, tmp_path, TAGS)  # another size is another cache entry


def test_cache_key_covers_texts_and_symbols(tmp_path):
    base = train_vocab(_texts(), 300, tmp_path, TAGS)
    other_symbols = train_vocab(_texts(), 300, tmp_path, ("<2de>",))
    other_texts = train_vocab(_texts()[:-2], 300, tmp_path, TAGS)
    assert len({base.path, other_symbols.path, other_texts.path}) == 3
    assert len(list(tmp_path.glob("spm-*.model"))) == 3


def test_empty_texts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_vocab(["", ""], 100, tmp_path)


def test_identity_normalisation_keeps_what_nfkc_maps_to_ascii(tmp_path):
    """nmt_nfkc turns `…`, full-width punctuation and `№` into ASCII: a model trained on it can
    never write them. identity keeps the text as written (its own cache entry)."""
    text = "保存しますか？ 続行… №5"
    texts = _texts() + [text] * 5
    nfkc = train_vocab(texts, 300, tmp_path, TAGS)
    identity = train_vocab(texts, 300, tmp_path, TAGS, normalization="identity")
    assert nfkc.path != identity.path
    assert nfkc.decode(nfkc.encode(text)) == "保存しますか? 続行... No5"
    assert identity.decode(identity.encode(text)) == text
    with pytest.raises(ValueError, match="normalization"):
        train_vocab(texts, 300, tmp_path, TAGS, normalization="nfc")
