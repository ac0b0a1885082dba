"""The routing contract shared by every router and the MoE block (see docs/ARCHITECTURE.md).

Routing is *expert-major*: for each expert ``e`` and each of its ``C`` capacity slots, which token
fills the slot and with what combine weight. Token choice and expert choice both produce this
form, so the MoE block has one dispatch path: gather ``x[slot_token]`` into ``[E, C, d]`` buffers,
run the experts, scatter-add ``slot_weight * y`` back onto the tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Result of a routing function.

    Attributes:
      slot_token: int32[E, C]; the token index (into the flattened ``[T]`` tokens) that fills slot
        ``c`` of expert ``e``, or -1 when the slot is empty.
      slot_weight: float32[E, C]; the combine weight of that token for that expert (0 for an
        empty slot). Gradients reach the router through these weights.
      aux_loss: float32 scalar; the router's load-balancing loss, *unweighted* (the weight lives
        in the config). 0 for routers that need none (expert choice).
      z_loss: float32 scalar; the router z-loss (ST-MoE eq. 5), unweighted.
      stats: dict of float32 arrays for monitoring (never differentiated through), e.g.
        ``dropped_fraction`` (scalar), ``expert_load`` ([E], fraction of routed choices per expert),
        ``router_confidence`` (scalar), ``tokens_per_expert`` ([E]).
    """

    slot_token: jax.Array
    slot_weight: jax.Array
    aux_loss: jax.Array
    z_loss: jax.Array
    stats: dict[str, jax.Array]

    @property
    def num_experts(self) -> int:
        return self.slot_token.shape[0]

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[1]

    def aux(self) -> RoutingAux:
        """The losses and statistics, with ``capacity`` (slots per expert) in the stats."""
        stats = {"capacity": jnp.float32(self.capacity), **self.stats}  # a router's own wins
        return RoutingAux(aux_loss=self.aux_loss, z_loss=self.z_loss, stats=stats)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingAux:
    """What an MoE layer reports besides its output: a ``Routing`` without its slots.

    Under expert parallelism each device's tokens are one routing group, and these are the
    means over the groups (``moe.parallel.expert_parallel``).

    Attributes:
      aux_loss: float32 scalar, the router's balancing loss, unweighted.
      z_loss: float32 scalar, the router z-loss (ST-MoE eq. 5), unweighted.
      stats: dict of float32 arrays for monitoring (the router's, see ``moe.routing.stats``,
        plus ``capacity``, slots per expert per group). Stats named ``token_*`` (``PER_TOKEN``)
        are per token (``[T, ...]`` in a group, ``[B, S, ...]`` out of the block), never
        averaged: the exchange returns them like the tokens (``moe.routing.coactivation``).
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    stats: dict[str, jax.Array]

    def split_per_token(self) -> tuple[RoutingAux, dict[str, jax.Array]]:
        """``(self without the per-token stats, {name: per-token stat})``."""
        per_token = {k: v for k, v in self.stats.items() if k.startswith(PER_TOKEN)}
        rest = {k: v for k, v in self.stats.items() if k not in per_token}
        return RoutingAux(self.aux_loss, self.z_loss, rest), per_token


PER_TOKEN = "token_"
