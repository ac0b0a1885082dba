"""Sharded, atomic checkpoints with orbax (tensorstore underneath); exact resume.

The train state is saved as its flat list of leaves (each process writes its own shards) next to
a small JSON record (step, data position, the leaves' tree paths). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest loadable one. The tree structure on restore comes from the model
definition, which the resolved config reproduces exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _leaf_names(tree: Any) -> tuple[dict[str, Any], list[str]]:
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = {f"{i:05d}": leaf for i, (_, leaf) in enumerate(with_path)}
    return leaves, [jax.tree_util.keystr(path) for path, _ in with_path]


class Checkpointer:
    """``save(step, state, meta)``, ``latest_step()``, ``restore(step, abstract_state)``."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        leaves, names = _leaf_names(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave({**meta, "step": int(step), "leaves": names}),
        )
        self._mgr.save(int(step), args=args, force=True)
        self._mgr.wait_until_finished()

    def latest_step(self) -> int | None:
        self._mgr.reload()
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return list(self._mgr.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the structure (and shardings) of ``abstract_state``: a pytree of
        ``jax.ShapeDtypeStruct`` (with ``sharding``) such as ``jax.eval_shape`` gives."""
        target, names = _leaf_names(abstract_state)
        restored = self._mgr.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        meta = dict(restored["meta"])
        if meta.get("leaves") != names:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} was written for a different model "
                "(parameter tree differs from the config's)"
            )
        leaves = [restored["state"][k] for k in sorted(target)]
        treedef = jax.tree.structure(abstract_state)
        return jax.tree.unflatten(treedef, leaves), meta

    def close(self) -> None:
        self._mgr.close()
