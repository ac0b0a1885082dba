"""The sparsely-gated MoE block: router -> ``moe.routing`` -> dispatch -> experts -> combine.

    y_t = sum_e G(x_t)_e FFN_e(x_t)            (Shazeer et al. 2017 eq. 1; GShard §2.2 eq. 1)

over the ``T = B * S`` tokens of a batch, routed together as one group. Data flow, and where
expert parallelism (``moe.parallel.expert_parallel``) cuts in::

    x [B, S, d] -> x_td [T, d] --router (float32)--> logits [T, E] --routing.*--> Routing
    dispatch(x_td, slot_token)            -> [E, C, d]   gather by index, empty slot -> 0
        (expert parallelism: all_to_all   -> [E / EP, EP * C, d])
    experts.apply_experts(...)            -> [E, C, d]   batched matmuls in the compute dtype
        (expert parallelism: all_to_all back)
    combine(y_ecd, slot_token, slot_weight, T) -> [T, d] weighted scatter-add in float32

Nothing here builds a ``[T, E, C]`` one-hot tensor (GShard Algorithm 2's dispatch/combine
einsums cost ``O(T * E * C * d)``, see ``scripts/bench_moe.py``); dispatch is a gather whose
backward is a scatter-add of ``E * C`` rows, combine a scatter-add whose backward is a gather.
A dropped token gets 0 from the block and passes through the residual connection.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.dense import DenseFFN
from moe.layers.experts import ExpertBank
from moe.layers.router import ROUTERS, Router
from moe.parallel import expert_parallel
from moe.routing.result import Routing
from moe.routing.token_choice import capacity as expert_capacity


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """What an MoE block needs to know (built from the experiment in ``moe.training.build``).

    Attributes:
      num_experts: E.
      top_k: experts per token (token choice, noisy); per level for ``hierarchical`` (Shazeer
        App. B uses k = 2 at each level, so a token uses ``top_k ** 2`` experts); expert choice
        gets the same number of slots as top-k token choice (``k * cf`` experts per token on
        average, compute-matched as in Zhou et al. 2022).
      router: 'token_choice' | 'noisy' | 'expert_choice' | 'hierarchical'.
      capacity_factor_train, capacity_factor_eval: ``C = ceil(cf * k * T / E)``; ``<= 0``
        means dropless (ST-MoE §5: 1.25 train, 2.0 eval).
      renormalize, second_expert_policy, second_expert_threshold, batch_priority: token-choice
        options (``moe.routing.token_choice.top_k``); the random second-expert policy applies in
        training only (evaluation keeps every second choice, deterministic).
      jitter: multiplicative router-input jitter ``x * U(1 - eps, 1 + eps)`` in training (ST-MoE
        §3.2, Mesh-TF ``multiplicative_jitter``; eps = 1e-2 there); 0 = off.
      num_groups: A, primary groups of the hierarchical router (``E = A * B``).
      expert_dropout: dropout on the experts' hidden activation (Switch §2.4: 0.4 fine-tuning).
      shared_expert: a dense FFN (width d_ff) beside the routed experts, added to their output
        (ST-MoE §5, "add a dense FFN next to each sparse layer").
      router_init_std: normal init std of the router kernel (flaxformer 2e-2, papers §3.4).
      activation: 'gelu' | 'relu' for the experts and the shared expert.
    """

    num_experts: int
    top_k: int = 2
    router: str = "token_choice"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    renormalize: bool = True
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2
    batch_priority: bool = False
    jitter: float = 0.0
    num_groups: int = 0
    expert_dropout: float = 0.0
    shared_expert: bool = False
    router_init_std: float = 0.02
    activation: str = "gelu"

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {ROUTERS}")
        if self.num_experts < 1 or self.top_k < 1:
            raise ValueError(f"num_experts={self.num_experts} and top_k={self.top_k} must be >= 1")
        if self.router != "hierarchical" and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router == "hierarchical" and (
            self.num_groups < 1 or self.num_experts % self.num_groups
        ):
            raise ValueError(
                f"router='hierarchical' needs num_groups >= 1 dividing num_experts="
                f"{self.num_experts}; got num_groups={self.num_groups}"
            )

    def choices_per_token(self) -> int:
        """Expert choices each token makes: ``k``, or ``min(k, A) * min(k, B)`` hierarchical."""
        if self.router == "hierarchical":
            a = self.num_groups
            return min(self.top_k, a) * min(self.top_k, self.num_experts // a)
        return self.top_k

    def capacity(self, num_tokens: int, *, train: bool) -> int:
        """Slots per expert for ``num_tokens`` tokens routed together (``T`` when dropless)."""
        cf = self.capacity_factor_train if train else self.capacity_factor_eval
        return expert_capacity(num_tokens, self.num_experts, self.choices_per_token(), cf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoeAux:
    """What an MoE block reports besides its output.

    Attributes:
      aux_loss: float32 scalar, the router's balancing loss, unweighted.
      z_loss: float32 scalar, the router z-loss (ST-MoE eq. 5), unweighted.
      stats: dict of float32 arrays for monitoring (the router's, see ``moe.routing.stats``,
        plus ``capacity``).
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    stats: dict[str, jax.Array]


