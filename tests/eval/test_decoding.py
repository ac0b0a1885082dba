"""Greedy and beam decoding: checked against known distributions, planted
decoders and slow Python references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.eval import decoding

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
V = 6


# Planted decoders: a bigram table per source row, chosen by enc["table"].


def _bigram_model(tables):
    """encode_fn/decode_fn whose next-token distribution depends only on the last token and on
    which table the source row selects (so enc must be repeated per beam correctly)."""
    log_tables = jnp.log(jnp.asarray(tables, jnp.float32) + 1e-30)  # [T, V, V]

    def encode_fn(src):
        return {"table": src[:, 0]}

    def decode_fn(enc, tgt):
        return log_tables[enc["table"][:, None], tgt]  # [N, L, V]

    return encode_fn, decode_fn


def _table(rows):
    """A [V, V] transition table from {from_token: {to_token: prob}}; unspecified rows -> eos."""
    table = np.zeros((V, V))
    table[:, EOS] = 1.0
    for frm, dist in rows.items():
        table[frm] = 0.0
        for to, p in dist.items():
            table[frm, to] = p
    return table


# Row 0's greedy path (a c eos, P=0.6*0.34*0.6) misses the best sequence (b eos, P=0.4*0.99).
TRAP = _table(
    {
        BOS: {A: 0.6, B: 0.4},
        A: {C: 0.34, EOS: 0.33, A: 0.33},
        B: {EOS: 0.99, A: 0.01},
        C: {EOS: 0.6, C: 0.4},
    }
)
# Row 1: greedy and beam agree on b c a eos.
CHAIN = _table(
    {BOS: {B: 0.9, A: 0.1}, B: {C: 0.6, A: 0.4}, C: {A: 0.7, EOS: 0.3}, A: {EOS: 0.9, C: 0.1}}
)


def _greedy_reference(encode_fn, decode_fn, src, max_len):
    enc = encode_fn(src)
    out = np.full((src.shape[0], max_len), PAD)
    for row in range(src.shape[0]):
        enc_row = jax.tree.map(lambda x, r=row: x[r : r + 1], enc)
        prefix = [BOS]
        for t in range(max_len):
            tgt = jnp.array([prefix + [PAD] * (max_len - len(prefix))])
            token = int(jnp.argmax(decode_fn(enc_row, tgt)[0, t]))
            out[row, t] = token
            if token == EOS:
                break
            prefix.append(token)
    return out


def test_greedy_decode_follows_argmax_and_pads_after_eos():
    encode_fn, decode_fn = _bigram_model([TRAP, CHAIN])
    src = jnp.array([[0, 9], [1, 9]])
    out = decoding.greedy_decode(encode_fn, decode_fn, src, max_len=6, bos_id=BOS, eos_id=EOS)
    assert out.dtype == jnp.int32 and out.shape == (2, 6)
    np.testing.assert_array_equal(out, [[A, C, EOS, PAD, PAD, PAD], [B, C, A, EOS, PAD, PAD]])
    np.testing.assert_array_equal(out, _greedy_reference(encode_fn, decode_fn, src, 6))


def test_greedy_decode_matches_python_loop_on_random_models():
    tables = jax.random.dirichlet(jax.random.key(3), jnp.full((V,), 0.5), (6, V))
    encode_fn, decode_fn = _bigram_model(tables)
    src = jnp.array([[0], [1], [2], [3], [4], [5], [5]])
    out = decoding.greedy_decode(encode_fn, decode_fn, src, max_len=5, bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(out, _greedy_reference(encode_fn, decode_fn, src, 5))


def test_greedy_decode_feeds_back_the_whole_prefix():
    """A decoder whose next token depends on every earlier token (through the prefix sum)."""
    weights = jax.random.normal(jax.random.key(0), (8, V)).at[:, :2].set(-10.0).at[:, EOS].add(-0.5)

    def decode_fn(enc, tgt):
        return weights[(jnp.cumsum(tgt, axis=1) + enc[:, None]) % 8]  # [N, L, V]

    src = jnp.arange(4)[:, None]
    encode_fn = lambda s: s[:, 0]
    out = decoding.greedy_decode(encode_fn, decode_fn, src, max_len=6, bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(out, _greedy_reference(encode_fn, decode_fn, src, 6))
    assert sorted(int(np.sum(row != PAD)) for row in np.asarray(out)) == [1, 4, 4, 6]


def test_greedy_decode_stops_calling_decoder_once_all_rows_finish():
    encode_fn, decode_fn = _bigram_model([CHAIN])
    calls = []

    def counting_decode(enc, tgt):
        jax.debug.callback(lambda: calls.append(1))
        return decode_fn(enc, tgt)

    out = decoding.greedy_decode(
        encode_fn, counting_decode, jnp.zeros((2, 1), int), max_len=12, bos_id=BOS, eos_id=EOS
    )
    jax.block_until_ready(out)
    assert len(calls) == 4  # b c a eos, not 12 steps


def test_beam_search_finds_planted_best_sequence_that_greedy_misses():
    encode_fn, decode_fn = _bigram_model([TRAP, CHAIN])
    src = jnp.array([[0], [1]])
    kw = dict(max_len=6, bos_id=BOS, eos_id=EOS)
    greedy = decoding.greedy_decode(encode_fn, decode_fn, src, **kw)
    beam = decoding.beam_search(encode_fn, decode_fn, src, beam_size=2, **kw)
    np.testing.assert_array_equal(greedy[0, :3], [A, C, EOS])
    np.testing.assert_array_equal(beam[0], [B, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(beam[1], greedy[1])  # no trap in row 1


def _score(seq, table, alpha):
    prefix, logp = BOS, 0.0
    for token in seq:
        logp += math.log(table[prefix, token]) if table[prefix, token] > 0 else -math.inf
        prefix = token
    return logp / ((5 + len(seq)) / 6) ** alpha


def _exhaustive_best(table, max_len, alpha):
    """Best finished sequence over all sequences of length <= max_len that end in eos."""
    tokens = [t for t in range(V) if t != EOS]
    candidates = [
        (*body, EOS) for n in range(max_len) for body in itertools.product(tokens, repeat=n)
    ]
    return max(candidates, key=lambda seq: _score(seq, table, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    """With more beams than prefixes, beam search is exact: it must return the best-scoring
    finished sequence found by enumerating all of them."""
    max_len = 3
    tables = np.asarray(jax.random.dirichlet(jax.random.key(7), jnp.full((V,), 0.7), (3, V)))
    encode_fn, decode_fn = _bigram_model(tables)
    beam = decoding.beam_search(
        encode_fn,
        decode_fn,
        jnp.array([[0], [1], [2]]),
        beam_size=V**max_len,
        max_len=max_len,
        bos_id=BOS,
        eos_id=EOS,
        length_penalty=alpha,
    )
    for row in range(3):
        best = _exhaustive_best(tables[row], max_len, alpha)
        got = [int(t) for t in beam[row]]
        assert got[: len(best)] == list(best)
        assert all(t == PAD for t in got[len(best) :])


def test_beam_size_one_equals_greedy():
    # In these rows no eos-terminated prefix of the greedy path is more probable than greedy's
    # output (in TRAP's row it is: a eos beats a c eos), so K=1 must match greedy.
    chain2 = _table({BOS: {A: 0.7, B: 0.3}, A: {A: 0.5, C: 0.5 - 1e-3, EOS: 1e-3}, C: {EOS: 1.0}})
    encode_fn, decode_fn = _bigram_model([CHAIN, chain2])
    src = jnp.array([[0], [1], [1]])
    kw = dict(max_len=6, bos_id=BOS, eos_id=EOS)
    greedy = decoding.greedy_decode(encode_fn, decode_fn, src, **kw)
    beam = decoding.beam_search(encode_fn, decode_fn, src, beam_size=1, length_penalty=0.0, **kw)
    np.testing.assert_array_equal(beam, greedy)


def test_beam_size_one_equals_greedy_when_eos_is_never_chosen():
    tables = np.array(jax.random.dirichlet(jax.random.key(4), jnp.full((V,), 0.5), (6, V)))
    tables[:, :, EOS] = 0.0
    encode_fn, decode_fn = _bigram_model(tables)
    src = jnp.arange(6)[:, None]
    kw = dict(max_len=5, bos_id=BOS, eos_id=EOS)
    greedy = decoding.greedy_decode(encode_fn, decode_fn, src, **kw)
    beam = decoding.beam_search(encode_fn, decode_fn, src, beam_size=1, **kw)
    assert not np.any(np.asarray(greedy) == EOS)
    np.testing.assert_array_equal(beam, greedy)


def test_decoders_run_inside_an_outer_jit_with_closed_over_params():
    """The trainer closes decode_fn over traced params inside its own jit."""
    tables = jnp.log(jnp.asarray(np.stack([TRAP, CHAIN])) + 1e-30)

    @jax.jit
    def run(params, src):
        encode_fn = lambda s: {"table": s[:, 0]}
        decode_fn = lambda enc, tgt: params[enc["table"][:, None], tgt]
        kw = dict(max_len=6, bos_id=BOS, eos_id=EOS)
        return (
            decoding.greedy_decode(encode_fn, decode_fn, src, **kw),
            decoding.beam_search(encode_fn, decode_fn, src, beam_size=2, **kw),
        )

    greedy, beam = run(tables, jnp.array([[0], [1]]))
    np.testing.assert_array_equal(greedy[0, :3], [A, C, EOS])
    np.testing.assert_array_equal(beam[0, :2], [B, EOS])


def test_beam_keeps_alive_beams_when_the_best_extensions_all_end_in_eos():
    """Step 1's best candidate is eos, but with a strong length penalty the longer a-eos scores
    higher: the alive beam must come from the 2K candidates, not die with the eos."""
    table = _table({BOS: {EOS: 0.4, A: 0.38, B: 0.22}, A: {EOS: 1.0}})
    encode_fn, decode_fn = _bigram_model([table])
    beam = decoding.beam_search(
        encode_fn,
        decode_fn,
        jnp.array([[0]]),
        beam_size=1,
        max_len=4,
        bos_id=BOS,
        eos_id=EOS,
        length_penalty=2.0,
    )
    assert _score((A, EOS), table, 2.0) > _score((EOS,), table, 2.0)
    np.testing.assert_array_equal(beam[0], [A, EOS, PAD, PAD])


def test_beam_search_stops_once_no_alive_beam_can_beat_the_finished_ones():
    encode_fn, decode_fn = _bigram_model([CHAIN])
    calls = []

    def counting_decode(enc, tgt):
        jax.debug.callback(lambda: calls.append(1))
        return decode_fn(enc, tgt)

    out = decoding.beam_search(
        encode_fn,
        counting_decode,
        jnp.ones((1, 1), int) * 0,
        beam_size=2,
        max_len=12,
        bos_id=BOS,
        eos_id=EOS,
    )
    np.testing.assert_array_equal(out[0, :4], [B, C, A, EOS])
    assert len(calls) == 4  # both finished beams outscore any alive continuation after step 4


# No repeated n-grams (fairseq's no_repeat_ngram_size)


def _banned_reference(row, t, n):
    """The tokens that would complete an n-gram already in row[1 : t + 1] (a Python loop)."""
    seq, out = list(row[1 : t + 1]), set()
    if n == 0 or len(seq) < n - 1:
        return out
    tail = seq[len(seq) - (n - 1) :] if n > 1 else []
    for j in range(len(seq) - n + 1):
        if seq[j : j + n - 1] == tail:
            out.add(seq[j + n - 1])
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_repeated_ngram_tokens_match_a_python_loop(n):
    rng = np.random.default_rng(n)
    buf = rng.integers(3, 6, (16, 12)).astype(np.int32)  # few tokens: many repeats
    buf[:, 0] = BOS
    for t in range(0, 11):
        got = np.asarray(decoding.repeated_ngram_tokens(jnp.asarray(buf), jnp.int32(t), n, V))
        for r in range(16):
            assert set(np.flatnonzero(got[r]).tolist()) == _banned_reference(buf[r], t, n), (t, r)


def test_greedy_and_beam_never_repeat_a_bigram_when_asked():
    loop = _table({BOS: {A: 0.9, B: 0.1}, A: {B: 0.8, EOS: 0.2}, B: {A: 0.7, EOS: 0.3}})
    encode_fn, decode_fn = _bigram_model([loop])
    src = jnp.zeros((1, 1), jnp.int32)
    kw = dict(max_len=8, bos_id=BOS, eos_id=EOS)
    free = decoding.greedy_decode(encode_fn, decode_fn, src, **kw)
    assert free[0].tolist() == [A, B, A, B, A, B, A, B]  # a b a b ...: loops
    for out in (
        decoding.greedy_decode(encode_fn, decode_fn, src, no_repeat_ngram=2, **kw),
        decoding.beam_search(encode_fn, decode_fn, src, beam_size=3, no_repeat_ngram=2, **kw),
    ):
        tokens = [x for x in out[0].tolist() if x not in (PAD, EOS)]
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams)) and tokens[:2] == [A, B]
