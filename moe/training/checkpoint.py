"""Sharded, atomic checkpoints with orbax (tensorstore underneath); exact resume.

The train state is saved as its flat list of leaves (each process writes its own shards) next to
a small JSON record (step, data position, the leaves' tree paths). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest loadable one. The tree structure on restore comes from the model
definition, which the resolved config reproduces exactly.

A checkpoint damaged on disk (a truncated data file or manifest, an empty step directory) is
skipped by :meth:`Checkpointer.restore_newest` for the newest one that restores, with one line
saying so; the damaged one is renamed ``damaged-<step>`` (kept for inspection, out of orbax's
sight). A checkpoint written for another model (the config changed) is a ``UserError``, found
from the saved metadata before orbax reads any array.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from moe.errors import UserError


class CheckpointMismatch(UserError):
    """The checkpoint holds a different model than the config describes."""


def _why(err: BaseException) -> str:
    """One short line for an exception from deep inside orbax/tensorstore."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


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
        handlers = {  # named up front: the saved metadata is readable before any restore
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} was written for a different model "
                "(parameter tree differs from the config's)"
            )
        leaves = [restored["state"][k] for k in sorted(target)]
        treedef = jax.tree.structure(abstract_state)
        return jax.tree.unflatten(treedef, leaves), meta

    def check_model(self, step: int, abstract_state: Any) -> None:
        """Raise :class:`CheckpointMismatch` when checkpoint ``step``'s saved metadata (leaf
        names and shapes) differs from ``abstract_state``'s; errors reading it (a damaged
        checkpoint) propagate as they are."""
        target, names = _leaf_names(abstract_state)
        meta = self._mgr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        where = f"checkpoint {self.directory / str(step)} was written for a different model"
        saved = meta["meta"].get("leaves")
        if saved != names:
            diff = next((f"{a} vs {b}" for a, b in zip(saved or [], names) if a != b), None)
            detail = diff or f"{len(saved or [])} arrays, the config's model has {len(names)}"
            raise CheckpointMismatch(f"{where} ({detail}); its config.yaml was changed?")
        shapes = self._mgr.item_metadata(int(step))["state"]
        for key, name in zip(sorted(target), names):
            have, want = tuple(getattr(shapes[key], "shape", ())), tuple(target[key].shape)
            if have != want:
                raise CheckpointMismatch(
                    f"{where} ({name} has shape {have} there, {want} in the config); "
                    "its config.yaml was changed?"
                )

    def restore_newest(
        self, abstract_state: Any, say: Callable[[str], None], *, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores (or of ``step``), None
        when there is none. Damaged newer ones are skipped with one line through ``say`` and
        renamed ``damaged-<step>`` (by the primary process); raises ``UserError`` when none
        restores or the checkpoints belong to another model."""
        steps = sorted(self.all_steps(), reverse=True) if step is None else [int(step)]
        failed: list[tuple[int, str]] = []
        for s in steps:
            try:
                self.check_model(s, abstract_state)
                state, meta = self.restore(s, abstract_state)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                failed.append((s, _why(err)))
                continue
            if failed:
                newest, why = failed[0]
                say(
                    f"moe: checkpoint step {newest} in {self.directory} is damaged ({why}); "
                    f"using step {s}" + (f" ({len(failed)} damaged)" if len(failed) > 1 else "")
                )
                self._set_aside([f for f, _ in failed])
            return s, state, meta
        if failed:
            newest, why = failed[0]
            raise UserError(f"no checkpoint in {self.directory} restores (step {newest}: {why})")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() != 0:
            return
        for s in steps:
            src, dst = self.directory / str(s), self.directory / f"damaged-{s}"
            if src.exists():
                shutil.rmtree(dst, ignore_errors=True)  # an older damaged copy of that step
                os.replace(src, dst)
        self._mgr.reload()

    def close(self) -> None:
        self._mgr.close()
