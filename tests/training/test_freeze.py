"""Training part of a model: optimizer state only for the trainable rows, frozen entries
bit-identical, trainable rows updated exactly as the optimizer would update them alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe import config as cfg
from moe.training import build
from moe.training import state as state_lib
from moe.training.freeze import Rows, path_names, train_only
from moe.training.sharding import Placement

SELECT = {"bank": Rows(0, (1, 3)), "router": Rows(1, (3,)), "shared": False, "head": True}


def select(path, shape):
    return SELECT[path_names(path)[0]]


def params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "bank": jax.random.normal(k[0], (4, 3, 2)),
        "router": jax.random.normal(k[1], (3, 4)),
        "shared": jnp.array([0.0, -0.0, 1.5, -2.0]),  # signed zeros must survive
        "head": jax.random.normal(k[3], (5,)),
    }


def grads_at(i):
    p = params()
    return jax.tree.map(lambda x: jnp.sin(x * (i + 1.0)) + 0.1, p)


def test_state_holds_only_the_trainable_entries():
    opt = train_only(optax.adam(1e-2), select)
    state = opt.init(params())
    mu = state[0].mu
    assert mu["bank"].shape == (2, 3, 2) and mu["router"].shape == (3, 1)
    assert isinstance(mu["shared"], optax.MaskedNode) and mu["head"].shape == (5,)
    entries = sum(x.size for x in jax.tree.leaves(state))
    assert entries == 1 + 2 * (12 + 3 + 5)  # count + mu + nu


def test_frozen_entries_stay_bit_identical_and_trained_rows_match_the_optimizer_alone():
    inner = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-1, weight_decay=0.1))
    opt = train_only(inner, select)
    p = params()
    state = opt.init(p)
    sliced = lambda t: {  # the trainable problem on its own
        "bank": t["bank"][jnp.array([1, 3])],
        "router": t["router"][:, jnp.array([3])],
        "head": t["head"],
    }
    ref_p = sliced(p)
    ref_state = inner.init(ref_p)
    for i in range(3):
        g = grads_at(i)
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
        ref_updates, ref_state = inner.update(sliced(g), ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, ref_updates)
    start = params()
    for name in ("bank", "router"):
        frozen = np.ones(start[name].shape, bool)
        axis, index = SELECT[name].axis, list(SELECT[name].index)
        np.moveaxis(frozen, axis, 0)[index] = False
        got, old = np.asarray(p[name]), np.asarray(start[name])
        assert np.array_equal(got[frozen].view(np.uint32), old[frozen].view(np.uint32))
    assert np.array_equal(np.asarray(p["shared"]).view(np.uint32), start["shared"].view(np.uint32))
    got = sliced(p)
    for name in got:
        np.testing.assert_allclose(got[name], ref_p[name], rtol=1e-6, atol=1e-7)
        assert not np.allclose(got[name], sliced(start)[name])  # they did train


@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_a_grown_experiment_gets_row_state_and_shards_through_placement(optimizer):
    tasks = [
        {"name": "old", "kind": "lm", "source": "t", "experts": [0, 1], "frozen": True},
        {"name": "new", "kind": "lm", "source": "t", "experts": [1, 2, 3]},
    ]
    exp = cfg.from_dict(
        {
            "name": "g",
            "model": {"d_model": 8, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2},
            "moe": {"num_experts": 4, "every": 2},
            "tasks": tasks,
            "train": {"optimizer": optimizer},
        }
    )
    placement = Placement.for_experiment(exp)
    abstract = jax.eval_shape(
        lambda: state_lib.create(build.build_model(exp), placement.optimizer)[1]
    )
    state = placement.init_state()
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    # Trainable: experts 2 and 3 (the old task holds 0 and 1) and their router columns.
    trainable = 2 * (2 * (8 * 512 + 512 + 512 * 8 + 8) + 8 * 2)  # 2 layers
    opt_entries = sum(x.size for x in jax.tree.leaves(state.opt_state))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    assert opt_entries < 0.6 * params  # Adam on everything would hold 2 x params
    if optimizer == "adam":
        assert opt_entries == 2 * trainable + 2  # mu, nu + two step counters
