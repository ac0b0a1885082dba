"""Greedy and beam decoding over a model given as two functions.

Decoding works on two pure functions supplied by the caller, so it knows nothing about the model:

- ``encode_fn(src int32[B, Ls]) -> enc``: any pytree whose leaves have the batch on axis 0,
  computed once per call;
- ``decode_fn(enc, tgt int32[B, L]) -> logits [B, L, V]`` with ``L = max_len``: a causal decoder
  over a fixed-length, right-padded prefix ``tgt = [bos, y1, y2, ..., pad, ...]``; the logits at
  position t predict token t+1. There is no KV cache: every step recomputes the whole prefix inside
  ``jax.lax.while_loop`` so all shapes stay static.

Both decoders return ``int32[B, max_len]`` holding the generated tokens ``[y1, y2, ...]`` (no bos),
ending with ``eos_id`` where the sequence finished and ``pad_id`` after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

EncodeFn = Callable[[jax.Array], Any]
DecodeFn = Callable[[Any, jax.Array], jax.Array]

_DECODE_STATIC = (
    "encode_fn", "decode_fn", "max_len", "bos_id", "eos_id", "pad_id", "no_repeat_ngram"
)  # fmt: skip


# Greedy decoding


def _next_logits(
    decode_fn: DecodeFn, enc: Any, buf: jax.Array, t: jax.Array, max_len: int, ngram: int = 0
):
    """float32 log-probabilities ``[N, V]`` of the token after position ``t`` of the prefix
    ``buf[:, :max_len]``; with ``ngram`` > 0, tokens that would repeat an n-gram are -inf."""
    logits = decode_fn(enc, buf[:, :max_len])  # [N, max_len, V]
    step = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)  # [N, V]
    logp = jax.nn.log_softmax(step.astype(jnp.float32), axis=-1)
    return jnp.where(repeated_ngram_tokens(buf, t, ngram, logp.shape[-1]), -jnp.inf, logp)


def repeated_ngram_tokens(buf: jax.Array, t: jax.Array, n: int, vocab: int) -> jax.Array:
    """bool[N, V]: the tokens that, written at ``buf[:, t + 1]``, would complete an n-gram that
    already occurs in ``buf[:, 1 : t + 1]`` (fairseq's ``no_repeat_ngram_size``; ``buf[:, 0]``
    is bos and takes part in none). All False for ``n`` = 0, or before ``n - 1`` tokens."""
    rows, width = buf.shape
    if n <= 0:
        return jnp.zeros((rows, vocab), bool)
    j = jnp.arange(width)  # start of an earlier n-gram: buf[:, j : j + n]
    match = (j >= 1) & (j + n - 1 <= t)  # [W]: it is complete before the new token
    for k in range(n - 1):  # its first n - 1 tokens equal the last n - 1 ones
        last = jax.lax.dynamic_index_in_dim(buf, t - n + 2 + k, axis=1, keepdims=False)  # [N]
        earlier = jnp.roll(buf, -k, axis=1)  # [N, W]: buf[:, j + k]
        match = match & (earlier == last[:, None])
    banned = jnp.roll(buf, -(n - 1), axis=1)  # [N, W]: the token that followed: buf[:, j + n - 1]
    out = jnp.zeros((rows, vocab), bool)
    return out.at[jnp.arange(rows)[:, None], banned].max(match & (t >= n - 1))


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC)
def greedy_decode(
    encode_fn: EncodeFn,
    decode_fn: DecodeFn,
    src: jax.Array,
    *,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    no_repeat_ngram: int = 0,
) -> jax.Array:
    """Arg-max decoding: ``int32[B, max_len]``; a row stops at ``eos_id`` (then ``pad_id``).
    ``no_repeat_ngram`` = n > 0 never repeats an n-gram within a row (fairseq's option).

    ``encode_fn`` and ``decode_fn`` are static jit arguments: pass the same function objects to
    reuse the compiled program, or call this inside your own ``jax.jit`` (arrays they close over
    are then traced, not baked in). The loop exits early once every row has produced eos.
    """
    enc = encode_fn(src)
    batch = src.shape[0]
    # buf[:, 0] is bos; step t writes the token predicted by position t into buf[:, t + 1].
    buf = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)  # [B, max_len+1]
    done = jnp.zeros((batch,), bool)

    def cond(state):
        t, _, done = state
        return (t < max_len) & ~jnp.all(done)

    def body(state):
        t, buf, done = state
        logp = _next_logits(decode_fn, enc, buf, t, max_len, no_repeat_ngram)
        token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)  # [B]
        buf = jax.lax.dynamic_update_slice(buf, token[:, None], (0, t + 1))
        return t + 1, buf, done | (token == eos_id)

    _, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buf, done))
    return buf[:, 1:]


def force_prefix(logits: jax.Array, prefix: jax.Array, pad_id: int = 0) -> jax.Array:
    """``logits [N, L, V]`` with position ``t`` pinned to token ``prefix[n, t]`` (log-prob 0,
    every other token -inf) wherever ``prefix int32[N, P]`` (``P <= L``, right-padded with
    ``pad_id``) has one: wrapped around a ``decode_fn``, both decoders then emit each row's
    prefix before choosing tokens themselves (continuing a text). The pinned tokens add 0 to a
    beam's score, so beams compete on the continuation only."""
    length, vocab = logits.shape[1], logits.shape[2]
    width = min(prefix.shape[1], length)
    p = jnp.pad(prefix[:, :length], ((0, 0), (0, length - width)), constant_values=pad_id)
    p = jnp.where(p == pad_id, -1, p)  # [N, L]; -1 = not pinned
    pinned = jnp.where(jnp.arange(vocab) == p[..., None], 0.0, -jnp.inf).astype(logits.dtype)
    return jnp.where((p >= 0)[..., None], pinned, logits)


# Beam search


def length_penalty_factor(length: Any, alpha: float) -> Any:
    """GNMT length normalisation ``lp(Y) = ((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016, Eq. 14);
    a finished hypothesis scores ``log P(Y | X) / lp(Y)``."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(x: jax.Array, beam_idx: jax.Array) -> jax.Array:
    """``out[b, j] = x[b, beam_idx[b, j]]`` for ``x [B, K, ...]``, ``beam_idx int[B, J]``."""
    return jax.vmap(lambda row, idx: row[idx])(x, beam_idx)


def _top_k_beams(scores: jax.Array, seqs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` best of ``scores [B, N]`` and their sequences ``[B, N, S]`` (best first)."""
    top_scores, idx = jax.lax.top_k(scores, k)
    return top_scores, _gather_beams(seqs, idx)


def _beam_step(state, *, decode_fn, enc, beam_size, max_len, eos_id, alpha, ngram=0):
    """One step of beam search over finished and alive beams (as in the flax wmt / t5x decoder).

    The ``2K`` best extensions of the alive beams are scored; those ending in eos become
    finished candidates scored ``log P / lp(t + 1)``, the rest compete for the ``K`` alive slots.
    Taking ``2K`` guarantees at least ``K`` extensions that do not end in eos.
    """
    t, alive_seq, alive_logp, fin_seq, fin_score = state
    batch, k, width = alive_seq.shape  # [B, K, max_len+1]
    logp = _next_logits(decode_fn, enc, alive_seq.reshape(batch * k, width), t, max_len, ngram)
    vocab = logp.shape[-1]
    cand = (alive_logp[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    cand_logp, cand_idx = jax.lax.top_k(cand, min(2 * k, k * vocab))  # [B, 2K]
    token = (cand_idx % vocab).astype(jnp.int32)
    cand_seq = _gather_beams(alive_seq, cand_idx // vocab)  # [B, 2K, max_len+1]
    cand_seq = jax.lax.dynamic_update_slice(cand_seq, token[:, :, None], (0, 0, t + 1))
    is_eos = token == eos_id

    alive_logp, alive_seq = _top_k_beams(
        jnp.where(is_eos, -jnp.inf, cand_logp), cand_seq, beam_size
    )
    new_fin = jnp.where(is_eos, cand_logp / length_penalty_factor(t + 1.0, alpha), -jnp.inf)
    fin_score, fin_seq = _top_k_beams(
        jnp.concatenate([fin_score, new_fin], axis=1),
        jnp.concatenate([fin_seq, cand_seq], axis=1),
        beam_size,
    )
    return t + 1, alive_seq, alive_logp, fin_seq, fin_score


def _beam_search_done(state, *, max_len: int, alpha: float) -> jax.Array:
    """True when no alive beam can still beat the worst of K finished ones, in every row.

    Log-probabilities only fall as a beam grows and ``lp`` is largest at ``max_len``, so
    ``best alive log P / lp(max_len)`` bounds any score an alive beam can still reach.
    """
    t, _, alive_logp, _, fin_score = state
    best_alive = jnp.max(alive_logp, axis=1) / length_penalty_factor(float(max_len), alpha)
    worst_fin = jnp.min(fin_score, axis=1)  # -inf until K beams have finished
    return (t >= max_len) | jnp.all(worst_fin > best_alive)


@functools.partial(jax.jit, static_argnames=(*_DECODE_STATIC, "beam_size", "length_penalty"))
def beam_search(
    encode_fn: EncodeFn,
    decode_fn: DecodeFn,
    src: jax.Array,
    *,
    beam_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    length_penalty: float = 0.6,
    pad_id: int = 0,
    no_repeat_ngram: int = 0,
) -> jax.Array:
    """Beam search with GNMT length normalisation: the best hypothesis per row, ``int32[B, L]``.

    Keeps ``beam_size`` alive and ``beam_size`` finished beams per row (flax wmt / t5x layout);
    returns the best finished beam by ``log P / ((5 + len) / 6) ** length_penalty`` (len counts
    eos), or the most probable alive beam for a row where none finished within ``max_len``.
    ``enc`` is computed once and repeated per beam along axis 0 of every leaf. With
    ``beam_size=1`` and ``length_penalty=0`` this follows the greedy path but may return an
    earlier eos-terminated prefix of it when that prefix is more probable than greedy's output.
    """
    batch = src.shape[0]
    enc = jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), encode_fn(src))  # [B*K, ...]
    seq = jnp.full((batch, beam_size, max_len + 1), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
    alive_logp = jnp.full((batch, beam_size), -jnp.inf).at[:, 0].set(0.0)  # [B, K]
    fin_score = jnp.full((batch, beam_size), -jnp.inf)  # [B, K]
    state = (jnp.int32(0), seq, alive_logp, seq, fin_score)

    step = functools.partial(
        _beam_step,
        decode_fn=decode_fn,
        enc=enc,
        beam_size=beam_size,
        max_len=max_len,
        eos_id=eos_id,
        alpha=length_penalty,
        ngram=no_repeat_ngram,
    )
    done = functools.partial(_beam_search_done, max_len=max_len, alpha=length_penalty)
    _, alive_seq, alive_logp, fin_seq, fin_score = jax.lax.while_loop(
        lambda s: ~done(s), step, state
    )
    any_finished = fin_score[:, 0] > -jnp.inf  # [B]; finished beams are sorted best first
    best = jnp.where(any_finished[:, None], fin_seq[:, 0], alive_seq[:, 0])  # [B, max_len+1]
    return best[:, 1:]
