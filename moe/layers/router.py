"""The gating network of an MoE block: router weights -> float32 logits -> ``moe.routing``.

Selective precision (Switch §2.4): the router input is cast to float32 and the logits, softmax,
top-k and slot assignment all run in float32 whatever the model's compute dtype. Kernels are
replicated (logical axes ``('embed', None)``): every device needs every expert's logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.params import param
from moe.routing import expert_choice, hierarchical, noisy, token_choice
from moe.routing.result import Routing

ROUTERS = ("token_choice", "noisy", "expert_choice", "hierarchical")

# Logit of a masked (token, expert) pair. Finite rather than -inf: exp() still underflows to
# exactly 0 in float32 after the max-shift, but differences of two masked logits (the noisy
# router's load estimator compares against the (k+1)-th logit) stay 0 instead of NaN.
MASKED_LOGIT = -1e9

# Shazeer et al. 2017 t2t code: noise std = softplus(x W_noise) + noise_epsilon, epsilon 1e-2.
NOISE_EPSILON = 1e-2


class RouterBias(nnx.Variable):
    """A per-expert selection bias ``b [E]`` (float32): model state that is not a parameter.

    Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2): added to the router
    scores for the top-k selection only, moved after every training step against the step's
    load (``moe.routing.balance.bias_update``), never by the optimizer or gradients. It lives in
    the model state (``nnx.state(model, RouterBias)``), so the train state carries it beside the
    parameters and checkpoints save it. Replicated on every device.
    """


def _logits(x: jax.Array, w: jax.Array, blocks: tuple[int, ...] = ()) -> jax.Array:
    """``x [T, d] @ w [d, E]`` in float32; with expert ``blocks`` (a grown model's parent
    experts, then each growth's) one product per block, side by side: a wider kernel can
    change how the backend sums an old expert's column (XLA:CPU does at E = 64 -> 72), one
    product per block keeps the parent's numbers bit for bit."""
    w = w[...]
    dot = lambda w_: jnp.dot(x, w_, precision=jax.lax.Precision.HIGHEST)
    if len(blocks) <= 1:
        return dot(w)
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    return jnp.concatenate([dot(w[:, a : a + b]) for a, b in zip(starts, blocks)], axis=-1)


class Router(nnx.Module):
    """Router weights for one of ``ROUTERS``; ``__call__(x_td [T, d], ...) -> Routing``.

    Parameters (float32): ``w_gate [d, E]`` (normal, ``spec.router_init_std``); for ``noisy``
    also ``w_noise [d, E]`` (zeros, Shazeer App. A: "no signal and some noise" at init); for
    ``hierarchical`` ``w_primary [d, A]`` and ``w_gate [d, A * B]`` (the A secondary gates side
    by side, expert ``a * B + b``). With ``spec.selection_bias`` also ``bias``, a
    ``RouterBias [E]`` (zeros at init).
    """

    def __init__(self, d_model: int, spec, *, causal: bool, rngs: nnx.Rngs):
        if spec.router == "expert_choice":
            expert_choice.check_allowed(causal, "MoE block")
        self.spec = spec
        init = jax.nn.initializers.normal(spec.router_init_std)
        e = spec.num_experts
        axes = ("embed", None)
        self.w_gate = param(init(rngs.params(), (d_model, e)), axes)
        noisy_gate, two_level = spec.router == "noisy", spec.router == "hierarchical"
        self.w_noise = nnx.data(param(jnp.zeros((d_model, e)), axes) if noisy_gate else None)
        self.w_primary = nnx.data(
            param(init(rngs.params(), (d_model, spec.num_groups)), axes) if two_level else None
        )
        self.bias = nnx.data(
            RouterBias(jnp.zeros((e,), jnp.float32)) if spec.selection_bias else None
        )

    def __call__(
        self,
        x_td: jax.Array,
        *,
        capacity: int,
        train: bool,
        rngs: nnx.Rngs | None = None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
        capacity_limit: jax.Array | None = None,
        num_devices: int = 1,
    ) -> Routing:
        """Route ``x_td [T, d]`` with ``capacity`` slots per expert (``capacity_limit`` of them
        usable, when given: see ``moe.routing.token_choice.top_k``).

        ``token_mask bool[T]`` marks real tokens; ``expert_mask bool[T, E]`` False pairs get
        the logit ``MASKED_LOGIT`` (and the selection bias ``MASKED_LOGIT``, so no bias pulls a
        token to an expert it may not use); ``router_bias [T, d]`` is added to the router input;
        ``num_devices`` is the expert-axis size (device limit, fan-out).
        """
        spec = self.spec
        h = x_td.astype(jnp.float32)  # [T, d]
        if router_bias is not None:
            h = h + router_bias.astype(jnp.float32)
        if train and spec.jitter > 0.0:
            eps = spec.jitter
            h = h * jax.random.uniform(_key(rngs, "jitter"), h.shape, h.dtype, 1 - eps, 1 + eps)
        allowed = None
        if expert_mask is not None:
            allowed = expert_mask.astype(bool)  # [T, E]
            if token_mask is not None:  # padding is not routed anyway; keep its logits finite
                allowed = allowed | ~token_mask.astype(bool)[:, None]
        logits = _logits(h, self.w_gate, spec.expert_blocks)  # [T, E]
        if allowed is not None:
            logits = jnp.where(allowed, logits, MASKED_LOGIT)

        if spec.router == "token_choice":
            random = train and spec.second_expert_policy == "random" and spec.top_k > 1
            bias = None
            if self.bias is not None:
                bias = self.bias[...]  # [E]
                if allowed is not None:
                    bias = jnp.where(allowed, bias[None, :], MASKED_LOGIT)  # [T, E]
            return token_choice.top_k(
                logits,
                k=spec.top_k,
                capacity=capacity,
                score=spec.gate,
                bias=bias,
                device_limit=spec.device_limit,
                num_devices=num_devices,
                routed_scaling=spec.routed_scaling,
                renormalize=spec.renormalize,
                second_expert_policy="random" if random else "all",
                second_expert_threshold=spec.second_expert_threshold,
                batch_priority=spec.batch_priority,
                key=_key(rngs, "second expert") if random else None,
                token_mask=token_mask,
                capacity_limit=capacity_limit,
                blocks=spec.expert_blocks,
            )
        if spec.router == "noisy":
            noise = _logits(h, self.w_noise, spec.expert_blocks)  # [T, E]
            noise_std = jax.nn.softplus(noise) + NOISE_EPSILON
            return noisy.top_k(
                logits,
                noise_std,
                k=spec.top_k,
                capacity=capacity,
                key=_key(rngs, "noise") if train else None,
                train=train,
                token_mask=token_mask,
                capacity_limit=capacity_limit,
            )
        if spec.router == "expert_choice":
            return expert_choice.route(
                logits,
                capacity=capacity,
                token_mask=token_mask,
                capacity_limit=capacity_limit,
                blocks=spec.expert_blocks,
            )
        return self._hierarchical(h, logits, allowed, capacity, token_mask, capacity_limit)

    def _hierarchical(self, h, logits, allowed, capacity, token_mask, capacity_limit) -> Routing:
        a = self.spec.num_groups
        b = self.spec.num_experts // a
        primary = _logits(h, self.w_primary)  # [T, A]
        if allowed is not None:  # a group is open if any of its experts is
            primary = jnp.where(allowed.reshape(-1, a, b).any(-1), primary, MASKED_LOGIT)
        return hierarchical.top_k(
            primary,
            logits.reshape(-1, a, b),  # [T, A, B]
            k_primary=min(self.spec.top_k, a),
            k_secondary=min(self.spec.top_k, b),
            capacity=capacity,
            token_mask=token_mask,
            capacity_limit=capacity_limit,
        )


def _key(rngs: nnx.Rngs | None, what: str) -> jax.Array:
    if rngs is None:
        raise ValueError(f"the router's {what} in training needs rngs (a 'router' stream)")
    return rngs.router()
