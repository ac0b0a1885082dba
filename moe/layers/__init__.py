"""Flax NNX modules. Parameters carry *logical* axis names (``out_sharding=('embed', 'mlp')``,
made by ``params.param``); ``moe.parallel.axes`` maps them onto mesh axes. Sharding is applied by
``moe.parallel`` and ``moe.training.sharding`` (parameters born sharded), never at variable
creation: every parameter is created with ``eager_sharding=False``."""
