"""A task's extracted sub-network computes what the full model computes for that task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import config as cfg
from moe.errors import UserError
from moe.pathways import extract, surgery
from moe.training import build

B, LS, LT, V = 6, 7, 5, 64


def experiment(**moe):
    tasks = [
        {"name": "a", "kind": "translate", "source": "tsv:a", "experts": {"encoder/1": [1, 3, 4]}},
        {"name": "b", "kind": "translate", "source": "tsv:b", "experts": [0, 2, 5]},
    ]
    model = {"d_model": 8, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2}
    model.update(d_ff=12, dropout=0.0, vocab_size=V)
    moe = {"num_experts": 6, "every": 2, "top_k": 2, "capacity_factor_eval": 1.0, **moe}
    return cfg.from_dict({"name": "x", "model": model, "moe": moe, "tasks": tasks})


def init(exp, seed=0):
    make = lambda: build.build_model(exp, seed)
    graphdef, _ = nnx.split(nnx.eval_shape(make), nnx.Param)
    return graphdef, jax.jit(lambda: nnx.split(make(), nnx.Param)[1])()


def sharpen(params):
    """Router weights x50: decisive, unbalanced routing, so the capacity drops tokens."""

    def one(path, x):
        where = surgery.expert_axis(path)
        return x * 50.0 if where is not None and where[1] == 1 else x

    return jax.tree_util.tree_map_with_path(one, params)


def forward(graphdef):
    """A jitted ``(params, task) -> logits`` of one fixed batch (compiled once per model)."""
    batch = jax.random.randint(jax.random.key(3), (B, LS + LT), 4, V)

    @jax.jit
    def run(params, task):
        task_b = jnp.full((B,), task, jnp.int32)
        return nnx.merge(graphdef, params)(batch[:, :LS], batch[:, LS:], task_b)[0]

    return lambda params, task: np.asarray(run(params, task))


@pytest.fixture(scope="module")
def full_model():
    """Token routing in the encoder (pathways), task routing in the decoder (Task-MoE)."""
    exp = experiment(routing_input={"encoder": "token", "decoder": "task"})
    graphdef, params = init(exp)
    return exp, sharpen(params), forward(graphdef)


@pytest.mark.parametrize("task", [0, 1])
def test_extracted_sub_network_matches_the_full_model_for_its_task(full_model, task):
    """Same experts, tokens and drops (capacity binds: cf 1.0 and sharp routers). The router
    softmax's normaliser sums fewer terms (zeros under a pathway, small probabilities under
    task routing), so outputs agree to float rounding, not necessarily bit for bit."""
    exp, params, full = full_model
    keep = extract.kept_experts(exp, params, task)
    allowed = [[0, 1, 2, 3, 4, 5], [0, 2, 5]][task]
    emb = np.asarray(params["task_embed"][...])[task]
    logits = emb @ np.asarray(params["decoder"][1]["ffn"]["router"]["w_gate"][...])
    top2 = sorted(np.array(allowed)[np.argsort(-logits[allowed])[:2]].tolist())
    assert keep == {"encoder/1": [[1, 3, 4], [0, 2, 5]][task], "decoder/1": top2}
    child = extract.extracted_experiment(exp, task, keep, name="x-a")
    assert child.moe.layer_experts == {"encoder/1": 3, "decoder/1": 2}
    assert child.moe.capacity_experts == 6 and all(t.experts is None for t in child.tasks)
    small = jax.tree.map(jnp.asarray, surgery.take_experts(params, keep))
    child_graph, _ = nnx.split(nnx.eval_shape(lambda: build.build_model(child)), nnx.Param)
    want, got = full(params, task), forward(child_graph)(small, task)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="no task named 'zz'.*tasks: a, b"):
        extract.task_index(experiment(), "zz")


def test_task_routing_without_renormalised_gates_keeps_the_whole_pathway():
    """Un-renormalised gates (Switch style) depend on every expert's logit: nothing dropped."""
    exp = experiment(routing_input="task", renormalize=False)
    assert extract.kept_experts(exp, None, 1) == {"encoder/1": [0, 2, 5], "decoder/1": [0, 2, 5]}
