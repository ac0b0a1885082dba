"""Co-activation counts from a Routing, against a Python loop over tokens; the model's routing
stats leave its outputs unchanged and agree with the routings it made."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.layers.moe import MoeBlock, MoeSpec
from moe.layers.transformer import Transformer, TransformerSpec
from moe.routing import coactivation
from moe.routing.token_choice import top_k


def reference(slot_token, slot_weight, num_tokens, previous=None):
    """The counts of moe.routing.coactivation, one token at a time."""
    e = slot_token.shape[0]
    kept = [dict() for _ in range(num_tokens)]  # token -> {expert: weight}
    for x in range(e):
        for c in range(slot_token.shape[1]):
            t = int(slot_token[x, c])
            if t >= 0:
                kept[t][x] = float(slot_weight[x, c])
    co, first_co = np.zeros((e, e)), np.zeros((e, e))
    firsts = []
    for t in range(num_tokens):
        first = max(sorted(kept[t]), key=lambda x: kept[t][x]) if kept[t] else None
        firsts.append(first)
        for a in kept[t]:
            for b in kept[t]:
                co[a, b] += 1
            if first is not None:
                first_co[first, a] += 1
    out = {"coactivation": co, "first_coactivation": first_co, "firsts": firsts}
    out["routed_tokens"] = sum(1 for k in kept if k)
    if previous is not None:
        trans = np.zeros((previous.shape[1], e))
        for t in range(num_tokens):
            if previous[t].any():
                for b in kept[t]:
                    trans[int(np.argmax(previous[t])), b] += 1
        out["transition"] = trans
    return out


def test_counts_match_a_loop_over_tokens_with_drops_and_padding():
    t, e = 40, 6
    logits = jax.random.normal(jax.random.key(0), (t, e))
    mask = jnp.arange(t) < 34  # 6 padding tokens
    routing = top_k(logits, k=2, capacity=9, token_mask=mask)  # tight: some choices drop
    prev = jax.nn.one_hot(jax.random.randint(jax.random.key(1), (t,), 0, 5), 5)
    prev = prev * mask[:, None]
    got = coactivation.coactivation_stats(routing, t, prev)
    want = reference(np.asarray(routing.slot_token), np.asarray(routing.slot_weight), t, prev)
    assert float(jnp.sum(routing.stats["dropped_fraction"])) > 0  # the case has drops
    for name in ("coactivation", "first_coactivation", "transition", "routed_tokens"):
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
    first = np.asarray(got[coactivation.FIRST_EXPERT])
    for i, f in enumerate(want["firsts"]):
        assert (first[i].argmax() if first[i].any() else None) == f


def spec(stats: bool, layers=4) -> TransformerSpec:
    moe = MoeSpec(num_experts=4, top_k=2, routing_stats=stats)
    return TransformerSpec(
        kind="encoder_decoder",
        vocab_size=50,
        d_model=16,
        num_heads=2,
        encoder_layers=layers,
        decoder_layers=2,
        d_ff=32,
        moe_layers=(("encoder/1", moe), ("encoder/3", moe), ("decoder/1", moe)),
    )


def test_routing_stats_change_no_output_and_chain_consecutive_layers(monkeypatch):
    plain = Transformer(spec(False), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(Transformer(spec(True), rngs=nnx.Rngs(0)))
    with_stats = nnx.merge(graphdef, nnx.split(plain)[1])
    src = jax.random.randint(jax.random.key(2), (4, 7), 0, 50).at[:, -2:].set(0)
    tgt = jax.random.randint(jax.random.key(3), (4, 5), 1, 50)
    task = jnp.zeros((4,), jnp.int32)
    seen = []
    route = MoeBlock.route

    def recording(self, x_td, **kw):
        routing = route(self, x_td, **kw)
        seen.append((np.asarray(routing.slot_token), np.asarray(routing.slot_weight)))
        return routing

    logits_a, aux_a = plain(src, tgt, task)
    monkeypatch.setattr(MoeBlock, "route", recording)
    logits_b, aux_b = with_stats(src, tgt, task)
    np.testing.assert_array_equal(logits_a, logits_b)
    assert "coactivation" not in aux_a["encoder/1"].stats
    assert all(not k.startswith("token_") for a in aux_b.values() for k in a.stats)
    enc1 = reference(*seen[0], 28)
    enc3 = reference(*seen[1], 28, jax.nn.one_hot(np.array([f or 0 for f in enc1["firsts"]]), 4)
                     * np.array([[f is not None] for f in enc1["firsts"]]))  # fmt: skip
    for name in ("coactivation", "first_coactivation", "routed_tokens"):
        np.testing.assert_array_equal(aux_b["encoder/1"].stats[name], enc1[name])
        np.testing.assert_array_equal(aux_b["encoder/3"].stats[name], enc3[name])
    np.testing.assert_array_equal(aux_b["encoder/3"].stats["transition"], enc3["transition"])
    assert "transition" not in aux_b["encoder/1"].stats  # first MoE layer of its stack
    assert "transition" not in aux_b["decoder/1"].stats  # other tokens than the encoder's
    load = np.diag(np.asarray(aux_b["encoder/1"].stats["coactivation"]))
    np.testing.assert_array_equal(load, aux_b["encoder/1"].stats["tokens_per_expert"])
