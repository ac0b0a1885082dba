"""Encoder-decoder and decoder-only Transformers whose every n-th feed-forward is an MoE block.

Pre-LayerNorm blocks, sinusoidal positions, one token embedding shared by the encoder, decoder
and output projection. ``Transformer.__call__`` returns float32 logits and a dict of per-layer
``RoutingAux`` (aux/z losses and routing stats), keyed ``encoder/<i>`` / ``decoder/<i>``.

Task pathways (docs/ARCHITECTURE.md §Pathways): every call gets ``task int32[B]``. An MoE layer
may restrict each task to a set of experts (``TransformerSpec.pathways``, a static mask: the
block masks the other experts' router logits and gives them none of the task's tokens), and the
routers may see a learned task embedding ``task_embed [num_tasks, d]``: added to the token
(``token+task``) or alone (``task``, Task-MoE; Kudugunta et al. 2021).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.attention import Attention, causal_mask
from moe.layers.dense import DenseFFN
from moe.layers.moe import MoeBlock, MoeSpec
from moe.layers.params import param
from moe.layers.task_moe import TaskRoutedMoeBlock
from moe.routing.coactivation import FIRST_EXPERT
from moe.routing.result import RoutingAux

PAD_ID = 0
ROUTING_INPUTS = ("token", "task", "token+task")


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Narrow model description (built from the experiment in ``moe.training.build``).

    ``moe_layers`` is the one place that says which feed-forward blocks are MoE blocks and with
    how many experts: ``(("encoder/1", MoeSpec(...)), ("decoder/1", MoeSpec(...)))``; every
    other block is a dense FFN.
    """

    kind: str  # "encoder_decoder" | "decoder_only"
    vocab_size: int
    d_model: int
    num_heads: int
    encoder_layers: int
    decoder_layers: int
    d_ff: int
    dropout: float = 0.0
    activation: str = "gelu"
    moe_layers: tuple[tuple[str, MoeSpec], ...] = ()
    dtype: str = "float32"
    num_tasks: int = 1
    # Router input of the (encoder, decoder) MoE layers: one of ROUTING_INPUTS.
    routing_input: tuple[str, str] = ("token", "token")
    # (layer, mask) pairs, mask[task][expert] True where the task may use the expert; layers not
    # listed let every task use every expert.
    pathways: tuple[tuple[str, tuple[tuple[bool, ...], ...]], ...] = ()
    # Inference only (`moe quantize`): attention and dense feed-forward kernels stored with this
    # many bits (0 = float; the expert banks follow their MoeSpec.weight_bits).
    dense_weight_bits: int = 0

    def __post_init__(self):
        for mode in self.routing_input:
            if mode not in ROUTING_INPUTS:
                raise ValueError(f"routing_input {mode!r} is not one of {ROUTING_INPUTS}")
        specs = dict(self.moe_layers)
        for layer, mask in self.pathways:
            if layer not in specs:
                raise ValueError(f"pathway of {layer}: not an MoE layer ({', '.join(specs)})")
            if len(mask) != self.num_tasks:
                raise ValueError(f"pathway of {layer} has {len(mask)} rows, not {self.num_tasks}")
            if any(len(row) != specs[layer].num_experts for row in mask):
                raise ValueError(
                    f"pathway of {layer} is not {specs[layer].num_experts} experts wide"
                )

    @property
    def uses_task_embedding(self) -> bool:
        return bool(self.moe_layers) and any(m != "token" for m in self.routing_input)

    def layer_moe(self, stack: str, i: int) -> MoeSpec | None:
        """The MoE spec of block ``i`` of ``stack`` ('encoder' | 'decoder'), None if dense."""
        return dict(self.moe_layers).get(f"{stack}/{i}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Which example each position of a row belongs to (packed rows, ``moe.data.packing``).

    ``segment int32[B, L]``: 1, 2, ... for the examples of a row, 0 for padding; ``position
    int32[B, L]``: the position within its example; ``task int32[B, L]``: its task. Attention
    never crosses examples; an unpacked row is one segment.
    """

    segment: jax.Array
    position: jax.Array
    task: jax.Array

    @classmethod
    def unpacked(cls, tokens: jax.Array, task: jax.Array) -> Segments:
        """One example a row: real tokens are segment 1 at positions 0, 1, ...; ``task [B]``."""
        segment = (tokens != PAD_ID).astype(jnp.int32)
        position = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        task = jnp.broadcast_to(jnp.asarray(task, jnp.int32)[:, None], tokens.shape)
        return cls(segment, position, task)

    @property
    def valid(self) -> jax.Array:
        """bool[B, L]: real tokens."""
        return self.segment > 0

    def attention_mask(self, keys: Segments, *, causal: bool = False) -> jax.Array:
        """bool[B, Lq, Lk]: query and key in the same example (and key not after the query)."""
        mask = (self.segment[:, :, None] == keys.segment[:, None, :]) & keys.valid[:, None, :]
        if causal:
            mask = mask & causal_mask(self.segment.shape[1])
        return mask

    def prefix_of(self, tgt: Segments) -> Segments:
        """A prefix LM's [source; target] rows: target positions continue after their own
        example's source (``self`` holds the sources)."""
        width = self.segment.shape[1]  # segment ids are < width + 1
        onehot = jax.nn.one_hot(self.segment, width + 1, dtype=jnp.int32)  # [B, Ls, S]
        src_len = onehot.sum(1)  # [B, S]: source tokens of each example
        offset = jnp.take_along_axis(src_len, tgt.segment, axis=1) * (tgt.segment > 0)
        return Segments(
            jnp.concatenate([self.segment, tgt.segment], axis=1),
            jnp.concatenate([self.position, tgt.position + offset], axis=1),
            jnp.concatenate([self.task, tgt.task], axis=1),
        )


class Block(nnx.Module):
    """x + SelfAttn(LN x) [+ CrossAttn(LN x, enc)] + FFN-or-MoE(LN x)."""

    def __init__(
        self,
        spec: TransformerSpec,
        *,
        cross: bool,
        moe: MoeSpec | None,
        causal,
        rngs,
        task_routed: bool = False,
    ):
        d, dt = spec.d_model, jnp.dtype(spec.dtype)
        self.dropout = spec.dropout
        bits = spec.dense_weight_bits
        self.ln_self = nnx.LayerNorm(d, rngs=rngs)
        self.self_attn = Attention(
            d, spec.num_heads, dropout=spec.dropout, dtype=dt, rngs=rngs, weight_bits=bits
        )
        self.ln_cross = nnx.LayerNorm(d, rngs=rngs) if cross else None
        self.cross_attn = (
            Attention(
                d, spec.num_heads, dropout=spec.dropout, dtype=dt, rngs=rngs, weight_bits=bits
            )
            if cross
            else None
        )
        self.ln_ffn = nnx.LayerNorm(d, rngs=rngs)
        self.is_moe = moe is not None
        if moe is not None:
            block = TaskRoutedMoeBlock if task_routed else MoeBlock
            self.ffn = block(d, spec.d_ff, moe, causal=causal, dtype=dt, rngs=rngs)
        else:
            self.ffn = DenseFFN(
                d, spec.d_ff, activation=spec.activation, dropout=spec.dropout, dtype=dt,
                weight_bits=bits, rngs=rngs,
            )  # fmt: skip

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


def _take_first_expert(aux: RoutingAux, first):
    """``(aux without its per-token stats, its token_first_expert or the previous one)``:
    per-token stats feed the next MoE layer of the stack, never the metrics."""
    aux, per_token = aux.split_per_token()
    return aux, per_token.get(FIRST_EXPERT, first)


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
        self.embed = param(
            init(rngs.params(), (spec.vocab_size, d), jnp.float32), ("vocab", "embed")
        )
        enc_layers = spec.encoder_layers if spec.kind == "encoder_decoder" else 0
        enc_task, dec_task = (m == "task" for m in spec.routing_input)
        self.encoder = nnx.List(
            [
                Block(
                    spec,
                    cross=False,
                    moe=spec.layer_moe("encoder", i),
                    causal=False,
                    rngs=rngs,
                    task_routed=enc_task,
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
                    moe=spec.layer_moe("decoder", i),
                    causal=True,
                    rngs=rngs,
                    task_routed=dec_task,
                )
                for i in range(spec.decoder_layers)
            ]
        )
        self.dec_norm = nnx.LayerNorm(d, rngs=rngs)
        # Drawn last, so models without task routing initialise exactly as before.
        self.task_embed = (
            param(
                nnx.initializers.normal(stddev=1.0)(
                    rngs.params(), (spec.num_tasks, d), jnp.float32
                ),
                (None, "embed"),
            )
            if spec.uses_task_embedding
            else None
        )

    def moe_blocks(self) -> dict[str, MoeBlock]:
        """The MoE blocks by layer name (``encoder/1``): the keys of the aux dict."""
        stacks = (("encoder", self.encoder), ("decoder", self.decoder))
        return {
            f"{stack}/{i}": block.ffn
            for stack, blocks in stacks
            for i, block in enumerate(blocks)
            if block.is_moe
        }

    # -- pieces ------------------------------------------------------------------------------
    def _moe_kw(self, stack: str, i: int, task_bs) -> dict:
        """Pathway mask and task router input of MoE block ``i`` for tokens whose tasks are
        ``task_bs int32[B, S]``."""
        if not (self.encoder if stack == "encoder" else self.decoder)[i].is_moe:
            return {}
        kw = {}
        mask = dict(self.spec.pathways).get(f"{stack}/{i}")
        if mask is not None:
            kw["expert_mask"] = jnp.asarray(mask, bool)[task_bs]  # [B, S, E]
        if self.spec.routing_input[stack == "decoder"] != "token":
            kw["router_bias"] = jnp.take(self.task_embed[...], task_bs, axis=0)  # [B, S, d]
        return kw

    def _embed(self, tokens, positions):
        d = self.spec.d_model
        x = jnp.take(self.embed[...], tokens, axis=0) * jnp.sqrt(jnp.float32(d))  # [B, L, d]
        return x + jnp.take(sinusoidal(tokens.shape[1], d), positions, axis=0)

    def encode(self, src, task, *, train=False, rngs=None, segments: Segments | None = None):
        """Encoder states. Returns ``(enc [B, Ls, d], src Segments, aux)``; ``task int32[B]``
        (one task a row) unless ``segments`` (packed rows) gives the task of every token."""
        seg = segments if segments is not None else Segments.unpacked(src, task)
        aux = {}
        if not len(self.encoder):
            return src, seg, aux  # decoder-only: the "encoding" is the source prefix itself
        x = self._embed(src, seg.position)
        mask = seg.attention_mask(seg)
        first = None  # routing stats only: the last MoE layer's first kept experts
        for i, block in enumerate(self.encoder):
            kw = self._moe_kw("encoder", i, seg.task)
            kw.update({"previous_first": first} if block.is_moe and first is not None else {})
            x, a = block(x, mask, valid=seg.valid, train=train, rngs=rngs, moe_kw=kw)
            if a is not None:
                aux[f"encoder/{i}"], first = _take_first_expert(a, first)
        return self.enc_norm(x), seg, aux

    def decode(self, tgt_in, enc, src: Segments, task, *, train=False, rngs=None, segments=None):
        """Logits ``float32[B, Lt, V]`` for the next token at each target position, and aux.
        ``src`` is what ``encode`` returned; ``task``/``segments`` as for ``encode``."""
        aux = {}
        tgt = segments if segments is not None else Segments.unpacked(tgt_in, task)
        if len(self.encoder):
            seg, x = tgt, self._embed(tgt_in, tgt.position)
            self_mask = tgt.attention_mask(tgt, causal=True)
            cross = tgt.attention_mask(src)
        else:  # prefix LM over [src; tgt]: causal within each example, pad keys masked
            seg = src.prefix_of(tgt)
            x = self._embed(jnp.concatenate([enc, tgt_in], axis=1), seg.position)
            self_mask = seg.attention_mask(seg, causal=True)
            cross = None
        first = None  # routing stats only: the last MoE layer's first kept experts
        for i, block in enumerate(self.decoder):
            kw = self._moe_kw("decoder", i, seg.task)
            kw.update({"previous_first": first} if block.is_moe and first is not None else {})
            x, a = block(
                x,
                self_mask,
                valid=seg.valid,
                enc=enc if cross is not None else None,
                cross_mask=cross,
                train=train,
                rngs=rngs,
                moe_kw=kw,
            )
            if a is not None:
                aux[f"decoder/{i}"], first = _take_first_expert(a, first)
        x = self.dec_norm(x)
        if cross is None:
            x = x[:, enc.shape[1] :]  # [B, Lt, d]: only target positions predict
        logits = jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.embed[...])
        return logits, aux

    def __call__(self, src, tgt_in, task, *, train=False, rngs=None, segments=None):
        """``segments``: None (one example a row, tasks ``task int32[B]``) or a pair of
        ``Segments`` (source, target) for packed rows (then ``task`` is unused)."""
        src_seg, tgt_seg = segments if segments is not None else (None, None)
        enc, src_seg, enc_aux = self.encode(src, task, train=train, rngs=rngs, segments=src_seg)
        logits, dec_aux = self.decode(
            tgt_in, enc, src_seg, task, train=train, rngs=rngs, segments=tgt_seg
        )
        return logits, {**enc_aux, **dec_aux}
