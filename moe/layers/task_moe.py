"""An MoE block for task pathways: routing by task alone.

:class:`TaskRoutedMoeBlock` routes on a learned task embedding only (Task-MoE, Kudugunta et
al. 2021 §3.1 "task-level" routing, ``G_{s,E} = GATE(task_id_s)``; lingvo ``TaskTop2Gating``,
papers §6.2). Every token of a task has the same router input, so (in evaluation) the same
experts: the task's sub-network is static and can be extracted. (A grown or extracted model
keeps its original capacity through ``MoeSpec.capacity_experts``.)
"""

from __future__ import annotations

import jax

from moe.layers.moe import MoeBlock
from moe.routing.result import Routing


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
        num_devices: int | None = None,
        previous_first: jax.Array | None = None,
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
            num_devices=num_devices,
            previous_first=previous_first,
        )