def dispatch(x_td: jax.Array, slot_token: jax.Array) -> jax.Array:
    """Gather each slot's token: ``x_td [T, d], slot_token int[E, C] -> [E, C, d]``.

    Empty slots (-1) get zeros. The backward pass is a scatter-add of the ``E * C`` rows.
    """
    num_tokens = x_td.shape[0]
    index = jnp.where(slot_token < 0, num_tokens, slot_token)  # -1 -> out of bounds -> 0
    return jnp.take(x_td, index, axis=0, mode="fill", fill_value=0)  # [E, C, d]


def combine(
    y_ecd: jax.Array, slot_token: jax.Array, slot_weight: jax.Array, num_tokens: int
) -> jax.Array:
    """Weighted scatter-add of expert outputs back onto tokens, in float32.

    ``y_t = sum_{(e, c): slot_token[e, c] = t} slot_weight[e, c] * y_ecd[e, c]``; tokens in no
    slot get 0. ``y_ecd [E, C, d]``, ``slot_token int[E, C]``, ``slot_weight [E, C]`` ->
    ``float32[T, d]``. Gradients reach ``slot_weight`` (so the router) and ``y_ecd``; the
    backward pass is two gathers of ``g[slot_token]``.
    """
    d = y_ecd.shape[-1]
    index = jnp.where(slot_token < 0, num_tokens, slot_token).reshape(-1)  # [E*C]
    rows = y_ecd.astype(jnp.float32) * slot_weight.astype(jnp.float32)[..., None]  # [E, C, d]
    out = jnp.zeros((num_tokens, d), jnp.float32)
    return out.at[index].add(rows.reshape(-1, d), mode="drop")  # [T, d]


def restrict_to_allowed(routing: Routing, allowed_te: jax.Array) -> Routing:
    """Empty every slot whose token may not use its expert (``allowed_te bool[T, E]``).

    The router already sees masked logits, but a token with fewer than ``k`` allowed experts, or
    an expert choosing among too few allowed tokens, would still fill a slot at gate 0; this
    makes "no masked expert receives a token" hold exactly.
    """
    slot_token = routing.slot_token
    num_experts = slot_token.shape[0]
    experts = jnp.arange(num_experts)[:, None]  # [E, 1]
    ok = (slot_token >= 0) & allowed_te[jnp.maximum(slot_token, 0), experts]  # [E, C]
    return dataclasses.replace(
        routing,
        slot_token=jnp.where(ok, slot_token, -1),
        slot_weight=jnp.where(ok, routing.slot_weight, 0.0),
    )


