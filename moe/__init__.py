"""moe: training sparsely-gated mixture-of-experts models on JAX."""

__version__ = "0.1.0"
