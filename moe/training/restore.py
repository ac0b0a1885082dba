"""A trained run brought back: its config, placement and the parameters of a checkpoint.

Used by ``moe eval``, ``moe extract`` and ``moe grow`` (and the tools of later issues that
start from a trained run). The tree structure comes from the resolved config (the model
definition), the values from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from flax import nnx

from moe import config as cfg
from moe.errors import UserError
from moe.training.checkpoint import Checkpointer
from moe.training.sharding import Placement


@dataclasses.dataclass
class Restored:
    """A trained model: its config, mesh placement, structure and parameters (on devices)."""

    exp: cfg.Experiment
    placement: Placement  # its graphdef is the model's structure
    params: Any  # nnx.State of the model's nnx.Param leaves
    step: int
    router_bias: Any = None  # nnx.State of its RouterBias leaves (empty: none)

    @property
    def model_state(self) -> Any:
        """Parameters and router biases: what ``nnx.merge(placement.graphdef, ...)`` takes."""
        if self.router_bias is None:
            return self.params
        return nnx.merge_state(self.params, self.router_bias)


def run_config(run_dir: Path) -> cfg.Experiment:
    """The resolved config of a run directory."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    return cfg.load(Path(run_dir) / "config.yaml")


def restore(run_dir: Path, step: int | None = None, say=None) -> Restored:
    """The parameters of ``run_dir``'s latest (or ``step``) checkpoint, placed on its mesh.
    A damaged latest checkpoint gives way to the newest that restores (one line to ``say``,
    stderr by default); one written for another model is a ``UserError``."""
    run_dir = Path(run_dir)
    exp = run_config(run_dir)
    placement = Placement.for_experiment(exp)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep)
    steps = ckpt.all_steps()
    if not steps:
        raise UserError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    if step is not None and step not in steps:
        raise UserError(f"{run_dir / 'checkpoints'} has no step {step} (has {steps})")
    say = say or (lambda line: print(line, file=sys.stderr))
    step, state, _ = ckpt.restore_newest(placement.abstract_state, say, step=step)
    ckpt.close()
    return Restored(exp, placement, state.params, step, state.router_bias)
