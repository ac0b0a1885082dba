"""Packed rows compute what one example a row computes: the same per-example losses (so the
same per-task metrics) and gradients, within float tolerance; and a step counts real tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import config as cfg
from moe.data.packing import Layout, assemble
from moe.data.tasks import Batcher, Task
from moe.data.token_store import ArrayRows
from moe.data.vocab import EOS_ID
from moe.training import build
from moe.training.step import LossWeights, loss_and_metrics

V, LS, LT = 40, 16, 16


def _task(i: int, n: int, kind: str) -> Task:
    rng = np.random.default_rng(i)
    src = np.zeros((n, 8), np.int32)
    tgt = np.zeros((n, 8), np.int32)
    for r in range(n):
        s, t = rng.integers(1, 6), rng.integers(1, 7)
        src[r, 0] = 4 + i  # the task tag
        if kind == "translate":
            src[r, 1 : 1 + s] = rng.integers(8, V, s)
            src[r, 1 + s] = EOS_ID
        tgt[r, :t] = rng.integers(8, V, t)
        tgt[r, t] = EOS_ID
    if kind == "lm":
        src = src[:, :1]
    return Task(f"t{i}", kind, f"<t{i}>", 4 + i, {"train": ArrayRows(src, tgt)})


def experiment(kind: str, every: int):
    return cfg.from_dict(
        {
            "name": "p",
            "model": {
                "kind": kind,
                "d_model": 16,
                "num_heads": 2,
                "encoder_layers": 2 if kind == "encoder_decoder" else 0,
                "decoder_layers": 2,
                "d_ff": 32,
                "dropout": 0.0,
                "vocab_size": 64,
                "max_source_length": LS,
                "max_target_length": LT,
            },
            # dropless: routing is per token, so rows can be regrouped without changing it
            "moe": {"num_experts": 4, "every": every, "top_k": 2, "capacity_factor_eval": 0},
            "tasks": [
                {"name": "t0", "kind": "translate", "source": "x"},
                {"name": "t1", "kind": "lm", "source": "x"},
            ],
        }
    )


def batches():
    """A packed global batch and the same examples one a row."""
    batcher = Batcher(
        [_task(0, 50, "translate"), _task(1, 50, "lm")],
        batch_size=4,
        max_src_len=LS,
        max_tgt_len=LT,
        seed=3,
        pack=True,
    )
    packed, plan = batcher.global_batch(7), batcher.plan(7)
    n = len(plan.task)
    src, tgt = [], []
    for t, r, ls_, lt_ in zip(plan.task, plan.row, plan.src_len, plan.tgt_len):
        s, g = batcher.tasks[t].splits["train"].read_rows([r])
        src.append(s[0, :ls_])
        tgt.append(g[0, :lt_])
    single = assemble(n, (LS, LT), Layout.one_per_row(n), src, tgt, plan.task)
    single = {"src": single["src"], "tgt_in": single["tgt_in"], "tgt_out": single["tgt_out"]}
    single["task"] = plan.task.astype(np.int32)  # the unpacked form: one task a row
    return packed, single, n


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_packed_loss_and_gradients_equal_one_example_a_row(kind):
    packed, single, n = batches()
    assert n > 4  # really packed: more examples than rows
    exp = experiment(kind, every=2)
    model = build.build_model(exp)
    graphdef, params = nnx.split(model, nnx.Param)

    def run(batch):
        def loss(p):
            _, m = loss_and_metrics(
                p, graphdef, batch, jax.random.key(0), LossWeights(0, 0), 2, False
            )
            return m["task_nll"].sum(), m

        return jax.value_and_grad(loss, has_aux=True)(params)

    (total_p, m_p), g_p = run(jax.tree.map(jnp.asarray, packed))
    (total_s, m_s), g_s = run(jax.tree.map(jnp.asarray, single))
    np.testing.assert_allclose(m_p["task_tokens"], m_s["task_tokens"])  # same real targets
    np.testing.assert_allclose(m_p["task_nll"], m_s["task_nll"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert float(total_p) > 0


def test_capacity_counts_the_real_tokens_of_a_group():
    """Padding takes no slot and adds none: with cf = 1, k = 1, E = 4 and 8 real tokens of a
    group of 32 positions, each expert has ceil(1 * 8 / 4) = 2 usable slots."""
    from moe.layers.moe import MoeBlock, MoeSpec

    spec = MoeSpec(num_experts=4, top_k=1, capacity_factor_eval=1.0)
    block = MoeBlock(8, 16, spec, causal=False, rngs=nnx.Rngs(0))
    block.router.w_gate[...] = jnp.zeros((8, 4)).at[:, 0].set(1.0)  # everyone wants expert 0
    x = jnp.ones((1, 32, 8))
    mask = jnp.arange(32)[None] < 8
    _, aux = block(x, train=False, token_mask=mask)
    assert float(aux.stats["capacity"]) == 2.0
    assert float(aux.stats["tokens_per_expert"][0]) == 2.0  # the other 6 are dropped
    assert float(aux.stats["dropped_fraction"]) == pytest.approx(6 / 8)
