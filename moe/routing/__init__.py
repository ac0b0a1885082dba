"""Routing: pure functions from router logits to an expert-major ``Routing`` (see result.py).

Use the modules by name: ``token_choice.top_k``, ``noisy.top_k``, ``expert_choice.route``,
``hierarchical.top_k``; losses in ``losses``; the shared slot filling in ``slots``.
"""

from moe.routing import (
    expert_choice,
    hierarchical,
    losses,
    noisy,
    slots,
    stats,
    token_choice,
)
from moe.routing.result import Routing

__all__ = [
    "Routing",
    "expert_choice",
    "hierarchical",
    "losses",
    "noisy",
    "slots",
    "stats",
    "token_choice",
]
