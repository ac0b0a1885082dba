"""The one place where the experiment config becomes model and optimizer objects."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from moe.config import Experiment
from moe.layers.moe import MoeSpec
from moe.layers.transformer import Transformer, TransformerSpec
from moe.training import pathway_spec, sign_optimizers
from moe.training.freeze import train_only


def moe_spec(exp: Experiment, layer: str, routing_stats: bool = False) -> MoeSpec:
    """The MoE spec of MoE layer ``layer`` ('encoder/1'); ``routing_stats``: evaluation's
    co-activation counts (``MoeSpec.routing_stats``).

    Routing groups are per device: under a mesh each ``(data, expert)`` device routes its own
    rows (GShard local dispatch; ``config`` checks that the batch sizes divide). Task-routed
    layers are dropless: every token of a task goes to the same k experts, so a capacity
    would drop most of a one-task batch. Batch-prioritised routing reorders by confidence across
    the batch, which leaks future tokens in a causal decoder (ST-MoE §5): encoder only.
    """
    m = exp.moe
    stack = layer.split("/")[0]
    dropless = getattr(m.routing_input, stack) == "task"
    return MoeSpec(
        num_experts=exp.experts_in(layer),
        top_k=m.top_k,
        router=m.router_of(stack),
        capacity_factor_train=0.0 if dropless else m.capacity_factor_train,
        capacity_factor_eval=0.0 if dropless else m.capacity_factor_eval,
        renormalize=m.renormalize,
        second_expert_policy=m.second_expert_policy,
        second_expert_threshold=m.second_expert_threshold,
        batch_priority=m.batch_priority and stack == "encoder",
        jitter=m.jitter,
        num_groups=m.num_groups,
        expert_dropout=m.expert_dropout,
        expert_d_ff=m.expert_d_ff or 0,
        num_shared_experts=m.num_shared_experts,
        gate=m.gate,
        routed_scaling=m.routed_scaling,
        selection_bias=m.bias_balance_rate > 0,
        device_limit=m.device_limit,
        expert_devices=exp.mesh_shape.get("expert", 1),
        router_init_std=m.router_init_std,
        activation=exp.model.activation,
        routing_groups="device",
        capacity_experts=m.capacity_experts or 0,
        expert_blocks=exp.expert_blocks(layer),
        weight_bits=exp.model.weight_bits,
        routing_stats=routing_stats,
    )


def transformer_spec(exp: Experiment, routing_stats: bool = False) -> TransformerSpec:
    m, moe = exp.model, exp.moe
    return TransformerSpec(
        kind=m.kind,
        vocab_size=m.vocab_size,
        d_model=m.d_model,
        num_heads=m.num_heads,
        encoder_layers=m.encoder_layers if m.kind == "encoder_decoder" else 0,
        decoder_layers=m.decoder_layers,
        d_ff=m.d_ff,
        dropout=m.dropout,
        activation=m.activation,
        moe_layers=tuple((layer, moe_spec(exp, layer, routing_stats)) for layer in exp.moe_layers),
        dtype=exp.train.precision,
        num_tasks=len(exp.tasks),
        routing_input=(moe.routing_input.encoder, moe.routing_input.decoder),
        pathways=tuple(sorted(pathway_spec.masks(exp).items())),
        dense_weight_bits=m.weight_bits if m.quantize_dense else 0,
    )


def build_model(
    exp: Experiment, seed: int | None = None, routing_stats: bool = False
) -> Transformer:
    return Transformer(
        transformer_spec(exp, routing_stats),
        rngs=nnx.Rngs(exp.train.seed if seed is None else seed),
    )


def learning_rate(exp: Experiment) -> optax.Schedule:
    t = exp.train
    warm = max(t.warmup_steps, 1)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, warmup_steps=warm, decay_steps=max(t.steps, warm + 1)
        )
    if t.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, t.learning_rate, warm),
                optax.constant_schedule(t.learning_rate),
            ],
            [warm],
        )

    def inverse_sqrt(step):  # linear warm-up, then lr * sqrt(warmup / step) (Vaswani et al.)
        s = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
        return t.learning_rate * jnp.minimum(s / warm, jnp.sqrt(warm / s))

    return inverse_sqrt


def build_optimizer(exp: Experiment) -> optax.GradientTransformation:
    """optax chain: clip -> optimizer with the schedule.

    Freezing: with frozen tasks in ``exp`` (a grown model), only the rows the unfrozen tasks
    own train (``pathway_spec.selector``; ``freeze.train_only``: no optimizer state and bit-exact
    zero updates for the rest, clipping over the trainable gradients)."""
    if exp.model.weight_bits:  # a quantised model (moe quantize) is for inference: no state
        return optax.identity()
    t = exp.train
    lr = learning_rate(exp)
    if t.optimizer == "adam":
        opt = optax.adam(lr, b1=0.9, b2=0.98, eps=1e-9)
    elif t.optimizer == "adamw":
        opt = optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-9, weight_decay=t.weight_decay)
    elif t.optimizer in ("powersign", "addsign"):
        opt = sign_optimizer(exp, lr)
    else:
        opt = optax.adafactor(lr, clipping_threshold=1.0, multiply_by_parameter_scale=False)
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    chain = optax.chain(*parts, opt)
    select = pathway_spec.selector(exp)
    if select is None:
        return chain
    abstract = nnx.split(nnx.eval_shape(lambda: build_model(exp)), nnx.Param, ...)[1]
    return train_only(chain, select, abstract)


def sign_optimizer(exp: Experiment, lr: optax.Schedule) -> optax.GradientTransformation:
    """PowerSign or AddSign (``train.optimizer``) with the ``train.sign_*`` settings."""
    t = exp.train
    decay = None
    if t.sign_decay != "constant":
        steps = t.sign_decay_steps or t.steps
        decay = sign_optimizers.sign_decay(t.sign_decay, steps, t.sign_decay_periods)
    alpha = sign_optimizers.DEFAULT_ALPHA[t.optimizer] if t.sign_alpha is None else t.sign_alpha
    make = sign_optimizers.power_sign if t.optimizer == "powersign" else sign_optimizers.add_sign
    return make(lr, alpha=alpha, beta=t.sign_beta, decay=decay)
