"""MoE blocks for task pathways: routing by task alone, and capacity fixed across growth.

Two small extensions of :mod:`moe.layers.moe`, used by :mod:`moe.layers.transformer`:

- :class:`TaskRoutedMoeBlock` routes on a learned task embedding only (Task-MoE, Kudugunta et
  al. 2021 §3.1 "task-level" routing, ``G_{s,E} = GATE(task_id_s)``; lingvo ``TaskTop2Gating``,
  papers §6.2). Every token of a task has the same router input, so (in evaluation) the same
  experts: the task's sub-network is static and can be extracted.
- :class:`PathwayMoeSpec` computes the expert capacity as if the layer had
  ``capacity_experts`` experts. A grown model (more experts) or an extracted one (fewer) keeps
  its original capacity, so a task routed over the same experts drops the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax

from moe.layers.moe import MoeBlock, MoeSpec
from moe.routing.result import Routing
from moe.routing.token_choice import capacity as expert_capacity


@dataclasses.dataclass(frozen=True)
class PathwayMoeSpec(MoeSpec):
    """A :class:`MoeSpec` whose capacity is ``ceil(cf * k * T / capacity_experts)``.

    ``capacity_experts = 0`` means ``num_experts`` (the plain rule).
    """

    capacity_experts: int = 0

    def capacity(self, num_tokens: int, *, train: bool) -> int:
        cf = self.capacity_factor_train if train else self.capacity_factor_eval
        experts = self.capacity_experts or self.num_experts
        return expert_capacity(num_tokens, experts, self.choices_per_token(), cf)


class TaskRoutedMoeBlock(MoeBlock):
    """An :class:`MoeBlock` whose router sees only the task embedding.

    Called like ``MoeBlock`` with ``router_bias [B, S, d]`` holding each token's task embedding;
    here it *replaces* the token representation as the router input (``logits = e_task W``)
    instead of being added to it. The experts still process the tokens. Gradients reach the
    task embedding and the router through the combine weights. Parameters are those of
    ``MoeBlock`` (checkpoints are interchangeable).
    """

    def route(
        self,
        x_td: jax.Array,
        *,
        train: bool,
        rngs=None,
        token_mask: jax.Array | None = None,
        expert_mask: jax.Array | None = None,
        router_bias: jax.Array | None = None,
    ) -> Routing:
        """Route ``x_td [T, d]`` on ``router_bias [T, d]`` (the task embeddings) alone."""
        if router_bias is None:
            raise ValueError("a task-routed MoE block needs router_bias (the task embedding)")
        if router_bias.shape != x_td.shape:
            raise ValueError(f"router_bias {router_bias.shape} must match tokens {x_td.shape}")
        return super().route(
            router_bias,
            train=train,
            rngs=rngs,
            token_mask=token_mask,
            expert_mask=expert_mask,
            router_bias=None,
        )
