"""Task pathways: masks from the config, isolation of a task from the experts outside its
pathway (forward and backward), what a model with frozen tasks trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import config as cfg
from moe.training import build
from moe.training import pathway_spec as pathways
from moe.training.freeze import Rows, path_names
from moe.training.step import LossWeights, loss_and_metrics

E = 4


def experiment(tasks=None, **moe):
    tasks = tasks or [
        {"name": "a", "kind": "translate", "source": "tsv:a", "experts": [0, 1]},
        {"name": "b", "kind": "translate", "source": "tsv:b", "experts": {"decoder/1": [1, 3]}},
        {"name": "c", "kind": "lm", "source": "text:c"},
    ]
    return cfg.from_dict(
        {
            "name": "p",
            "model": {
                "d_model": 8,
                "num_heads": 2,
                "encoder_layers": 2,
                "decoder_layers": 2,
                "d_ff": 12,
                "dropout": 0.0,
                "vocab_size": 64,
            },
            "moe": {"num_experts": E, "every": 2, "top_k": 2, **moe},
            "tasks": tasks,
        }
    )


@pytest.fixture(scope="module")
def model_and_batch():
    exp = experiment()
    make = lambda: build.build_model(exp)
    graphdef, _ = nnx.split(nnx.eval_shape(make), nnx.Param)
    params = jax.jit(lambda: nnx.split(make(), nnx.Param)[1])()
    b = 6
    batch = {
        "src": jax.random.randint(jax.random.key(0), (b, 5), 4, 64),
        "tgt_in": jax.random.randint(jax.random.key(1), (b, 4), 4, 64),
        "tgt_out": jax.random.randint(jax.random.key(2), (b, 4), 4, 64),
    }
    return exp, graphdef, params, batch


def test_masks_come_from_lists_dicts_and_default_to_every_expert():
    exp = experiment()
    assert exp.moe_layers == ["encoder/1", "decoder/1"]
    m = pathways.masks(exp)
    assert m["encoder/1"] == (
        (True, True, False, False),
        (True, True, True, True),
        (True, True, True, True),
    )
    assert m["decoder/1"][:2] == ((True, True, False, False), (False, True, False, True))
    assert pathways.task_experts(exp, 1, "encoder/1") == [0, 1, 2, 3]
    assert pathways.masks(experiment(tasks=[{"name": "x", "kind": "lm", "source": "t"}])) == {}


@pytest.mark.parametrize(
    "experts, message",
    [
        ([0, 4], "distinct expert ids in [0, 4)"),
        ([1, 1], "distinct expert ids"),
        ([2], "fewer than moe.top_k=2"),
        ({"decoder/0": [0, 1]}, "'decoder/0' is not an MoE layer"),
    ],
)
def test_bad_pathways_are_config_errors_naming_the_task(experts, message):
    tasks = [{"name": "x", "kind": "lm", "source": "t", "experts": experts}]
    with pytest.raises(cfg.ConfigError, match="tasks.0.experts") as err:
        experiment(tasks=tasks)
    assert message in str(err.value)


def test_every_task_at_weight_zero_is_a_config_error():
    with pytest.raises(cfg.ConfigError, match="at least one task"):
        experiment(tasks=[{"name": "x", "kind": "lm", "source": "t", "weight": 0}])


def _loss(params, graphdef, batch, task):
    b = dict(batch, task=jnp.broadcast_to(task, batch["src"].shape[:1]).astype(jnp.int32))
    return loss_and_metrics(
        params, graphdef, b, jax.random.key(0), LossWeights(0.01, 0.001), 3, False
    )


def _expert_rows(params, layer):
    """{leaf name: array [E, ...]} of a layer's expert bank and router (experts first)."""
    stack, i = layer.split("/")
    ffn = params[stack][int(i)]["ffn"]
    rows = {k: ffn["experts"][k][...] for k in pathways.EXPERT_LEAVES}
    rows["w_gate"] = ffn["router"]["w_gate"][...].T  # [E, d]
    return rows


def test_a_task_never_routes_to_a_masked_expert_nor_sends_it_gradient(model_and_batch):
    exp, graphdef, params, batch = model_and_batch
    grad_fn = jax.jit(jax.grad(_loss, has_aux=True), static_argnums=1)
    for task in range(3):
        grads, metrics = grad_fn(params, graphdef, batch, jnp.int32(task))
        for layer in exp.moe_layers:
            allowed = pathways.task_experts(exp, task, layer)
            masked = [e for e in range(E) if e not in allowed]
            load = np.asarray(metrics["moe"][layer]["expert_load"])
            assert np.all(load[masked] == 0) and load[allowed].sum() == pytest.approx(1.0)
            for name, g in _expert_rows(grads, layer).items():
                g = np.asarray(g)
                assert np.all(g[masked] == 0), (task, layer, name)
                if name != "b_out":  # b_out of an allowed expert may be ~0 by chance
                    assert np.any(g[allowed] != 0), (task, layer, name)


def test_weights_of_masked_experts_do_not_change_the_task_outputs(model_and_batch):
    exp, graphdef, params, batch = model_and_batch
    loss = jax.jit(_loss, static_argnums=1)
    changed = jax.tree.map(lambda x: x, params)
    ffn = changed["decoder"][1]["ffn"]
    ffn["experts"]["w_in"][...] = ffn["experts"]["w_in"][...].at[2].multiply(3.0)  # a: masked
    ffn["router"]["w_gate"][...] = ffn["router"]["w_gate"][...].at[:, 2].add(5.0)
    _, before = loss(params, graphdef, batch, jnp.int32(0))
    _, after = loss(changed, graphdef, batch, jnp.int32(0))
    assert np.array_equal(before["task_nll"], after["task_nll"])
    _, before_c = loss(params, graphdef, batch, jnp.int32(2))  # task c may use expert 2
    _, after_c = loss(changed, graphdef, batch, jnp.int32(2))
    assert not np.array_equal(before_c["task_nll"], after_c["task_nll"])


def test_frozen_tasks_lock_their_experts_task_rows_and_all_shared_weights():
    tasks = [
        {"name": "old1", "kind": "lm", "source": "t", "experts": [0, 1], "frozen": True},
        {"name": "old2", "kind": "lm", "source": "t", "experts": [1, 2], "frozen": True},
        {"name": "new", "kind": "lm", "source": "t", "experts": [2, 3, 5, 4]},
    ]
    exp = experiment(tasks=tasks, num_experts=6, routing_input="token+task")
    assert pathways.trainable_experts(exp) == {"encoder/1": [3, 4, 5], "decoder/1": [3, 4, 5]}
    select = pathways.selector(exp)
    params = nnx.split(nnx.eval_shape(lambda: build.build_model(exp)), nnx.Param)[1]
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        seen["/".join(path_names(path))] = select(path, leaf.shape)
    assert seen["decoder/1/ffn/experts/w_in"] == Rows(0, (3, 4, 5))
    assert seen["encoder/1/ffn/router/w_gate"] == Rows(1, (3, 4, 5))
    assert seen["task_embed"] == Rows(0, (2,))
    assert seen["embed"] is False and seen["decoder/0/self_attn/w_q"] is False
    assert sum(1 for v in seen.values() if v is not False) == 2 * 5 + 1
    assert pathways.selector(experiment()) is None  # nothing frozen: train everything
