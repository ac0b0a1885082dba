"""Encoder-decoder and decoder-only Transformers whose every n-th feed-forward is an MoE block.

Pre-LayerNorm blocks, sinusoidal positions, one token embedding shared by the encoder, decoder
and output projection. ``Transformer.__call__`` returns float32 logits and a dict of per-layer
``MoeAux`` (aux/z losses and routing stats), keyed ``encoder/<i>`` / ``decoder/<i>``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.attention import Attention, causal_mask, padding_mask
from moe.layers.dense import DenseFFN
from moe.layers.moe import MoeBlock, MoeSpec

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Narrow model description (built from the experiment in ``moe.training.build``)."""

    kind: str  # "encoder_decoder" | "decoder_only"
    vocab_size: int
    d_model: int
    num_heads: int
    encoder_layers: int
    decoder_layers: int
    d_ff: int
    dropout: float = 0.0
    activation: str = "gelu"
    moe_every: int = 0  # MoE replaces feed-forward i when (i + 1) % moe_every == 0; 0 = dense
    encoder_moe: MoeSpec | None = None
    decoder_moe: MoeSpec | None = None
    dtype: str = "float32"

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0


class Block(nnx.Module):
    """x + SelfAttn(LN x) [+ CrossAttn(LN x, enc)] + FFN-or-MoE(LN x)."""

    def __init__(self, spec: TransformerSpec, *, cross: bool, moe: MoeSpec | None, causal, rngs):
        d, dt = spec.d_model, jnp.dtype(spec.dtype)
        self.dropout = spec.dropout
        self.ln_self = nnx.LayerNorm(d, rngs=rngs)
        self.self_attn = Attention(d, spec.num_heads, dropout=spec.dropout, dtype=dt, rngs=rngs)
        self.ln_cross = nnx.LayerNorm(d, rngs=rngs) if cross else None
        self.cross_attn = (
            Attention(d, spec.num_heads, dropout=spec.dropout, dtype=dt, rngs=rngs)
            if cross
            else None
        )
        self.ln_ffn = nnx.LayerNorm(d, rngs=rngs)
        self.is_moe = moe is not None
        if moe is not None:
            self.ffn = MoeBlock(d, spec.d_ff, moe, causal=causal, dtype=dt, rngs=rngs)
        else:
            self.ffn = DenseFFN(
                d, spec.d_ff, activation=spec.activation, dropout=spec.dropout, dtype=dt, rngs=rngs
            )

    def _drop(self, y, train, rngs):
        if not train or self.dropout == 0 or rngs is None:
            return y
        keep = jax.random.bernoulli(rngs.dropout(), 1 - self.dropout, y.shape)
        return jnp.where(keep, y / (1 - self.dropout), 0)

    def __call__(self, x, self_mask, *, valid, enc=None, cross_mask=None, train, rngs, moe_kw):
        h = self.self_attn(self.ln_self(x), self.ln_self(x), self_mask, train=train, rngs=rngs)
        x = x + self._drop(h.astype(x.dtype), train, rngs)
        if self.cross_attn is not None:
            h = self.cross_attn(self.ln_cross(x), enc, cross_mask, train=train, rngs=rngs)
            x = x + self._drop(h.astype(x.dtype), train, rngs)
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ln_ffn(x), train=train, rngs=rngs, token_mask=valid, **moe_kw)
        else:
            h = self.ffn(self.ln_ffn(x), train=train, rngs=rngs)
        x = x + self._drop(h.astype(x.dtype), train, rngs)
        return x, aux


def sinusoidal(length: int, d: int) -> jax.Array:
    """float32[L, d] sinusoidal position encodings (Vaswani et al. 2017 §3.5)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    i = jnp.arange(d // 2, dtype=jnp.float32)[None]
    angle = pos / jnp.power(10000.0, 2 * i / d)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class Transformer(nnx.Module):
    def __init__(self, spec: TransformerSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.d_model
        init = nnx.initializers.normal(stddev=d**-0.5)
        self.embed = nnx.Param(
            init(rngs.params(), (spec.vocab_size, d), jnp.float32), out_sharding=("vocab", "embed")
        )
        enc_layers = spec.encoder_layers if spec.kind == "encoder_decoder" else 0
        self.encoder = nnx.List(
            [
                Block(
                    spec,
                    cross=False,
                    moe=spec.encoder_moe if spec.is_moe_layer(i) else None,
                    causal=False,
                    rngs=rngs,
                )
                for i in range(enc_layers)
            ]
        )
        self.enc_norm = nnx.LayerNorm(d, rngs=rngs) if enc_layers else None
        self.decoder = nnx.List(
            [
                Block(
                    spec,
                    cross=enc_layers > 0,
                    moe=spec.decoder_moe if spec.is_moe_layer(i) else None,
                    causal=True,
                    rngs=rngs,
                )
                for i in range(spec.decoder_layers)
            ]
        )
        self.dec_norm = nnx.LayerNorm(d, rngs=rngs)

    # -- pieces ------------------------------------------------------------------------------
    def _embed(self, tokens):
        d = self.spec.d_model
        x = jnp.take(self.embed[...], tokens, axis=0) * jnp.sqrt(jnp.float32(d))  # [B, L, d]
        return x + sinusoidal(tokens.shape[1], d)[None]

    def encode(self, src, task, *, train=False, rngs=None):
        """Encoder states. Returns ``(enc [B, Ls, d], src_valid [B, Ls], aux)``."""
        valid = src != PAD_ID
        aux = {}
        if not len(self.encoder):
            return src, valid, aux  # decoder-only: the "encoding" is the source prefix itself
        x = self._embed(src)
        mask = padding_mask(valid)
        for i, block in enumerate(self.encoder):
            x, a = block(x, mask, valid=valid, train=train, rngs=rngs, moe_kw={})
            if a is not None:
                aux[f"encoder/{i}"] = a
        return self.enc_norm(x), valid, aux

    def decode(self, tgt_in, enc, src_valid, task, *, train=False, rngs=None):
        """Logits ``float32[B, Lt, V]`` for the next token at each target position, and aux."""
        aux = {}
        tgt_valid = tgt_in != PAD_ID
        if len(self.encoder):
            x, valid = self._embed(tgt_in), tgt_valid
            self_mask = causal_mask(tgt_in.shape[1]) & padding_mask(valid)
            cross = padding_mask(src_valid)
        else:  # prefix LM over [src; tgt]: causal, pad keys masked
            tokens = jnp.concatenate([enc, tgt_in], axis=1)
            valid = jnp.concatenate([src_valid, tgt_valid], axis=1)
            x = self._embed(tokens)
            self_mask = causal_mask(tokens.shape[1]) & padding_mask(valid)
            cross = None
        for i, block in enumerate(self.decoder):
            x, a = block(
                x,
                self_mask,
                valid=valid,
                enc=enc if cross is not None else None,
                cross_mask=cross,
                train=train,
                rngs=rngs,
                moe_kw={},
            )
            if a is not None:
                aux[f"decoder/{i}"] = a
        x = self.dec_norm(x)
        if cross is None:
            x = x[:, enc.shape[1] :]  # [B, Lt, d]: only target positions predict
        logits = jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.embed[...])
        return logits, aux

    def __call__(self, src, tgt_in, task, *, train=False, rngs=None):
        enc, src_valid, enc_aux = self.encode(src, task, train=train, rngs=rngs)
        logits, dec_aux = self.decode(tgt_in, enc, src_valid, task, train=train, rngs=rngs)
        return logits, {**enc_aux, **dec_aux}
