"""What serving a model costs: parameter bytes and decode speed, measured alike for every
model compared (``moe quantize`` writes them to ``serving.json``; ``scripts/bench_serving.py``
puts four models side by side).

Decode speed is generated tokens (up to and including eos) per second of wall time of
``Evaluator.decode_ids`` on the same source batch, after one untimed call per model (the
compile); the timed calls go round-robin over the models, so a change in machine load hits
them alike, and the median of the per-round rates is reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np

from moe.training.evaluation import Evaluator
from moe.training.freeze import path_names


def param_bytes(params: Any, *, experts_only: bool = False) -> int:
    """Bytes of the parameters as stored (int8 1, packed int4 1/2, float32 4 per value);
    ``experts_only``: the expert banks' leaves (``.../ffn/experts/...``) alone."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if experts_only and "experts" not in path_names(path):
            continue
        total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class DecodeRate:
    """Decode speed of one model on one batch. Tokens per second depends on how long the
    outputs are (the loop runs until the longest row ends); ``ms_per_step``, the time per
    decoder position, compares models whose outputs differ."""

    tokens_per_second: float  # median over rounds
    tokens: int  # generated per call
    steps: int  # decoder positions per call: the longest row's length
    seconds: tuple[float, ...]  # wall time of each timed call

    @property
    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.seconds) / max(self.steps, 1)


def generated_tokens(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Tokens each row of ``ids [N, L]`` holds up to and including its eos, ``int[N]``."""
    ids = np.asarray(ids)
    ended = np.cumsum(ids == eos_id, axis=1) - (ids == eos_id)  # eos seen before position
    return ((ids != 0) & (ended == 0)).sum(axis=1)


def decode_rates(
    models: dict[str, tuple[Evaluator, Any]],
    src: np.ndarray,
    task: int,
    *,
    eos_id: int,
    rounds: int = 3,
) -> dict[str, DecodeRate]:
    """Decode ``src int32[N, Ls]`` as task ``task`` with each ``name: (evaluator, params)``:
    one untimed call each, then ``rounds`` timed calls each, interleaved."""
    rows = {
        n: generated_tokens(ev.decode_ids(p, src, task), eos_id) for n, (ev, p) in models.items()
    }
    seconds: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, (ev, params) in models.items():
            start = time.perf_counter()
            ev.decode_ids(params, src, task)  # returns host arrays: the work is done
            seconds[name].append(time.perf_counter() - start)
    return {
        n: DecodeRate(
            statistics.median(int(rows[n].sum()) / max(s, 1e-9) for s in seconds[n]),
            int(rows[n].sum()),
            int(rows[n].max(initial=0)),
            tuple(seconds[n]),
        )
        for n in models
    }