class MoeBlock(nnx.Module):
    """A feed-forward layer made of ``spec.num_experts`` experts and a router.

    ``__call__(x [B, S, d], *, train, rngs=None, token_mask=None, expert_mask=None,
    router_bias=None) -> (y [B, S, d] in x.dtype, MoeAux)``; ``y`` is the block's contribution
    (the caller adds the residual), exactly 0 for a token that no expert took.

    Precision: router logits, routing, losses and the combine run in float32 from float32
    inputs (Switch §2.4 selective precision); the experts run in ``dtype``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        spec: MoeSpec,
        *,
        causal: bool,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.dtype = dtype
        self.router = Router(d_model, spec, causal=causal, rngs=rngs)
        self.experts = ExpertBank(
            spec.num_experts,
            d_model,
            d_ff,
            activation=spec.activation,
            dropout=spec.expert_dropout,
            dtype=dtype,
            rngs=rngs,
        )
        self.shared = (
            DenseFFN(d_model, d_ff, activation=spec.activation, dtype=dtype, rngs=rngs)
            if spec.shared_expert
            else None
        )

    def route(
        self,
        x_td: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
    ) -> Routing:
        """The block's routing of flattened tokens ``x_td [T, d]`` (masks and bias flattened
        to ``[T]``, ``[T, E]``, ``[T, d]``); a masked expert holds none of its masked tokens."""
        routing = self.router(
            x_td,
            capacity=self.spec.capacity(x_td.shape[0], train=train),
            train=train,
            rngs=rngs,
            token_mask=token_mask,
            expert_mask=expert_mask,
            router_bias=router_bias,
        )
        if expert_mask is not None:
            routing = restrict_to_allowed(routing, expert_mask.astype(bool))
        return routing

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux]:
        """Args:
        x: [B, S, d] token representations.
        train: training mode (jitter, noise, random second expert, expert dropout, and the
          training capacity factor).
        rngs: ``router`` stream (jitter, noise, random policy) and ``dropout`` stream.
        token_mask: optional bool[B, S]; False (padding) tokens are not routed (output 0).
        expert_mask: optional bool[B, S, E]; False keeps a token away from an expert
          (task pathways): its router logit is masked and it gets no slot there.
        router_bias: optional [B, S, d] (a task embedding) added to the router input only.
        """
        batch, seq, d = x.shape
        num_tokens = batch * seq
        x_td = x.reshape(num_tokens, d)  # [T, d]
        mesh = expert_parallel.expert_mesh()
        if expert_parallel.can_exchange(mesh, batch, self.spec.num_experts):
            # Expert parallelism: each (data, expert) device routes its own rows as one group
            # and the [E, C, d] buffers travel by all_to_all (moe.parallel.expert_parallel).
            y_td, aux = expert_parallel.block_exchange(
                self,
                x,
                mesh,
                train=train,
                rngs=rngs,
                token_mask=token_mask,
                expert_mask=expert_mask,
                router_bias=router_bias,
            )
        else:
            y_td, aux = self._local(x_td, train, rngs, token_mask, expert_mask, router_bias)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td, train=train, rngs=rngs).astype(jnp.float32)
        return y_td.reshape(batch, seq, d).astype(x.dtype), aux

    def _local(self, x_td, train, rngs, token_mask, expert_mask, router_bias):
        """All tokens as one routing group on this program's devices -> (y_td [T, d], aux)."""
        num_tokens = x_td.shape[0]
        flat = lambda a: None if a is None else a.reshape(num_tokens, *a.shape[2:])
        routing = self.route(
            x_td,
            train=train,
            rngs=rngs,
            token_mask=flat(token_mask),
            expert_mask=flat(expert_mask),
            router_bias=flat(router_bias),
        )
        buffers = dispatch(x_td, routing.slot_token).astype(self.dtype)  # [E, C, d]
        y_ecd = self.experts(buffers, train=train, rngs=rngs)  # [E, C, d]
        y_td = combine(y_ecd, routing.slot_token, routing.slot_weight, num_tokens)  # [T, d]
        stats = {**routing.stats, "capacity": jnp.float32(routing.capacity)}
        return y_td, MoeAux(aux_loss=routing.aux_loss, z_loss=routing.z_loss, stats=stats)
