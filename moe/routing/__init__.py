"""Routing: pure functions from router logits to an expert-major ``Routing`` (see result.py).

Use the modules by name: ``token_choice.top_k``, ``noisy.top_k``, ``expert_choice.route``,
``hierarchical.top_k``; losses in ``losses``; the shared slot filling in ``slots``; moving
tokens into expert buffers and back in ``dispatch``.
"""
