"""Task-level routing (Task-MoE) and the fixed-capacity spec of grown/extracted models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers.moe import MoeBlock, MoeSpec
from moe.layers.task_moe import TaskRoutedMoeBlock
from moe.layers.transformer import Transformer, TransformerSpec
from moe.routing.token_choice import capacity

D, F, E = 8, 12, 6


def expert_sets(slot_token, num_tokens):
    """For each token, the frozenset of experts holding it (a Python loop over slots)."""
    sets = [set() for _ in range(num_tokens)]
    for e, row in enumerate(np.asarray(slot_token)):
        for t in row:
            if t >= 0:
                sets[t].add(e)
    return [frozenset(s) for s in sets]


def test_task_routing_gives_every_token_of_a_task_the_same_experts_whatever_the_token():
    spec = MoeSpec(num_experts=E, top_k=2, capacity_factor_eval=0.0)
    block = TaskRoutedMoeBlock(D, F, spec, causal=False, rngs=nnx.Rngs(0))
    block.router.w_gate[...] = jax.random.normal(jax.random.key(1), (D, E))
    task_emb = jax.random.normal(jax.random.key(2), (3, D))
    task = jnp.array([0, 1, 2, 0, 1, 2, 0, 0] * 3)  # [T]
    route = jax.jit(lambda x, b: block.route(x, train=False, router_bias=b).slot_token)
    x1 = jax.random.normal(jax.random.key(3), (task.size, D))
    x2 = 10 * jax.random.normal(jax.random.key(4), (task.size, D))
    sets1 = expert_sets(route(x1, task_emb[task]), task.size)
    sets2 = expert_sets(route(x2, task_emb[task]), task.size)
    assert sets1 == sets2, "the routing must not depend on the tokens"
    for t in range(3):
        mine = {sets1[i] for i in range(task.size) if task[i] == t}
        assert len(mine) == 1 and len(next(iter(mine))) == 2
    expected = jax.lax.top_k(task_emb @ block.router.w_gate[...], 2)[1]  # [tasks, k]
    for t in range(3):
        got = next(sets1[i] for i in range(task.size) if task[i] == t)
        assert got == frozenset(np.asarray(expected[t]).tolist())


def test_task_routed_block_needs_the_task_embedding():
    block = TaskRoutedMoeBlock(D, F, MoeSpec(num_experts=E), causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="router_bias"):
        block(jnp.ones((1, 2, D)), train=False)


@pytest.mark.parametrize("tokens, experts, fixed", [(16, 6, 4), (40, 12, 8), (7, 2, 8)])
def test_pathway_spec_capacity_is_computed_for_the_fixed_expert_count(tokens, experts, fixed):
    spec = MoeSpec(num_experts=experts, top_k=2, capacity_experts=fixed)
    for train, cf in ((True, 1.25), (False, 2.0)):
        assert spec.capacity(tokens, train=train) == capacity(tokens, fixed, 2, cf)
    plain = MoeSpec(num_experts=experts, top_k=2)
    assert plain.capacity(tokens, train=True) == MoeSpec(experts, 2).capacity(tokens, train=True)


def test_decoder_task_routing_uses_exactly_k_experts_per_task_in_the_model():
    spec = TransformerSpec(
        kind="encoder_decoder",
        vocab_size=32,
        d_model=D,
        num_heads=2,
        encoder_layers=2,
        decoder_layers=2,
        d_ff=F,
        moe_layers=(
            ("encoder/1", MoeSpec(num_experts=E, top_k=2)),
            ("decoder/1", MoeSpec(num_experts=E, top_k=2, capacity_factor_eval=0.0)),
        ),
        num_tasks=2,
        routing_input=("token", "task"),
    )
    model = Transformer(spec, rngs=nnx.Rngs(0))
    assert isinstance(model.decoder[1].ffn, TaskRoutedMoeBlock)
    assert type(model.encoder[1].ffn) is MoeBlock
    assert model.task_embed.shape == (2, D)
    src = jax.random.randint(jax.random.key(0), (4, 5), 4, 32)
    tgt = jax.random.randint(jax.random.key(1), (4, 6), 4, 32)
    forward = nnx.jit(lambda m, s, g, k: m(s, g, k))
    for t in (0, 1):
        _, aux = forward(model, src, tgt, jnp.full((4,), t))
        load = np.asarray(aux["decoder/1"].stats["expert_load"])
        assert (load > 0).sum() == 2 and np.allclose(load[load > 0], 0.5)
        assert (np.asarray(aux["encoder/1"].stats["expert_load"]) > 0).sum() > 2
