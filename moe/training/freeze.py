"""Training part of a model: optimizer state and updates for the trainable rows alone.

A grown model (``moe grow``) trains its new experts, router columns and task embedding rows,
and freezes the rest. Freezing is finer than whole parameters: an expert bank ``w_in [E, d, f]``
holds frozen old experts and trainable new ones. :func:`train_only` wraps an optax optimizer so
that it sees a *view* of each parameter, its trainable rows gathered along one axis:

    leaf [E, d, f], rows (axis 0, index [8, 9, 10, 11]) -> view [4, d, f]
    inner optimizer state (Adam mu, nu, ...)            -> [4, d, f]: nothing for frozen rows
    inner updates [4, d, f] -> scattered into -0.0 everywhere else

A wholly frozen leaf has a zero-size view (``[0, 0, 0]``), so no optimizer state at all, and a
wholly trainable one is passed through. Gradient clipping inside the wrapped optimizer measures
the trainable gradients only. Frozen entries get the update ``-0.0``, and ``p + (-0.0) == p``
bit for bit for every float ``p`` (``+0.0 + -0.0 = +0.0``, ``-0.0 + -0.0 = -0.0``), so frozen
parameters stay bit-identical whatever the optimizer (weight decay included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Rows:
    """The trainable part of one parameter: ``index`` along ``axis`` (sorted, distinct)."""

    axis: int
    index: tuple[int, ...]


# select(path, shape) -> True (train the whole leaf), False (freeze it) or Rows.
Selector = Callable[[tuple, tuple[int, ...]], "bool | Rows"]


def _view_leaf(leaf, sel):
    if sel is True:
        return leaf
    if sel is False:
        return jnp.zeros((0,) * leaf.ndim, leaf.dtype)  # no state for a frozen leaf
    return jnp.take(leaf, jnp.asarray(sel.index, jnp.int32), axis=sel.axis)  # [.., n, ..]


def _unview_leaf(update, leaf, sel):
    if sel is True:
        return update
    out = jnp.full(leaf.shape, -0.0, leaf.dtype)  # p + (-0.0) == p bit for bit
    if sel is False:
        return out
    where = (slice(None),) * sel.axis + (jnp.asarray(sel.index, jnp.int32),)
    return out.at[where].set(update.astype(leaf.dtype))


def trainable_view(tree, select: Selector):
    """``tree`` with every leaf replaced by its trainable rows (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _view_leaf(leaf, select(path, leaf.shape)), tree
    )


def train_only(
    inner: optax.GradientTransformation, select: Selector
) -> optax.GradientTransformation:
    """``inner`` applied to the trainable rows chosen by ``select``; frozen entries get -0.0.

    ``select(path, shape)`` is called with each parameter's tree path and shape and returns
    True, False or :class:`Rows`. The state has the parameters' tree structure (views in place of
    leaves), so ``optax.tree_map_params`` (used to shard the state like the parameters) works.
    """

    def init(params):
        if not jax.tree.leaves(params):  # optax.tree_map_params probes with a leafless tree
            return inner.init(params)
        return inner.init(trainable_view(params, select))

    def update(updates, state, params=None):
        view_params = None if params is None else trainable_view(params, select)
        new, state = inner.update(trainable_view(updates, select), state, view_params)
        full = jax.tree_util.tree_map_with_path(
            lambda path, u, leaf: _unview_leaf(u, leaf, select(path, leaf.shape)), new, updates
        )
        return full, state

    return optax.GradientTransformation(init, update)


def path_names(path: tuple) -> tuple[str, ...]:
    """A tree path as plain names: ``('decoder', '1', 'ffn', 'experts', 'w_in')`` (a trailing
    ``value``, the ``nnx.Variable`` field, is dropped)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names[:-1] if names and names[-1] == "value" else names)
