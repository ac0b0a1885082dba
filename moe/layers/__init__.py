"""Flax NNX modules. Parameters carry *logical* axis names (``out_sharding=('embed', 'mlp')``);
``moe.parallel.axes`` maps them onto mesh axes. Sharding is applied by ``moe.parallel``, not at
variable creation, so Flax's eager variable sharding is turned off here."""

import flax

flax.config.update("flax_always_shard_variable", False)
